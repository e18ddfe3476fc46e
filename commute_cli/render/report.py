"""Transitional: the names of the old ``render/report.py``, now in :mod:`commute_cli.render.tables` and
:mod:`commute_cli.render.figures`. Kept only so branches started before the split still import; new code
imports ``tables``/``figures``. Delete once nothing imports it."""

from commute_cli.render.figures import VALIDATE_PLANE_COLUMNS, check_validate_table
from commute_cli.render.tables import (
    OutputFormat,
    analysis_tables,
    emit,
    emit_dataframe,
    format_interval,
    format_number,
    make_table,
    open_output,
    print_renderable,
    recommend_report,
    table1,
    with_caption,
)

__all__ = [
    "VALIDATE_PLANE_COLUMNS",
    "OutputFormat",
    "analysis_tables",
    "check_validate_table",
    "emit",
    "emit_dataframe",
    "format_interval",
    "format_number",
    "make_table",
    "open_output",
    "print_renderable",
    "recommend_report",
    "table1",
    "with_caption",
]
