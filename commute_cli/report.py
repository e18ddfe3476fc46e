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
    """The paper's Table 1 layout for :func:`commute_cli.toy.run_table1`: rows t, columns dt, and a
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
    the per-domain loss curves in a last panel. Written atomically as PNG."""
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(results["target"]))
    fig, axes = plt.subplots(len(targets) + 1, 1, figsize=(8, 2.6 * (len(targets) + 1)), sharex=True)
    for ax, target in zip(axes, targets, strict=False):
        df = results[results["target"] == target]
        for (i, j), g in df.groupby(["domain_i", "domain_j"], sort=False):
            ax.errorbar(
                g["step"], g["el_ij"], yerr=g["el_se"], marker="o", capsize=3, label=f"EL^{{{i},{j}}}"
            )
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
    ax = axes[-1]
    for name, g in losses.groupby("domain", sort=False):
        ax.errorbar(g["step"], g["loss"], yerr=g["loss_se"], marker="o", capsize=3, label=f"L_{name}")
    ax.set_ylabel("loss (nats/token)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
