"""The schedule a run realised, read from where a Hugging Face ``Trainer`` records it: ``trainer_state.json``.

The contract with the callback of ``commute watch`` (and any trainer that wants ``analyze`` to need no
``--weights``): an entry of ``log_history`` that holds keys ``commute/weight/<domain>`` says that from its
``"step"`` on (the Trainer's ``global_step``: updates done, so the weights of update ``step`` and later) the
domains were drawn with those weights, until the next such entry. The callback logs them whenever the
weights are known or change, so:

- an entry must give every domain (the weights of one moment, not a part of them);
- the first logged weights count from step 0 (a Trainer logs first at ``logging_steps``, not at 0; the
  caller is told when the first entry is later than 0);
- at a step logged twice the later entry wins (a resumed run logs its resume step again);
- logged numbers may be rounded: weights summing to 1 within ``LOG_SUM_TOL`` are divided by their sum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from commute_cli.core.schedule import Schedule, check_weights
from commute_cli.errors import CommuteError
from commute_cli.io.safefiles import read_json

WEIGHT_KEY = "commute/weight/"
LOG_SUM_TOL = 1e-3
"""How far from 1 the logged weights of one entry may sum (rounded logs) before they are refused."""
STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class LoggedSchedule:
    """A schedule read from a trainer log: where, and the first and last step it was logged at."""

    schedule: Schedule
    file: Path
    first_logged: int
    last_logged: int


def logged_entries(log_history: Any, context: str = "") -> list[tuple[int, dict[str, float]]]:
    """``(step, {domain: weight})`` of every ``log_history`` entry with ``commute/weight/*`` keys, in log
    order. Raises ``CommuteError`` for such an entry without a whole ``step`` or with a non-number weight."""
    if not isinstance(log_history, list):
        return []
    out = []
    for i, entry in enumerate(log_history):
        if not isinstance(entry, Mapping):
            continue
        weights = {
            k[len(WEIGHT_KEY) :]: v
            for k, v in entry.items()
            if isinstance(k, str) and k.startswith(WEIGHT_KEY)
        }
        if not weights:
            continue
        step = entry.get("step")
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CommuteError(
                f"log_history entry {i} of {context or STATE_FILE} has domain weights but no step ({step!r})",
                hint='each logged entry needs the Trainer\'s "step"; or pass --weights / --schedule',
            )
        out.append((step, weights))
    return out


def _normalised(weights: Mapping[str, Any], domains: Sequence[str], where: str) -> dict[str, float]:
    """Logged weights checked against ``domains``; a sum within ``LOG_SUM_TOL`` of 1 is divided out."""
    values = {}
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise CommuteError(f"weight of {name!r} is not a number: {w!r} in {where}", hint="pass --weights")
        values[name] = float(w)
    total = math.fsum(values.values())
    if total > 0 and abs(total - 1.0) <= LOG_SUM_TOL:
        values = {n: w / total for n, w in values.items()}
    return check_weights(values, domains, where)


def schedule_from_log(
    log_history: Any, domains: Sequence[str], context: str = ""
) -> tuple[Schedule, int, int] | None:
    """The piecewise schedule the log records (module docstring), its first and last logged step; None when
    no entry has weights. Raises ``CommuteError`` for weights that do not fit ``domains``."""
    entries = logged_entries(log_history, context)
    if not entries:
        return None
    by_step: dict[int, dict[str, float]] = {}
    for step, weights in entries:
        by_step[step] = _normalised(weights, domains, f"the entry at step {step} of {context or STATE_FILE}")
    steps = sorted(by_step)
    kept: list[tuple[int, dict[str, float]]] = []
    for step in steps:
        if not kept or kept[-1][1] != by_step[step]:
            kept.append((step, by_step[step]))
    kept[0] = (0, kept[0][1])
    return Schedule.from_entries(kept, domains), steps[0], steps[-1]


def read_logged_schedule(folders: Sequence[Path], domains: Sequence[str]) -> LoggedSchedule | None:
    """The schedule logged in the ``trainer_state.json`` of ``folders`` (a run's output folder, its latest
    checkpoint): of those that log weights, the one that logs the latest step (the longest history); None
    when none does. Raises ``CommuteError`` for a log whose weights do not fit ``domains``."""
    best: LoggedSchedule | None = None
    for folder in folders:
        file = Path(folder) / STATE_FILE
        if not file.is_file():
            continue
        raw = read_json(file, "trainer state")
        history = raw.get("log_history") if isinstance(raw, dict) else None
        found = schedule_from_log(history, domains, str(file))
        if found is not None and (best is None or found[2] > best.last_logged):
            best = LoggedSchedule(found[0], file, found[1], found[2])
    return best
