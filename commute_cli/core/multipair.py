"""Several disjoint pairs shifted in one window (K >= 4), and error bars of sums of correlated predictions.

Pure numpy. The use case is ``commands/recommend.py``; the math is docs/MATH.md "Several pairs in one
window".

``EL(d) = dt^2 sum C o M`` with ``C[a, b] = wbar_a d_b - d_a wbar_b`` *linear* in ``d``, and the
second-order change of the target has no term quadratic in ``d`` (the ``DG G`` terms of the two halves
cancel, MATH.md), so the shift ``d = d_1 + d_2`` of two disjoint pairs predicts ``EL(d_1) + EL(d_2)`` with
no cross term at order ``dt^2``; the cross terms start at ``dt^3``, the order of the expansion's own
remainder. The same identity holds block by block: the per-block values (or jackknife pseudo-values) of
the total are the sums of the pairs' per-block values, so

    SE(total) = sd_b( sum_p x[b, p] ) / sqrt(B)

includes every covariance between the pairs' estimates (all pairs are estimated on the same samples),
whereas ``sqrt(sum_p SE_p^2)`` assumes them independent and ``sum_p SE_p`` assumes them perfectly
correlated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from commute_cli.core.criterion import two_domain_excess
from commute_cli.core.regime import CheckpointStats, el_scale, parse_targets
from commute_cli.core.shifts import Shift, Skipped
from commute_cli.errors import CommuteError

MAX_ENUMERATED_DOMAINS = 10
"""Up to this many domains every disjoint set of pairs is tried (9496 sets for K = 10); above, a greedy
search (:func:`greedy_matching`)."""


def block_total(values: np.ndarray) -> tuple[float, float]:
    """Mean and SE (``sd / sqrt(B)``, ``ddof = 1``) of ``[B, ...]`` per-block values summed over the other
    axes: the estimate of a sum of predictions and its standard error, covariances included."""
    x = np.asarray(values, dtype=np.float64)
    total = x.reshape(x.shape[0], -1).sum(axis=1)
    B = total.shape[0]
    se = float(total.std(ddof=1) / math.sqrt(B)) if B > 1 else math.nan
    return float(total.mean()), se


def row_blocks(M: np.ndarray, wbar: np.ndarray, names: Sequence[str], row: Mapping[str, Any]) -> np.ndarray:
    """``[B]`` per-block values of a ``results.csv`` row's ``el_ij`` (at its ``dw`` and ``dt``) from the
    ``[B, K, K]`` interaction matrices of its target: the numbers whose mean and ``sd / sqrt(B)`` are the
    row's ``el_ij`` and ``el_se`` (``core.regime.predict_pair``)."""
    i, j = list(names).index(str(row["domain_i"])), list(names).index(str(row["domain_j"]))
    return np.asarray(two_domain_excess(M, wbar, i, j, float(row["dw"]), float(row["dt"])), dtype=np.float64)


def step_blocks(
    stats: CheckpointStats, wbar: np.ndarray, names: Sequence[str], rows: Sequence[dict]
) -> dict[tuple[str, str, str], np.ndarray] | None:
    """Per-block values of every row of one step (``(target, domain_i, domain_j)`` -> ``[B]``), from the
    step's cached statistics. Each must reproduce its row's ``el_ij`` and ``el_se`` (to 1e-6 of their
    size): None when one does not (statistics of another analysis) or the domains differ. A target whose
    interaction the statistics lack (target plan) has no entry."""
    if stats.n_domains != len(names):
        return None
    out: dict[tuple[str, str, str], np.ndarray] = {}
    matrices: dict[str, np.ndarray | None] = {}
    for row in rows:
        name = str(row["target"])
        if name not in matrices:
            try:
                (target,) = parse_targets([name], names)
                matrices[name] = stats.interaction(target.coefs_at(wbar))
            except (CommuteError, KeyError, ValueError):
                matrices[name] = None
        M = matrices[name]
        if M is None:
            continue
        x = row_blocks(M, wbar, names, row)
        mean, se = block_total(x[:, None])
        el, el_se = float(row["el_ij"]), float(row["el_se"])
        tol = 1e-6 * (abs(el) + abs(el_se)) + 1e-300
        if not (abs(mean - el) <= tol and abs(se - el_se) <= tol):
            return None
        out[(name, str(row["domain_i"]), str(row["domain_j"]))] = x
    return out


def shift_blocks(
    el_blocks: np.ndarray, row: Mapping[str, Any], earlier: str, delta: float, window: float
) -> np.ndarray:
    """Per-block values of a row rescaled to a shift (``earlier`` +delta first) and window: the one
    rescaling law (``core.regime.el_scale``), the sign flipped when ``domain_j`` is the earlier one."""
    sign = 1.0 if earlier == str(row["domain_i"]) else -1.0
    return sign * el_blocks * el_scale(float(row["dw"]), float(row["horizon"]), delta, float(window))


def independent_se(values: np.ndarray) -> float:
    """``sqrt(sum_p SE_p^2)`` of the columns of ``[B, P]`` values: the SE of their sum *if* they were
    independent (for comparison only; wrong when they share samples)."""
    x = np.asarray(values, dtype=np.float64).reshape(np.shape(values)[0], -1)
    B = x.shape[0]
    return float(math.sqrt(float(np.sum(x.var(axis=0, ddof=1))) / B))


def disjoint_sets(pairs: Sequence[tuple[int, int]], min_size: int = 1) -> Iterator[tuple[int, ...]]:
    """Every set of pairwise-disjoint pairs (indices into ``pairs``, ascending) of at least ``min_size``
    pairs: no domain is in two pairs of a set."""

    def grow(start: int, used: frozenset[int], chosen: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        if len(chosen) >= min_size:
            yield chosen
        for p in range(start, len(pairs)):
            a, b = pairs[p]
            if a not in used and b not in used:
                yield from grow(p + 1, used | {a, b}, (*chosen, p))

    for chosen in grow(0, frozenset(), ()):
        if chosen:
            yield chosen


@dataclass(frozen=True)
class PairSet:
    """A set of disjoint pairs shifted together in one window of ``window`` steps each side.

    ``change`` and ``se`` are the total predicted change of the target and its SE from the per-block sums;
    ``parts``/``part_se`` each pair's own; ``independent_se`` what adding the variances would say;
    ``gain_lo`` the lower confidence bound of the gain ``-change``: ``-change - t_crit x se``.
    """

    chosen: tuple[int, ...]
    window: int
    change: float
    se: float
    parts: tuple[float, ...]
    part_se: tuple[float, ...]
    independent_se: float
    gain_lo: float
    t_crit: float


def evaluate_set(
    chosen: Sequence[int],
    unit_blocks: np.ndarray,
    limits: Sequence[int],
    rates: Sequence[float],
    max_ratio: float,
    t_crit: float,
) -> PairSet | None:
    """Shift the pairs ``chosen`` together: the common window and the total's estimate, SE and bound.

    Args:
        unit_blocks: ``[B, P]`` per-block predicted change of the target for each candidate pair at its own
            shift and a window of one step (``EL ∝ h^2``, so at window ``h`` the values are ``h^2`` times).
        limits: each pair's largest window on its own (geometry, schedule, its regime bound).
        rates: each pair's regime ratio per step of window (``ratio(h) = rate x h``); the total's ratio is
            the sum (every chosen pair lowers the target, so the ``|EL|`` add), so the common window is at
            most ``max_ratio / sum(rates)``.
    Returns None when not even one step fits.
    """
    idx = list(chosen)
    h = min(int(limits[p]) for p in idx)
    rate = math.fsum(max(0.0, float(rates[p])) for p in idx)
    if rate > 0:
        h = min(h, math.floor(max_ratio / rate * (1 + 1e-12)))
    if h < 1:
        return None
    x = np.asarray(unit_blocks, dtype=np.float64)[:, idx] * float(h) ** 2
    change, se = block_total(x)
    B = x.shape[0]
    parts = tuple(float(v) for v in x.mean(axis=0))
    part_se = tuple(float(v) for v in x.std(axis=0, ddof=1) / math.sqrt(B))
    return PairSet(
        tuple(idx), h, change, se, parts, part_se, independent_se(x), -change - t_crit * se, t_crit
    )


def greedy_matching(
    pairs: Sequence[tuple[int, int]],
    unit_blocks: np.ndarray,
    limits: Sequence[int],
    rates: Sequence[float],
    max_ratio: float,
    t_crit: float,
) -> PairSet | None:
    """Start from the pair with the largest ``gain_lo`` and add the disjoint pair that raises it most, while
    one does (for many domains, where enumerating every disjoint set is too slow)."""
    best: PairSet | None = None
    chosen: tuple[int, ...] = ()
    while True:
        used = {d for p in chosen for d in pairs[p]}
        step_best = best
        for p in range(len(pairs)):
            if p in chosen or pairs[p][0] in used or pairs[p][1] in used:
                continue
            cand = evaluate_set((*chosen, p), unit_blocks, limits, rates, max_ratio, t_crit)
            if cand is not None and (step_best is None or cand.gain_lo > step_best.gain_lo):
                step_best = cand
        if step_best is None or step_best is best:
            return best
        best, chosen = step_best, step_best.chosen


def best_pair_set(
    pairs: Sequence[tuple[int, int]],
    unit_blocks: np.ndarray,
    limits: Sequence[int],
    rates: Sequence[float],
    max_ratio: float,
    t_crit: float,
    min_pairs: int = 2,
) -> PairSet | None:
    """The set of at least ``min_pairs`` disjoint candidate pairs with the largest lower confidence bound of
    the gain (:func:`evaluate_set`), by trying every disjoint set up to :data:`MAX_ENUMERATED_DOMAINS`
    domains (greedy above). ``pairs`` are domain indices; None when no such set fits."""
    n_domains = len({d for p in pairs for d in p})
    if n_domains > MAX_ENUMERATED_DOMAINS:
        found = greedy_matching(pairs, unit_blocks, limits, rates, max_ratio, t_crit)
        return found if found is not None and len(found.chosen) >= min_pairs else None
    best: PairSet | None = None
    for chosen in disjoint_sets(pairs, min_pairs):
        cand = evaluate_set(chosen, unit_blocks, limits, rates, max_ratio, t_crit)
        if cand is not None and (best is None or cand.gain_lo > best.gain_lo):
            best = cand
    return best


def pair_set_record(
    step: int, plan: PairSet, moved: Sequence[Any], single: PairSet, single_shift: Any
) -> dict[str, Any]:
    """What ``recommend.json`` (and the report) say about pairs moved together at one checkpoint: which
    pairs (``moved``/``single_shift`` are shifts with ``earlier``, ``later``, ``amount``), each one's part,
    the total with its SE from the per-block sums, what adding variances would say, and the rule's numbers
    (the lower confidence bound of the gain, against the best single pair's)."""

    def words(sh: Any) -> str:
        return f"{sh.earlier} earlier, {sh.later} later by {float(sh.amount):g}"

    return {
        "step": int(step),
        "window": plan.window,
        "pairs": [
            {"earlier": sh.earlier, "later": sh.later, "shift": float(sh.amount), "change": c, "se": e}
            for sh, c, e in zip(moved, plan.parts, plan.part_se, strict=True)
        ],
        "change": plan.change,
        "se": plan.se,
        "half_width": plan.t_crit * plan.se,
        "independent_se": plan.independent_se,
        "gain_lower_bound": plan.gain_lo,
        "single_pair": {
            "pair": words(single_shift),
            "window": single.window,
            "change": single.change,
            "se": single.se,
            "gain_lower_bound": single.gain_lo,
        },
        "words": "; ".join(words(sh) for sh in moved),
    }


def plan_together(
    cands: Sequence[tuple[Mapping[str, Any], Shift]],
    names: Sequence[str],
    blocks: Mapping[tuple[str, str, str], np.ndarray],
    target: str,
    best: int,
    max_ratio: float,
) -> tuple[PairSet, PairSet] | None:
    """Pairs moved together at one checkpoint, or None when one pair (``cands[best]``) is as good.

    ``cands``: each suboptimal pair's row and its shift on its own (amount, window); ``blocks``: the step's
    per-block values (:func:`step_blocks`). The set of at least two disjoint pairs with the largest lower
    confidence bound of the gain (:func:`best_pair_set`) is returned with the single pair's evaluation when
    its bound is larger."""
    if any((target, str(r["domain_i"]), str(r["domain_j"])) not in blocks for r, _ in cands):
        return None
    unit = np.stack(
        [shift_blocks(blocks[(target, str(r["domain_i"]), str(r["domain_j"]))], r, sh.earlier,
                      float(sh.amount), 1.0) for r, sh in cands],
        axis=1,
    )  # fmt: skip
    pairs = [(list(names).index(sh.earlier), list(names).index(sh.later)) for _, sh in cands]
    windows = [sh.window for _, sh in cands]
    rates = [float(r["regime_ratio"]) * float(sh.amount) / (float(r["dw"]) * sh.horizon) for r, sh in cands]
    t = float(cands[best][0]["t_crit"])
    one = evaluate_set((best,), unit, windows, rates, max_ratio, t)
    many = best_pair_set(pairs, unit, windows, rates, max_ratio, t)
    if many is None or one is None or not many.gain_lo > one.gain_lo:
        return None
    return many, one


def shifts_total(shifts: Sequence[Shift], name: str, confidence: float) -> dict[str, Any]:
    """Total predicted change of target ``name`` over ``shifts``, its SE from the per-block sums when every
    shift has per-block values for it (else the sum of the SEs, a bound), the half-width of its interval
    (the largest ``t_crit`` of the shifts) and the SE that adding variances would give."""
    mine = [sh for sh in shifts if name in sh.effects]
    effs = [sh.effects[name] for sh in mine]
    t = max((e.t_crit for e in effs), default=math.nan)
    change = math.fsum(e.change for e in effs)
    if effs and all(name in sh.blocks for sh in mine):
        x = np.stack([sh.blocks[name] for sh in mine], axis=1)
        se, method, naive = block_total(x)[1], "per-block", independent_se(x)
    else:
        se, method, naive = math.fsum(e.se for e in effs), "sum of SEs (a bound)", math.nan
    return {"change": change, "se": se, "half_width": t * se, "confidence": confidence, "se_method": method,
            "independent_se": naive}  # fmt: skip


def with_blocks(
    shift: Shift | Skipped,
    row: Mapping[str, Any],
    blocks: Mapping[tuple[str, str, str], np.ndarray] | None,
    targets: Sequence[str],
) -> Shift:
    """``shift`` with the per-block values of its effect on every target that has them (rescaled to its
    amount and window by :func:`shift_blocks`; ``row`` is its results row)."""
    assert isinstance(shift, Shift)
    for name in targets:
        key = (name, str(row["domain_i"]), str(row["domain_j"]))
        if blocks is not None and key in blocks:
            shift.blocks[name] = shift_blocks(
                blocks[key], row, shift.earlier, float(shift.amount), shift.window
            )
    return shift
