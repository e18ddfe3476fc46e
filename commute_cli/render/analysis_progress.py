"""``commute analyze``'s progress: :class:`AnalysisEta`, the remaining time from measured per-block and
per-checkpoint times, and :class:`AnalysisProgress`, its two bars (checkpoints, sample blocks of the current
checkpoint) drawn through ``render.progress.Bars`` on a terminal, and plain lines elsewhere (stderr piped to
a file or a log: at each checkpoint and at least every :data:`PLAIN_INTERVAL` seconds).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from types import TracebackType

from rich.console import Console

from commute_cli.render.progress import (
    PLAIN_INTERVAL,
    Bars,
    Clock,
    eta_words,
    format_duration,
    plain_interval,
)

__all__ = ["PLAIN_INTERVAL", "AnalysisEta", "AnalysisProgress", "plain_interval"]


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
    the current checkpoint. Pass :meth:`checkpoint` and :meth:`block` as ``run_analysis``'s callbacks.

    When the console is not a terminal (stderr to a file or a pipe) the bars are not drawn; plain lines say
    the same instead (step, checkpoints and blocks done of their totals, elapsed, ETA): one when each
    checkpoint starts and, from a background timer, at least every ``interval`` seconds
    (:func:`plain_interval`)."""

    def __init__(
        self,
        enabled: bool = True,
        total_checkpoints: int | None = None,
        *,
        console: Console | None = None,
        clock: Clock = time.monotonic,
        interval: float | None = None,
    ) -> None:
        console = console if console is not None else Console(file=sys.stderr)
        self.bars = Bars(enabled, console=console, clock=clock)
        self.enabled = self.bars.enabled
        self.plain = enabled and not self.bars.enabled  # not a terminal: lines instead of bars
        self.interval = plain_interval() if interval is None else float(interval)
        self.eta = AnalysisEta(total_checkpoints, clock)
        self.clock = clock
        self._file = console.file
        self._ckpt_task: int | None = None
        self._block_task: int | None = None
        self._started = clock()
        self._last_line = self._started
        self._where: str | None = None  # the current checkpoint: "step 1000 (checkpoint-1000)"
        self._deadline: float | None = None  # the ETA as of the last event, a clock() time
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    def __enter__(self) -> AnalysisProgress:
        self.bars.__enter__()
        self._started = self._last_line = self.clock()
        if self.plain:
            self._timer = threading.Thread(target=self._tick, name="commute-progress", daemon=True)
            self._timer.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.join()
        self.bars.__exit__(exc_type, exc, tb)

    def _tick(self) -> None:
        """The timer: a line whenever ``interval`` seconds passed without one."""
        while not self._stop.wait(min(self.interval, 1.0) / 2):
            if self._where is not None and self.clock() - self._last_line >= self.interval:
                self.line()

    def line(self) -> str:
        """Print one plain progress line (stderr) and return it."""
        with self._lock:
            eta = self.eta
            total = "?" if eta.total is None else str(eta.total)
            blocks = "cached" if eta.cached else f"sample blocks {eta.done}/{eta.n_blocks}"
            now = self.clock()
            when = eta_words(self._deadline, now, eta.upper_bound())
            text = (
                f"analyze: {self._where}, checkpoint {eta.index + 1}/{total}, {blocks}; "
                f"{format_duration(now - self._started)} elapsed, {when}"
            )
            print(text, file=self._file, flush=True)
            self._last_line = now
            return text

    def checkpoint(
        self, index: int, ref: object, n_blocks: int, cached: bool, total: int | None = None
    ) -> None:
        """Called when checkpoint ``index`` (of ``total``) starts; ``cached``: its numbers come from the
        cache."""
        with self._lock:  # the plain lines' timer reads the estimate from its own thread
            if total is not None:
                self.eta.total = int(total)
            self.eta.checkpoint(index, n_blocks, cached)
            self._deadline = self.eta.deadline()
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
        if self.plain:
            step = getattr(ref, "step", None)
            self._where = f"step {step} ({name})" if step is not None else name
            self.line()

    def block(self, index: int) -> None:
        """Called after each sample block of the current checkpoint."""
        with self._lock:
            self.eta.block()
            self._deadline = self.eta.deadline()
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
