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
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np

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
    t_crit: float = math.nan  # the analysis' Student-t quantile: change ± t_crit x se is its interval

    @property
    def half_width(self) -> float:
        """Half-width of the confidence interval at the analysis' ``--confidence`` (``t_crit x se``)."""
        return self.t_crit * self.se


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
    t_crit = float(row["t_crit"]) if "t_crit" in row else math.nan
    return Effect(str(row["target"]), change, se, bool(inside), significant, t_crit)


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
    horizon: int = 0  # the analysed horizon of the row (the window is at most this)
    limited_by: str = ""  # why the window is shorter than the analysed horizon ("" when it is not)
    blocks: dict[str, np.ndarray] = field(default_factory=dict, compare=False)  # per target: [B] values

    @property
    def window(self) -> int:
        return self.step - self.start

    def shortened(self) -> str:
        """``window 5 steps, shorter than the analysed horizon 10 (the local regime bound)``, or ''."""
        if not self.limited_by or self.window >= self.horizon:
            return ""
        return f"window {self.window} steps, shorter than the analysed {self.horizon} ({self.limited_by})"

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
    spans = sorted({(sh.start, sh.end) for sh in shifts})  # pairs moved together share one window
    for (_, e0), (s1, _) in itertools.pairwise(spans):
        if s1 < e0:
            raise ValueError("shift windows overlap")
    for span in spans:
        moved = [n for sh in shifts if (sh.start, sh.end) == span for n in (sh.earlier, sh.later)]
        if len(moved) != len(set(moved)):
            raise ValueError("pairs shifted in one window must be disjoint")
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


LIMIT_WORDS = {
    "geometry": "half-way to a neighbouring checkpoint, or the run's start or end",
    "constant": "the original schedule changes there",
    "regime": "the local-regime bound",
    "together": "the common window of the pairs moved together",
}
"""Why a window is shorter than the analysed horizon, in words (:meth:`Shift.shortened`)."""

SOURCE_COLUMNS = ("t_crit", "lr", "dt", "w_i", "w_j")
"""Columns of the row kept in a shift's ``source`` beside the required results columns."""


def pair_shift(
    row: Mapping[str, Any],
    base: Mapping[str, Fraction],
    others: Sequence[Mapping[str, Any]],
    *,
    delta_max: Fraction,
    grid: Fraction,
    limits: Mapping[str, int],
    regime: Mapping[str, float],
    last: int,
    keep: Sequence[str] = (),
    window: int | None = None,
) -> Shift | Skipped:
    """The shift of one suboptimal ``results.csv`` row around its step, or why there is none.

    ``base``: the original weights at the step (exact); ``others``: the rows of every target for the same
    step and pair (the trade-off); ``limits``: the window bounds ``geometry`` and ``constant``
    (:func:`window_bounds`, :func:`constant_span`); the row's own regime bound is added here. ``window``
    imposes a shorter common window (pairs moved together). ``keep``: the columns kept in ``source``.
    """
    s = int(row["step"])
    i, j = str(row["domain_i"]), str(row["domain_j"])
    pair = f"{i}↔{j}"
    if i not in base or j not in base:
        return Skipped(s, pair, "a domain of this pair is not in the run's schedule")
    el = float(row["el_ij"])
    if el == 0.0 or not math.isfinite(el):
        return Skipped(s, pair, "no preferred order (EL is 0 or not finite)")
    if str(row.get("regime", "")) in ("outside", "saturated"):
        return Skipped(
            s,
            pair,
            f"analyze marked this row '{row['regime']}': its size cannot be rescaled into a shorter window "
            "(sign only; recommend --kind phases measures moves of useful size)",
        )
    earlier, later = (i, j) if el < 0 else (j, i)
    delta = shift_amount(base, earlier, later, delta_max, grid)
    if delta <= 0:
        bound = min(delta_max, *(base[n] for n in (i, j)), *(1 - base[n] for n in (i, j)))
        why = (
            "no admissible shift: a weight is 0 or 1"
            if bound <= 0
            else f"the largest admissible shift {float(bound):g} is below the grid {grid}"
        )
        return Skipped(s, pair, why)
    bounds = {**limits, "regime": regime_window(row, float(delta), regime)}
    if window is not None:
        bounds["together"] = window
    h = min(bounds.values())
    if h < 1:
        why = {
            "geometry": "the run ends at this checkpoint: no steps after it to shift into (see --until)"
            if s >= last
            else "no room: a neighbouring checkpoint is too close",
            "constant": "the original schedule changes at this step (the criterion is local to one wbar)",
            "regime": "outside the local regime even for one step",
            "together": "no common window",
        }[min(bounds, key=lambda k: bounds[k])]
        return Skipped(s, pair, why)
    effects = {str(o["target"]): scaled_effect(o, earlier, float(delta), h, regime) for o in others}
    raised, lowered = dict(base), dict(base)
    raised[earlier] += delta
    raised[later] -= delta
    lowered[earlier] -= delta
    lowered[later] += delta
    horizon = int(row["horizon"])
    short = min(bounds, key=lambda k: bounds[k]) if h < horizon else ""
    return Shift(
        step=s,
        start=s - h,
        end=s + h,
        earlier=earlier,
        later=later,
        amount=delta,
        base={n: float(v) for n, v in base.items()},
        raised={n: float(v) for n, v in raised.items()},
        lowered={n: float(v) for n, v in lowered.items()},
        effects=effects,
        source={
            k: (v.item() if hasattr(v, "item") else v)
            for k, v in row.items()
            if k in (*keep, *SOURCE_COLUMNS)
        },
        horizon=horizon,
        limited_by=LIMIT_WORDS.get(short, ""),
    )
