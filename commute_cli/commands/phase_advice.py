"""``commute recommend`` (the default, ``--kind phases``): a schedule of useful size, measured before it is
proposed.

The criterion along the run says which domain to move later; a schedule that moves data far enough to matter
is a late phase (``core/phases.py``: one domain raised at the end, the same data per domain, starting at a
saved checkpoint). At that size the bracket's expansion is far outside its regime (docs/MATH.md "Schedules
of useful size"), so its number only ranks the candidates; what is proposed is what real continuations
measured:

1. **Candidates.** The family of ``core.phases.candidates`` from the start checkpoint (``--start``; default
   the earliest analysed checkpoint that can be continued), every domain late, ranked by the bracket's
   prediction on the target (a hypothesis, printed as such).
2. **Screen.** Every candidate (at most ``--candidates``) and the unchanged schedule are continued to the
   run's last step at the run's own stream seed (``commands/continuations.py``); the unchanged one at that
   seed reproduces the run.
3. **Confirm.** The ``--finalists`` best of the screen on the target and the unchanged schedule are continued
   on ``--seeds - 1`` more stream seeds; gains are paired per seed (same rows read up to where the schedules
   differ) and reported as mean +- t SE.
4. **Choose.** The finalist with the lowest mean change of the target is proposed when its interval excludes
   0; otherwise nothing is, and the answer says by how much at most the family beats the run's schedule.

Every candidate measured is named beside the proposal, including the practitioner's heuristics
("low-resource late", "high-resource late": members of the same family), with the measured change of every
target. The compute is reported as training steps and as a fraction of the run's own training. Choosing the
best of several measured candidates biases its measured gain upwards (winner's curse): the gain a user
realises on fresh seeds is measured by ``benchmarks/advice.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from commute_cli.core import phases
from commute_cli.core.power import t_critical
from commute_cli.core.schedule import Schedule
from commute_cli.core.shifts import domain_totals
from commute_cli.errors import CommuteError
from commute_cli.io.exports import FILES as EXPORT_FILES
from commute_cli.io.store import AnalysisRun

RUN = "the run's schedule"


@dataclass
class Gain:
    """Paired change of one target's final loss against the run's schedule (nats): mean over seeds, SE."""

    mean: float
    se: float
    n: int
    half_width: float

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "se": self.se, "n": self.n, "half_width": self.half_width}


def paired_gain(arm: Mapping[int, float], base: Mapping[int, float], confidence: float) -> Gain | None:
    """``mean_s (arm_s - base_s)`` over the seeds both have, with its SE (``sd / sqrt(n)``; NaN for one
    seed) and ``t_{n-1} x SE`` as the half-width of the interval at ``confidence``. None without a seed."""
    seeds = sorted(set(arm) & set(base))
    if not seeds:
        return None
    d = [arm[s] - base[s] for s in seeds]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return Gain(mean, math.nan, 1, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    return Gain(mean, se, n, t_critical(n, confidence) * se)


@dataclass
class PhaseAdvice:
    """The answer of ``recommend --kind phases`` for one target (and the measured trade-off on the others)."""

    target: str
    about: str
    start: int
    last: int
    original: Schedule
    mix_weights: dict[str, float]
    candidates: list[phases.Phase]
    predicted: dict[str, dict[str, tuple[float, float]]]  # label -> target -> (bracket change, SE bound)
    losses: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)  # label -> seed -> domain
    chosen: phases.Phase | None = None
    verified: bool = True
    confidence: float = 0.95
    steps_trained: int = 0
    steps_cached: int = 0
    seconds: float = 0.0
    seconds_per_step: float = math.nan  # one training step of the run, timed here
    analysis_seconds: float = math.nan  # what the analysis took (run.json)
    heuristics: dict[str, str] = field(default_factory=dict)  # label -> "low-resource late", ...
    notes: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        return [self.target, *[t for t in [*self.original.domains, "mix"] if t != self.target]]

    def target_loss(self, losses: Mapping[str, float], target: str) -> float:
        if target == "mix":
            return float(sum(self.mix_weights[n] * losses[n] for n in self.mix_weights))
        return float(losses[target])

    def gain(self, label: str, target: str) -> Gain | None:
        """Measured paired change of ``target`` for candidate ``label`` against the run's schedule."""
        if label not in self.losses or RUN not in self.losses:
            return None
        arm = {s: self.target_loss(v, target) for s, v in self.losses[label].items()}
        base = {s: self.target_loss(v, target) for s, v in self.losses[RUN].items()}
        return paired_gain(arm, base, self.confidence)

    @property
    def proposed(self) -> bool:
        return self.chosen is not None

    @property
    def analysis_fraction(self) -> float:
        """The analysis' time as a fraction of the run's training time (its steps at the measured rate)."""
        return self.analysis_seconds / (self.last * self.seconds_per_step)

    def versus_heuristics(self) -> list[tuple[str, str, Gain]]:
        """(heuristic name, its label, the chosen schedule's paired change minus the heuristic's on the
        target, over the seeds both have): what the recommendation gains over each heuristic, measured."""
        if self.chosen is None:
            return []
        out = []
        for label, name in self.heuristics.items():
            if label == self.chosen.label or label not in self.losses:
                continue
            mine = {s: self.target_loss(v, self.target) for s, v in self.losses[self.chosen.label].items()}
            theirs = {s: self.target_loss(v, self.target) for s, v in self.losses[label].items()}
            g = paired_gain(mine, theirs, self.confidence)
            if g is not None:
                out.append((name, label, g))
        return out

    @property
    def run_fraction(self) -> float:
        """Training steps the verification ran, as a fraction of the run's own training steps."""
        return self.steps_trained / max(self.last, 1)

    def best_measured(self) -> tuple[str, Gain] | None:
        """The candidate with the most seeds, then the lowest mean change of the target."""
        scored = [(c.label, self.gain(c.label, self.target)) for c in self.candidates]
        found = [(lab, g) for lab, g in scored if g is not None]
        if not found:
            return None
        top_n = max(g.n for _, g in found)
        return min(((lab, g) for lab, g in found if g.n == top_n), key=lambda x: x[1].mean)

    @property
    def origin(self) -> str:
        """Where the candidates start, in words: "checkpoint N", or "scratch" for a retrain (start 0)."""
        return "scratch" if self.start == 0 else f"checkpoint {self.start}"

    def summary(self) -> str:
        """The bottom line in one sentence."""
        if not self.verified:
            if self.chosen is None:
                return f"no candidate schedule for target {self.target} (see notes)"
            return (
                f"unverified hypothesis for target {self.target}: {self.chosen.label} (from {self.origin}); "
                "its size is not known until measured (rerun without --no-verify)"
            )
        best = self.best_measured()
        if self.chosen is not None and best is not None:
            g = best[1]
            return (
                f"for target {self.target}: {self.chosen.label}, "
                + ("retrained from scratch" if self.start == 0 else f"continued from checkpoint {self.start}")
                + ": "
                f"measured change of L_{self.target} {_mnat(g.mean, g.half_width)} "
                f"({self.confidence:.0%} interval, {g.n} seeds, paired with the run's schedule)"
            )
        if best is None:
            return f"nothing measured for target {self.target}"
        g = best[1]
        bound = -(g.mean - g.half_width) if math.isfinite(g.half_width) else -g.mean
        return (
            f"no late-phase schedule from {self.origin} beats the run's for target {self.target} "
            f"by more than {max(bound, 0.0) * 1e3:.3g} mnat (measured: best {best[0]}, "
            f"{_mnat(g.mean, g.half_width)}, {g.n} seeds); the run's schedule is kept"
        )

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for c in self.candidates:
            rows.append(
                {
                    **c.to_record(),
                    "heuristic": self.heuristics.get(c.label),
                    "predicted": {
                        t: {"change": v[0], "se_bound": v[1]}
                        for t, v in self.predicted.get(c.label, {}).items()
                    },
                    "measured": {
                        t: g.to_dict() for t in self.targets if (g := self.gain(c.label, t)) is not None
                    },
                    "seeds": sorted(self.losses.get(c.label, {})),
                }
            )
        return {
            "format": "commute-recommend-phases/1",
            "about": self.about,
            "target": self.target,
            "kind": "phases",
            "start": self.start,
            "last_step": self.last,
            "verified": self.verified,
            "proposed": self.proposed,
            "summary": self.summary(),
            "chosen": self.chosen.to_record() if self.chosen else None,
            "confidence": self.confidence,
            "mix_weights": self.mix_weights,
            "candidates": rows,
            "run_losses": {str(s): v for s, v in self.losses.get(RUN, {}).items()},
            "versus_heuristics": [
                {"heuristic": name, "label": label, "difference": g.to_dict()}
                for name, label, g in self.versus_heuristics()
            ],
            "cost": {
                "analysis_seconds": self.analysis_seconds,
                "analysis_fraction_of_run": self.analysis_fraction,
                "seconds_per_step": self.seconds_per_step,
                "steps_trained": self.steps_trained,
                "steps_cached": self.steps_cached,
                "run_steps": self.last,
                "fraction_of_run": self.run_fraction,
                "seconds": round(self.seconds, 1),
            },
            "notes": self.notes,
            "original_schedule": self.original.to_records(),
            "schedule": self.chosen.schedule.to_records() if self.chosen else None,
        }


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _mnat(mean: float, half_width: float) -> str:
    if not math.isfinite(half_width):
        return f"{mean * 1e3:+.1f} mnat"
    return f"{mean * 1e3:+.1f} ± {half_width * 1e3:.1f} mnat"


# ------------------------------------------------------------------------------------------------ planning


def mixture_weights(schedule: Schedule, last: int) -> dict[str, float]:
    """The run's mixture: each domain's share of all data over ``[0, last)`` (what ``mix`` means for final
    losses; the schedule's constant weights when it is constant)."""
    totals = domain_totals(schedule, last)
    total = sum(totals.values())
    return {n: float(v / total) for n, v in totals.items()}


def heuristic_names(cands: Sequence[phases.Phase], original: Schedule, start: int) -> dict[str, str]:
    """Which candidates are the practitioner's heuristics: the half-way member with the shortest late phase
    for the domain with the smallest share ("low-resource late") and the largest ("high-resource late")."""
    w = original.weights_at(start)
    low, high = min(w, key=lambda n: w[n]), max(w, key=lambda n: w[n])
    out: dict[str, str] = {}
    for name, dom in (("low-resource late", low), ("high-resource late", high)):
        mine = [c for c in cands if c.late == dom]
        if not mine:
            continue
        latest = max(c.switch for c in mine)
        shortest = [c for c in mine if c.switch == latest]
        out[min(shortest, key=lambda c: c.late_share).label] = name
    return out


def default_start(analysis: AnalysisRun, last: int) -> int:
    """The earliest analysed checkpoint before ``last`` (the longest continuation: the most room to move
    data, and the most compute)."""
    steps = [s for s in analysis.checkpoint_steps if 0 < s < last]
    if not steps:
        raise CommuteError(
            f"no analysed checkpoint before step {last} to continue from",
            hint="analyze checkpoints before the run's end, or pass --until",
        )
    return min(steps)


def start_checkpoint(analysis: AnalysisRun, start: int) -> tuple[Path, bool]:
    """Where the continuations of ``start`` begin: (the analysed checkpoint at ``start``, False), or for
    ``start`` 0 (a retrain from scratch) the earliest analysed checkpoint, which supplies the run's model
    config, manifest, data and tokenizer, and True."""
    if start == 0:
        steps = [s for s in analysis.checkpoint_steps if s > 0]
        if not steps:
            raise CommuteError("no analysed checkpoint to take the run's model config from")
        return checkpoint_folder(analysis, min(steps)), True
    return checkpoint_folder(analysis, start), False


def checkpoint_folder(analysis: AnalysisRun, step: int) -> Path:
    """The folder of the analysed checkpoint at ``step`` (``run.json``), or a one-line error."""
    root = analysis.checkpoint_dir
    for c in analysis.run.get("checkpoints", []):
        if c.get("step") != step or not c.get("name"):
            continue
        for folder in (root / str(c["name"]), root):
            if folder.name == str(c["name"]) and folder.is_dir():
                return folder
        raise CommuteError(
            f"checkpoint {root / str(c['name'])} (step {step}) is gone",
            hint="verification continues the saved checkpoint",
        )
    steps = ", ".join(str(s) for s in analysis.checkpoint_steps)
    raise CommuteError(f"no analysed checkpoint at step {step}", hint=f"--start one of {steps}")


def plan(
    analysis: AnalysisRun,
    target: str,
    start: int,
    last: int,
    batch_size: int,
    max_candidates: int | None = None,
) -> PhaseAdvice:
    """Candidates from ``start`` ranked by the bracket's prediction on ``target`` (pure, no training)."""
    res = analysis.results
    available = list(dict.fromkeys(res["target"].astype(str)))
    if target not in available:
        raise CommuteError(
            f"unknown target {target!r}", hint=f"the results have targets {', '.join(available)}"
        )
    original = analysis.schedule
    cands = phases.candidates(original, start, last, batch_size)
    if not cands:
        raise CommuteError(
            f"no late-phase schedule fits between steps {start} and {last}",
            hint="pass an earlier --start",
        )
    predicted: dict[str, dict[str, tuple[float, float]]] = {}
    rows_of = {t: res[res["target"].astype(str) == t].to_dict("records") for t in available}
    for c in cands:
        for t in available:
            p = phases.bracket_prediction(original, c, rows_of[t])
            if p is not None:
                predicted.setdefault(c.label, {})[t] = p

    def rank(c: phases.Phase) -> float:
        return predicted.get(c.label, {}).get(target, (0.0, 0.0))[0]

    cands.sort(key=rank)
    if max_candidates is not None:
        cands = cands[:max_candidates]
    advice = PhaseAdvice(
        target=target, about=analysis.label(), start=start, last=last, original=original,
        mix_weights=mixture_weights(original, last), candidates=cands, predicted=predicted,
        confidence=float(analysis.run.get("options", {}).get("confidence", 0.95)),
    )  # fmt: skip
    advice.heuristics = heuristic_names(cands, original, start)
    advice.analysis_seconds = float(analysis.run.get("elapsed_seconds") or math.nan)
    earlier = [s for s in analysis.checkpoint_steps if 0 < s < start]
    if start == 0:
        advice.notes.append(
            "from scratch: each arm retrains the whole run (the run's initialization, seed and optimizer); "
            "advice for the next run of this recipe, not a continuation of this one"
        )
    elif earlier:
        advice.notes.append(
            f"changes before step {start} are not tried: --start {min(earlier)} moves data over more steps "
            "(more room, and more compute to measure)"
        )
    elif start > 0:
        advice.notes.append(
            f"changes before step {start} are not tried: with no saved checkpoint before it, measuring them "
            "would need a retrain from scratch"
        )
    return advice


# ------------------------------------------------------------------------------------------------ measuring


def verify(
    advice: PhaseAdvice,
    checkpoint: Path,
    *,
    seeds: int = 5,
    finalists: int = 2,
    cache: Path | None = None,
    device: str = "cpu",
    workers: int = 1,
    note: Callable[[str], None] = lambda _m: None,
    progress: Any = None,
) -> PhaseAdvice:
    """Screen every candidate at the run's seed, confirm the best ``finalists`` on ``seeds`` seeds, choose.

    ``progress``: an object with ``start(total)`` and ``step()`` (``render.progress.StepProgress``) or None.
    Raises ``CommuteError`` for a checkpoint that cannot be continued (no data, no tokenizer, ...).
    """
    from commute_cli.commands import continuations

    if seeds < 1:
        raise CommuteError(f"--seeds must be at least 1, got {seeds}", hint="3 or more for an interval")
    began = time.monotonic()
    scratch = advice.start == 0
    try:
        start = continuations.load_start(checkpoint, advice.last, note, device=device, scratch=scratch)
    except CommuteError as err:
        if "no training domains" not in err.message:
            raise
        raise CommuteError(
            f"cannot continue {checkpoint}: no commute.json beside it names the run's training data",
            hint="verification trains the run further; --no-verify gives the unverified ranking",
        ) from err
    if start.setup.step != advice.start:
        raise CommuteError(f"{checkpoint} is at step {start.setup.step}, not {advice.start}")
    if start.setup.batch_size != advice.candidates[0].batch_size:
        raise CommuteError(
            f"the candidates use batches of {advice.candidates[0].batch_size} rows, the run "
            f"{start.setup.batch_size}",
            hint=f"pass --batch-size {start.setup.batch_size}",
        )
    seed0 = start.setup.seed
    arms = {RUN: advice.original, **{c.label: c.schedule for c in advice.candidates}}
    plan_runs = [(RUN, seed0), *[(c.label, seed0) for c in advice.candidates]]
    n_final = min(finalists, len(advice.candidates))
    extra = [seed0 + k for k in range(1, seeds)]
    n_runs = len(plan_runs) + (n_final + 1) * len(extra)
    per_step = continuations.seconds_per_step(start, advice.original)
    advice.seconds_per_step = per_step
    note(
        f"verifying {len(advice.candidates)} candidate schedules on real "
        + (
            f"retrains from scratch (seed {seed0}, model config of {checkpoint})"
            if scratch
            else f"continuations from {checkpoint}"
        )
        + f" to step {advice.last}: up to {n_runs} continuations of {start.steps} steps "
        f"({n_runs * start.steps / advice.last:.2g}x "
        f"the run's {advice.last} training steps; cached ones are reused), about "
        f"{_duration(n_runs * start.steps * per_step)} in one process at {per_step:.3g} s/step measured here"
        + (f", {workers} worker processes" if workers > 1 else "")
    )
    if progress is not None:
        progress.start(n_runs * start.steps)

    def run(pairs: list[tuple[str, int]]) -> None:
        todo = []
        for label, seed in pairs:
            hit = continuations.cached_losses(cache, start, arms[label], seed)
            if hit is not None:
                advice.steps_cached += start.steps
                advice.losses.setdefault(label, {})[seed] = hit
                if progress is not None:
                    progress.step(start.steps)
            else:
                todo.append((label, seed))
        done = continuations.run_many(
            start, [(arms[lab], sd) for lab, sd in todo], workers=workers, cache=cache,
            on_done=progress.step if progress is not None else None,
        )  # fmt: skip
        for (label, seed), losses in zip(todo, done, strict=True):
            advice.losses.setdefault(label, {})[seed] = losses
            advice.steps_trained += start.steps

    run(plan_runs)
    screened = sorted(
        advice.candidates, key=lambda c: g.mean if (g := advice.gain(c.label, advice.target)) else math.inf
    )
    run([(label, seed) for seed in extra for label in [RUN, *[c.label for c in screened[:n_final]]]])
    advice.seconds = time.monotonic() - began
    best = advice.best_measured()
    if best is not None:
        g = best[1]
        significant = g.n >= 2 and math.isfinite(g.half_width) and g.mean + g.half_width < 0
        if significant:
            advice.chosen = next(c for c in advice.candidates if c.label == best[0])
    if seeds < 2:
        advice.notes.append("one seed: the measured changes have no error bar, so nothing is proposed")
    return advice


def unverified(advice: PhaseAdvice) -> PhaseAdvice:
    """Without measurement: the top-ranked candidate by the bracket's prediction, as a hypothesis, when the
    prediction favours it (its predicted change of the target is negative); nothing otherwise."""
    advice.verified = False
    top = advice.candidates[0]
    p = advice.predicted.get(top.label, {}).get(advice.target)
    if p is not None and p[0] < 0:
        advice.chosen = top
    else:
        advice.notes.append(
            "the bracket along the run does not favour any late phase for this target; measure (without "
            "--no-verify) to know"
        )
    return advice


def write_advice(advice: PhaseAdvice, out: Path) -> list[Path]:
    """``schedule.json``, ``schedule.csv`` (what ``commute train --schedule`` reads) when a schedule is
    proposed, and ``recommend.json`` always (what was measured, proposed or not), each atomically. Without
    a proposal, the schedule files and exports (``io.exports.FILES``) of an earlier answer are removed."""
    import json

    from commute_cli.io import atomic
    from commute_cli.io.schedules import save_schedule

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommuteError(f"cannot create {out}: {err.strerror}", hint="pass --out DIR") from err
    files: list[Path] = []
    for name in ("schedule.json", "schedule.csv"):
        if advice.chosen is not None:
            files.append(save_schedule(advice.chosen.schedule, out / name))
        elif (out / name).is_file():
            (out / name).unlink()  # a schedule of an earlier answer must not be taken for this one
    if advice.chosen is None:  # nor its exports for other trainers (recommend --export)
        for name in EXPORT_FILES.values():
            (out / name).unlink(missing_ok=True)
    target = out / "recommend.json"
    atomic.write_text(target, json.dumps(advice.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n")
    return [*files, target]


# ------------------------------------------------------------------------------------------------ run facts


def run_last_step(analysis: AnalysisRun) -> int:
    """The run's last step: its manifest's ``max_steps``, else the last analysed checkpoint."""
    value = analysis.run_manifest().get("max_steps")
    if isinstance(value, int) and value > 0:
        return value
    return max(analysis.checkpoint_steps)


def run_batch_size(analysis: AnalysisRun) -> int:
    """Rows per step of the run (``AnalysisRun.run_batch_size``); without one, weights are on a 1/1000 grid
    (1000 rows), which ``commute train`` realises with its own batch size only approximately."""
    return analysis.run_batch_size() or 1000


def measured_table(advice: PhaseAdvice) -> Any:
    """One row per candidate x target: label, heuristic, predicted (bracket) and measured change (nats)."""
    import pandas as pd

    rows = []
    for c in advice.candidates:
        for t in advice.targets:
            g = advice.gain(c.label, t)
            p = advice.predicted.get(c.label, {}).get(t)
            rows.append(
                {
                    "candidate": c.label,
                    "late": c.late,
                    "start": c.start,
                    "switch": c.switch,
                    "late_share": c.late_share,
                    "heuristic": advice.heuristics.get(c.label, ""),
                    "chosen": advice.chosen is not None and c.label == advice.chosen.label,
                    "target": t,
                    "predicted_change": p[0] if p else math.nan,
                    "predicted_se_bound": p[1] if p else math.nan,
                    "measured_change": g.mean if g else math.nan,
                    "measured_se": g.se if g else math.nan,
                    "measured_half_width": g.half_width if g else math.nan,
                    "seeds": g.n if g else 0,
                }
            )
    return pd.DataFrame(rows)
