"""Rendering: turn result tables (pandas DataFrames) into rich tables, CSV or JSON.

Commands compute a DataFrame and hand it here; nothing in this module does math or reads inputs.
The generic helpers (:class:`OutputFormat`, :func:`open_output`, :func:`emit_dataframe`,
:func:`make_table`, :func:`print_renderable`, :func:`emit`, the number formatters) are meant to be
reused by every command; command-specific layouts (e.g. :func:`table1`) build on them.

Machine formats (csv, json) write only the data, so they can be piped; human text (titles, captions,
notes) appears only in the table format.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from commute_cli.errors import CommuteError
from commute_cli.io import atomic

__all__ = [
    "OutputFormat",
    "emit",
    "emit_dataframe",
    "format_interval",
    "format_number",
    "make_table",
    "open_output",
    "print_renderable",
    "table1",
    "with_caption",
]

#: Width used for rich output when the stream is not a terminal (files, pipes, test runners), where
#: rich would otherwise assume 80 columns and wrap wide tables.
NON_TTY_WIDTH = 160


class OutputFormat(str, Enum):
    """Output formats every command accepts via ``--format``."""

    table = "table"
    csv = "csv"
    json = "json"


@contextlib.contextmanager
def open_output(out: Path | str | None) -> Iterator[TextIO]:
    """Yield the stream to write to: ``out`` opened for writing (UTF-8), or stdout when ``out`` is None.

    A file that cannot be opened is a user error (:class:`CommuteError`), not a traceback.
    """
    if out is None:
        yield sys.stdout
        return
    path = Path(out)
    try:
        fh = path.open("w", encoding="utf-8", newline="")
    except OSError as err:
        raise CommuteError(
            f"cannot write {path}: {err.strerror or err}", hint="check the folder exists and is writable"
        ) from err
    with fh:
        yield fh


def emit_dataframe(df: pd.DataFrame, fmt: OutputFormat | str, stream: TextIO | None = None) -> None:
    """Write ``df`` as CSV (header, no index) or JSON (a list of row objects, NaN -> null) to ``stream``.

    Floats keep full precision (CSV uses ``repr``, JSON 15 significant digits) so downstream tools see
    the same numbers as the table. Nothing else is written, so the output can be piped.
    """
    stream = sys.stdout if stream is None else stream
    fmt = OutputFormat(fmt)
    if fmt is OutputFormat.csv:
        df.to_csv(stream, index=False, lineterminator="\n")
    elif fmt is OutputFormat.json:
        stream.write(df.to_json(orient="records", double_precision=15))
        stream.write("\n")
    else:
        raise ValueError("emit_dataframe writes csv or json; build a rich table for the table format")
    stream.flush()


def format_number(x: float, digits: int = 4) -> str:
    """Fixed-point with ``digits`` decimals; scientific when tiny or huge; "nan"/"inf" as such."""
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x != 0.0 and (abs(x) < 10.0 ** (-digits + 1) or abs(x) >= 1e6):
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}f}"


def format_interval(center: float, lo: float, hi: float, digits: int = 4) -> str:
    """``"center [lo, hi]"``, e.g. a median with its 10-90 percentile range."""
    return f"{format_number(center, digits)} [{format_number(lo, digits)}, {format_number(hi, digits)}]"


def make_table(
    title: str | None,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    caption: str | None = None,
    justify: Sequence[str] | None = None,
) -> Table:
    """A rich Table with a header row; cells are converted with ``str``.

    Args:
        title: shown above the table.
        columns: header labels.
        rows: one sequence of cells per row, same length as ``columns`` (``Text`` kept, else ``str``;
            never parsed as rich markup).
        caption: shown below the table, wrapped to the table's width (see :func:`with_caption` for a
            caption that may be wider than the table). Title and caption are plain text, not markup.
        justify: per-column "left" / "right" / "center" (default: first column left, others right).
    """
    if justify is None:
        justify = ["left"] + ["right"] * (len(columns) - 1)
    table = Table(
        title=None if title is None else Text(title, style="bold"),
        caption=None if caption is None else Text(caption),
        caption_justify="left",
    )
    for label, just in zip(columns, justify, strict=True):
        table.add_column(label, justify=just)  # type: ignore[arg-type]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row has {len(row)} cells, table has {len(columns)} columns")
        # Text, not markup: "[0.99, 1.01]" or a user's domain name must print as written.
        table.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in row))
    return table


def with_caption(renderable: RenderableType, caption: str) -> Group:
    """``renderable`` followed by a plain-text caption line that may be wider than the renderable."""
    return Group(renderable, Text(caption))


def print_renderable(renderable: RenderableType, stream: TextIO | None = None) -> None:
    """Print a rich renderable to ``stream`` (default stdout): colour only on a terminal, and a wide
    fixed width elsewhere so tables are not wrapped in files and pipes."""
    stream = sys.stdout if stream is None else stream
    console = Console(file=stream)
    if not console.is_terminal:
        console = Console(file=stream, width=NON_TTY_WIDTH, no_color=True, highlight=False)
    console.print(renderable)


def emit(
    df: pd.DataFrame,
    fmt: OutputFormat | str,
    table_builder: Callable[[pd.DataFrame], RenderableType],
    out: Path | str | None = None,
) -> None:
    """The usual end of a command: the table format prints ``table_builder(df)``; csv/json print ``df``.

    Output goes to ``out`` when given, else stdout.
    """
    fmt = OutputFormat(fmt)
    with open_output(out) as stream:
        if fmt is OutputFormat.table:
            print_renderable(table_builder(df), stream)
        else:
            emit_dataframe(df, fmt, stream)


# --------------------------------------------------------------------------------------------------
# command-specific layouts


def table1(df: pd.DataFrame, title: str | None = None, caption: str | None = None, digits: int = 4) -> Group:
    """The paper's Table 1 layout for :func:`commute_cli.commands.toy.run_table1`: rows t, columns dt, and a
    one-line caption below saying what the ratio is.

    Each cell is ``median [p10, p90]`` of the ratio observed / predicted excess loss.
    """
    missing = {"t", "dt", "median", "p10", "p90", "n"} - set(df.columns)
    if missing:
        raise ValueError(f"table1 needs columns t, dt, median, p10, p90, n; missing {sorted(missing)}")
    ts = sorted(df["t"].unique())
    dts = sorted(df["dt"].unique())
    by_key = {(float(r.t), float(r.dt)): r for r in df.itertuples(index=False)}
    rows = []
    for t in ts:
        cells: list[str] = [f"{t:g}"]
        for dt in dts:
            r = by_key.get((float(t), float(dt)))
            cells.append("" if r is None else format_interval(r.median, r.p10, r.p90, digits))
        rows.append(cells)
    n = int(df["n"].max()) if len(df) else 0
    if title is None:
        title = "Table 1: observed vs. predicted excess loss, quadratic domains"
    if caption is None:
        caption = (
            f"cell: median [p10, p90] over {n} samples of ratio = [L(theta_12) - L(theta_base)] / "
            f"[(1/2) dt^2 P(L1, L2; L)], L = (L1 + L2)/2; exact flows; -> 1 as dt -> 0"
        )
    return with_caption(make_table(title, ["t \\ dt", *[f"{dt:g}" for dt in dts]], rows), caption)


# --------------------------------------------------------------------------------------------------
# analyze


def _verdict_text(row: Any) -> Text:
    style = {"suboptimal": "bold yellow", "consistent": "green", "insufficient signal": "dim"}.get(
        row.verdict, ""
    )
    text = Text(row.verdict, style=style)
    if not row.in_regime:
        text.append(" (outside local regime: sign only)", style="red")
    if row.direction:
        text.append(f": {row.direction}")
    return text


def analysis_tables(results: pd.DataFrame, losses: pd.DataFrame) -> Group:
    """One table per target in the layout of the paper's Tables 2-4.

    Columns: step, every domain's loss (mean +- SE over blocks), then per domain pair (i, j): the bracket
    ``P(L_i, L_j; L)`` (Euclidean metric; preconditioned under ``--metric adam``) +- SE, the predicted
    ``EL^{ij}`` in nats for the stated intervention +- SE, and the verdict with its direction in words.
    """
    names = list(dict.fromkeys(losses["domain"]))
    loss_at = {(r.step, r.domain): r for r in losses.itertuples(index=False)}
    parts: list[RenderableType] = []
    for target, df in results.groupby("target", sort=False):
        rows = []
        for r in df.itertuples(index=False):
            cells: list[Any] = [str(r.step)]
            for n in names:
                lr_ = loss_at.get((r.step, n))
                cells.append("" if lr_ is None else f"{lr_.loss:.3f} ± {lr_.loss_se:.3f}")
            cells += [
                f"{r.domain_i}↔{r.domain_j}",
                f"{format_number(r.bracket, 3)} ± {format_number(r.bracket_se, 2)}",
                f"{format_number(r.el_ij, 3)} ± {format_number(r.el_se, 2)}",
                f"{r.dw:g} x {int(r.horizon)} steps",
                _verdict_text(r),
            ]
            rows.append(cells)
        columns = [
            "step",
            *[f"L_{n}" for n in names],
            "pair i↔j",
            "P(L_i,L_j;L)",
            "EL^ij (nats)",
            "dw x horizon",
            "verdict",
        ]
        title = f"target: {target}"
        parts.append(make_table(title, columns, rows, justify=["right"] * (len(columns) - 1) + ["left"]))
    caption = (
        "EL^ij: predicted change of the target loss if domain i gets +dw and j gets -dw for `horizon` steps, "
        "then the reverse (same total data), against the schedule; negative = moving i earlier and j later "
        "helps. ± is one standard error over independent sample blocks; 'suboptimal' = significant and both "
        "weights > 0 (Corollary 3.2(b))."
    )
    parts.append(Text(caption, style="dim"))
    return Group(*parts)


def plot_analysis(results: pd.DataFrame, losses: pd.DataFrame, path: Path | str) -> Path:
    """Criterion over steps with error bars (one panel per target, a line per pair), verdicts shaded, and
    the per-domain loss curves in a last panel. Written atomically as PNG.

    ``commute plot`` draws the same panels through :func:`plot_report` (EL rescaled to a common ``dt`` and
    ``dw``, verdict bands, and the loss plane of ``commute validate`` results)."""
    plt = _pyplot()
    targets = list(dict.fromkeys(results["target"]))
    fig, axes = plt.subplots(len(targets) + 1, 1, figsize=(8, 2.6 * (len(targets) + 1)), sharex=True)
    for ax, target in zip(axes, targets, strict=False):
        _draw_criterion(ax, results[results["target"] == target], target)
    _draw_losses(axes[-1], losses)
    fig.tight_layout()
    return _save_figure(fig, path)


def _pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_criterion(ax: Any, df: pd.DataFrame, target: str) -> None:
    """The panel of :func:`plot_analysis` for one target: ``EL^ij`` +- SE per pair, as computed."""
    for (i, j), g in df.groupby(["domain_i", "domain_j"], sort=False):
        ax.errorbar(g["step"], g["el_ij"], yerr=g["el_se"], marker="o", capsize=3, label=f"EL^{{{i},{j}}}")
        for r in g.itertuples(index=False):
            if r.verdict == "suboptimal":
                ax.axvspan(r.step - 0.5 * r.horizon, r.step + 0.5 * r.horizon, color="orange", alpha=0.15)
            if not r.in_regime:
                ax.plot([r.step], [r.el_ij], marker="x", color="red", markersize=9)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_ylabel("nats")
    ax.set_title(
        f"target {target}: predicted change from reordering (shaded: suboptimal; x: outside regime)",
        fontsize=9,
    )
    ax.legend(fontsize=8)


def _draw_losses(ax: Any, losses: pd.DataFrame) -> None:
    for name, g in losses.groupby("domain", sort=False):
        ax.errorbar(g["step"], g["loss"], yerr=g["loss_se"], marker="o", capsize=3, label=f"L_{name}")
    ax.set_ylabel("loss (nats/token)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)


def _save_figure(fig: Any, path: Path | str, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG atomically (temp file + os.replace) and close it."""

    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic.replacing(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# plot (commute plot): criterion, verdict bands, losses, and the loss plane of validate results

VERDICT_COLORS = {"suboptimal": "tab:orange", "consistent": "tab:green"}

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


def _bands(steps: Sequence[float]) -> dict[float, tuple[float, float]]:
    """Each checkpoint's own interval: half-way to its neighbours (the first and last extend as far)."""
    s = sorted(set(float(x) for x in steps))
    out = {}
    for k, x in enumerate(s):
        left = (x - s[k - 1]) / 2 if k > 0 else ((s[1] - x) / 2 if len(s) > 1 else 0.5)
        right = (s[k + 1] - x) / 2 if k + 1 < len(s) else left
        out[x] = (x - left, x + right)
    return out


def _draw_criterion_common(ax: Any, df: pd.DataFrame, target: str) -> None:
    """One target's panel for ``commute plot``: every ``EL^ij`` rescaled to one ``(dt, dw)``.

    ``analyze`` picks one horizon per checkpoint (shortened to stay in the local regime), so raw ``EL``
    values at different checkpoints are not comparable; ``EL`` is linear in ``dw`` and quadratic in ``dt``
    (MATH.md), so ``EL x (dw_ref / dw)(dt_ref / dt)^2`` (and its SE) is the same prediction at a common
    ``dt_ref``, ``dw_ref`` (the medians). Bands: each checkpoint's interval coloured by its verdict
    (orange: suboptimal for some pair, green: consistent); x: outside the local regime.
    """
    dt_ref = float(df["dt"].median())
    dw_ref = float(df["dw"].median())
    scale = (dw_ref / df["dw"]) * (dt_ref / df["dt"]) ** 2
    bands = _bands(df["step"])
    pairs = list(df.groupby(["domain_i", "domain_j"], sort=False))
    shown: set[str] = set()
    labels: list[tuple[float, str]] = []
    for step, g in df.groupby("step"):
        verdicts = set(g["verdict"])
        verdict = next((v for v in ("suboptimal", "consistent") if v in verdicts), None)
        if verdict is None:
            continue
        lo, hi = bands[float(step)]
        pad = 0.03 * (hi - lo)  # a visible seam between neighbouring bands of the same colour
        ax.axvspan(lo + pad, hi - pad, color=VERDICT_COLORS[verdict], alpha=0.15, lw=0)
        shown.add(verdict)
        if len(pairs) == 1 and verdict == "suboptimal":
            r = g.iloc[0]
            labels.append((float(step), f"{r['domain_i'] if r['el_ij'] < 0 else r['domain_j']} earlier"))
    for (i, j), g in pairs:
        sc = scale.loc[g.index]
        y, e = g["el_ij"] * sc, g["el_se"] * sc
        ax.errorbar(g["step"], y, yerr=e, marker="o", capsize=3, label=f"EL^{{{i},{j}}}")
        out = ~g["in_regime"].astype(bool)
        if out.any():
            ax.plot(g["step"][out], y[out], ls="none", marker="x", color="red", markersize=9)
            shown.add("outside")
    ax.axhline(0.0, color="grey", lw=0.8)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.18 * (hi - lo))  # room for the direction labels above the data
    for x, text in labels:
        ax.text(x, 0.96, text, transform=ax.get_xaxis_transform(), ha="center", va="top", fontsize=7)
    ax.set_ylabel("nats")
    ax.set_title(
        f"target {target}: EL^ij ± SE rescaled to dt = {dt_ref:.3g}, dw = {dw_ref:.3g} (EL ∝ dw dt²; "
        "< 0: i earlier helps)",
        fontsize=9,
    )
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles, _ = ax.get_legend_handles_labels()
    for verdict in ("suboptimal", "consistent"):
        if verdict in shown:
            handles.append(Patch(color=VERDICT_COLORS[verdict], alpha=0.3, label=verdict))
    if "outside" in shown:
        handles.append(Line2D([], [], ls="none", marker="x", color="red", label="outside regime"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)


def _plane_points(validate: pd.DataFrame) -> list[dict[str, Any]]:
    """Per validated step: base, 12 and 21 end points (observed, with SE) and the predicted ones."""
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
        point = {"step": int(step), "d1": d1, "d2": d2, "base": base}
        point["ckpt"] = (get(r1, "loss_ckpt"), get(r2, "loss_ckpt"))
        for key in ("12", "21"):
            point[key] = (base[0] + get(r1, f"obs_el{key}"), base[1] + get(r2, f"obs_el{key}"))
            point[key + "_se"] = (get(r1, f"obs_el{key}_se", 0.0), get(r2, f"obs_el{key}_se", 0.0))
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
            label="validate (held-out blocks): base end" if k == 0 else None,
        )
        ax.plot(*p["12"], "o", color="tab:red", ms=4, label=f"'12' ({d1} up first)" if k == 0 else None)
        ax.plot(*p["21"], "^", color="tab:purple", ms=4, label=f"'21' ({d2} up first)" if k == 0 else None)
    ax.set_xlabel(f"L_{d1} (nats/token)")
    ax.set_ylabel(f"L_{d2} (nats/token)")
    ax.set_title("loss plane: trajectory and interventions (cf. paper Fig. 3-4)", fontsize=9)
    ax.legend(fontsize=7)


def _draw_plane_zoom(ax: Any, p: dict[str, Any]) -> None:
    """One validated checkpoint, zoomed on the end of the base branch: observed '12' / '21' end points with
    SE bars, the predicted ones (hollow, dashed), and the direction training was moving."""
    bx, by = p["base"]
    ax.plot(bx, by, "s", color="tab:cyan", ms=8, label="base", zorder=3)
    styles = {"12": ("o", "tab:red"), "21": ("^", "tab:purple")}
    for key, (marker, color) in styles.items():
        (x, y), (ex, ey) = p[key], p[key + "_se"]
        ax.errorbar(
            x, y, xerr=ex, yerr=ey, fmt=marker, color=color, ms=7, capsize=3, label=f"'{key}' observed"
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


def build_report_figure(
    results: pd.DataFrame, losses: pd.DataFrame, validate: pd.DataFrame | None = None
) -> Any:
    """The figure of ``commute plot`` (returned, not saved; :func:`plot_report` saves it).

    Left column: one panel per target (:func:`_draw_criterion_common`) and the per-domain loss curves.
    Right column, when validate results are given: the loss plane at full scale and one zoomed panel per
    validated checkpoint (at most four).
    """
    plt = _pyplot()
    targets = list(dict.fromkeys(results["target"]))
    points = _plane_points(validate) if validate is not None and not validate.empty else []
    points = points[:4]
    n_left = len(targets) + 1
    if not points:
        fig, axes = plt.subplots(n_left, 1, figsize=(8.5, 2.7 * n_left), sharex=True)
        left = list(axes)
    else:
        n_right = 1 + len(points)
        rows = max(n_left, n_right) * 2
        fig = plt.figure(figsize=(15, 2.7 * max(n_left, n_right)))
        grid = fig.add_gridspec(rows, 2, width_ratios=[1.35, 1])
        left, per = [], rows // n_left
        for k in range(n_left):
            left.append(fig.add_subplot(grid[k * per : (k + 1) * per, 0], sharex=left[0] if left else None))
        per_r = rows // n_right
        over = fig.add_subplot(grid[0:per_r, 1])
        _draw_plane_overview(over, losses, points)
        for k, p in enumerate(points):
            _draw_plane_zoom(fig.add_subplot(grid[(k + 1) * per_r : (k + 2) * per_r, 1]), p)
    for ax, target in zip(left, targets, strict=False):
        _draw_criterion_common(ax, results[results["target"] == target], str(target))
    _draw_losses(left[-1], losses)
    left[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)
    left[-1].set_title("per-domain loss at the checkpoints (analysis sample, ± SE)", fontsize=9)
    for ax in left[:-1]:
        ax.tick_params(labelbottom=False)
    fig.tight_layout()
    return fig


def plot_report(
    results: pd.DataFrame, losses: pd.DataFrame, path: Path | str, validate: pd.DataFrame | None = None
) -> Path:
    """Draw :func:`build_report_figure` to ``path`` (PNG, atomically)."""
    return _save_figure(build_report_figure(results, losses, validate), path)


# --------------------------------------------------------------------------------------------------
# recommend


def _effect_cell(change: float, se: float, in_regime: bool = True) -> str:
    text = f"{change:+.4f} ± {se:.4f}" if abs(change) >= 1e-4 else f"{change:+.2e} ± {se:.1e}"
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
                "predicted change of each target's loss (nats; negative = better), ± SE",
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
                "ΔL: predicted change at the end of each window (MATH.md; EL scales as shift x window^2 "
                "from the analysed dw and horizon). Totals add the local predictions; their ± adds the SEs "
                "(the same samples are used at every checkpoint, so errors are correlated).",
                style="dim",
            )
        )
    return Group(*parts)
