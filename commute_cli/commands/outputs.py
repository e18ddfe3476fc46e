"""The rows one measurement adds to an analysis folder, and the writing of that folder.

A measurement is one model's :class:`~commute_cli.core.checkpoint_stats.CheckpointStats` at one step with
its learning rate and horizon: a saved checkpoint (``commute analyze``) or the live model of a running
trainer (``commute watch``, ``commute train --watch``). Both turn it into rows here (``core.rows``:
``results.csv``, ``losses.csv``, ``baselines.csv`` and ``decomposition.csv``) and write the folder with
:func:`write_folder`, so a watched run's folder is read by ``recommend``, ``plot`` and ``validate`` exactly
as an analysed one.

Not a command: a service module of the commands layer (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from commute_cli.commands.options import AnalyzeOptions
from commute_cli.core import baselines as first_order_baselines
from commute_cli.core.checkpoint_stats import CheckpointStats
from commute_cli.core.regime import Target
from commute_cli.core.rows import loss_rows, summarize_checkpoint, why_rows
from commute_cli.io import atomic, store


@dataclass
class RowTables:
    """The rows of every measurement so far, in the order they were added (one list per output file)."""

    results: list[dict] = field(default_factory=list)
    losses: list[dict] = field(default_factory=list)
    baselines: list[dict] = field(default_factory=list)
    decomposition: list[dict] = field(default_factory=list)

    def add(
        self,
        stats: CheckpointStats,
        opts: AnalyzeOptions,
        *,
        step: int | None,
        names: Sequence[str],
        wbar: np.ndarray,
        targets: Sequence[Target],
        lr: float,
        horizon: int,
        horizon_reason: str,
    ) -> list[dict]:
        """Add one measurement's rows; return its ``results.csv`` rows.

        ``wbar`` ``[K]``: the domain weights at ``step``; ``lr``: the learning rate in force there;
        ``horizon``: steps of each half of the intervention (``dt = lr x horizon``, docs/MATH.md
        "Notation"). The numbers come from ``core.rows`` (``summarize_checkpoint``, ``loss_rows``,
        ``why_rows``) with the options' ``--dw``, confidence, ``--min-effect`` and ``--decompose``.
        """
        rows = summarize_checkpoint(
            stats, step=step, names=names, wbar=wbar, targets=targets, lr=float(lr), horizon=horizon,
            dw=opts.dw, confidence=opts.confidence, min_effect=opts.min_effect, horizon_reason=horizon_reason,
        )  # fmt: skip
        self.results += rows
        self.losses += loss_rows(stats, step, names, opts.confidence)
        base, parts = why_rows(
            stats, step, names, wbar, targets, opts.confidence, opts.decompose is not None,
            dw=opts.dw, dt=float(lr) * horizon,
        )  # fmt: skip
        self.baselines += first_order_baselines.attach_second_order(base, rows)
        self.decomposition += parts
        return rows

    def drop_from(self, step: int) -> None:
        """Forget the rows of steps at or after ``step`` (a resumed run measures them again)."""
        for name in ("results", "losses", "baselines", "decomposition"):
            kept = [r for r in getattr(self, name) if r.get("step") is None or int(r["step"]) < step]
            setattr(self, name, kept)

    def frames(self, run_id: str, decompose: bool) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, Any]:
        """``results`` (with the ``run_id`` column first: its first 8 characters), ``losses``,
        ``baselines`` and ``decomposition`` (None unless ``decompose``) as data frames."""
        results = pd.DataFrame(self.results)
        results.insert(0, "run_id", run_id[:8])
        decomposition = pd.DataFrame(self.decomposition) if decompose else None
        return results, pd.DataFrame(self.losses), pd.DataFrame(self.baselines), decomposition

    @classmethod
    def read(cls, folder: Path) -> RowTables:
        """The rows already in ``folder`` (empty lists for files that are absent), ``run_id`` dropped."""
        tables = cls()
        for name in ("results", "losses", "baselines", "decomposition"):
            file = Path(folder) / f"{name}.csv"
            if file.is_file():
                frame = store.read_table(file).drop(columns=["run_id"], errors="ignore")
                setattr(tables, name, frame.to_dict("records"))
        return tables


def write_folder(
    out: Path,
    results: pd.DataFrame,
    losses: pd.DataFrame,
    baselines: pd.DataFrame,
    decomposition: pd.DataFrame | None,
    run: dict[str, Any],
) -> None:
    """``baselines.csv``, ``decomposition.csv`` (when given), then ``results.csv``, ``losses.csv`` and
    ``run.json`` (``store.AnalysisRun.write``), each atomically; ``run.json`` last: the folder is complete."""
    atomic.write_text(out / "baselines.csv", baselines.to_csv(index=False))
    if decomposition is not None:
        atomic.write_text(out / "decomposition.csv", decomposition.to_csv(index=False))
    store.AnalysisRun(out, results, losses, run).write()
