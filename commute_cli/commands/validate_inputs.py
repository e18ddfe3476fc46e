"""``commute validate``'s options and resolved inputs: everything checked before any training.

A service of the commands layer (docs/ARCHITECTURE.md): :mod:`commute_cli.commands.validate` (the use case)
and :mod:`commute_cli.commands.validate_branches` import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from commute_cli.core.mixing import max_dw
from commute_cli.core.schedule import Schedule
from commute_cli.engine import training
from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints, run_inputs, runfiles
from commute_cli.io import data as domain_data

VALIDATE_FORMAT = "commute-validate/1"

QUICK = {"repeats": 1, "eval_samples": 64, "samples": 48, "blocks": 4}
"""``--quick``: one stream seed (the observed effect has no SE, so no significance), 64 held-out blocks per
domain instead of 256 (noisier losses), and a prediction from 48 sequences per domain in 4 blocks instead of
96 in 8 (wider error bars). The intervention itself (N, dw, the three branches) is unchanged, so the signs
and sizes it measures are real, at about half the default's training time."""

Note = Callable[[str], None]


# ------------------------------------------------------------------------------------------------ options


@dataclass
class ValidateOptions:
    """Everything ``commute validate`` takes; saved in ``validate.json``."""

    checkpoint: Path
    domains: list[str] = field(default_factory=list)
    """Training domains ``name=source`` (default: the run's manifest)."""
    eval_domains: list[str] = field(default_factory=list)
    """Held-out domains ``name=source`` (default: the manifest's ``eval_domains``, else the training data)."""
    weights: list[str] = field(default_factory=list)
    """Constant base schedule (default: the checkpoint's ``commute_state.json``, else the manifest)."""
    dw: float = 0.15
    steps: int = 100
    """N (``--horizon``): steps of each half of the intervention (the prediction's horizon)."""
    repeats: int = 2
    pair: str | None = None
    eval_samples: int = 256
    from_dir: Path | None = None
    metric: str = "euclid"
    lr: float | None = None
    batch_size: int | None = None
    seed: int | None = None
    samples: int | None = None
    """Blocks per domain for the prediction (default: ``commute analyze``'s)."""
    blocks: int = 8
    confidence: float = 0.95
    out: Path = Path("commute_out")
    use_cache: bool = True
    device: str = "cpu"
    """Where the branches train (``auto``, ``cpu``, ``cuda``); the prediction runs on the same device."""
    quick: bool = False

    def validate(self) -> None:
        if not (isinstance(self.dw, (int, float)) and math.isfinite(self.dw) and 0.0 < self.dw <= 0.5):
            raise CommuteError(f"--dw must be in (0, 0.5], got {self.dw}")
        if self.steps < 1:
            raise CommuteError(f"--horizon must be a positive number of steps, got {self.steps}")
        if self.repeats < 1:
            raise CommuteError(
                f"--repeats must be at least 1, got {self.repeats}", hint="2 or more for an SE"
            )
        if self.eval_samples < 1:
            raise CommuteError(f"--eval-samples must be positive, got {self.eval_samples}")
        if self.metric not in ("euclid", "adam"):
            raise CommuteError(f"--metric must be euclid or adam, got {self.metric!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0.0):
            raise CommuteError(f"--lr must be a positive number, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise CommuteError(f"--batch-size must be positive, got {self.batch_size}")
        if not (0.5 <= self.confidence < 1.0):
            raise CommuteError(f"--confidence must be in [0.5, 1), got {self.confidence}")


# ------------------------------------------------------------------------------------------------ inputs


@dataclass
class Setup:
    """Resolved inputs of one validation (everything checked before any training)."""

    checkpoint: Path
    step: int
    names: list[str]
    pair: tuple[int, int]
    schedule: Schedule
    lrs: list[float]
    lr_source: str
    has_optimizer_state: bool
    batch_size: int
    seed: int
    train_sources: dict[str, str]
    eval_sources: dict[str, str]
    eval_held_out: bool
    tokenizer_path: str
    seq_len: int
    base_dir: Path | None = None

    @property
    def lr_mean(self) -> float:
        return float(np.mean(self.lrs))


def parse_pair(text: str | None, names: Sequence[str]) -> tuple[int, int]:
    """``--pair en,ru`` -> indices; the default for two domains is their order (domain 1 = the first)."""
    if text is None:
        if len(names) == 2:
            return (0, 1)
        raise CommuteError(
            f"{len(names)} domains: say which pair to intervene on",
            hint=f"pass --pair {names[0]},{names[1]} (the first one goes up first in '12')",
        )
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise CommuteError(f"--pair must be two domain names like en,ru, got {text!r}")
    unknown = [p for p in parts if p not in names]
    if unknown:
        raise CommuteError(
            f"unknown domain {unknown[0]!r} in --pair {text}", hint=f"the domains are {', '.join(names)}"
        )
    if parts[0] == parts[1]:
        raise CommuteError(f"--pair needs two different domains, got {text!r}")
    return (list(names).index(parts[0]), list(names).index(parts[1]))


def _learning_rates(
    opts: ValidateOptions,
    folder: Path,
    step: int,
    manifest: checkpoints.Manifest | None,
    has_state: bool,
    n_total: int,
) -> tuple[list[float], str]:
    """The rate of each of the ``n_total`` steps from ``step``: ``--lr``, the manifest's schedule (with
    optimizer state), the logged rate, else a one-line error."""
    raw = manifest.raw if manifest is not None else {}
    opt = manifest.optimizer if manifest is not None and manifest.optimizer else {}
    logged = checkpoints.learning_rate(checkpoints.CheckpointRef(folder, step, folder.name))
    if opts.lr is not None:
        return [float(opts.lr)] * n_total, "--lr"
    if has_state and isinstance(opt.get("lr"), (int, float)) and isinstance(raw.get("max_steps"), int):
        kind = (manifest.lr_schedule if manifest is not None else None) or "constant"
        warm = int(raw.get("warmup_steps") or 0)
        lrs = [
            training.lr_at(s, float(opt["lr"]), kind, int(raw["max_steps"]), warm)
            for s in range(step, step + n_total)
        ]
        return lrs, f"manifest ({kind}, base {float(opt['lr']):g})"
    if logged is not None:
        return [float(logged)] * n_total, "trainer_state.json"
    what = "no optimizer state, and no learning rate" if not has_state else "no learning rate"
    raise CommuteError(
        f"{folder} has {what} (no trainer_state.json log or manifest)",
        hint="pass --lr (the learning rate to continue training with)",
    )


def resolve_setup(
    opts: ValidateOptions, note: Note, until: int | None = None, scratch: bool = False
) -> Setup:
    """Checkpoint, domains, schedule, pair, learning rates: all checked before any long work.

    ``until``: a continuation to this global step instead of validate's intervention (no pair or ``dw`` to
    check; the rates cover every step from the checkpoint to ``until``). Raises ``CommuteError`` when
    ``until`` is not after the checkpoint's step.

    ``scratch`` (with ``until``): the run retrained from step 0 instead of continued: the checkpoint only
    supplies the run's manifest, data, tokenizer and model config; the rates are the manifest's from step 0
    (a one-line error when the manifest records no optimizer and schedule)."""
    opts.validate()
    pending: list[str] = []  # notes are shown only once every input is known to be good
    emit, note = note, pending.append
    folder = Path(opts.checkpoint).expanduser()
    if not folder.exists():
        raise CommuteError(f"checkpoint {folder} does not exist", hint="pass a checkpoint-N folder")
    if not checkpoints.is_checkpoint_dir(folder):
        raise CommuteError(
            f"{folder} is not a model checkpoint (config.json and model weights)",
            hint="pass one checkpoint folder, e.g. sample_checkpoints/checkpoint-1000",
        )
    runfiles.check_complete(folder)
    checkpoints.validate_weights(folder)  # pickle and truncation checks before anything is loaded
    inputs = run_inputs.resolve_run_inputs(
        folder,
        domains=domain_data.parse_domain_specs(opts.domains) if opts.domains else None,
        eval_domains=domain_data.parse_domain_specs(opts.eval_domains) if opts.eval_domains else None,
        weights=opts.weights or None,
        batch_size=opts.batch_size,
        seed=opts.seed,
        note=note,
    )
    step = 0 if scratch else checkpoints.discover(folder)[0].step or 0
    names = inputs.names
    if not names:
        raise CommuteError(
            f"no training domains for {folder}: no --domains and no commute.json next to it",
            hint="pass --domains name=source ... (the data the run trained on)",
        )
    if len(names) < 2:
        raise CommuteError(f"need at least two domains, got {names}", hint="pass --domains a=... b=...")
    held_out = bool(inputs.eval_domains) and set(names) <= set(inputs.eval_domains)
    if opts.eval_domains and not held_out:
        raise CommuteError(
            f"--eval-domains names ({', '.join(inputs.eval_domains)}) differ from the training domains "
            f"({', '.join(names)})",
            hint="give held-out data for exactly the training domains",
        )
    if held_out:
        eval_sources = {n: inputs.eval_domains[n] for n in names}
    else:
        eval_sources = dict(inputs.domains)
        note(
            "note: no held-out data (--eval-domains or the manifest's eval_domains): "
            "evaluating on training data"
        )
    schedule = inputs.schedule
    if schedule is None:
        raise CommuteError(
            f"no weight schedule for {folder}",
            hint="pass --weights " + " ".join(f"{n}={1 / len(names):.2g}" for n in names),
        )
    if until is not None and until <= step:
        raise CommuteError(
            f"{folder} is at step {step}: nothing to continue to step {until}",
            hint="start from an earlier checkpoint",
        )
    pair = parse_pair(opts.pair, names) if until is None else (0, 1)
    limit = max_dw(schedule, step, opts.steps, pair) if until is None else 1.0
    if opts.dw > limit + 1e-12:
        w = schedule.weights_at(step)
        raise CommuteError(
            f"--dw {opts.dw:g} is too large for the weights {names[pair[0]]}={w[names[pair[0]]]:g}, "
            f"{names[pair[1]]}={w[names[pair[1]]]:g}: a weight would leave [0, 1]",
            hint=f"use --dw <= {limit:g}"
            if limit > 0
            else "pick a pair whose weights are both inside (0, 1)",
        )
    has_state = scratch or (folder / "optimizer.pt").is_file()  # from scratch: the manifest's optimizer
    n_total = 2 * opts.steps if until is None else until - step
    lrs, source = _learning_rates(opts, folder, step, inputs.manifest, has_state, n_total)
    if scratch and not source.startswith("manifest"):
        raise CommuteError(
            f"cannot retrain {folder}'s run from scratch: its commute.json records no optimizer and "
            "learning-rate schedule",
            hint="continue from a saved checkpoint instead (--start STEP)",
        )
    if not has_state:
        note(f"note: {folder} has no optimizer state: the branches use plain SGD at lr {lrs[0]:g}")
    if opts.metric == "adam":
        note(
            "warning: --metric adam is experimental (docs/MATH.md 'Regime of validity'): Adam's frozen "
            "second moments, clipped at 100x their median, as the metric"
        )
    if inputs.tokenizer_path is None:
        raise CommuteError(f"no tokenizer for {folder}", hint="save the tokenizer with the checkpoint")
    for text in pending:
        emit(text)
    return Setup(
        checkpoint=folder,
        step=int(step),
        names=names,
        pair=pair,
        schedule=schedule,
        lrs=lrs,
        lr_source=source,
        has_optimizer_state=has_state,
        batch_size=int(inputs.batch_size or run_inputs.DEFAULT_BATCH_SIZE),
        seed=int(inputs.seed or 0),
        train_sources=dict(inputs.domains),
        eval_sources=eval_sources,
        eval_held_out=held_out,
        tokenizer_path=str(inputs.tokenizer_path),
        seq_len=int(inputs.seq_len or run_inputs.DEFAULT_SEQ_LEN),
        base_dir=inputs.base_dir,
    )
