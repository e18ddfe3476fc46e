"""``commute recommend``: from the verdicts of ``commute analyze`` to one schedule that uses the same data.

At a checkpoint ``s`` where the verdict for the target is ``suboptimal`` (Corollary 3.2(b) of MATH.md: the
bracket term is significant and both weights are positive), the sign of ``EL^{ij}`` says which way to reorder:
negative means "domain i earlier, j later". The recommendation is the local move the criterion evaluates,
centred on ``s``: the *earlier* domain ``a`` gets ``+delta`` on the ``h`` steps before ``s`` and ``-delta`` on
the ``h`` steps after it, the *later* domain ``b`` the reverse. Every update in ``[s - h, s + h)`` keeps its
batch size, and the ``+delta`` and ``-delta`` windows have the same length, so every domain's total is
unchanged; windows of different checkpoints never overlap, so the moves compose into one piecewise-constant
schedule by addition.

Predicted effect (MATH.md "What an intervention does to the target"): ``EL = dt^2 sum C o M`` with
``C[a, b] = wbar_a d_b - d_a wbar_b`` linear in ``d`` and ``dt = lr x h``, so a row of ``results.csv``
measured with shift ``dw`` and horizon ``H`` predicts, for shift ``delta`` and window ``h``,
``EL x (delta / dw) x (h / H)^2`` (the same scaling for its standard error). The rows of the *other* targets
at the same checkpoint and pair give the trade-off. The criterion is evaluated at ``theta(s)`` while the
centred move starts at ``theta(s - h)``; the two predictions differ by ``O(dt^3)``, the order of the
expansion's own remainder.

Decisions (see the docstrings below for the details):

- **Window.** ``h`` is the largest number of steps that (1) does not exceed the analysed horizon ``H`` (the
  prediction is never extrapolated beyond the window that was analysed), (2) keeps ``[s - h, s + h)`` inside
  ``[0, last step]`` and at most half-way to the neighbouring checkpoints (windows cannot overlap), (3) stays
  where the original schedule is constant (the expansion is around one ``wbar``), and (4) keeps the target's
  prediction inside the local regime, with the closed-form scaling that ``commute analyze`` uses for its
  default horizon: the regime ratio scales as ``(delta / dw) (h / H)`` and the first-order progress as
  ``h / H``. Rows that ``analyze`` flagged ``outside local regime`` are therefore used with a window short
  enough to be inside (their verdict's t-score does not depend on ``dt``); when even one step is outside, the
  checkpoint is skipped.
- **Amount.** ``delta = min(--max-shift, w_a, w_b, 1 - w_a, 1 - w_b)``, rounded *down* to a grid (``1/1000``,
  or ``1/B`` with ``--batch-size B`` so that ``commute train``'s whole-row batches realize it), so every
  weight stays in ``[0, 1]``.
- **One pair per checkpoint** (K > 2): the suboptimal pair with the largest predicted gain for the target.
  ``EL`` is linear in ``d``, so several pairs could be combined; one keeps the bounds and the words simple.
- **Exact totals.** Weights are added in exact rational arithmetic on the decimals that the files show
  (``Fraction(repr(w))``), so the totals computed from ``schedule.csv`` are equal *exactly* whenever the
  original weights have at most 15 significant digits (any weight a person writes); otherwise they agree to
  float rounding (about 1e-16 per step).
- **Totals.** The per-target total is the sum of the local predictions (each at the end of its window; later
  training may shrink or grow them). Its error bar is the sum of the standard errors: ``analyze`` uses the
  same samples at every checkpoint, so the errors are correlated and the quadrature sum would understate it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import pandas as pd

from commute_cli.core.schedule import Schedule, save_schedule
from commute_cli.errors import CommuteError
from commute_cli.io import atomic

__all__ = [
    "DEFAULT_GRID",
    "AnalyzeOutput",
    "Effect",
    "Recommendation",
    "Shift",
    "Skipped",
    "compose_schedule",
    "constant_span",
    "domain_totals",
    "earlier_recommendation",
    "exact",
    "load_analysis",
    "load_losses",
    "recommend",
    "regime_window",
    "run_batch_size",
    "scaled_effect",
    "shift_amount",
    "shift_grid",
    "window_bounds",
    "write_recommendation",
]

RESULTS_COLUMNS = (
    "step",
    "target",
    "domain_i",
    "domain_j",
    "target_loss",
    "el_ij",
    "el_se",
    "t",
    "dw",
    "horizon",
    "first_order",
    "regime_ratio",
    "in_regime",
    "verdict",
)
"""Columns of ``results.csv`` that the recommendation reads."""

DEFAULT_GRID = Fraction(1, 1000)
"""Shifts are multiples of this (unless ``--batch-size`` gives ``1/B``)."""

# Fallbacks when run.json has no "regime" entry; the source of truth is analysis.REGIME_MAX_RATIO /
# REGIME_MAX_PROGRESS, recorded in every run.json (importing analysis here would import torch).
_DEFAULT_REGIME = {"max_ratio": 0.25, "max_progress_fraction": 0.5}


# ------------------------------------------------------------------------------------------------ inputs


@dataclass
class AnalyzeOutput:
    """What ``commute analyze`` left in its ``--out`` folder, as far as recommend and plot need it."""

    folder: Path
    results: pd.DataFrame
    schedule: Schedule
    checkpoint_steps: list[int]
    regime: dict[str, float]
    run: dict[str, Any]


def load_analysis(folder: str | os.PathLike[str]) -> AnalyzeOutput:
    """Read ``results.csv`` and ``run.json`` from an ``analyze --out`` folder, with one-line errors."""
    folder = Path(folder)
    results_file, run_file = folder / "results.csv", folder / "run.json"
    hint = f"run `commute analyze CHECKPOINTS --out {folder}` first"
    if not results_file.is_file():
        raise CommuteError(f"no analyze results in {folder}/ (results.csv is missing)", hint=hint)
    if not run_file.is_file():
        raise CommuteError(f"{folder}/run.json is missing: the schedule of the analysed run is unknown", hint)
    try:
        results = pd.read_csv(results_file, keep_default_na=False, na_values=[""])
        run = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise CommuteError(f"cannot read the analyze results in {folder}/: {err}", hint=hint) from err
    missing = [c for c in RESULTS_COLUMNS if c not in results.columns]
    if missing:
        raise CommuteError(
            f"{results_file} lacks columns {', '.join(missing)}",
            hint=f"rerun analyze: {hint.split(': ')[-1]}",
        )
    if results.empty:
        raise CommuteError(f"{results_file} has no rows", hint=hint)
    if "schedule" not in run:
        raise CommuteError(f"{run_file} has no schedule", hint=hint)
    schedule = Schedule.from_records(run["schedule"], context=str(run_file))
    results = results[results["step"].notna()].copy()
    if results.empty:
        raise CommuteError(
            f"{results_file} has no checkpoint steps (a single model folder?)",
            hint="recommend needs checkpoints with step numbers (checkpoint-N/ folders)",
        )
    results["step"] = results["step"].astype(int)
    for col in ("in_regime", "significant"):
        if col in results.columns and results[col].dtype != bool:
            results[col] = results[col].astype(str).str.lower().isin({"true", "1"})
    steps = sorted({int(c["step"]) for c in run.get("checkpoints", []) if c.get("step") is not None})
    steps = sorted(set(steps) | set(results["step"].tolist()))
    regime = {**_DEFAULT_REGIME, **run.get("regime", {})}
    return AnalyzeOutput(folder, results, schedule, steps, regime, run)


# ------------------------------------------------------------------------------------------------ pure parts


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


def regime_window(row: Mapping[str, Any], delta: float, regime: Mapping[str, float]) -> int:
    """Longest window (in steps, at most the analysed horizon) keeping a row's prediction in the local regime.

    The rule of ``commute analyze`` (docs/DECISIONS.md "Regime of validity"): ``regime_ratio = |EL| /
    first-order progress <= max_ratio`` and ``|first-order progress| <= max_progress_fraction x loss``. With
    ``EL ~ delta h^2`` and progress ``~ h``, the ratio scales as ``(delta / dw)(h / H)`` and the progress as
    ``h / H``, so both bounds are solved in closed form. Returns 0 when not even one step is inside.
    """
    H = int(row["horizon"])
    ratio = float(row["regime_ratio"])
    progress = abs(float(row["first_order"]))
    loss = max(float(row["target_loss"]), 1e-12)
    dw = float(row["dw"])
    h = float(H)
    if not math.isfinite(ratio) or math.isnan(progress):
        return 0
    if ratio > 0 and delta > 0:
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
    row: Mapping[str, Any], earlier: str, delta: float, h: int, regime: Mapping[str, float]
) -> Effect:
    """A ``results.csv`` row's prediction rescaled to shift ``delta`` on ``earlier`` and window ``h``.

    MATH.md: ``EL = dt^2 sum C o M`` with ``C`` linear in ``d`` and ``dt = lr h``, so ``EL`` (and its SE)
    scale as ``(delta / dw)(h / H)^2``. ``EL^{ji} = -EL^{ij}``: the sign flips when ``j`` is the earlier one.
    """
    sign = 1.0 if earlier == row["domain_i"] else -1.0
    s_d = delta / float(row["dw"])
    s_h = h / float(row["horizon"])
    change = sign * float(row["el_ij"]) * s_d * s_h**2
    se = abs(float(row["el_se"])) * s_d * s_h**2
    ratio = float(row["regime_ratio"]) * s_d * s_h
    progress = abs(float(row["first_order"])) * s_h
    tol = 1 + 1e-9  # the window was solved in closed form for these bounds: do not flag rounding
    inside = ratio <= regime["max_ratio"] * tol and progress <= regime["max_progress_fraction"] * tol * max(
        float(row["target_loss"]), 1e-12
    )
    if "significant" in row and isinstance(row["significant"], bool):
        significant = row["significant"]
    else:
        significant = str(row.get("verdict", "")) in ("suboptimal", "consistent")
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


@dataclass
class Recommendation:
    target: str
    max_shift: float
    grid: Fraction
    last_step: int
    original: Schedule
    schedule: Schedule
    shifts: list[Shift]
    skipped: list[Skipped]
    n_suboptimal: int
    targets: list[str]
    totals: dict[str, tuple[float, float]] = field(default_factory=dict)  # target -> (change, se bound)
    domain_totals: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def proposed(self) -> bool:
        return bool(self.shifts)

    def summary(self) -> str:
        """One line saying what was proposed, or why nothing was."""
        if self.shifts:
            change, se = self.totals[self.target]
            return (
                f"{len(self.shifts)} local reordering{'s' * (len(self.shifts) > 1)} for target "
                f"{self.target}: predicted total change {change:+.3g} ± {se:.2g} nats"
            )
        if self.n_suboptimal == 0:
            return (
                f"nothing significant for target {self.target}: no checkpoint has a 'suboptimal' verdict, so "
                "no reordering is proposed"
            )
        return (
            f"target {self.target} is suboptimal at {self.n_suboptimal} checkpoint"
            f"{'s' * (self.n_suboptimal > 1)}, but no admissible shift fits (see 'skipped'); nothing proposed"
        )

    def table(self) -> pd.DataFrame:
        """One row per (shift, target): the machine form of the per-interval predictions."""
        rows = []
        for sh in self.shifts:
            for name in self.targets:
                eff = sh.effects.get(name)
                if eff is None:
                    continue
                rows.append(
                    {
                        "step": sh.step,
                        "start": sh.start,
                        "end": sh.end,
                        "earlier": sh.earlier,
                        "later": sh.later,
                        "shift": float(sh.amount),
                        **{f"w_{n}_before": sh.raised[n] for n in self.original.domains},
                        **{f"w_{n}_after": sh.lowered[n] for n in self.original.domains},
                        "target": name,
                        "predicted_change": eff.change,
                        "predicted_se": eff.se,
                        "in_regime": eff.in_regime,
                        "significant": eff.significant,
                        "chosen_target": name == self.target,
                    }
                )
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "commute-recommend/1",
            "target": self.target,
            "max_shift": self.max_shift,
            "grid": str(self.grid),
            "last_step": self.last_step,
            "proposed": self.proposed,
            "summary": self.summary(),
            "shifts": [
                {
                    "step": sh.step,
                    "start": sh.start,
                    "end": sh.end,
                    "earlier": sh.earlier,
                    "later": sh.later,
                    "shift": float(sh.amount),
                    "words": f"{sh.words()}: {sh.numbers()}",
                    "weights_original": sh.base,
                    "weights_before_step": sh.raised,
                    "weights_after_step": sh.lowered,
                    "predicted": {
                        n: {
                            "change": e.change,
                            "se": e.se,
                            "in_regime": e.in_regime,
                            "significant": e.significant,
                        }
                        for n, e in sh.effects.items()
                    },
                    "source_row": sh.source,
                }
                for sh in self.shifts
            ],
            "skipped": [{"step": s.step, "pair": s.pair, "reason": s.reason} for s in self.skipped],
            "total_predicted_change": {n: {"change": c, "se_bound": s} for n, (c, s) in self.totals.items()},
            "domain_totals": self.domain_totals,
            "original_schedule": self.original.to_records(),
            "schedule": self.schedule.to_records(),
        }


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


def recommend(
    results: pd.DataFrame,
    original: Schedule,
    checkpoint_steps: Sequence[int],
    target: str,
    *,
    max_shift: float = 0.1,
    last_step: int | None = None,
    grid: Fraction = DEFAULT_GRID,
    regime: Mapping[str, float] | None = None,
) -> Recommendation:
    """The whole algorithm (pure): suboptimal checkpoints -> shifts -> one schedule with the same totals.

    Args:
        results: ``results.csv`` of ``commute analyze`` (one row per step x target x pair).
        original: the schedule the analysed run used (``run.json``).
        checkpoint_steps: every analysed checkpoint (windows stay half-way to neighbours).
        target: the target name as in ``results["target"]``.
        max_shift: largest weight change ``delta``.
        last_step: the run's last step (default: the last checkpoint); nothing is shifted past it.
        grid: shifts are multiples of this.
        regime: ``max_ratio`` and ``max_progress_fraction`` of the local regime (default: analyze's).
    """
    regime = {**_DEFAULT_REGIME, **(regime or {})}
    available = list(dict.fromkeys(results["target"].astype(str)))
    if target not in available:
        raise CommuteError(
            f"unknown target {target!r}", hint=f"the results have targets {', '.join(available)}"
        )
    if not (0 < max_shift <= 1) or math.isnan(max_shift):
        raise CommuteError(f"--max-shift must be in (0, 1], got {max_shift}")
    steps = sorted(set(int(s) for s in checkpoint_steps) | set(results["step"].astype(int)))
    last = int(last_step) if last_step is not None else max(steps)
    if last < 0:
        raise CommuteError(f"the last step must be non-negative, got {last}")
    geometry = window_bounds(steps, last)
    delta_max = exact(max_shift)
    names = original.domains

    res = results.copy()
    res["target"] = res["target"].astype(str)
    mine = res[res["target"] == target]
    sub = mine[mine["verdict"] == "suboptimal"]
    shifts: list[Shift] = []
    skipped: list[Skipped] = []
    for s, rows in sub.groupby("step", sort=True):
        s = int(s)
        base_exact = {n: exact(v) for n, v in original.weights_at(s).items()}
        best: tuple[float, Shift] | None = None
        reasons: list[Skipped] = []
        for row in rows.to_dict("records"):
            i, j = str(row["domain_i"]), str(row["domain_j"])
            pair = f"{i}↔{j}"
            if i not in names or j not in names:
                reasons.append(Skipped(s, pair, "a domain of this pair is not in the run's schedule"))
                continue
            el = float(row["el_ij"])
            if el == 0.0 or not math.isfinite(el):
                reasons.append(Skipped(s, pair, "no preferred order (EL is 0 or not finite)"))
                continue
            earlier, later = (i, j) if el < 0 else (j, i)
            delta = shift_amount(base_exact, earlier, later, delta_max, grid)
            if delta <= 0:
                bound = min(delta_max, *(base_exact[n] for n in (i, j)), *(1 - base_exact[n] for n in (i, j)))
                why = (
                    "no admissible shift: a weight is 0 or 1"
                    if bound <= 0
                    else f"the largest admissible shift {float(bound):g} is below the grid {grid}"
                )
                reasons.append(Skipped(s, pair, why))
                continue
            limits = {
                "geometry": geometry.get(s, 0),
                "constant": constant_span(original, s),
                "regime": regime_window(row, float(delta), regime),
            }
            h = min(limits.values())
            if h < 1:
                why = {
                    "geometry": "the run ends at this checkpoint: no steps after it to shift into "
                    "(see --until)"
                    if s >= last
                    else "no room: a neighbouring checkpoint is too close",
                    "constant": "the original schedule changes at this step (the criterion is local to one "
                    "wbar)",
                    "regime": "outside the local regime even for one step",
                }[min(limits, key=lambda k: limits[k])]
                reasons.append(Skipped(s, pair, why))
                continue
            effects: dict[str, Effect] = {}
            same = res[(res["step"] == s) & (res["domain_i"] == i) & (res["domain_j"] == j)]
            for other in same.to_dict("records"):
                effects[str(other["target"])] = scaled_effect(other, earlier, float(delta), h, regime)
            raised = dict(base_exact)
            raised[earlier] += delta
            raised[later] -= delta
            lowered = dict(base_exact)
            lowered[earlier] -= delta
            lowered[later] += delta
            source = {
                k: (v.item() if hasattr(v, "item") else v)
                for k, v in row.items()
                if k in (*RESULTS_COLUMNS, "t_crit", "lr", "dt", "w_i", "w_j")
            }
            shift = Shift(
                step=s,
                start=s - h,
                end=s + h,
                earlier=earlier,
                later=later,
                amount=delta,
                base={n: float(v) for n, v in base_exact.items()},
                raised={n: float(raised[n]) for n in names},
                lowered={n: float(lowered[n]) for n in names},
                effects=effects,
                source=source,
            )
            gain = effects[target].change
            if not gain < 0.0:  # e.g. a tiny effect that rounds to 0 at this window: nothing to gain
                reasons.append(Skipped(s, pair, "the predicted gain at the admissible shift rounds to 0"))
                continue
            if best is None or gain < best[0]:
                best = (gain, shift)
        if best is None:
            skipped += reasons
        else:
            shifts.append(best[1])
    schedule = compose_schedule(original, shifts)
    targets = [target, *[t for t in available if t != target]]
    totals = {}
    for name in targets:
        effs = [sh.effects[name] for sh in shifts if name in sh.effects]
        totals[name] = (math.fsum(e.change for e in effs), math.fsum(e.se for e in effs))
    before, after = domain_totals(original, last), domain_totals(schedule, last)
    dom_totals = {
        n: {"original": float(before[n]), "recommended": float(after[n]), "equal": before[n] == after[n]}
        for n in names
    }
    return Recommendation(
        target=target,
        max_shift=float(max_shift),
        grid=grid,
        last_step=last,
        original=original,
        schedule=schedule,
        shifts=shifts,
        skipped=skipped,
        n_suboptimal=int(sub["step"].nunique()),
        targets=targets,
        totals=totals,
        domain_totals=dom_totals,
    )


# ------------------------------------------------------------------------------------------------ files


def write_recommendation(rec: Recommendation, out: str | os.PathLike[str]) -> list[Path]:
    """``schedule.json``, ``schedule.csv`` (the forms ``commute train --schedule`` reads) and
    ``recommend.json``, each atomically. Writes nothing when nothing is proposed."""
    if not rec.proposed:
        return []
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommuteError(f"cannot create {out}: {err.strerror}", hint="pass --out DIR") from err
    files = [
        save_schedule(rec.schedule, out / "schedule.json"),
        save_schedule(rec.schedule, out / "schedule.csv"),
    ]
    target = out / "recommend.json"
    atomic.write_text(target, json.dumps(rec.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n")
    return [*files, target]


# ------------------------------------------------------------------------------------------------ helpers


def run_batch_size(analysis: AnalyzeOutput) -> int | None:
    """The analysed run's batch size from the ``commute.json`` next to its checkpoints, when it can be found
    (``run.json`` records the checkpoint folder as given to ``analyze``, relative to where it ran)."""
    ckpt_dir = analysis.run.get("options", {}).get("ckpt_dir")
    if not ckpt_dir:
        return None
    for folder in (Path(ckpt_dir), Path(ckpt_dir).parent):
        manifest = folder / "commute.json"
        if manifest.is_file():
            try:
                value = json.loads(manifest.read_text(encoding="utf-8")).get("batch_size")
            except (OSError, ValueError):
                return None
            return int(value) if isinstance(value, int) and value > 0 else None
    return None


def shift_grid(batch_size: int | None) -> Fraction:
    """``1/B`` for a batch of ``B`` rows (``commute train`` composes batches of whole rows, so a shift that
    is not a whole number of rows would be rounded, step by step, and no longer conserve data); else
    :data:`DEFAULT_GRID`."""
    if batch_size is None:
        return DEFAULT_GRID
    if batch_size < 1:
        raise CommuteError(f"--batch-size must be positive, got {batch_size}")
    return Fraction(1, int(batch_size))


def earlier_recommendation(folder: str | os.PathLike[str]) -> str | None:
    """What an earlier ``recommend`` left in ``folder`` (e.g. ``target en``), or None when nothing is there.

    When nothing is proposed nothing is written, so files of an earlier run with another target stay; the
    command says so rather than deleting a user's files."""
    folder = Path(folder)
    if not any((folder / f).is_file() for f in ("schedule.json", "schedule.csv", "recommend.json")):
        return None
    try:
        target = json.loads((folder / "recommend.json").read_text(encoding="utf-8")).get("target")
    except (OSError, ValueError, AttributeError):
        target = None
    return f"target {target}" if target else "schedule files"


def load_losses(folder: str | os.PathLike[str]) -> pd.DataFrame:
    """``losses.csv`` of an ``analyze --out`` folder (step, domain, loss, loss_se)."""
    file = Path(folder) / "losses.csv"
    if not file.is_file():
        raise CommuteError(
            f"no analyze results in {Path(folder)}/ (losses.csv is missing)",
            hint=f"run `commute analyze CHECKPOINTS --out {Path(folder)}` first",
        )
    losses = pd.read_csv(file)
    missing = [c for c in ("step", "domain", "loss", "loss_se") if c not in losses.columns]
    if missing:
        raise CommuteError(f"{file} lacks columns {', '.join(missing)}", hint="rerun commute analyze")
    return losses
