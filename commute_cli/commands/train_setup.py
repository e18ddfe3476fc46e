"""``commute train``'s set-up: its configuration (:class:`TrainConfig`, checked), the checkpoints it may
replace, the model and optimizer it starts from, the manifest it writes last, and the command that resumes
it. The training run itself is ``commands.train``."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from commute_cli.core.schedule import Schedule
from commute_cli.engine import training
from commute_cli.engine.models import model_config, new_model
from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints, discovery, run_inputs, runfiles


@dataclass
class TrainConfig:
    """Everything ``train`` needs; the CLI builds one from its flags.

    ``domains``/``eval_domains`` map names to sources (paths relative to ``base_dir`` or the working
    directory, or hub names; see ``io.documents.load_texts``). Without ``schedule`` or ``weights`` the weights
    are uniform. ``init`` is a model config JSON, a model folder, or a checkpoint to continue.
    ``seq_len``/``batch_size`` None: from ``--init``'s checkpoint or the manifest, else 128 / 16.
    """

    out_dir: Path
    domains: dict[str, str]
    tokenizer: str | None = None
    eval_domains: dict[str, str] | None = None
    schedule: Schedule | str | Path | None = None
    """A ``Schedule``, or a schedule file (JSON/CSV); exclusive with ``weights``."""
    weights: Sequence[str] | str | Mapping[str, float] | None = None
    """Constant weights: ``{"en": 0.8, "ru": 0.2}`` or ``"en=0.8 ru=0.2"`` (``schedule.parse_weights``)."""
    manifest: Path | None = None
    """A ``commute.json`` (or its folder) whose domains, eval domains and tokenizer fill in missing ones."""
    steps: int = 1000
    save_every: int = 200
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float = 1e-3
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    lr_schedule: str = "constant"
    warmup: int = 0
    max_grad_norm: float | None = None
    init: str | None = None
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    logging_steps: int = 10
    eval_blocks: int = 256
    unset: tuple[str, ...] = ()
    """Optimizer settings the user did not give (``lr``, ``optimizer``, ``weight_decay``, ``lr_schedule``,
    ``warmup``): taken from the run being continued or named (``--init``'s or ``--manifest``'s
    ``commute.json``) by :func:`inherit_training`, else the defaults above."""
    base_dir: Path | None = None
    watch: int | None = None
    """``--watch N``: measure the criterion on the live model every N steps (``commands.watch``), into
    ``out_dir/watch/``."""
    overwrite: bool = False
    quiet: bool = False
    progress: bool | None = None
    """Show a progress bar (drawn only where stderr is a terminal): None = when it is and not ``quiet``."""
    argv: list[str] | None = None
    """The command's arguments (after ``commute``), so that an interrupted run can say how to resume."""
    model_overrides: dict[str, Any] = field(default_factory=dict)


UNSET = ("lr", "optimizer", "weight_decay", "lr_schedule", "warmup")
"""Every setting :func:`inherit_training` can take from a run's manifest."""


def inherit_training(config: TrainConfig, manifest: Any) -> TrainConfig:
    """``config`` with every setting in ``config.unset`` taken from ``manifest`` (an
    ``io.checkpoints.Manifest`` or None) where it records one: a continuation trains as the run did (its
    learning rate, schedule, warmup, optimizer and weight decay; betas and eps with the optimizer) unless a
    flag says otherwise."""
    if manifest is None or not config.unset:
        return config
    opt = manifest.optimizer or {}
    raw = manifest.raw or {}
    found: dict[str, Any] = {
        "lr": opt.get("lr"),
        "optimizer": opt.get("name"),
        "weight_decay": opt.get("weight_decay"),
        "lr_schedule": raw.get("lr_schedule"),
        "warmup": raw.get("warmup_steps"),
    }
    changes = {k: found[k] for k in config.unset if found.get(k) is not None}
    if "optimizer" in changes and changes["optimizer"] == "adamw":
        if isinstance(opt.get("betas"), list) and len(opt["betas"]) == 2:
            changes["betas"] = (float(opt["betas"][0]), float(opt["betas"][1]))
        if isinstance(opt.get("eps"), (int, float)):
            changes["eps"] = float(opt["eps"])
    return replace(config, **changes) if changes else config


def validate_config(config: TrainConfig) -> None:
    checks = [
        (config.steps >= 1, f"--steps must be at least 1, got {config.steps}"),
        (config.save_every >= 1, f"--save-every must be at least 1, got {config.save_every}"),
        (
            config.batch_size is None or config.batch_size >= 1,
            f"--batch-size must be >= 1: {config.batch_size}",
        ),
        (
            config.seq_len is None or config.seq_len >= 2,
            f"--seq-len must be at least 2, got {config.seq_len}",
        ),
        (math.isfinite(config.lr) and config.lr > 0, f"--lr must be a positive number, got {config.lr}"),
        (config.warmup >= 0, f"--warmup must be non-negative, got {config.warmup}"),
        (config.logging_steps >= 1, f"logging_steps must be at least 1, got {config.logging_steps}"),
        (config.watch is None or config.watch >= 1, f"--watch must be at least 1 step, got {config.watch}"),
        (config.optimizer in ("adamw", "sgd"), f"unknown optimizer {config.optimizer!r} (adamw or sgd)"),
        (config.lr_schedule in ("constant", "cosine"), f"unknown --lr-schedule {config.lr_schedule!r}"),
        (
            config.threads is None or config.threads >= 1,
            f"--threads must be at least 1, got {config.threads}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise CommuteError(message)


def clashing_checkpoints(out: Path, init_dir: Path | None, start_step: int, overwrite: bool) -> list[Path]:
    """Refuse to mix runs: existing checkpoints must be the past of the run being continued. With
    ``overwrite``, return the ones to delete (deleted only once everything has loaded)."""
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in out.iterdir() if p.is_dir() and discovery.name_step(p.name) is not None)
    continuing_here = init_dir is not None and init_dir.resolve().parent == out.resolve()
    clash = [p for p in existing if not continuing_here or (discovery.name_step(p.name) or 0) > start_step]
    if clash and not overwrite:
        raise CommuteError(
            f"{out} already holds checkpoints from another run ({', '.join(p.name for p in clash[:3])})",
            "choose an empty folder, continue from its last checkpoint with --init, or pass --overwrite",
        )
    return clash


def model_and_optimizer(
    config: TrainConfig,
    tokenizer: Any,
    seq_len: int,
    init: Path | None,
    init_dir: Path | None,
    resumed: runfiles.Resumed | None,
    device: torch.device,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A new model (default or config JSON) or a saved one (the one loader), and its optimizer."""
    if init_dir is not None:
        model: Any = checkpoints.load_model(init_dir, device=device)  # a transformers model
        if model.config.vocab_size < len(tokenizer):
            raise CommuteError(f"the model at {init_dir} has a smaller vocabulary than the tokenizer")
    else:
        model = new_model(model_config(tokenizer, seq_len, init, config.model_overrides), config.seed)
        model.to(device)
    model.train()
    optimizer = training.build_optimizer(
        model,
        config.optimizer,
        config.lr,
        decay=checkpoints.decay_parameter_names(model),
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        momentum=config.momentum,
    )
    if resumed and resumed.optimizer_state is not None:
        try:
            optimizer.load_state_dict(resumed.optimizer_state)
        except (ValueError, KeyError) as err:
            raise CommuteError(
                f"the optimizer state in {init_dir} does not fit a {config.optimizer} optimizer: {err}",
                "use the optimizer the checkpoint was trained with",
            ) from err
    return model, optimizer


def run_manifest(
    config: TrainConfig,
    inputs: run_inputs.RunInputs,
    schedule: Schedule,
    tok_rel: str,
    seq_len: int,
    batch: int,
) -> dict[str, Any]:
    """The ``commute.json`` content (docs/CONVENTIONS.md)."""
    opt: dict[str, Any] = {"name": config.optimizer, "lr": config.lr}
    if config.optimizer == "adamw":
        opt.update(betas=list(config.betas), eps=config.eps)
    else:
        opt["momentum"] = config.momentum
    opt["weight_decay"] = config.weight_decay
    return runfiles.manifest_dict(
        Path(config.out_dir),
        inputs.domains,
        inputs.eval_domains,
        inputs.base_dir or config.base_dir,
        schedule=schedule.to_records(),
        tokenizer=tok_rel,
        seq_len=seq_len,
        optimizer=opt,
        lr_schedule=config.lr_schedule,
        warmup_steps=config.warmup,
        max_steps=config.steps,
        batch_size=batch,
        seed=config.seed,
    )


def resume_command(config: TrainConfig, last: Path | None) -> str:
    """The command that continues this run from checkpoint ``last`` (or starts it again)."""
    import shlex

    argv = list(config.argv or [])
    if not argv:
        return (
            f"commute train {config.out_dir} ... --init {last}" if last else "the same commute train command"
        )
    keep: list[str] = []
    skip = False
    for tok in argv:
        if skip:
            skip = False
        elif tok == "--init":
            skip = True
        elif not tok.startswith("--init="):
            keep.append(tok)
    if last is not None:
        keep += ["--init", str(last)]
    return "commute " + " ".join(shlex.quote(t) for t in keep)
