"""Figures: ONE criterion figure, drawn by both ``commute analyze --plot`` and ``commute plot``.

:func:`criterion_figure` shows exactly the numbers of the analysis table (:func:`commute_cli.render.tables.
analysis_tables`): per target, the predicted change ``EL^{ij}`` of each checkpoint at its own ``dw`` and
horizon (no rescaling), with the same confidence interval as the table and the verdict's test
(``± t_crit x SE``); behind each point the intervention's window ``[step - horizon, step + horizon]``,
shaded by verdict (clipped to the run's last step); below, the per-domain losses. With ``commute validate``
results, a second column shows the loss plane (the paper's Figures 3-4) with the intervals of validate's
table (none with one repeat, and the legend says so).

Nothing here reads or writes files: figures get DataFrames and return a matplotlib Figure; :func:`png_bytes`
turns one into PNG bytes for the caller to write (atomically, :mod:`commute_cli.io.atomic`).
"""

from __future__ import annotations

import io
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from commute_cli.errors import CommuteError
from commute_cli.render.style import si_scale, verdict_style
from commute_cli.render.tables import (
    earlier_domain,
    interval_half_widths,
    regime_labels,
    schedule_words,
    table_confidence,
)

__all__ = [
    "VALIDATE_PLANE_COLUMNS",
    "check_validate_table",
    "criterion_figure",
    "png_bytes",
]


def _pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any, dpi: int = 110) -> bytes:
    """``fig`` as PNG bytes; the figure is closed (its memory freed) either way."""
    plt = _pyplot()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# the criterion panels


def _window_label(verdict: str) -> str:
    return f"window (± horizon): {verdict_style(verdict).words}"


def draw_criterion(
    ax: Any, df: pd.DataFrame, target: str, conf_pct: str, last_step: float | None = None
) -> None:
    """One target's panel: ``EL^{ij}`` per pair as in the table (nats, its own ``dw`` and horizon; the
    axis in one SI prefix, named in its label, as the table's column), with the table's confidence
    interval as error bars; each checkpoint's intervention window ``[step - horizon, step + horizon]``
    (clipped to ``[0, last_step]``: no window past the end of training) shaded in the colour of its
    verdict (the highest-ranked one when pairs differ); above an actionable window, the domain to move
    earlier; a red ring: outside the local regime or saturated (its nats are unreliable, the sign is a
    weaker hint)."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    half = interval_half_widths(df)
    regimes = regime_labels(df)
    pairs = list(dict.fromkeys(zip(df["domain_i"], df["domain_j"], strict=True)))
    shown: dict[str, Any] = {}
    labels: list[tuple[float, str]] = []
    for step, g in df.groupby("step", sort=True):
        verdict = str(max(g["verdict"], key=lambda v: verdict_style(v).rank))
        style = verdict_style(verdict)
        h = float(g["horizon"].max())
        x0 = max(float(step) - h, 0.0)
        x1 = float(step) + h if last_step is None else min(float(step) + h, float(last_step))
        ax.axvspan(x0, x1, facecolor=style.color, alpha=0.3, lw=0)
        ax.axvline(x0, color=style.color, lw=0.6, alpha=0.9)
        ax.axvline(x1, color=style.color, lw=0.6, alpha=0.9)
        shown.setdefault(verdict, style)
        if style.actionable:
            rows = g[g["verdict"] == verdict]
            words = sorted({earlier_domain(r) for r in rows.itertuples(index=False)} - {""})
            if words:
                labels.append((float(step), ", ".join(words) + " earlier"))
    outside = False
    steps = sorted(set(float(s) for s in df["step"]))
    gap = min((b - a for a, b in itertools.pairwise(steps)), default=1.0)
    for k, (i, j) in enumerate(pairs):
        g = df[(df["domain_i"] == i) & (df["domain_j"] == j)]
        # several pairs: side by side around the checkpoint's step (a few % of the spacing), not on top
        dodge = (k - (len(pairs) - 1) / 2) * 0.04 * gap
        label = f"predicted change EL ({conf_pct} interval)"
        if len(pairs) > 1:
            label = f"{i} before {j}: " + label
        # points, not a line: each checkpoint has its own horizon, so neighbours are not one curve
        x = g["step"].astype(float) + dodge
        ax.errorbar(x, g["el_ij"], yerr=half.loc[g.index], ls="none", marker="o", capsize=3, label=label)
        if regimes is not None:
            # the same rows the table calls outside or saturated ("uncertain" is not flagged: its interval
            # straddles the limit)
            out = regimes.loc[g.index].isin(["outside", "saturated"])
            if out.any():
                ax.plot(
                    x[out],
                    g["el_ij"][out],
                    ls="none",
                    marker="o",
                    ms=13,
                    mfc="none",
                    mec="red",
                    mew=1.5,
                )
                outside = True
    ax.axhline(0.0, color="0.4", lw=0.8)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.15 * (hi - lo))  # room for the direction labels above the data
    for x, text in labels:
        ax.text(x, 0.97, text, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=8)
    factor, prefix, _ = si_scale([*df["el_ij"], *half])
    ax.yaxis.set_major_formatter(_fixed_prefix(factor))
    ax.set_ylabel(f"change of L_{target} ({prefix}nat)")
    if len(pairs) == 1:
        i, j = pairs[0]
        what = f"+dw on {i}, -dw on {j} before the checkpoint, the reverse after"
    else:
        what = "+dw on the first domain of a pair before the checkpoint, the reverse after"
    ax.set_title(f"Target {target}: predicted change of its loss ({what}); below 0: helps", fontsize=9)
    handles, _ = ax.get_legend_handles_labels()
    for verdict, style in sorted(shown.items(), key=lambda kv: -kv[1].rank):
        handles.append(Patch(facecolor=style.color, alpha=0.5, label=_window_label(verdict)))
    if outside:
        handles.append(
            Line2D(
                [],
                [],
                ls="none",
                marker="o",
                ms=9,
                mfc="none",
                mec="red",
                label="outside the local regime (or saturated)",
            )
        )
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)


def _fixed_prefix(factor: float) -> Any:
    """Tick labels in one SI prefix for the whole axis (the unit in the axis label): ``0.02`` with ``factor``
    1e-3 is ``20``; zero is ``0``, not ``0 nat`` among ``20 mnat``."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _pos: Any = None) -> str:
        scaled = round(value / factor, 9) + 0.0  # no "-0", no float noise
        return f"{scaled:g}"

    return FuncFormatter(label)


def draw_losses(ax: Any, losses: pd.DataFrame, t_crit: float | None, conf_pct: str) -> None:
    """Per-domain mean loss at each checkpoint with the interval ``± t_crit x SE`` (the analysis sample's
    sample blocks; ``± 1 SE`` when ``t_crit`` is unknown)."""
    scale = 1.0 if t_crit is None else float(t_crit)
    for name, g in losses.groupby("domain", sort=False):
        ax.errorbar(g["step"], g["loss"], yerr=scale * g["loss_se"], marker="o", capsize=3, label=str(name))
    ax.set_ylabel("loss (nat/token)")
    ax.set_xlabel("training step")
    what = f"{conf_pct} interval" if t_crit is not None else "± 1 SE"
    ax.set_title(f"Mean loss per domain at the checkpoints (analysis sample, {what})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)


def _suptitle(run: Mapping[str, Any] | None) -> str:
    if not run:
        return ""
    where = (run.get("options") or {}).get("ckpt_dir")
    sched = schedule_words(run.get("schedule"))
    text = "Where the domain order was locally suboptimal"
    if where:
        text += f": {where}"
    if sched:
        text += f", schedule {sched}"
    return text


# --------------------------------------------------------------------------------------------------
# the loss plane of validate results

#: columns of ``validate.csv`` (written by ``commute validate``) that the loss plane reads; one row per
#: (validated checkpoint ``step``, domain ``target``), the pair in ``domain_1``/``domain_2``. Optional:
#: ``obs_el12_se``, ``obs_el21_se``, ``pred_el12``, ``pred_el21``, ``loss_ckpt``.
VALIDATE_PLANE_COLUMNS = ("step", "target", "domain_1", "domain_2", "loss_base", "obs_el12", "obs_el21")


def check_validate_table(df: pd.DataFrame, source: str = "validate.csv") -> pd.DataFrame:
    """The rows of a validate table usable for the loss plane (both pair domains present per step)."""
    missing = [c for c in VALIDATE_PLANE_COLUMNS if c not in df.columns]
    if missing:
        raise CommuteError(
            f"{source} lacks columns {', '.join(missing)} needed for the loss plane",
            hint="rerun `commute validate`, or remove the file to plot without the loss plane",
        )
    return df


def _plane_points(validate: pd.DataFrame) -> list[dict[str, Any]]:
    """Per validated step: base, 12 and 21 end points (observed, with the half-widths of validate's table:
    ``obs_t_crit x SE``, its confidence interval; ``1 x SE`` from a validate.csv without ``obs_t_crit``; 0
    with one repeat, which has no SE) and the predicted ones; ``bars`` says which."""
    out = []
    for step, g in validate.groupby("step", sort=True):
        d1, d2 = str(g["domain_1"].iloc[0]), str(g["domain_2"].iloc[0])
        by = {str(r["target"]): r for _, r in g.iterrows()}
        if d1 not in by or d2 not in by:
            continue
        r1, r2 = by[d1], by[d2]

        def get(r: Any, col: str, default: float = math.nan) -> float:
            return float(r[col]) if col in r and pd.notna(r[col]) else default

        base = (get(r1, "loss_base"), get(r2, "loss_base"))
        if "obs_t_crit" in r1:  # validate's table: ± obs_t_crit x SE
            t_crit, bars = get(r1, "obs_t_crit"), "confidence interval"
        else:  # a validate.csv of an earlier version: ± 1 SE, said as such
            t_crit, bars = 1.0, "1 SE"
        has_se = all(math.isfinite(get(r, f"obs_el{k}_se")) for r in (r1, r2) for k in ("12", "21"))
        if not has_se or not math.isfinite(t_crit):
            bars, t_crit = "", 0.0  # one repeat: no SE, no interval
        point = {"step": int(step), "d1": d1, "d2": d2, "base": base, "bars": bars}
        point["ckpt"] = (get(r1, "loss_ckpt"), get(r2, "loss_ckpt"))
        for key in ("12", "21"):
            point[key] = (base[0] + get(r1, f"obs_el{key}"), base[1] + get(r2, f"obs_el{key}"))
            point[key + "_se"] = (
                t_crit * get(r1, f"obs_el{key}_se", 0.0) if t_crit else 0.0,
                t_crit * get(r2, f"obs_el{key}_se", 0.0) if t_crit else 0.0,
            )
            pred_col = f"pred_el{key}"
            p1 = get(r1, pred_col, -get(r1, "pred_el12") if key == "21" else math.nan)
            p2 = get(r2, pred_col, -get(r2, "pred_el12") if key == "21" else math.nan)
            point["pred" + key] = (base[0] + p1, base[1] + p2)
        out.append(point)
    return out


def _draw_plane_overview(ax: Any, losses: pd.DataFrame, points: Sequence[dict[str, Any]]) -> None:
    """The paper's Figures 3-4 at full scale: the base trajectory in the (L_1, L_2) plane and, per
    validated checkpoint, the branch end points (too close together to tell apart at this scale: see the
    zoomed panels)."""
    d1, d2 = points[0]["d1"], points[0]["d2"]
    l1 = losses[losses["domain"] == d1].set_index("step")["loss"]
    l2 = losses[losses["domain"] == d2].set_index("step")["loss"]
    common = [s for s in l1.index if s in l2.index]
    if common:
        ax.plot(l1[common], l2[common], "-o", color="tab:blue", ms=4, label="checkpoints (analyze sample)")
        for s in common:
            ax.annotate(str(s), (l1[s], l2[s]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    for k, p in enumerate(points):
        if all(math.isfinite(v) for v in p["ckpt"]):
            ax.annotate(
                "",
                xy=p["base"],
                xytext=p["ckpt"],
                arrowprops={"arrowstyle": "->", "color": "tab:cyan", "lw": 1.2},
            )
        ax.plot(
            *p["base"],
            "s",
            color="tab:cyan",
            ms=5,
            label="validate: end of the base branch" if k == 0 else None,
        )
        ax.plot(*p["12"], "o", color="tab:red", ms=4, label=f"'12' ({d1} up first)" if k == 0 else None)
        ax.plot(*p["21"], "^", color="tab:purple", ms=4, label=f"'21' ({d2} up first)" if k == 0 else None)
    ax.set_xlabel(f"L_{d1} (nat/token)")
    ax.set_ylabel(f"L_{d2} (nat/token)")
    ax.set_title("loss plane: trajectory and interventions (cf. paper Fig. 3-4)", fontsize=9)
    ax.legend(fontsize=7)


def _draw_plane_zoom(ax: Any, p: dict[str, Any]) -> None:
    """One validated checkpoint, zoomed on the end of the base branch: observed '12' / '21' end points with
    the bars of validate's table (its confidence interval; none with one repeat, and the legend says so), the
    predicted ones (hollow, dashed), and the direction training was moving."""
    bx, by = p["base"]
    ax.plot(bx, by, "s", color="tab:cyan", ms=8, label="base", zorder=3)
    styles = {"12": ("o", "tab:red"), "21": ("^", "tab:purple")}
    what = f"± {p['bars']}" if p["bars"] else "(one repeat: no SE, no interval)"
    for key, (marker, color) in styles.items():
        (x, y), (ex, ey) = p[key], p[key + "_se"]
        ax.errorbar(
            x, y, xerr=ex, yerr=ey, fmt=marker, color=color, ms=7, capsize=3, label=f"'{key}' observed {what}"
        )
        ax.plot([bx, x], [by, y], "-", color=color, lw=0.8, alpha=0.7)
        px, py = p["pred" + key]
        if math.isfinite(px) and math.isfinite(py):
            ax.plot(px, py, marker, mfc="none", mec=color, ms=9, mew=1.5, label=f"'{key}' predicted")
            ax.plot([bx, px], [by, py], "--", color=color, lw=0.8, alpha=0.7)
    xs, ys = [bx, p["pred12"][0], p["pred21"][0]], [by, p["pred12"][1], p["pred21"][1]]
    for key in ("12", "21"):  # the observed points with their error bars
        (x, y), (ex, ey) = p[key], p[key + "_se"]
        xs += [x - ex, x + ex]
        ys += [y - ey, y + ey]
    xs = [v for v in xs if math.isfinite(v)]
    ys = [v for v in ys if math.isfinite(v)]
    span = max(max(xs) - min(xs), max(ys) - min(ys), 1e-6) * 0.65
    cx, cy = (max(xs) + min(xs)) / 2, (max(ys) + min(ys)) / 2
    ax.set_xlim(cx - span, cx + span)
    ax.set_ylim(cy - span, cy + span)
    ax.set_aspect("equal", adjustable="box")
    ax.axvline(bx, color="grey", lw=0.5, ls=":")
    ax.axhline(by, color="grey", lw=0.5, ls=":")
    cxk, cyk = p["ckpt"]
    if math.isfinite(cxk) and math.isfinite(cyk) and (cxk, cyk) != (bx, by):
        vx, vy = bx - cxk, by - cyk
        norm = math.hypot(vx, vy)
        ax.annotate(
            "",
            xy=(0.15 + 0.08 * vx / norm, 0.14 + 0.08 * vy / norm),
            xytext=(0.15, 0.14),
            xycoords="axes fraction",
            textcoords="axes fraction",
            arrowprops={"arrowstyle": "->", "color": "tab:cyan"},
        )
        ax.text(
            0.15,
            0.03,
            "training direction",
            transform=ax.transAxes,
            fontsize=7,
            color="tab:cyan",
            ha="center",
        )
    ax.set_xlabel(f"L_{p['d1']}")
    ax.set_ylabel(f"L_{p['d2']}")
    ax.ticklabel_format(useOffset=True, style="plain")
    ax.tick_params(labelsize=7)
    ax.set_title(f"validate at step {p['step']} (zoom)", fontsize=9)
    ax.legend(fontsize=6, loc="upper right")


# --------------------------------------------------------------------------------------------------
# the figure


def criterion_figure(
    results: pd.DataFrame,
    losses: pd.DataFrame,
    validate: pd.DataFrame | None = None,
    run: Mapping[str, Any] | None = None,
) -> Any:
    """The criterion figure of ``commute analyze --plot`` and ``commute plot`` (returned, not saved).

    Args:
        results: ``results.csv`` rows (columns ``step, target, domain_i, domain_j, el_ij, el_se, horizon,
            verdict``; ``t_crit``, ``n_blocks``, ``in_regime``/``regime`` used when present).
        losses: ``losses.csv`` rows (``step, domain, loss, loss_se``).
        validate: ``validate.csv`` rows (:data:`VALIDATE_PLANE_COLUMNS`) for the loss-plane column, or None.
        run: ``run.json``; names the checkpoints and the schedule in the figure's title when given, and its
            ``last_step`` (the run's last checkpoint) ends the last window (else the last step drawn).

    Left column: one panel per target (:func:`draw_criterion`) and the loss curves (:func:`draw_losses`).
    Right column, with validate results: the loss plane at full scale and one zoomed panel per validated
    checkpoint (at most four).
    """
    plt = _pyplot()
    targets = list(dict.fromkeys(results["target"]))
    conf_pct = f"{100 * table_confidence(results):.3g}%"
    t_crit = float(results["t_crit"].iloc[0]) if "t_crit" in results and len(results) else None
    points = _plane_points(validate) if validate is not None and not validate.empty else []
    points = points[:4]
    n_left = len(targets) + 1
    if not points:
        fig, axes = plt.subplots(n_left, 1, figsize=(10.5, 2.9 * n_left), sharex=True)
        left = list(axes)
    else:
        n_right = 1 + len(points)
        rows = max(n_left, n_right) * 2
        fig = plt.figure(figsize=(17, 2.9 * max(n_left, n_right)))
        grid = fig.add_gridspec(rows, 2, width_ratios=[1.5, 1])
        left, per = [], rows // n_left
        for k in range(n_left):
            left.append(fig.add_subplot(grid[k * per : (k + 1) * per, 0], sharex=left[0] if left else None))
        per_r = rows // n_right
        over = fig.add_subplot(grid[0:per_r, 1])
        _draw_plane_overview(over, losses, points)
        for k, p in enumerate(points):
            _draw_plane_zoom(fig.add_subplot(grid[(k + 1) * per_r : (k + 2) * per_r, 1]), p)
    last = (run or {}).get("last_step")
    last_step = float(last) if last is not None else float(results["step"].max())
    for ax, target in zip(left, targets, strict=False):
        draw_criterion(ax, results[results["target"] == target], str(target), conf_pct, last_step)
    draw_losses(left[-1], losses, t_crit, conf_pct)
    for ax in left[:-1]:
        ax.tick_params(labelbottom=False)
    title = _suptitle(run)
    if title:
        fig.suptitle(title, fontsize=11, x=0.01, ha="left")
    fig.tight_layout()
    return fig
