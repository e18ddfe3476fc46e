"""Progress bars for long commands (rich), drawn on stderr and only on a terminal.

The commands only call plain callbacks; this module decides how (and whether) to show them.

- :class:`Bars`: the one adapter around ``rich.progress`` (a bar = label, M/N, elapsed, ETA); every
  command's bars go through it.
- :class:`StepProgress`: one bar over uniform steps (train's steps), with an ETA from the mean measured
  time per step.
- :class:`ValidateProgress`: validate's one bar over its branch steps (its own ``rich.progress``, not
  :class:`Bars`), with a ``~N min left`` text from the mean time per step since the start.
- :class:`AnalysisProgress`: analyze's two bars (checkpoints, sample blocks of the current checkpoint)
  with the ETA of :class:`AnalysisEta`, built from measured per-block and per-checkpoint times.

ETAs are a deadline (a point in time) re-estimated at each event and counted down in between, so the
display moves smoothly instead of jumping with the last interval's speed.
"""

from __future__ import annotations

import math
import statistics
import sys
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

__all__ = ["AnalysisEta", "AnalysisProgress", "Bars", "StepProgress", "ValidateProgress", "format_duration"]

Clock = Callable[[], float]


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


class StepProgress:
    """One bar over uniform steps; ETA = remaining steps x the mean time per step measured since the
    first step ended (so start-up cost, e.g. loading a model, does not count as a step).

    validate: ``with StepProgress("validate: branches", enabled) as p:`` then
    ``run_validate(..., on_start=p.start, on_step=p.step)``;
    train: ``p.start(total, completed=first_step)``, ``p.update(step, losses="en 4.1 ru 4.9")``,
    ``p.print(line)``, with ``fields=("losses",)`` to show a text column.
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
    ) -> None:
        self.label = label
        self.fields = fields
        extra = tuple(TextColumn(f"{{task.fields[{f}]}}") for f in fields)
        self.bars = Bars(enabled, transient=transient, console=console, clock=clock, extra=extra)
        self.clock = clock
        self._task: int | None = None
        self._total = 0
        self._done = 0
        self._first: tuple[float, int] | None = None  # (time, steps) when the first step ended

    def __enter__(self) -> StepProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)

    def start(self, total: int, completed: int = 0) -> None:
        self._total, self._done = int(total), int(completed)
        self._task = self.bars.add(
            self.label, total=total, completed=completed, deadline=None, **{f: "" for f in self.fields}
        )

    def step(self, n: int = 1, **fields: Any) -> None:
        self.update(self._done + n, **fields)

    def update(self, completed: int, **fields: Any) -> None:
        now = self.clock()
        self._done = int(completed)
        if self._first is None:
            self._first = (now, self._done)
            deadline = None
        else:
            t0, s0 = self._first
            per = (now - t0) / (self._done - s0) if self._done > s0 else None
            deadline = None if per is None else now + per * (self._total - self._done)
        if self._task is not None:
            self.bars.update(self._task, completed=completed, deadline=deadline, **fields)

    def print(self, line: str) -> None:
        self.bars.print(line)


class AnalysisEta:
    """Remaining time of ``commute analyze`` from what it measured so far.

    Model: a checkpoint that is not cached costs ``overhead + n_blocks x per_block``; a cached one costs
    nothing. ``per_block`` is the mean time between consecutive block ends within a checkpoint (no
    estimate until two blocks ended); ``overhead`` is the median time from a checkpoint's start to its
    first block's end, minus one block, plus the median time from its last block to the next checkpoint
    (loading the model, the preconditioner, the summary). The first computed checkpoint also pays
    one-time costs (first model load, first autograd graphs; ``benchmarks/bench_eta.py`` measures them),
    so its times are left out once a later checkpoint has been measured; until then the estimate is an
    upper bound (:meth:`upper_bound`). Checkpoints not reached yet are assumed not cached (an interrupted
    run resumes with its first checkpoints cached, not its last). Means and medians over everything
    measured keep the estimate stable; :meth:`deadline` is re-estimated at each event.
    """

    def __init__(self, total_checkpoints: int | None, clock: Clock = time.monotonic) -> None:
        self.total = total_checkpoints
        self.clock = clock
        self.index = -1
        self.n_blocks = 0
        self.cached = False
        self.done = 0
        self._start = 0.0
        self._last = 0.0
        self._intervals: list[tuple[int, float]] = []  # (checkpoint index, seconds)
        self._warmup: int | None = None  # index of the first checkpoint that was computed
        self._firsts: list[tuple[int, float]] = []  # (checkpoint index, start to first block end)
        self._tails: list[float] = []

    def checkpoint(self, index: int, n_blocks: int, cached: bool) -> None:
        now = self.clock()
        if self.index >= 0 and not self.cached and self.done == self.n_blocks and self.done > 0:
            self._tails.append(now - self._last)
        self.index, self.n_blocks, self.cached, self.done = index, int(n_blocks), bool(cached), 0
        self._start = self._last = now

    def block(self) -> None:
        now = self.clock()
        if self._warmup is None:
            self._warmup = self.index
        if self.done == 0:
            self._firsts.append((self.index, now - self._start))
        else:
            self._intervals.append((self.index, now - self._last))
        self.done += 1
        self._last = now

    def per_block(self) -> float | None:
        """Mean time between consecutive block ends; None until two blocks of one checkpoint ended (the
        first block also carries the model load, so alone it would overstate the rest)."""
        # the first computed checkpoint warms up (first model load, first autograd graphs): once a later
        # one has measured intervals, only those count
        later = [x for k, x in self._intervals if k != self._warmup]
        use = later or [x for _, x in self._intervals]
        return sum(use) / len(use) if use else None

    def overhead(self) -> float:
        b = self.per_block()
        if b is None:
            return 0.0
        firsts = [x for k, x in self._firsts if k != self._warmup] or [x for _, x in self._firsts]
        first = max(0.0, statistics.median(firsts) - b) if firsts else 0.0
        return first + self._tail()

    def _tail(self) -> float:
        return statistics.median(self._tails) if self._tails else 0.0

    def remaining(self) -> float | None:
        """Seconds left as of the last event, or None before anything was measured."""
        b = self.per_block()
        later = 0 if self.total is None else max(0, self.total - self.index - 1)
        if b is None:
            return 0.0 if (self.cached and later == 0) else None
        o = self.overhead()
        tail = self._tail()
        if self.cached:
            current = 0.0
        elif self.done == 0:
            current = o + self.n_blocks * b
        else:
            current = (self.n_blocks - self.done) * b + tail
        return current + later * (o + self.n_blocks * b)

    def deadline(self) -> float | None:
        left = self.remaining()
        return None if left is None else self.clock() + left

    def upper_bound(self) -> bool:
        """True while the estimate still charges the first checkpoint's one-time warm-up to the checkpoints
        left (no later checkpoint measured yet): the time left is then at most the estimate."""
        later = 0 if self.total is None else max(0, self.total - self.index - 1)
        measured_later = any(k != self._warmup for k, _ in self._firsts)
        return later > 0 and not measured_later


class AnalysisProgress:
    """analyze's bars: checkpoints (M/N of the real total, ETA of the whole run) and the sample blocks of
    the current checkpoint. Pass :meth:`checkpoint` and :meth:`block` as ``run_analysis``'s callbacks."""

    def __init__(
        self,
        enabled: bool = True,
        total_checkpoints: int | None = None,
        *,
        console: Console | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.bars = Bars(enabled, console=console, clock=clock)
        self.enabled = self.bars.enabled
        self.eta = AnalysisEta(total_checkpoints, clock)
        self._ckpt_task: int | None = None
        self._block_task: int | None = None

    def __enter__(self) -> AnalysisProgress:
        self.bars.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.bars.__exit__(exc_type, exc, tb)

    def checkpoint(
        self, index: int, ref: object, n_blocks: int, cached: bool, total: int | None = None
    ) -> None:
        """Called when checkpoint ``index`` (of ``total``) starts; ``cached``: its numbers come from the
        cache."""
        if total is not None:
            self.eta.total = int(total)
        self.eta.checkpoint(index, n_blocks, cached)
        if self._ckpt_task is None:
            self._ckpt_task = self.bars.add("checkpoints", total=self.eta.total, deadline=None)
        self.bars.update(
            self._ckpt_task,
            completed=index,
            total=self.eta.total,
            deadline=self.eta.deadline(),
            upper_bound=self.eta.upper_bound(),
        )
        if self._block_task is not None:
            self.bars.remove(self._block_task)
        name = getattr(ref, "name", str(ref))
        label = f"  {name}" + (" (cached)" if cached else ": sample blocks")
        self._block_task = self.bars.add(label, total=0 if cached else n_blocks)

    def block(self, index: int) -> None:
        """Called after each sample block of the current checkpoint."""
        self.eta.block()
        if self._block_task is not None:
            self.bars.update(self._block_task, advance=1)
        if self._ckpt_task is not None:
            self.bars.update(
                self._ckpt_task, deadline=self.eta.deadline(), upper_bound=self.eta.upper_bound()
            )

    def finish(self) -> None:
        """Mark every checkpoint done (the bars are transient: they vanish when the context exits)."""
        if self._ckpt_task is not None and self.eta.total is not None:
            self.bars.update(self._ckpt_task, completed=self.eta.total)


class ValidateProgress:
    """One rich bar over the training steps still to run (stderr, terminals only).

    The ETA is ``remaining steps x mean seconds per step so far`` (all steps of this run, evaluations
    included), not rich's windowed speed: it does not jump when a branch ends and its evaluation runs.
    """

    def __init__(self, enabled: bool = True) -> None:
        console = Console(file=sys.stderr)
        self.enabled = enabled and console.is_terminal
        self._progress = Progress(
            TextColumn("validate: branches"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[eta]}"),
            console=console,
            transient=True,
            disable=not self.enabled,
        )
        self._task: Any = None
        self.total = 0
        self.done = 0
        self._t0 = 0.0

    def __enter__(self) -> ValidateProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def start(self, total: int) -> None:
        self.total, self.done, self._t0 = total, 0, time.perf_counter()
        if total:
            self._task = self._progress.add_task("branches", total=total, eta="")

    def eta_seconds(self) -> float | None:
        """Remaining steps x the mean time per step measured so far (None before the first step)."""
        if self.done == 0:
            return None
        return (self.total - self.done) * (time.perf_counter() - self._t0) / self.done

    def step(self) -> None:
        self.done += 1
        if self._task is not None:
            eta = self.eta_seconds()
            text = "" if eta is None else f"~{eta / 60:.1f} min left" if eta >= 60 else f"~{eta:.0f} s left"
            self._progress.update(self._task, advance=1, eta=text)
