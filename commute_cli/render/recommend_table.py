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
            note = f"\n      {sh.shortened()}" if sh.shortened() else ""
            parts.append(Text(f"  step {sh.step}: {sh.words()}\n      {sh.numbers()}{note}"))
        for ps in rec.pair_sets:
            one = ps["single_pair"]
            parts.append(
                Text(
                    f"  step {ps['step']}: {len(ps['pairs'])} disjoint pairs moved together ({ps['words']}): "
                    f"lower {rec.confidence:.0%} bound of the gain {ps['gain_lower_bound']:.3g} nats against "
                    f"{one['gain_lower_bound']:.3g} for the best single pair ({one['pair']}); together "
                    f"{ps['change']:+.3g} ± {ps['half_width']:.2g} nats (SE {ps['se']:.2g} from per-block "
                    f"sums; adding variances would say {ps['independent_se']:.2g})"
                )
            )
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
                cells.append("" if e is None else _effect_cell(e.change, e.half_width, e.in_regime))
            rows.append(cells)
        total = ["total", ""]
        for t in [rec.target, *others]:
            info = rec.total_info.get(t, {"change": 0.0, "half_width": 0.0})
            total.append(_effect_cell(info["change"], info["half_width"]))
        rows.append(total)
        parts.append(
            make_table(
                f"predicted change of each target's loss (lower = better), ± {rec.confidence:.0%} interval",
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
                "from the analysed dw and horizon). ±: the analysis' confidence interval (t_crit x SE). "
                "Totals add the local predictions; their SE is "
                + (
                    "that of the per-block sums (every shift is estimated on the same samples: covariances "
                    "included)."
                    if rec.total_info[rec.target]["se_method"] == "per-block"
                    else "the sum of the SEs, a bound (no statistics cache found beside the results)."
                ),
                style="dim",
            )
        )
    return Group(*parts)
