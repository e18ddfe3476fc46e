"""``commute recommend --kind phases``'s report: the bottom line, every candidate measured (the heuristics
among them) with the bracket's prediction beside the measurement, the cost, and the command that applies
the schedule.

It gets the advice and draws it; nothing here computes or reads inputs.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from commute_cli.render.formats import make_table


def train_line(
    manifest_dir: str,
    init: str | None,
    schedule: str,
    last: int,
    out: str,
    *,
    model_config: str | None = None,
    seed: int | None = None,
) -> str:
    """The ``commute train`` command that trains a schedule file from ``init`` (a checkpoint folder; None:
    from scratch, with ``model_config`` and ``seed`` when given) to step ``last`` with the run's data,
    tokenizer, optimizer and batch size (its ``commute.json``)."""
    parts = ["commute", "train", out, "--manifest", manifest_dir]
    if init is not None:
        parts += ["--init", init]
    elif model_config is not None:
        parts += ["--init", model_config]
    if init is None and seed:
        parts += ["--seed", str(seed)]
    parts += ["--schedule", schedule, "--steps", str(last)]
    return " ".join(shlex.quote(p) for p in parts)


def _mnat(mean: float, half_width: float, n: int) -> str:
    if not math.isfinite(mean):
        return ""
    text = f"{mean * 1e3:+.1f}"
    if n >= 2 and math.isfinite(half_width):
        text += f" ± {half_width * 1e3:.1f}"
    return text + f" ({n})"


def _pred(p: Sequence[float] | None) -> str:
    if p is None:
        return ""
    return f"{p[0] * 1e3:+.3g}"


def phase_report(advice: Any) -> Group:
    """The human output for a :class:`commute_cli.commands.phase_advice.PhaseAdvice`."""
    parts: list[RenderableType] = [Text(advice.summary(), style="bold")]
    targets = advice.targets
    columns = [f"candidate (from {advice.origin})", "", *[f"ΔL_{t} measured" for t in targets]]
    columns.append(f"ΔL_{advice.target} bracket")
    rows = []
    for c in advice.candidates:
        mark = "→" if advice.chosen is not None and c.label == advice.chosen.label else ""
        name = c.label + (f" ({advice.heuristics[c.label]})" if c.label in advice.heuristics else "")
        cells = [name, mark]
        for t in targets:
            g = advice.gain(c.label, t)
            cells.append("" if g is None else _mnat(g.mean, g.half_width, g.n))
        cells.append(_pred(advice.predicted.get(c.label, {}).get(advice.target)))
        rows.append(cells)
    title = (
        f"change of each final loss against the run's schedule, mnat (lower = better), "
        f"± {advice.confidence:.0%} interval over paired seeds (seeds)"
        if advice.verified
        else "not measured (--no-verify): the bracket's prediction only, mnat"
    )
    parts.append(make_table(title, columns, rows, justify=["left", "left", *["right"] * (len(columns) - 2)]))
    for name, label, g in advice.versus_heuristics():
        word = "beats" if g.mean < 0 else "does not beat"
        by = _mnat(g.mean, g.half_width, g.n)
        parts.append(Text(f"against {name} ({label}): {word} it by {by} mnat on {advice.target}"))
    if advice.verified:
        took, frac = advice.analysis_seconds / 60, advice.analysis_fraction
        analysis = (
            f"; the analysis took {took:.1f} min, {frac:.2g}x the run's training time at the rate timed here"
            if math.isfinite(frac)
            else ""
        )
        parts.append(
            Text(
                f"cost: {advice.steps_trained} training steps ({advice.run_fraction:.2g}x the run's "
                f"{advice.last}), {advice.seconds / 60:.1f} min"
                + (f"; {advice.steps_cached} steps reused from the cache" if advice.steps_cached else "")
                + analysis
            )
        )
    measured = (
        "measured: final held-out losses of real continuations from the checkpoint to the run's last step, "
        "each paired with the run's schedule continued on the same stream seed; one seed has no interval. "
        "The best of several measured candidates is optimistic: its gain on new seeds is usually smaller. "
    )
    parts.append(
        Text(
            (measured if advice.verified else "")
            + "bracket: the criterion along the run summed over the displaced data "
            "(docs/MATH.md 'Schedules of useful size'), far outside its regime at these sizes: "
            "a ranking and a hypothesis, not a size (benchmarks/advice.py reports its realised/predicted "
            "ratio).",
            style="dim",
        )
    )
    for line in advice.notes:
        parts.append(Text(f"note: {line}", style="dim"))
    return Group(*parts)
