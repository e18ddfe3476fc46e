"""Mixing arithmetic: domain weights -> rows of a batch, and the schedules of validate's branches.

Pure (no torch, no files). A batch of ``B`` rows takes ``n_i`` rows of domain ``i``; the realized weights
are ``n_i / B``. Two roundings are used:

- :func:`batch_counts` rounds each step on its own (largest remainder of ``B * w``): what ``train`` does
  at every step, deterministic and stateless;
- :func:`realize_counts` diffuses the rounding error over steps, so that every window whose total
  ``B * sum_t w_t`` is whole gets exactly that many rows. ``validate`` needs this: its three branches must
  read the same rows of every domain over the window (0.8 +- 0.15 with B = 10 would otherwise round to
  +0.2 / -0.1, neither the intervention asked for nor data-conserving).

:func:`branch_schedules` writes realized counts back as weights ``n / B``, so that
``batch_counts`` reproduces them exactly when the branches are trained; :func:`realized_dw` checks that
the branches read the same rows and says which shift they realize. :func:`repeat_summary` and
:func:`signs_agree` are validate's arithmetic on the observed excess losses.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from commute_cli.core.schedule import Schedule
from commute_cli.errors import CommuteError

BRANCHES = ("base", "12", "21")
"""validate's branches: the run's schedule, pair domain 1 up first, pair domain 2 up first."""


def batch_counts(weights: Sequence[float], batch_size: int) -> list[int]:
    """Rows per domain in a batch of ``batch_size``: largest-remainder rounding of ``batch_size * w``.

    The counts sum to ``batch_size`` exactly; each is ``floor(B w_i)`` or one more; the rows left over go to
    the largest fractional parts, ties to the earlier domain. ``B w_i`` is rounded to 9 decimals first, so
    that 0.7 * 10 = 7.000000000000001 counts as 7. Deterministic: the same weights give the same counts.

    Raises ``CommuteError`` when ``batch_size < 1``.
    """
    if batch_size < 1:
        raise CommuteError(f"batch size must be positive, got {batch_size}")
    scaled = [round(batch_size * float(w), 9) for w in weights]
    counts = [math.floor(x) for x in scaled]
    left = batch_size - sum(counts)
    order = sorted(range(len(scaled)), key=lambda i: (-(scaled[i] - counts[i]), i))
    for i in order[: max(left, 0)]:
        counts[i] += 1
    return counts


def uneven_split(schedule: Schedule, batch_size: int) -> tuple[int, dict[str, float]] | None:
    """The first schedule entry ``(step, weights)`` whose ``batch_size * w`` is not whole, else None."""
    for step, w in schedule.entries:
        if any(abs(batch_size * x - round(batch_size * x)) > 1e-9 for x in w.values()):
            return step, dict(w)
    return None


def realize_counts(weights: Sequence[Sequence[float]], batch_size: int) -> list[list[int]]:
    """Per-step row counts whose running totals track ``batch_size * cumsum(weights)`` within one row.

    ``weights``: ``[T][K]`` weights per step. Returns ``[T][K]`` integer rows, each step summing to
    ``batch_size``. Error diffusion: at each step the rows still owed to each domain (target cumulative
    minus rows given) are rounded by largest remainder to a batch of exactly ``batch_size`` (ties to the
    earlier domain). Whole-number weights give the plain per-step counts; fractional ones alternate.
    """
    if batch_size < 1:
        raise CommuteError(f"batch size must be positive, got {batch_size}")
    K = len(weights[0]) if weights else 0
    given = [0] * K
    target = [0.0] * K
    out: list[list[int]] = []
    for w in weights:
        for k in range(K):
            target[k] += batch_size * float(w[k])
        owed = [round(target[k] - given[k], 9) for k in range(K)]
        counts = [max(0, math.floor(x)) for x in owed]
        left = batch_size - sum(counts)
        rema = [owed[k] - math.floor(owed[k]) if owed[k] >= 0 else -1.0 for k in range(K)]
        order = sorted(range(K), key=lambda k: (-rema[k], k))
        for k in order[: max(left, 0)]:
            counts[k] += 1
        while sum(counts) > batch_size:  # defensive: only if rounding left a domain owed a negative amount
            k = min((k for k in range(K) if counts[k] > 0), key=lambda k: (rema[k], -k))
            counts[k] -= 1
        for k in range(K):
            given[k] += counts[k]
        out.append(counts)
    return out


def max_dw(schedule: Schedule, start: int, n: int, pair: tuple[int, int]) -> float:
    """The largest ``dw`` that keeps both weights of the pair in [0, 1] over ``[start, start + 2n)``."""
    names = list(schedule.domains)
    i, j = pair
    best = 1.0
    for t in range(2 * n):
        w = schedule.weights_at(start + t)
        wi, wj = w[names[i]], w[names[j]]
        best = min(best, wi, wj, 1.0 - wi, 1.0 - wj)
    return max(best, 0.0)


def branch_schedules(
    schedule: Schedule,
    start: int,
    n: int,
    pair: tuple[int, int],
    dw: float,
    batch_size: int,
) -> dict[str, Schedule]:
    """The three branches' schedules over global steps ``[start, start + 2n)``, realized exactly.

    ``base`` follows ``schedule``; ``12`` adds ``+dw`` to ``pair[0]`` and ``-dw`` to ``pair[1]`` for the first
    ``n`` steps and the opposite for the next ``n``; ``21`` is the reverse. Every entry holds weights
    ``rows / batch_size`` (see :func:`realize_counts`), so :func:`batch_counts` reproduces the rows.
    Raises ``CommuteError`` when the shifted weights leave [0, 1] somewhere in the window.
    """
    names = list(schedule.domains)
    i, j = pair
    out: dict[str, Schedule] = {}
    for label, sign in zip(BRANCHES, (0.0, 1.0, -1.0), strict=True):
        rows = []
        for t in range(2 * n):
            w = [schedule.weights_at(start + t)[name] for name in names]
            s = sign * (1.0 if t < n else -1.0) * dw
            w[i] += s
            w[j] -= s
            if min(w) < -1e-12 or max(w) > 1.0 + 1e-12:
                base = schedule.weights_at(start + t)
                raise CommuteError(
                    f"--dw {dw:g} is too large for the weights {names[i]}={base[names[i]]:g}, "
                    f"{names[j]}={base[names[j]]:g} at step {start + t}: a weight would leave [0, 1]",
                    hint=f"use --dw <= {max_dw(schedule, start, n, pair):g}",
                )
            rows.append([min(max(x, 0.0), 1.0) for x in w])
        counts = realize_counts(rows, batch_size)
        entries: list[tuple[int, dict[str, float]]] = []
        prev: list[int] | None = None
        for t, c in enumerate(counts):
            if c != prev:
                step = 0 if not entries else start + t
                entries.append((step, {m: x / batch_size for m, x in zip(names, c, strict=True)}))
                prev = c
        out[label] = Schedule.from_entries(entries, names)
    return out


def rows_per_domain(schedule: Schedule, start: int, n_steps: int, batch_size: int) -> list[list[int]]:
    """Rows of each domain at each step of ``[start, start + n_steps)`` (:func:`batch_counts`), ``[T][K]``."""
    return [
        batch_counts([schedule.weights_at(s)[d] for d in schedule.domains], batch_size)
        for s in range(start, start + n_steps)
    ]


def realized_dw(schedules: Mapping[str, Schedule], start: int, n: int, batch_size: int, first: int) -> float:
    """The shift the branches' whole rows realize on the pair's ``first`` domain over the first half:
    ``(rows of "12" - rows of "base") / (n B)`` over steps ``[start, start + n)``.

    Raises:
        CommuteError: the branches (keys of ``schedules``, ``"12"`` and ``"base"`` among them) would not read
            the same number of rows of every domain over the window of ``2n`` steps.
    """
    rows = {b: np.array(rows_per_domain(s, start, 2 * n, batch_size)) for b, s in schedules.items()}
    totals = {b: r.sum(axis=0).tolist() for b, r in rows.items()}
    if len({tuple(t) for t in totals.values()}) != 1:
        raise CommuteError(
            f"cannot give every branch the same data: rows per domain {totals}",
            hint="choose --horizon and --dw so that steps x batch size x dw is a whole number",
            exit_code=1,
        )
    return float((rows["12"][:n, first].sum() - rows["base"][:n, first].sum()) / (n * batch_size))


def repeat_summary(values: Sequence[float], confidence: float) -> tuple[float, float, bool]:
    """Mean, SE over repeats and a t test (SE is nan and nothing is significant with one repeat)."""
    from commute_cli.core.criterion import summarize_blocks

    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return float(x.mean()), math.nan, False
    s = summarize_blocks(x, confidence)
    return s.mean, s.se, s.significant


def signs_agree(pred: float, obs: float) -> bool | None:
    """Whether a predicted and an observed effect have the same sign (None when either is 0 or not finite)."""
    if pred == 0.0 or obs == 0.0 or not (math.isfinite(pred) and math.isfinite(obs)):
        return None
    return (pred > 0.0) == (obs > 0.0)
