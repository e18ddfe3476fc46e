"""``commute recommend``'s report: the shifts in words and numbers, the predicted change of every target's
loss per shift and in total, the skipped checkpoints and the conservation check.

It gets the recommendation and draws it; nothing here computes or reads inputs.
"""

from __future__ import annotations

from typing import Any

from rich.console import Group, RenderableType
from rich.text import Text

from commute_cli.render.formats import make_table
from commute_cli.render.style import format_si_interval


def _effect_cell(change: float, se: float, in_regime: bool = True) -> str:
    text = ("+" if change > 0 else "") + format_si_interval(change, se)
    return text + ("" if in_regime else " (outside regime)")


def recommend_report(rec: Any) -> Group:
    """``commute recommend``'s human output for a :class:`commute_cli.commands.recommend.Recommendation`: the
    shifts in words and numbers, a table of predicted changes per target (the chosen target and the
    trade-off on every other one), the totals, the skipped checkpoints and the conservation check."""
    parts: list[RenderableType] = [Text(rec.summary(), style="bold")]
    if rec.shifts:
        for sh in rec.shifts:
            parts.append(Text(f"  step {sh.step}: {sh.words()}\n      {sh.numbers()}"))
        others = [t for t in rec.targets if t != rec.target]
        columns = [
            "checkpoint",
            "shift",
            f"ΔL_{rec.target} (target)",
            *[f"ΔL_{t}" for t in others],
        ]
        rows = []
        for sh in rec.shifts:
            cells: list[Any] = [
                str(sh.step),
                f"{sh.earlier} earlier, {sh.later} later: ±{float(sh.amount):g} × {sh.window} steps",
            ]
            for t in [rec.target, *others]:
                e = sh.effects.get(t)
                cells.append("" if e is None else _effect_cell(e.change, e.se, e.in_regime))
            rows.append(cells)
        total = ["total", ""]
        for t in [rec.target, *others]:
            change, se = rec.totals.get(t, (0.0, 0.0))
            total.append(_effect_cell(change, se))
        rows.append(total)
        parts.append(
            make_table(
                "predicted change of each target's loss (negative = better), ± one SE",
                columns,
                rows,
                justify=["right", "left", *["right"] * (len(columns) - 2)],
            )
        )
        kept = all(v["equal"] for v in rec.domain_totals.values())
        totals = ", ".join(f"{n} {v['original']:.6g}" for n, v in rec.domain_totals.items())
        parts.append(
            Text(
                f"every domain's total over steps 0-{rec.last_step} "
                + ("is unchanged (exactly): " if kept else "agrees to float rounding: ")
                + totals
                + " (weight x steps)"
            )
        )
    for sk in rec.skipped:
        parts.append(Text(f"  skipped step {sk.step} ({sk.pair}): {sk.reason}", style="dim"))
    if rec.shifts:
        parts.append(
            Text(
                "ΔL: predicted change at the end of each window (docs/MATH.md; EL scales as shift x window^2 "
                "from the analysed dw and horizon). Totals add the local predictions; their ± adds the SEs "
                "(the same samples are used at every checkpoint, so errors are correlated).",
                style="dim",
            )
        )
    return Group(*parts)
