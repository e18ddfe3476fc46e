"""The pure arithmetic of ``commute recommend``: windows, shift amounts, rescaled effects, composed
schedules and exact domain totals (no files, no torch; the use case is ``commands/recommend.py``).

A local reordering around checkpoint ``s`` gives the *earlier* domain ``+delta`` on ``[s - h, s)`` and
``-delta`` on ``[s, s + h)``, the *later* domain the reverse; every step keeps its batch size and the two
windows have the same length, so every domain's total is unchanged. Weights are added in exact rational
arithmetic on the decimals the files show (:func:`exact`), so totals are equal exactly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from commute_cli.core.criterion import Verdict
from commute_cli.core.regime import REGIME_MAX_PROGRESS, REGIME_MAX_RATIO, el_scale
from commute_cli.core.schedule import Schedule
from commute_cli.errors import CommuteError

DEFAULT_GRID = Fraction(1, 1000)
"""Shifts are multiples of this (unless ``--batch-size`` gives ``1/B``)."""

DEFAULT_REGIME = {"max_ratio": REGIME_MAX_RATIO, "max_progress_fraction": REGIME_MAX_PROGRESS}
"""The regime thresholds of ``core.regime``, in the form ``run.json`` records them."""


def exact(x: float) -> Fraction:
    """The decimal a schedule file shows for ``x`` (``repr``, the shortest round-trip form), as a Fraction.

    Arithmetic on these is exact, and ``float(exact(x)) == x``, so unchanged weights stay bit-identical.
    """
    return Fraction(repr(float(x)))


def window_bounds(checkpoint_steps: Sequence[int], last_step: int) -> dict[int, int]:
    """Largest half-window ``h`` at each checkpoint ``s`` from the run's geometry alone.

    ``[s - h, s + h)`` must lie in ``[0, last_step]`` (updates ``0 .. last_step - 1`` exist), and ``h`` is at
    most half the gap to each neighbouring checkpoint (rounded down), so two windows never overlap:
    ``h_k + h_{k+1} <= s_{k+1} - s_k``. A checkpoint at or after ``last_step`` gets 0 (nothing after it).
    """
    steps = sorted(set(int(s) for s in checkpoint_steps))
    out: dict[int, int] = {}
    for k, s in enumerate(steps):
        h = min(s, last_step - s)
        if k > 0:
            h = min(h, (s - steps[k - 1]) // 2)
        if k + 1 < len(steps):
            h = min(h, (steps[k + 1] - s) // 2)
        out[s] = max(0, h)
    return out


def constant_span(schedule: Schedule, step: int) -> int:
    """Largest ``h`` such that the original schedule is constant on ``[step - h, step + h)``.

    MATH.md's expansion is around one ``wbar``; where the schedule itself changes inside the window, the
    change of ``wbar`` enters at the same order as the prediction. An entry exactly at ``step`` gives 0.
    """
    i = schedule.index_at(step)
    h = step - schedule.steps[i]
    if i + 1 < len(schedule.steps):
        h = min(h, schedule.steps[i + 1] - step)
    return h


def shift_amount(
    weights: Mapping[str, Fraction], earlier: str, later: str, max_shift: Fraction, grid: Fraction
) -> Fraction:
    """``delta = min(max_shift, w_a, w_b, 1 - w_a, 1 - w_b)`` rounded down to a multiple of ``grid``.

    Before ``s`` the earlier domain ``a`` gets ``w_a + delta`` and the later ``b`` gets ``w_b - delta``;
    after ``s`` the reverse; so each of the four must stay in ``[0, 1]``. Exact (Fractions): the bound holds
    without rounding slack.
    """
    wa, wb = weights[earlier], weights[later]
    bound = min(max_shift, wa, wb, 1 - wa, 1 - wb)
    if bound <= 0:
        return Fraction(0)
    return math.floor(bound / grid) * grid


def regime_window(row: Mapping[str, Any], delta: float, regime: Mapping[str, float] | None = None) -> int:
    """Longest window (in steps, at most the analysed horizon) keeping a row's prediction in the local regime.

    The rule of ``core.regime`` at the row's point estimates: ``regime_ratio <= max_ratio`` and first-order
    progress ``<= max_progress_fraction x loss``. By the one rescaling law (:func:`core.regime.el_scale`,
    ``EL ∝ dw dt^2``, progress ``∝ dt``) the ratio scales as ``(delta / dw)(h / H)`` and the progress as
    ``h / H``, so both bounds are solved in closed form. Returns 0 when not even one step is inside.
    """
    regime = {**DEFAULT_REGIME, **(regime or {})}
    H = int(row["horizon"])
    ratio = float(row["regime_ratio"])
    progress = abs(float(row["first_order"]))
    loss = max(float(row["target_loss"]), 1e-12)
    dw = float(row["dw"])
    h = float(H)
    if not math.isfinite(ratio) or math.isnan(progress):
        return 0
    if ratio > 0 and delta > 0:
        # ratio(h) = ratio * el_scale(dw, H, delta, h) * H / h  (EL ∝ delta h^2 over progress ∝ h)
        h = min(h, H * regime["max_ratio"] * dw / (ratio * delta))
    if progress > 0:
        h = min(h, H * regime["max_progress_fraction"] * loss / progress)
    return max(0, math.floor(h * (1 + 1e-12)))


@dataclass(frozen=True)
class Effect:
    """Predicted change of one target's loss (nats) from one shift, at the end of its window."""

    target: str
    change: float
    se: float
    in_regime: bool
    significant: bool


def scaled_effect(
    row: Mapping[str, Any], earlier: str, delta: float, h: int, regime: Mapping[str, float] | None = None
) -> Effect:
    """A ``results.csv`` row's prediction rescaled to shift ``delta`` on ``earlier`` and window ``h``.

    The one rescaling law (:func:`core.regime.el_scale`): ``EL`` and its SE scale as
    ``(delta / dw)(h / H)^2`` at the same learning rate. ``EL^{ji} = -EL^{ij}``: the sign flips when ``j``
    is the earlier one.
    """
    regime = {**DEFAULT_REGIME, **(regime or {})}
    sign = 1.0 if earlier == row["domain_i"] else -1.0
    H = float(row["horizon"])
    factor = el_scale(float(row["dw"]), H, delta, float(h))
    change = sign * float(row["el_ij"]) * factor
    se = abs(float(row["el_se"])) * factor
    ratio = float(row["regime_ratio"]) * (delta / float(row["dw"])) * (h / H)
    progress = abs(float(row["first_order"])) * (h / H)
    tol = 1 + 1e-9  # the window was solved in closed form for these bounds: do not flag rounding
    inside = ratio <= regime["max_ratio"] * tol and progress <= regime["max_progress_fraction"] * tol * max(
        float(row["target_loss"]), 1e-12
    )
    if "significant" in row and isinstance(row["significant"], bool):
        significant = row["significant"]
    else:
        significant = str(row.get("verdict", "")) in (Verdict.SUBOPTIMAL, Verdict.CONSISTENT)
    return Effect(str(row["target"]), change, se, bool(inside), significant)


@dataclass(frozen=True)
class Shift:
    """One local reordering around checkpoint ``step``: ``earlier`` +amount on ``[start, step)`` and
    -amount on ``[step, end)``, ``later`` the reverse (``end - step == step - start``)."""

    step: int
    start: int
    end: int
    earlier: str
    later: str
    amount: Fraction
    base: dict[str, float]  # weights of the original schedule on [start, end)
    raised: dict[str, float]  # weights on [start, step)
    lowered: dict[str, float]  # weights on [step, end)
    effects: dict[str, Effect]  # per target (the chosen one included)
    source: dict[str, Any]  # the results.csv row of the chosen target (el_ij, el_se, t, dw, horizon, ...)

    @property
    def window(self) -> int:
        return self.step - self.start

    def to_record(self) -> dict[str, Any]:
        """The fields every serialization of a shift starts with (CSV rows and ``recommend.json``)."""
        return {
            "step": self.step,
            "start": self.start,
            "end": self.end,
            "earlier": self.earlier,
            "later": self.later,
            "shift": float(self.amount),
        }

    def words(self) -> str:
        """``move ru earlier, en later by 0.1 for 250 steps each side``."""
        return (
            f"move {self.earlier} earlier, {self.later} later by {float(self.amount):g} "
            f"for {self.window} steps each side"
        )

    def numbers(self) -> str:
        """``steps 750-1000: en 0.80->0.70, ru 0.20->0.30; steps 1000-1250: en 0.80->0.90, ru 0.20->0.10``
        (the two domains that move, in the schedule's order)."""
        moved = [n for n in self.base if n in (self.earlier, self.later)]

        def part(a: int, b: int, new: Mapping[str, float]) -> str:
            return f"steps {a}-{b}: " + ", ".join(f"{n} {self.base[n]:.2f}->{new[n]:.2f}" for n in moved)

        return f"{part(self.start, self.step, self.raised)}; {part(self.step, self.end, self.lowered)}"


@dataclass(frozen=True)
class Skipped:
    """A checkpoint where the target's verdict is suboptimal but no shift is proposed, and why."""

    step: int
    pair: str
    reason: str


def compose_schedule(original: Schedule, shifts: Sequence[Shift]) -> Schedule:
    """The original schedule plus every shift's ``+-amount`` windows, as one piecewise-constant schedule.

    Windows must not overlap (:func:`window_bounds` guarantees it). Additions are exact on the files'
    decimals (:func:`exact`); consecutive equal entries are merged.
    """
    spans = sorted((sh.start, sh.end) for sh in shifts)
    for (_, e0), (s1, _) in itertools.pairwise(spans):
        if s1 < e0:
            raise ValueError("shift windows overlap")
    names = original.domains
    cuts = sorted(set(original.steps) | {b for sh in shifts for b in (sh.start, sh.step, sh.end)})
    entries: list[tuple[int, dict[str, float]]] = []
    for b in cuts:
        w = {n: exact(v) for n, v in original.weights_at(b).items()}
        for sh in shifts:
            sign = 1 if sh.start <= b < sh.step else -1 if sh.step <= b < sh.end else 0
            if sign:
                w[sh.earlier] += sign * sh.amount
                w[sh.later] -= sign * sh.amount
        floats = {n: float(w[n]) for n in names}
        if not entries or entries[-1][1] != floats:
            entries.append((b, floats))
    return Schedule.from_entries(entries, names)


def domain_totals(schedule: Schedule, last_step: int) -> dict[str, Fraction]:
    """``sum_{step < last_step} w_k(step)`` per domain, exactly, on the decimals the files show."""
    tot = {n: Fraction(0) for n in schedule.domains}
    bounds = [*schedule.steps, max(last_step, schedule.steps[-1])]
    for k, s in enumerate(schedule.steps):
        length = max(0, min(bounds[k + 1], last_step) - min(s, last_step))
        for n, v in zip(schedule.domains, schedule.values[k], strict=True):
            tot[n] += exact(v) * length
    return tot


def shift_grid(batch_size: int | None) -> Fraction:
    """``1/B`` for a batch of ``B`` rows (``commute train`` composes batches of whole rows, so a shift that
    is not a whole number of rows would be rounded, step by step, and no longer conserve data); else
    :data:`DEFAULT_GRID`."""
    if batch_size is None:
        return DEFAULT_GRID
    if batch_size < 1:
        raise CommuteError(f"--batch-size must be positive, got {batch_size}")
    return Fraction(1, int(batch_size))
