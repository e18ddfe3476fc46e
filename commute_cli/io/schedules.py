"""Schedule files: read and write the weight schedules of ``core.schedule`` (JSON or CSV).

The parsing and checks are pure (``core.schedule``); this module only touches files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from commute_cli.core.schedule import Schedule, parse_schedule_text
from commute_cli.errors import CommuteError
from commute_cli.io import atomic


def load_schedule(path: str | os.PathLike[str], domains: Sequence[str] | None = None) -> Schedule:
    """Read a schedule file (JSON or CSV, by content) and validate it against ``domains`` if given."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise CommuteError(f"schedule file not found: {p}", "check the path") from err
    except (OSError, UnicodeDecodeError) as err:
        raise CommuteError(f"cannot read schedule file {p}: {err}") from err
    return parse_schedule_text(text, domains, str(p))


def save_schedule(schedule: Schedule, path: str | os.PathLike[str]) -> Path:
    """Write CSV if ``path`` ends in .csv, JSON otherwise; atomically (temp file + os.replace)."""
    p = Path(path)
    text = schedule.to_csv() if p.suffix.lower() == ".csv" else schedule.to_json()
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_text(p, text)
