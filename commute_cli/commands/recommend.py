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
- **Pairs per checkpoint.** K < 4: the suboptimal pair with the largest predicted gain. K >= 4 (with the
  cached per-block statistics): the set of disjoint suboptimal pairs, shifted together in one window, with
  the largest lower confidence bound of the gain, when that bound beats the single pair's
  (``core/multipair.py``, MATH.md "Several pairs in one window"); ``--single-pair`` turns it off.
- **Exact totals.** Weights are added in exact rational arithmetic on the decimals that the files show
  (``Fraction(repr(w))``), so the totals computed from ``schedule.csv`` are equal *exactly* whenever the
  original weights have at most 15 significant digits (any weight a person writes); otherwise they agree to
  float rounding (about 1e-16 per step).
- **Totals.** The per-target total is the sum of the local predictions (each at the end of its window).
  Its SE comes from the per-block sums of the shifts' predictions (the same samples at every checkpoint and
  for every pair: covariances included); without the statistics cache, the SEs add (a bound). Intervals
  are ``t_crit x SE`` at the analysis' ``--confidence``.
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

import numpy as np
import pandas as pd

from commute_cli.core.criterion import Verdict
from commute_cli.core.multipair import (
    pair_set_record,
    plan_together,
    shifts_total,
    step_blocks,
    with_blocks,
)
from commute_cli.core.regime import CheckpointStats
from commute_cli.core.schedule import Schedule
from commute_cli.core.shifts import (
    DEFAULT_GRID,
    DEFAULT_REGIME,
    Shift,
    Skipped,
    compose_schedule,
    constant_span,
    domain_totals,
    exact,
    pair_shift,
    scaled_effect,
    shift_amount,
    shift_grid,
    window_bounds,
)
from commute_cli.errors import CommuteError
from commute_cli.io import atomic, store
from commute_cli.io.schedules import save_schedule
from commute_cli.io.store import RESULTS_COLUMNS, AnalysisRun, load_analysis
from commute_cli.render.style import format_si_interval

__all__ = [
    "Recommendation",
    "constant_span",
    "domain_totals",
    "earlier_recommendation",
    "first_change",
    "load_analysis",
    "load_block_stats",
    "recommend",
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
    totals: dict[str, tuple[float, float]] = field(default_factory=dict)  # target -> (change, se)
    domain_totals: dict[str, dict[str, float]] = field(default_factory=dict)
    about: str = ""  # which analysed run and schedule (AnalysisRun.label())
    total_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # + half_width, se_method, ...
    pair_sets: list[dict[str, Any]] = field(default_factory=list)  # checkpoints with pairs moved together
    confidence: float = 0.95

    @property
    def proposed(self) -> bool:
        return bool(self.shifts)

    def summary(self) -> str:
        """One line saying what was proposed, or why nothing was."""
        if self.shifts:
            info = self.total_info[self.target]
            together = f" ({len(self.pair_sets)} with several pairs at once)" if self.pair_sets else ""
            total = format_si_interval(info["change"], info["half_width"])
            return (
                f"{len(self.shifts)} local reordering{'s' * (len(self.shifts) > 1)}{together} for target "
                f"{self.target}: predicted total change {total} ({self.confidence:.0%} interval)"
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
                        "predicted_half_width": eff.half_width,
                        "in_regime": eff.in_regime,
                        "significant": eff.significant,
                        "chosen_target": name == self.target,
                    }
                )
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "commute-recommend/2",  # 2: totals with change, se, half_width, se_method; no se_bound
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
                    "window_note": sh.shortened(),
                    "weights_original": sh.base,
                    "weights_before_step": sh.raised,
                    "weights_after_step": sh.lowered,
                    "predicted": {
                        n: {
                            "change": e.change,
                            "se": e.se,
                            "half_width": e.half_width,
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
            "confidence": self.confidence,
            "pair_sets": self.pair_sets,
            "total_predicted_change": self.total_info,
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
    stats: Mapping[int, CheckpointStats] | None = None,
    confidence: float = 0.95,
    single_pair: bool = False,
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
        stats: the analysis' cached per-block statistics by step (:func:`load_block_stats`): error bars of
            sums from per-block sums, and several pairs per checkpoint for K >= 4. Without them (or for a
            step whose statistics do not reproduce its rows) one pair, and totals' SEs add.
        confidence: the analysis' ``--confidence`` (the intervals use the rows' ``t_crit``).
        single_pair: never move several pairs together.
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
    names = original.domains
    targets = [target, *[t for t in available if t != target]]
    res = results.copy()
    res["target"] = res["target"].astype(str)
    mine = res[res["target"] == target]
    sub = mine[mine["verdict"] == Verdict.SUBOPTIMAL]
    shifts: list[Shift] = []
    skipped: list[Skipped] = []
    sets: list[dict[str, Any]] = []
    for s, rows in sub.groupby("step", sort=True):
        s = int(s)
        at = res[res["step"] == s]
        base = {n: exact(v) for n, v in original.weights_at(s).items()}
        limits = {"geometry": geometry.get(s, 0), "constant": constant_span(original, s)}

        def build(row: dict, window: int | None = None, at=at, base=base, limits=limits) -> Shift | Skipped:
            same = at[(at["domain_i"] == row["domain_i"]) & (at["domain_j"] == row["domain_j"])]
            return pair_shift(
                row, base, same.to_dict("records"), delta_max=exact(max_shift), grid=grid, limits=limits,
                regime=regime, last=last, keep=RESULTS_COLUMNS, window=window,
            )  # fmt: skip

        cands: list[tuple[dict, Shift]] = []
        reasons: list[Skipped] = []
        for row in rows.to_dict("records"):
            sh = build(row)
            if isinstance(sh, Skipped):
                reasons.append(sh)
            elif not sh.effects[target].change < 0.0:  # a tiny effect that rounds to 0 at this window
                reasons.append(Skipped(s, f"{sh.earlier}↔{sh.later}", "the predicted gain rounds to 0"))
            else:
                cands.append((row, sh))
        if not cands:
            skipped += reasons
            continue
        wbar = np.array([float(original.weights_at(s)[n]) for n in names])
        blocks = step_blocks(stats[s], wbar, names, at.to_dict("records")) if stats and s in stats else None
        best = min(range(len(cands)), key=lambda k: cands[k][1].effects[target].change)
        chosen: list[tuple[dict, Shift | Skipped]] = [cands[best]]
        plan = None if single_pair or len(names) < 4 or not blocks else plan_together(
            cands, names, blocks, target, best, regime["max_ratio"])  # fmt: skip
        if plan is not None:
            many, one = plan
            chosen = [(cands[k][0], build(cands[k][0], many.window)) for k in many.chosen]
            sets.append(pair_set_record(s, many, [sh for _, sh in chosen], one, cands[best][1]))
        shifts += [with_blocks(sh, row, blocks, targets) for row, sh in chosen]
    schedule = compose_schedule(original, shifts)
    total_info = {name: shifts_total(shifts, name, confidence) for name in targets}
    totals = {name: (v["change"], v["se"]) for name, v in total_info.items()}
    before, after = domain_totals(original, last), domain_totals(schedule, last)
    dom_totals = {
        n: {"original": float(before[n]), "recommended": float(after[n]), "equal": before[n] == after[n]}
        for n in names
    }
    return Recommendation(
        target=target, max_shift=float(max_shift), grid=grid, last_step=last, original=original,
        schedule=schedule, shifts=shifts, skipped=skipped, n_suboptimal=int(sub["step"].nunique()),
        targets=targets, totals=totals, domain_totals=dom_totals, about=about, total_info=total_info,
        pair_sets=sets, confidence=confidence,
    )  # fmt: skip


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


def load_block_stats(analysis: AnalysisRun) -> dict[int, CheckpointStats]:
    """The cached per-block statistics of each analysed checkpoint (``run.json`` names each entry; the
    cache is ``cache/`` beside or above the analysis folder), by step; steps without one are left out."""
    out: dict[int, CheckpointStats] = {}
    for c in analysis.run.get("checkpoints", []):
        if c.get("step") is None or not c.get("cache"):
            continue
        for folder in (analysis.folder / "cache", analysis.folder.parent / "cache"):
            found = store.load_stats(folder / str(c["cache"]))
            if found is not None:
                out[int(c["step"])] = found[0]
                break
    return out


def run_batch_size(analysis: AnalysisRun) -> int | None:
    """The analysed run's batch size (``AnalysisRun.run_batch_size``), when its commute.json has one."""
    return analysis.run_batch_size()


def first_change(rec: Recommendation) -> int:
    """The first step whose weights the recommendation changes (the start of its earliest window)."""
    return min((sh.step - sh.window for sh in rec.shifts), default=rec.last_step)


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
