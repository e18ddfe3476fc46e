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

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import pandas as pd

from commute_cli.core.criterion import Verdict
from commute_cli.core.schedule import Schedule
from commute_cli.core.shifts import (
    DEFAULT_GRID,
    DEFAULT_REGIME,
    Effect,
    Shift,
    Skipped,
    compose_schedule,
    constant_span,
    domain_totals,
    exact,
    regime_window,
    scaled_effect,
    shift_amount,
    shift_grid,
    window_bounds,
)
from commute_cli.errors import CommuteError
from commute_cli.io import atomic
from commute_cli.io.schedules import save_schedule
from commute_cli.io.store import RESULTS_COLUMNS, AnalysisRun, load_analysis, load_losses

__all__ = [
    "DEFAULT_GRID",
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


# ------------------------------------------------------------------------------------------------ use case


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
    about: str = ""  # which analysed run and schedule (AnalysisRun.label())

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
                        **sh.to_record(),
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
            "about": self.about,
            "target": self.target,
            "max_shift": self.max_shift,
            "grid": str(self.grid),
            "last_step": self.last_step,
            "proposed": self.proposed,
            "summary": self.summary(),
            "shifts": [
                {
                    **sh.to_record(),
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
    about: str = "",
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
        about: which analysed run and schedule this is about (kept in ``recommend.json``).
    """
    regime = {**DEFAULT_REGIME, **(regime or {})}
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
    sub = mine[mine["verdict"] == Verdict.SUBOPTIMAL]
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
        about=about,
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


def run_batch_size(analysis: AnalysisRun) -> int | None:
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
