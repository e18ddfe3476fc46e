"""The few lines that end ``commute analyze``'s table: the bottom line of :mod:`commute_cli.core.bottom_line`
in plain words (the change, its effect on every target with the interval, how far such predictions held on
real runs, and the command that acts on it)."""

from __future__ import annotations

import shlex

from commute_cli.core.bottom_line import BottomLine, Effect
from commute_cli.render.style import format_interval_scaled, si_scale

__all__ = ["act_command", "bottom_line_lines"]

DEFAULT_OUT = "commute_out"


def act_command(target: str, out: str | None = None) -> str:
    """``commute recommend --target T`` (with ``--from OUT`` when the results are not in the default
    folder), quoted for a POSIX shell: the line a user copies to act on the analysis."""
    words = ["commute", "recommend", "--target", target]
    if out is not None and out.rstrip("/") != DEFAULT_OUT:
        words += ["--from", out]
    return " ".join(shlex.quote(w) for w in words)


def _effects(effects: tuple[Effect, ...], conf_pct: str) -> str:
    factor, prefix, _ = si_scale([v for e in effects for v in (e.change, e.half_width)])
    parts = []
    for e in effects:
        text = format_interval_scaled(e.change, e.half_width, factor, prefix)
        if not text.startswith("-"):
            text = "+" + text
        parts.append(f"{e.target} {text}" + ("" if e.significant else " (n.s.)"))
    return f"predicted change of each target's loss ({conf_pct}): " + ", ".join(parts) + "."


def _reliability(line: BottomLine) -> str:
    f = line.followed
    shipped = (
        f"followed on the shipped run, local swaps realised {100 * f.low:.0f}-{100 * f.high:.0f}% of their "
        f"predicted gain, a late phase {f.late_phase:.2g}x of its bracket's"
    )
    s = line.sizes
    if s is None:
        return f"reliability: not measured for this run's optimizer; {shipped}."
    if s.family == "sgd":  # the SGD record was measured on saturated windows, which are never chosen here
        return (
            "reliability: on a tiny plain-SGD run inside the local regime the prediction was 0.82-1.04x the "
            f"real effect (tests/test_intervention.py; in saturated windows {s.sign_agree} of {s.cases} "
            f"signs right); {shipped}."
        )
    return (
        f"reliability: on {s.family}-family runs such predictions had the right sign in {s.sign_agree} of "
        f"{s.cases} real interventions and {s.low:.3g} to {s.high:.3g}x the observed size; {shipped}."
    )


def bottom_line_lines(line: BottomLine, out: str | None = None, confidence: float = 0.95) -> list[str]:
    """At most 5 lines: what to change (or that nothing is supported), its predicted effect on every
    target with its ``confidence`` interval (SI-prefixed nats, one prefix for all), the measured
    reliability of such predictions, and the command that measures a schedule before proposing it
    (``recommend``'s real continuations: a local swap's size did not pay off when followed)."""
    conf_pct = f"{100 * confidence:.3g}%"
    c = line.change
    if c is None:
        why = f"none of the {line.rows} rows is a significant reorder worth acting on"
        if line.unusable:
            why = (
                f"{line.unusable} of the {line.significant} significant rows lie outside the local regime "
                "(their sizes cannot be trusted) and no other row is significant"
            )
        target = "mix" if "mix" in line.targets else (line.targets[0] if line.targets else "mix")
        return [
            f"bottom line: no change is supported: {why}; the n.s. rows say how many more samples would "
            "resolve them.",
            f"  to measure real schedules instead: {act_command(target, out)}  (late phases on real "
            "continuations; it trains, and prints its cost first)",
        ]
    left_out = f"; {line.unusable} of them outside the local regime, left out" if line.unusable else ""
    regime = "" if c.regime in ("inside", "") else f", regime {c.regime}"
    return [
        f"bottom line: move {c.earlier} earlier and {c.later} later around step {c.step} (dw {c.dw:g} for "
        f"{c.horizon} steps each way{regime}): the largest significant predicted gain, on {c.target} "
        f"({line.significant} of {line.rows} rows significant{left_out}).",
        "  " + _effects(line.effects, conf_pct),
        "  " + _reliability(line),
        f"  to act on it: {act_command(c.target, out)}  (measures late-phase schedules on real "
        "continuations before proposing one; it trains, and prints its cost first)",
    ]
