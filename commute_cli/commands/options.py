"""The typed options of ``commute analyze`` and its resolved inputs, shared by the commands that compute
per-checkpoint statistics (``analyze`` and ``validate``, through :mod:`commute_cli.commands.stats`).

Not a command: a plain data module of the commands layer (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from commute_cli.core.regime import MIN_EFFECT, Target
from commute_cli.core.schedule import Schedule
from commute_cli.engine import distributed
from commute_cli.engine import groups as param_groups
from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints


@dataclass
class AnalyzeOptions:
    """Everything ``commute analyze`` takes; saved to ``run.json`` so a run can be repeated."""

    ckpt_dir: Path
    domains: list[str] = field(default_factory=list)
    text_fields: list[str] = field(default_factory=list)  # NAME=COLUMN: the text column of a domain
    tokenizer: str | None = None
    seq_len: int | None = None
    samples: int = 96
    blocks: int = 8
    batch_size: int = 8
    hvp_batch_size: int | None = None  # None: half of batch_size (see hvp_micro_batch)
    weights: list[str] = field(default_factory=list)
    schedule: Path | None = None
    targets: list[str] = field(default_factory=list)
    metric: str = "euclid"
    dw: float | None = None
    horizon: int | None = None
    lr: float | None = None
    hvp: str = "rr"
    plan: str = "auto"
    device: str = "auto"
    offload: str = "auto"  # auto, on, off: vector stacks in host memory (see offload_stacks)
    seed: int = 0
    confidence: float = 0.95
    min_effect: float = MIN_EFFECT  # fraction of the window's first-order progress (core.regime)
    out: Path = Path("commute_out")
    name: str | None = None  # results in OUT/NAME/ (store.choose_folder)
    steps: list[int] | None = None
    every: int | None = None
    use_cache: bool = True
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S  # seconds; only under torchrun (WORLD_SIZE > 1)
    decompose: str | None = None  # kind, layer, module or NAME=REGEX;...: decomposition.csv (engine.groups)

    def check_dist_timeout(self) -> None:
        """``--dist-timeout``; :func:`run_analysis` checks it before creating the process group."""
        if not (0.0 < self.dist_timeout <= 1e9):  # nan fails too
            raise CommuteError(
                f"--dist-timeout must be a positive number of seconds (at most 1e9), "
                f"got {self.dist_timeout:g}",
                hint="the default is 1800 (30 minutes); it only matters under torchrun",
            )

    def validate(self) -> None:
        if self.samples < 3 * self.blocks:
            raise CommuteError(
                f"--samples {self.samples} is too small for {self.blocks} blocks of 3 disjoint parts",
                hint=f"use --samples >= {3 * self.blocks} (a multiple of {3 * self.blocks})",
            )
        if self.blocks < 2:
            raise CommuteError(f"--blocks must be at least 2 for an error bar, got {self.blocks}")
        if self.batch_size < 1:
            raise CommuteError(f"--batch-size must be positive, got {self.batch_size}")
        if self.hvp_batch_size is not None and self.hvp_batch_size < 1:
            raise CommuteError(f"--hvp-batch-size must be positive, got {self.hvp_batch_size}")
        if self.seq_len is not None and self.seq_len < 2:
            raise CommuteError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.dw is not None and not (0.0 < self.dw <= 0.5):  # nan fails too
            raise CommuteError(f"--dw must be in (0, 0.5], got {self.dw}")
        if self.horizon is not None and self.horizon < 1:
            raise CommuteError(f"--horizon must be a positive number of steps, got {self.horizon}")
        if self.lr is not None and not (self.lr > 0.0 and math.isfinite(self.lr)):
            raise CommuteError(f"--lr must be a positive number, got {self.lr}")
        if not (0.5 <= self.confidence < 1.0):
            raise CommuteError(f"--confidence must be in [0.5, 1), got {self.confidence}")
        if not (0.0 <= self.min_effect < 1.0):  # nan fails too
            raise CommuteError(
                f"--min-effect must be in [0, 1), got {self.min_effect}",
                hint="a fraction of the loss decrease training makes over the window (default 0.01)",
            )
        if self.metric not in ("euclid", "adam"):
            raise CommuteError(f"--metric must be euclid or adam, got {self.metric!r}")
        if self.hvp not in ("rr", "fr"):
            raise CommuteError(f"--hvp must be rr or fr, got {self.hvp!r}")
        if self.offload not in ("auto", "on", "off"):
            raise CommuteError(f"--offload must be auto, on or off, got {self.offload!r}")
        if self.plan not in ("auto", "pair", "target"):
            raise CommuteError(f"--plan must be auto, pair or target, got {self.plan!r}")
        if self.weights and self.schedule is not None:
            raise CommuteError("give either --weights or --schedule, not both")
        self.check_dist_timeout()
        if self.decompose is not None:
            param_groups.check_spec(self.decompose)


@dataclass
class Inputs:
    """Resolved inputs of one analysis."""

    refs: list[checkpoints.CheckpointRef]
    names: list[str]
    sources: dict[str, str]
    base_dir: Path | None
    tokenizer: Any
    tokenizer_path: str
    seq_len: int
    schedule: Schedule
    targets: list[Target]
    manifest: checkpoints.Manifest | None
    text_fields: dict[str, str] = field(default_factory=dict)  # domain -> text column (default "text")
