"""The typed options of ``commute analyze`` and its resolved inputs, shared by the commands that compute
per-checkpoint statistics (``analyze`` and ``validate``, through :mod:`commute_cli.commands.stats`), and
:func:`resolve_inputs`, which turns the options into checked inputs (``analyze`` and its ``--dry-run``).

Not a command: a service module of the commands layer (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from commute_cli.core.regime import MIN_EFFECT, Target, check_shifts, parse_targets
from commute_cli.core.schedule import Schedule
from commute_cli.engine import distributed
from commute_cli.engine import groups as param_groups
from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints, run_inputs, runfiles
from commute_cli.io import data as domains


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

    @property
    def samples_used(self) -> int:
        """Sequences per domain actually drawn: ``--samples`` rounded down to a multiple of 3 x ``--blocks``
        (every design block has three parts of the same size)."""
        return (self.samples // (3 * self.blocks)) * 3 * self.blocks

    def samples_note(self) -> str | None:
        """The one-line note when ``--samples`` is rounded down (:attr:`samples_used`), else None."""
        used, unit = self.samples_used, 3 * self.blocks
        if used == self.samples:
            return None
        return (
            f"note: --samples {self.samples} is rounded down to {used}: every domain's sample is "
            f"{self.blocks} blocks x 3 parts of equal size, so a multiple of {unit} "
            f"({used // unit} per part; --samples {used + unit} for the next size up)"
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
        if self.hvp not in ("rr", "fr", "fd"):
            raise CommuteError(f"--hvp must be rr, fr or fd, got {self.hvp!r}")
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
    notes: list[str] = field(default_factory=list)  # stderr notes: --samples rounded, pairs left out
    schedule_from: str = ""  # where the schedule came from (run_inputs.RunInputs.schedule_from)


# ------------------------------------------------------------------------------------------------ inputs


def resolve_inputs(opts: AnalyzeOptions) -> Inputs:
    """Checkpoints, domains, tokenizer, schedule and targets, all checked before any long work.

    Run inputs come from ``io.run_inputs.resolve_run_inputs`` (the same precedence as validate and train:
    flag, then the first checkpoint, then the manifest). Without ``--domains`` the manifest's held-out
    ``eval_domains`` are analysed when it has them (population gradients without memorisation bias).
    """
    opts.validate()
    ckpt_dir = Path(opts.ckpt_dir)
    if not ckpt_dir.exists():
        raise CommuteError(f"checkpoint folder {ckpt_dir} does not exist", hint="check the path")
    runfiles.check_complete(ckpt_dir)
    found = checkpoints.discover(ckpt_dir)
    refs = checkpoints.select(found, steps=opts.steps, every=opts.every)
    checkpoints.check_compatible(refs)
    for ref in refs:  # preflight: a truncated or corrupt weight file fails now, not hours into the run
        checkpoints.validate_weights(ref.path)
    run = run_inputs.resolve_run_inputs(
        refs[0].path,
        domains=domains.parse_domain_specs(opts.domains) if opts.domains else None,
        manifest=ckpt_dir if checkpoints.read_manifest(ckpt_dir) is not None else None,
        tokenizer=opts.tokenizer,
        weights=opts.weights or None,
        schedule=opts.schedule,
        seq_len=opts.seq_len,
        note=lambda text: print(text, file=sys.stderr),
        # a Trainer's logged weights: the run folder's trainer_state.json, or its latest checkpoint's
        trainer_logs=[ckpt_dir, *[r.path for r in found[-1:] if r.path.is_dir()]]
        if ckpt_dir.is_dir()
        else [],
    )
    sources = run.analysis_sources
    if not sources:
        raise CommuteError(
            "no domains given and no commute.json manifest next to the checkpoints",
            hint="pass --domains name=path ... (at least two domains)",
        )
    names = list(sources)
    for name, source in sources.items():  # a missing file says so, before any count of domains
        domains.resolve_source(source, domain=name, base_dir=run.base_dir)
    if len(names) < 2:
        raise CommuteError(f"need at least two domains, got {names}", hint="pass --domains a=... b=...")
    text_fields = domains.parse_text_fields(opts.text_fields, names)
    if run.tokenizer_path is None:
        raise CommuteError(
            f"{refs[0].path.name} has no tokenizer files and no manifest names a tokenizer",
            hint="pass --tokenizer FOLDER (the tokenizer the run was trained with)",
        )
    tokenizer = run.load_tokenizer()
    checkpoints.check_tokenizer(tokenizer, checkpoints.read_config(refs[0]))
    if run.schedule is None:
        raise CommuteError(
            "no weight schedule: the criterion is evaluated around the schedule the run used",
            hint="pass --weights "
            + " ".join(f"{n}={1 / len(names):.2g}" for n in names)
            + " or --schedule FILE (or log commute/weight/<domain> in the Trainer's trainer_state.json)",
        )
    schedule = Schedule.from_entries(run.schedule.entries, names)
    targets = parse_targets(opts.targets, names)
    notes = [n for n in [opts.samples_note()] if n is not None]
    if run.schedule_logged:  # a trainer's log (io.trainer_log): say what was read, and where
        words = ", ".join(
            " ".join(f"{n}={w:g}" for n, w in weights.items()) + f" from step {step}"
            for step, weights in schedule.entries
        )
        notes.append(f"note: the run's schedule ({words}) read from {run.schedule_from}")
    notes += check_shifts(schedule, names, [r.step if r.step is not None else 0 for r in refs], opts.dw)
    return Inputs(
        refs,
        names,
        sources,
        run.base_dir,
        tokenizer,
        str(run.tokenizer_path),
        int(run.seq_len or 256),
        schedule,
        targets,
        run.manifest,
        text_fields,
        notes,
        run.schedule_from,
    )


_STEP_LIST = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*$")


def parse_steps(text: str | None) -> list[int] | None:
    """``--steps 2000,8000``."""
    if text is None:
        return None
    if not _STEP_LIST.match(text):
        raise CommuteError(
            f"--steps must be a comma-separated list of steps, got {text!r}", hint="e.g. --steps 2000,8000"
        )
    return [int(s) for s in text.split(",")]
