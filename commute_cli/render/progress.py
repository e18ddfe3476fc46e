"""Progress bars for long commands (rich), drawn on stderr and only on a terminal.

The analysis modules only call plain callbacks; this module decides how (and whether) to show them.
"""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class AnalysisProgress:
    """Two bars: checkpoints, and sample blocks within the current checkpoint."""

    def __init__(self, enabled: bool = True, total_checkpoints: int | None = None) -> None:
        console = Console(file=sys.stderr)
        self.enabled = enabled and console.is_terminal
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not self.enabled,
        )
        self._ckpt_task: int | None = None
        self._block_task: int | None = None
        self._total = total_checkpoints

    def __enter__(self) -> AnalysisProgress:
        self._progress.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.__exit__(exc_type, exc, tb)

    def checkpoint(self, index: int, ref: object, n_blocks: int, cached: bool) -> None:
        """Called when checkpoint ``index`` starts (``cached``: its numbers come from the cache)."""
        name = getattr(ref, "name", str(ref))
        if self._ckpt_task is None:
            self._ckpt_task = self._progress.add_task("checkpoints", total=self._total)
        else:
            self._progress.advance(self._ckpt_task)
        if self._block_task is not None:
            self._progress.remove_task(self._block_task)
        label = f"  {name}" + (" (cached)" if cached else "")
        self._block_task = self._progress.add_task(label, total=0 if cached else n_blocks)

    def block(self, index: int) -> None:
        """Called after each sample block of the current checkpoint."""
        if self._block_task is not None:
            self._progress.advance(self._block_task)
