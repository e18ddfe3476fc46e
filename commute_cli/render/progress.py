"""Progress bars for long commands (rich), drawn on stderr and only on a terminal.

The commands only call plain callbacks; this module decides how (and whether) to show them.

- :class:`Bars`: the one adapter around ``rich.progress`` (a bar = label, M/N, elapsed, ETA); every
  command's bars go through it.
- :class:`StepProgress`: one bar over uniform steps (train's steps, validate's branch steps, recommend's
  continuations), with an ETA from the mean measured time per step; when stderr is not a terminal, plain
  lines instead (at the start and at least every :data:`PLAIN_INTERVAL` seconds).
- ``render.analysis_progress.AnalysisProgress``: analyze's two bars (checkpoints, sample blocks of the
  current checkpoint) with the ETA of ``AnalysisEta``, built from measured per-block and per-checkpoint
  times.

ETAs are a deadline (a point in time) re-estimated at each event and counted down in between, so the
display moves smoothly instead of jumping with the last interval's speed.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

__all__ = ["PLAIN_INTERVAL", "Bars", "StepProgress", "format_duration", "plain_interval"]

Clock = Callable[[], float]

PLAIN_INTERVAL = 60.0
"""Seconds between two plain progress lines at most when stderr is not a terminal (environment variable
``COMMUTE_PROGRESS_INTERVAL`` overrides it: a log that wants more, a test that cannot wait a minute)."""


def plain_interval() -> float:
    """:data:`PLAIN_INTERVAL`, or ``COMMUTE_PROGRESS_INTERVAL`` when set to a positive number."""
    try:
        value = float(os.environ.get("COMMUTE_PROGRESS_INTERVAL", ""))
    except ValueError:
        return PLAIN_INTERVAL
    return value if value > 0 else PLAIN_INTERVAL


def format_duration(seconds: float) -> str:
    """``75.4`` -> ``"1:16"``; ``3725`` -> ``"1:02:05"`` (rounded up to whole seconds)."""
    s = max(0, math.ceil(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class EtaColumn(ProgressColumn):
    """``ETA m:ss`` counted down to the task's ``deadline`` field (a ``clock()`` time), ``ETA ≤ m:ss`` when
    its ``upper_bound`` field is true; ``ETA estimating…`` while there is no measurement yet; nothing for a
    task without the field."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        super().__init__()
        self.clock = clock

    def render(self, task: Task) -> Text:
        if "deadline" not in task.fields:
            return Text("")
        deadline = task.fields["deadline"]
        if task.finished:
            return Text("done", style="progress.remaining")
        if deadline is None:
            return Text("ETA estimating…", style="progress.remaining")
        left = deadline - self.clock()
        if left <= 0:
            return Text("ETA finishing…", style="progress.remaining")
        bound = "≤ " if task.fields.get("upper_bound") else ""
        return Text(f"ETA {bound}{format_duration(left)}", style="progress.remaining")


class Bars:
    """One rich ``Progress`` on stderr with any number of bars (label, bar, M/N, elapsed, ETA).

    Disabled (draws nothing, costs nothing) unless ``enabled`` and the console is a terminal. ``console``
    and ``clock`` are for tests (a recording console, a controlled clock).
    """

    def __init__(
        self,
        enabled: bool = True,
        *,
        transient: bool = True,
        console: Console | None = None,
        clock: Clock = time.monotonic,
        extra: tuple[ProgressColumn, ...] = (),
    ) -> None:
        console = console if console is not None else Console(file=sys.stderr)
        self.enabled = enabled and console.is_terminal
        self.clock = clock
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            *extra,
            TimeElapsedColumn(),
            EtaColumn(clock),
            console=console,
            transient=transient,
            disable=not self.enabled,
        )

    def __enter__(self) -> Bars:
        self._progress.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def add(self, label: str, total: float | None, completed: float = 0, **fields: Any) -> int:
        """A new bar; ``fields`` feed extra columns (``deadline=`` the ETA column)."""
        return int(self._progress.add_task(label, total=total, completed=completed, **fields))  # type: ignore[arg-type]  # rich takes floats

    def update(self, task: int, **kwargs: Any) -> None:
        """``rich.progress.Progress.update`` (``completed=``, ``advance=``, ``total=``, fields)."""
        self._progress.update(task, **kwargs)  # type: ignore[arg-type]

    def remove(self, task: int) -> None:
        self._progress.remove_task(task)  # type: ignore[arg-type]

    def print(self, line: str) -> None:
        """A line above the bars (or on stderr when the bars are disabled)."""
        if self.enabled:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr)

    def renderable(self) -> Any:
        """What the bars look like now (for tests)."""
        return self._progress.get_renderable()


def eta_words(deadline: float | None, now: float, bound: bool = False) -> str:
    """A plain progress line's ETA: "ETA estimating" (no measurement yet), "ETA finishing" (the deadline
    passed), else "ETA m:ss" counted down to ``deadline`` ("ETA ≤ m:ss" for an upper ``bound``)."""
    if deadline is None:
        return "ETA estimating"
    if deadline <= now:
        return "ETA finishing"
    return f"ETA {'≤ ' if bound else ''}{format_duration(deadline - now)}"


class StepProgress:
    """One bar over uniform steps; ETA = remaining steps x the mean time per step measured since the
    first step ended (so start-up cost, e.g. loading a model, does not count as a step), or since the start
    when the first update completes several steps at once (chunks of work done elsewhere, e.g. recommend's
    continuations in worker processes: two chunks ending together say nothing about the pace).

    validate: ``with StepProgress("validate: branches", enabled) as p:`` then
    ``run_validate(..., on_start=p.start, on_step=p.step)``;
    train: ``p.start(total, completed=first_step)``, ``p.update(step, losses="en 4.1 ru 4.9")``,
    ``p.print(line)``, with ``fields=("losses",)`` to show a text column.

    When ``enabled`` but stderr is not a terminal (a pipe, a log file), plain lines say the same instead
    (``validate: branches: step 120/600, 0:31 elapsed, ETA 2:05``): one at :meth:`start` and, from a
    background timer, whenever ``interval`` seconds (:func:`plain_interval`) passed without one.
    """

    def __init__(
        self,
        label: str,
        enabled: bool = True,
        *,
        fields: tuple[str, ...] = (),
        transient: bool = True,
        console: Console | None = None,
        clock: Clock = time.monotonic,
        interval: float | None = None,
    ) -> None:
        self.label = label
        self.fields = fields
        extra = tuple(TextColumn(f"{{task.fields[{f}]}}") for f in fields)
        self.bars = Bars(enabled, transient=transient, console=console, clock=clock, extra=extra)
        self.clock = clock
        self.plain = enabled and not self.bars.enabled
        self.interval = plain_interval() if interval is None else float(interval)
        self._file = console.file if console is not None else sys.stderr
        self._task: int | None = None
        self._total = 0
        self._done = 0
        self._first: tuple[float, int] | None = None  # (time, steps) when the first step ended
        self._deadline: float | None = None
        self._values: dict[str, Any] = {}
        self._started = clock()
        self._last_line: float | None = None  # None: no line yet (before start)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    def __enter__(self) -> StepProgress:
        self.bars.__enter__()
        self._started = self.clock()
        if self.plain:
            self._timer = threading.Thread(target=self._tick, name="commute-progress", daemon=True)
            self._timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join()
        self.bars.__exit__(*exc)

    def _tick(self) -> None:
        """The timer: a line whenever ``interval`` seconds passed without one (after :meth:`start`)."""
        while not self._stop.wait(min(self.interval, 1.0) / 2):
            last = self._last_line
            if last is not None and self.clock() - last >= self.interval:
                self.line()

    def line(self) -> str:
        """Print one plain progress line (stderr) and return it."""
        with self._lock:
            now = self.clock()
            when = eta_words(self._deadline, now)
            values = "".join(f", {v}" for f in self.fields if (v := self._values.get(f)))
            text = (
                f"{self.label}: step {self._done}/{self._total}{values}, "
                f"{format_duration(now - self._started)} elapsed, {when}"
            )
            print(text, file=self._file, flush=True)
            self._last_line = now
            return text

    def start(self, total: int, completed: int = 0) -> None:
        self._total, self._done = int(total), int(completed)
        self._task = self.bars.add(
            self.label, total=total, completed=completed, deadline=None, **{f: "" for f in self.fields}
        )
        if self.plain:
            self.line()

    def step(self, n: int = 1, **fields: Any) -> None:
        self.update(self._done + n, **fields)

    def update(self, completed: int, **fields: Any) -> None:
        now = self.clock()
        with self._lock:
            before, self._done = self._done, int(completed)
            self._values.update(fields)
            if self._first is None and self._done - before > 1:
                # a whole chunk at once (a continuation done in a worker process): its time is the time
                # since the start, so the pace is measured from there
                self._first = (self._started, before)
            if self._first is None:
                self._first = (now, self._done)
                deadline = None
            else:
                t0, s0 = self._first
                per = (now - t0) / (self._done - s0) if self._done > s0 else None
                deadline = None if per is None else now + per * (self._total - self._done)
            self._deadline = deadline
        if self._task is not None:
            self.bars.update(self._task, completed=completed, deadline=deadline, **fields)

    def print(self, line: str) -> None:
        self.bars.print(line)
