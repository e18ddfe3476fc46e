"""Phase schedules: one domain emphasised at the end of the run, the same data per domain (pure).

A *late phase* for domain ``j`` from checkpoint ``start`` to the run's last step ``T``: the ``N = T - start``
remaining steps are cut at ``switch`` into an early phase ``[start, switch)`` and a late phase
``[switch, T)``. In the late phase ``j`` gets the weight ``b`` (more than it had), in the early phase what
is left of its data over ``[start, T)``; every other domain keeps its own total too, shared between the
phases in proportion to its total. Nothing before ``start`` changes, so the schedule can be trained as a
continuation of the saved checkpoint at ``start`` (``commute train --init``).

Why this family (MATH.md "Schedules of useful size"): Corollary 3.2(b) says that a locally optimal schedule
has, wherever the criterion is non-zero, one of the two weights at zero: optimal schedules switch between
modes (bang-bang) rather than mixing evenly, and the paper's LLM experiment ends with the low-resource share
raised. The family spans that: ``b`` up to ``min(1, w_j N / L)`` (``j`` absent from the early phase, the
bang-bang end of the family), for every domain ``j`` (so the practitioner's "low-resource late" and
"high-resource late" heuristics are members, and are measured beside the recommendation).

Exact data: rows, not weights. With batches of ``B`` rows, every domain's rows over ``[start, T)`` are kept
exactly (:func:`phase_rows` lays the early phase's rows out in at most ``K + 1`` constant pieces); the
weights written are ``rows / B``, which ``commute train`` realises exactly.

The bracket's prediction for such a schedule (:func:`bracket_prediction`): a data-conserving change
``delta(t)`` of the weights displaces ``D_k(t) = sum_{u < t} delta_k(u)`` rows-per-batch-steps of domain
``k`` earlier; to leading order the target changes by ``sum_t sum_k D_k(t) rho_k(t)`` with
``rho_k = EL^{k r} / (dw h^2)`` from the analysis row of the nearest checkpoint (``r`` a reference domain;
``sum_k D_k = 0`` removes it). A local swap of ``dw`` for ``h`` steps has ``sum_t D = dw h^2`` and gives back
the row's own ``EL``. At the sizes of a phase schedule the expansion is far outside its regime (MATH.md
"Regime of validity"), so this number ranks candidates and is printed as a hypothesis; the numbers a user
acts on are measured on real continuations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from commute_cli.core.mixing import batch_counts
from commute_cli.core.schedule import Schedule
from commute_cli.errors import CommuteError


@dataclass(frozen=True)
class Phase:
    """One late-phase schedule: ``late`` raised to ``late_weights`` from ``switch`` to ``last``."""

    late: str
    start: int
    switch: int
    last: int
    early_rows: tuple[tuple[int, tuple[int, ...]], ...]
    """(first step, rows per domain) of each constant piece of the early phase."""
    late_rows: tuple[int, ...]
    batch_size: int
    domains: tuple[str, ...]
    schedule: Schedule = field(compare=False, hash=False)

    @property
    def late_share(self) -> float:
        return self.late_rows[self.domains.index(self.late)] / self.batch_size

    @property
    def label(self) -> str:
        """``ru late: 0.8 from 2250`` (the late domain, its late weight, where the late phase starts)."""
        return f"{self.late} late: {self.late_share:g} from {self.switch}"

    def to_record(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "late": self.late,
            "start": self.start,
            "switch": self.switch,
            "last": self.last,
            "late_weights": {
                n: r / self.batch_size for n, r in zip(self.domains, self.late_rows, strict=True)
            },
            "early_weights": [
                {
                    "step": s,
                    "weights": {n: r / self.batch_size for n, r in zip(self.domains, rows, strict=True)},
                }
                for s, rows in self.early_rows
            ],
        }


def window_rows(schedule: Schedule, start: int, last: int, batch_size: int) -> dict[str, int]:
    """Rows of each domain that ``schedule`` trains on over steps ``[start, last)`` with batches of ``B``.

    Exact when ``B w`` is whole at every entry (what ``commute train`` realises); otherwise ``B w`` is
    rounded per entry as ``train`` rounds each step (largest remainder).
    Raises ``CommuteError`` for an empty window.
    """
    if not 0 <= start < last:
        raise CommuteError(f"empty window [{start}, {last})", "the start must be before the last step")
    rows = dict.fromkeys(schedule.domains, 0)
    bounds = [*schedule.steps, math.inf]
    for k, (s, w) in enumerate(schedule.entries):
        lo, hi = max(s, start), min(bounds[k + 1], last)
        if hi <= lo:
            continue
        counts = batch_counts([w[n] for n in schedule.domains], batch_size)
        for n, c in zip(schedule.domains, counts, strict=True):
            rows[n] += int(c * (hi - lo))
    return rows


def phase_rows(totals: Sequence[int], steps: int, batch_size: int) -> list[tuple[int, tuple[int, ...]]]:
    """Integer rows per step over ``steps`` steps whose sums are exactly ``totals``, in few constant pieces.

    Every step holds ``batch_size`` rows (``sum(totals) == steps * batch_size``). Domain ``k`` gets
    ``floor(totals_k / steps)`` rows at every step; the ``m`` rows per step left over are ``m`` lanes of
    ``steps`` slots, filled domain after domain (lane after lane), so each domain's extra rows are one run
    of slots and the per-step counts change at most ``K + m`` times. Returns ``(offset, rows)`` pieces.
    Raises ``ValueError`` when the totals do not fill the steps exactly.
    """
    if steps <= 0 or sum(totals) != steps * batch_size or min(totals, default=0) < 0:
        raise ValueError(f"totals {list(totals)} do not fill {steps} steps of {batch_size} rows")
    base = [t // steps for t in totals]
    extra = [t - b * steps for t, b in zip(totals, base, strict=True)]
    lanes = batch_size - sum(base)
    # slot index q in [0, lanes * steps): lane q // steps, step q % steps; domain k owns [lo_k, hi_k)
    owner_bounds, acc = [], 0
    for e in extra:
        owner_bounds.append((acc, acc + e))
        acc += e
    cuts = {0}
    for lo, hi in owner_bounds:
        for q in (lo, hi):
            if q < lanes * steps:
                cuts.add(q % steps)
    pieces: list[tuple[int, tuple[int, ...]]] = []
    for c in sorted(cuts):
        rows = list(base)
        for lane in range(lanes):
            q = lane * steps + c
            k = next(i for i, (lo, hi) in enumerate(owner_bounds) if lo <= q < hi)
            rows[k] += 1
        if not pieces or pieces[-1][1] != tuple(rows):
            pieces.append((c, tuple(rows)))
    return pieces


def late_phase(
    original: Schedule,
    late: str,
    start: int,
    last: int,
    late_fraction: Fraction,
    late_share: Fraction,
    batch_size: int,
) -> Phase | None:
    """The late-phase schedule for domain ``late`` (module docstring), or None when it is not feasible.

    Args:
        original: the schedule that was run (its rows over ``[start, last)`` are conserved exactly).
        late: the domain raised at the end.
        start: first step that changes (a saved checkpoint, so the schedule can be trained from it).
        last: the run's last step ``T`` (updates ``start .. T-1``).
        late_fraction: share of the ``T - start`` steps in the late phase (``switch`` rounded to a step).
        late_share: ``late``'s weight in the late phase, rounded down to whole rows of ``batch_size``.
        batch_size: rows per step ``B``.

    Infeasible (None): the late phase would not raise ``late``'s weight, or needs more of its data than the
    window holds, or an empty phase.
    """
    names = original.domains
    if late not in names:
        raise CommuteError(f"unknown domain {late!r}", hint=f"the domains are {', '.join(names)}")
    n = last - start
    n_late = round(n * late_fraction)
    n_early = n - n_late
    if n_late <= 0 or n_early <= 0:
        return None
    totals = window_rows(original, start, last, batch_size)
    j = names.index(late)
    b_j = min(batch_size, math.floor(late_share * batch_size))
    before = Fraction(totals[late], n * batch_size)
    if b_j <= before * batch_size or b_j * n_late > totals[late]:
        return None  # not raised, or more of its data than the window holds
    rest = batch_size - b_j
    others = [k for k in range(len(names)) if k != j]
    other_total = sum(totals[names[k]] for k in others)
    late_rows = [0] * len(names)
    late_rows[j] = b_j
    if other_total == 0 and rest > 0:
        return None
    # the other domains share the rest of the late batch in proportion to their totals (largest remainder)
    quotas = {
        k: Fraction(rest * totals[names[k]], other_total) if other_total else Fraction(0) for k in others
    }
    for k in others:
        late_rows[k] = math.floor(quotas[k])
    for k in sorted(others, key=lambda k: (-(quotas[k] - math.floor(quotas[k])), k))[
        : rest - sum(late_rows) + b_j
    ]:
        late_rows[k] += 1
    early_totals = [totals[names[k]] - late_rows[k] * n_late for k in range(len(names))]
    if min(early_totals) < 0:
        return None
    pieces = phase_rows(early_totals, n_early, batch_size)
    entries: list[tuple[int, dict[str, float]]] = [(s, w) for s, w in original.entries if s < start]
    for offset, rows in pieces:
        entries.append((start + offset, {nm: r / batch_size for nm, r in zip(names, rows, strict=True)}))
    entries.append((start + n_early, {nm: r / batch_size for nm, r in zip(names, late_rows, strict=True)}))
    kept = [e for k, e in enumerate(entries) if k == 0 or e[1] != entries[k - 1][1]]
    schedule = Schedule.from_entries(kept, names)
    return Phase(
        late=late, start=start, switch=start + n_early, last=last,
        early_rows=tuple((start + o, r) for o, r in pieces), late_rows=tuple(late_rows),
        batch_size=batch_size, domains=tuple(names), schedule=schedule,
    )  # fmt: skip


def candidates(
    original: Schedule,
    start: int,
    last: int,
    batch_size: int,
    late_domains: Sequence[str] | None = None,
) -> list[Phase]:
    """The candidate family from ``start``, for each domain (or ``late_domains``).

    With the late phase the last quarter of the remaining steps: the bang-bang member (``late`` absent from
    the early phase, or its weight 1 at the end) and the member half-way between it and the schedule that was
    run; with the late phase the last half: the half-way member. Duplicates and infeasible members dropped."""
    out: list[Phase] = []
    seen: set[tuple[Any, ...]] = set()
    n = last - start
    totals = window_rows(original, start, last, batch_size)
    for late in late_domains or original.domains:
        before = Fraction(totals[late], n * batch_size)
        for f, bang_bang in ((Fraction(1, 4), True), (Fraction(1, 4), False), (Fraction(1, 2), False)):
            top = min(Fraction(1), before / f)
            share = top if bang_bang else (before + top) / 2
            ph = late_phase(original, late, start, last, f, share, batch_size)
            if ph is None:
                continue
            key = (ph.late, ph.switch, ph.late_rows, ph.early_rows)
            if key not in seen:
                seen.add(key)
                out.append(ph)
    return out


def displacement(
    original: Schedule, changed: Schedule, start: int, last: int, batch_size: int
) -> dict[str, list[float]]:
    """``D_k(t)`` for ``t = start .. last``: weight-steps of domain ``k`` moved earlier than ``t``
    (``sum_{start <= u < t} (changed_k(u) - original_k(u))``, with the weights ``commute train`` realises:
    whole rows of ``batch_size``). Zero at both ends for a data-conserving change."""
    names = original.domains
    out = {n: [0.0] for n in names}
    for t in range(start, last):
        a = batch_counts([original.weights_at(t)[n] for n in names], batch_size)
        b = batch_counts([changed.weights_at(t)[n] for n in names], batch_size)
        for k, n in enumerate(names):
            out[n].append(out[n][-1] + (b[k] - a[k]) / batch_size)
    return out


def bracket_prediction(
    original: Schedule,
    phase: Phase,
    rows: Sequence[Mapping[str, Any]],
) -> tuple[float, float] | None:
    """The bracket's leading-order prediction of the target's change for ``phase`` (module docstring), with
    a bound on its standard error (the rows' SEs added with the absolute weights: correlated rows make
    quadrature too optimistic). ``rows``: one target's rows of ``results.csv`` (``step``, ``domain_i``,
    ``domain_j``, ``el_ij``, ``el_se``, ``dw``, ``horizon``). Units: nats. None without rows.
    """
    by_step: dict[int, dict[tuple[str, str], tuple[float, float]]] = {}
    for r in rows:
        dw, h = float(r["dw"]), float(r["horizon"])
        if not (dw > 0 and h > 0 and math.isfinite(float(r["el_ij"]))):
            continue
        scale = 1.0 / (dw * h * h)
        by_step.setdefault(int(r["step"]), {})[(str(r["domain_i"]), str(r["domain_j"]))] = (
            float(r["el_ij"]) * scale,
            float(r["el_se"]) * scale,
        )
    if not by_step:
        return None
    names = original.domains
    ref = names[-1]
    steps = sorted(by_step)

    def rho(step: int) -> dict[str, tuple[float, float]]:
        near = min(steps, key=lambda s: (abs(s - step), s))
        pairs = by_step[near]
        out = {ref: (0.0, 0.0)}
        for k in names[:-1]:
            if (k, ref) in pairs:
                out[k] = pairs[(k, ref)]
            elif (ref, k) in pairs:
                v, se = pairs[(ref, k)]
                out[k] = (-v, se)
            else:
                out[k] = (0.0, 0.0)
        return out

    disp = displacement(original, phase.schedule, phase.start, phase.last, phase.batch_size)
    change = bound = 0.0
    for idx, t in enumerate(range(phase.start, phase.last)):
        r = rho(t)
        for k in names:
            d = disp[k][idx + 1]
            change += d * r[k][0]
            bound += abs(d) * r[k][1]
    return change, bound
