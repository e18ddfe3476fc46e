"""Formats: the pieces every command's output is built from (csv/json/table, files or stdout).

:class:`OutputFormat` (``--format``), :func:`open_output`, :func:`emit_dataframe`, :func:`emit`,
:func:`make_table`, :func:`with_caption`, :func:`print_renderable`, and the fixed-point formatters of
Table 1. Machine formats (csv, json) write only the data, so they can be piped; human text (titles,
captions, notes) appears only in the table format. The layouts are in :mod:`commute_cli.render.tables`.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
from rich import box
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from commute_cli.errors import CommuteError

__all__ = [
    "NON_TTY_WIDTH",
    "OutputFormat",
    "emit",
    "emit_dataframe",
    "format_interval",
    "format_number",
    "make_table",
    "open_output",
    "print_renderable",
    "with_caption",
]

#: Least width used for rich output when the stream is not a terminal (files, pipes, test runners), where
#: rich would otherwise assume 80 columns and wrap wide tables; a longer line widens it (nothing wraps).
NON_TTY_WIDTH = 160


class OutputFormat(StrEnum):
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
    compact: bool = False,
    min_widths: Sequence[int] | None = None,
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
        compact: a light frame (a rule under the header, no vertical lines) and cells that never wrap,
            for tables that must fit an 80-column terminal.
        min_widths: per-column minimum widths (to line up several tables).
    """
    if justify is None:
        justify = ["left"] + ["right"] * (len(columns) - 1)
    table = Table(
        title=None if title is None else Text(title, style="bold"),
        caption=None if caption is None else Text(caption),
        caption_justify="left",
        box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
        show_edge=not compact,
        pad_edge=not compact,
        collapse_padding=compact,
        title_justify="left" if compact else "center",
    )
    mins = list(min_widths) if min_widths is not None else [None] * len(columns)
    for label, just, width in zip(columns, justify, mins, strict=True):
        table.add_column(label, justify=just, no_wrap=compact, min_width=width)  # type: ignore[arg-type]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row has {len(row)} cells, table has {len(columns)} columns")
        # Text, not markup: "[0.99, 1.01]" or a user's domain name must print as written.
        table.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in row))
    return table


def with_caption(renderable: RenderableType, caption: str) -> Group:
    """``renderable`` followed by a plain-text caption line that may be wider than the renderable."""
    return Group(renderable, Text(caption))


class _Console(Console):
    """rich's console, except that a closed pipe is an error for the CLI's boundary to handle
    (``cli.entry.main``: exit 141, quietly) rather than rich's own ``SystemExit(1)``."""

    def on_broken_pipe(self) -> None:
        self.quiet = True  # nothing more to write to a pipe without a reader
        raise BrokenPipeError("the reader of the output closed the pipe")


def print_renderable(
    renderable: RenderableType, stream: TextIO | None = None, width: int | None = None
) -> None:
    """Print a rich renderable to ``stream`` (default stdout): colour only on a terminal; elsewhere (files,
    pipes) at least :data:`NON_TTY_WIDTH` columns and as many as the renderable's longest line needs, so
    no table cell, legend or caption is hard-wrapped mid-phrase (a pager or editor wraps, if it likes);
    ``width`` overrides both."""
    stream = sys.stdout if stream is None else stream
    console = _Console(file=stream)
    if width is not None:
        console = _Console(file=stream, width=width, no_color=not console.is_terminal, highlight=False)
    elif not console.is_terminal:
        console = _Console(file=stream, width=NON_TTY_WIDTH, no_color=True, highlight=False)
        unbounded = console.options.update_width(1_000_000)  # Measurement.get clamps to the width given
        need = Measurement.get(console, unbounded, renderable).maximum
        if need > NON_TTY_WIDTH:
            console = _Console(file=stream, width=need, no_color=True, highlight=False)
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
