"""The commands that train: ``commute train`` (a run on a mixture of domains) and ``commute validate``
(branches from one checkpoint, the observed excess loss beside the predicted one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from commute_cli.cli.app import (
    INVOCATION,
    Device,
    Format,
    LrSchedule,
    Metric,
    Optimizer,
    alias,
    help_paragraphs,
    interrupted,
)
from commute_cli.errors import CommuteError


@help_paragraphs
def train_command(
    out_dir: Path = typer.Argument(
        ..., metavar="OUT_DIR", help="Folder for checkpoint-N/ subfolders and the commute.json manifest."
    ),
    domains: list[str] = typer.Option(
        [], "--domains", help="name=source per training domain (several may follow one flag)."
    ),
    eval_domains: list[str] = typer.Option(
        [], "--eval-domains", help="name=source of validation data, evaluated at every save."
    ),
    manifest: Path | None = typer.Option(
        None, "--manifest", help="Reuse domains, eval domains and tokenizer of this commute.json (or folder)."
    ),
    tokenizer: str | None = typer.Option(
        None,
        "--tokenizer",
        help="Tokenizer folder (AutoTokenizer, offline). Default: --init's or --manifest's.",
    ),
    weights: list[str] = typer.Option(
        [], "--weights", help="Constant weights, e.g. --weights en=0.8 ru=0.2 (default: uniform)."
    ),
    schedule: Path | None = typer.Option(None, "--schedule", help="Piecewise schedule file (CSV or JSON)."),
    steps: int = typer.Option(1000, "--steps", help="Final global step (like the HF Trainer's max_steps)."),
    save_every: int = typer.Option(
        200, "--save-every", help="Save a checkpoint every N steps (and at the end)."
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        help="Sequences per step, split by the weights (default: --init's or the manifest's, else 16).",
    ),
    seq_len: int | None = typer.Option(
        None, "--seq-len", help="Tokens per sequence (default: --init's or the manifest's, else 128)."
    ),
    lr: float | None = typer.Option(
        None, "--lr", help="Peak learning rate (default: --init's or the manifest's run, else 1e-3)."
    ),
    optimizer: Optimizer | None = typer.Option(
        None, "--optimizer", help="adamw or sgd (default: --init's or the manifest's run, else adamw)."
    ),
    weight_decay: float | None = typer.Option(
        None, "--weight-decay", help="Decoupled weight decay, AdamW (default: the run's, else 0)."
    ),
    lr_schedule: LrSchedule | None = typer.Option(
        None, "--lr-schedule", help="constant or cosine (default: the run's, else constant)."
    ),
    warmup: int | None = typer.Option(
        None, "--warmup", help="Linear warmup steps (default: the run's, else 0)."
    ),
    init: str | None = typer.Option(
        None, "--init", help="Model config JSON, or a checkpoint to continue (weights, optimizer, step)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialization and the data streams."),
    threads: int | None = typer.Option(None, "--threads", help="torch.set_num_threads (default: torch's)."),
    device: Device = typer.Option(Device.auto, "--device", help="auto (CUDA when available), cpu or cuda."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace checkpoints of another run in OUT_DIR."
    ),
    watch: int | None = typer.Option(
        None,
        "--watch",
        metavar="N",
        help="Measure the criterion on the live model every N steps, into OUT_DIR/watch/ (read it with "
        "commute recommend --from OUT_DIR/watch) and the run's log_history.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or messages."),
) -> None:
    """Train a small causal LM (a tiny GPT-2 by default) on a weighted mixture of domains.

    Saves checkpoints in the Hugging Face Trainer layout and, when done, a commute.json manifest, so that
    'commute analyze OUT_DIR' needs no flags (data outside OUT_DIR is recorded by absolute path). Ctrl-C
    keeps the finished checkpoints and prints the command that resumes.

    Example: commute train runs/example --manifest sample_checkpoints --steps 20 --save-every 10
    """
    from commute_cli.commands import train
    from commute_cli.io.data import parse_domain_specs

    given: dict[str, Any] = {
        "lr": lr,
        "optimizer": optimizer.value if optimizer else None,
        "weight_decay": weight_decay,
        "lr_schedule": lr_schedule.value if lr_schedule else None,
        "warmup": warmup,
    }
    config = train.TrainConfig(
        out_dir=out_dir,
        domains=parse_domain_specs(domains) if domains else {},
        eval_domains=parse_domain_specs(eval_domains) if eval_domains else None,
        manifest=manifest,
        tokenizer=tokenizer,
        weights=weights or None,
        schedule=schedule,
        steps=steps,
        save_every=save_every,
        batch_size=batch_size,
        seq_len=seq_len,
        **{k: v for k, v in given.items() if v is not None},
        unset=tuple(k for k, v in given.items() if v is None),
        init=init,
        seed=seed,
        threads=threads,
        device=device.value,
        overwrite=overwrite,
        watch=watch,
        quiet=quiet,
        argv=list(INVOCATION.argv),
    )
    try:
        out = train.train(config)
    except KeyboardInterrupt as ex:
        interrupted(ex, "interrupted: training stopped")
    if not quiet:
        typer.echo(f"checkpoints and commute.json in {out}/", err=True)


@help_paragraphs
def validate_command(
    checkpoint: Path = typer.Argument(
        ..., metavar="CKPT", help="One checkpoint folder (with optimizer.pt when saved)."
    ),
    domains: list[str] = typer.Option(
        [], "--domains", help="name=source training domains (default: the run's commute.json)."
    ),
    eval_domains: list[str] = typer.Option(
        [], "--eval-domains", help="name=source held-out data (default: the manifest's eval_domains)."
    ),
    weights: list[str] = typer.Option(
        [], "--weights", help="Base schedule, e.g. en=0.8 ru=0.2 (default: the checkpoint's)."
    ),
    dw: float = typer.Option(0.15, "--dw", help="Weight shift of the intervention (the paper's 0.15)."),
    horizon: int | None = typer.Option(
        None, "--horizon", help="N: steps of each half (branches train 2N steps). Default 100."
    ),
    steps_old: int | None = typer.Option(None, "--steps", hidden=True),
    repeats: int | None = typer.Option(
        None, "--repeats", help="Stream seeds, for the SE of the observed excess loss (default 2; --quick 1)."
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="About half the time: 1 repeat (no SE of the observation), 64 held-out blocks, a prediction "
        "from 48 sequences in 4 blocks. Same intervention. Explicit flags win.",
    ),
    pair: str | None = typer.Option(
        None, "--pair", help="i,j: domain i up first in '12' (default with two domains: their order)."
    ),
    eval_samples: int | None = typer.Option(
        None, "--eval-samples", help="Held-out sequences per domain, at most (default 256; --quick 64)."
    ),
    from_dir: Path | None = typer.Option(
        None, "--from", help="Read the prediction from this analyze output when it has matching rows."
    ),
    metric: Metric = typer.Option(Metric.euclid, "--metric", help="euclid or adam (experimental)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default: the run's schedule or log)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Rows per step (default: the run's)."),
    seed: int | None = typer.Option(None, "--seed", help="Stream seed of repeat 0 (default: the run's)."),
    samples: int | None = typer.Option(
        None, "--samples", help="Sequences per domain for the prediction (default: analyze's 96; --quick 48)."
    ),
    threads: int | None = typer.Option(None, "--threads", help="torch.set_num_threads (default: torch's)."),
    device: Device = typer.Option(Device.auto, "--device", help="auto (CUDA when available), cpu or cuda."),
    out: Path = typer.Option(
        Path("commute_out"), "--out", help="Folder for validate.csv, validate.json and the cache."
    ),
    fmt: Format = typer.Option(Format.table, "--format", help="table, or csv/json (rows to stdout)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Retrain the branches even if cached."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or notes."),
) -> None:
    """Check the criterion against real training: observed excess losses beside the predicted ones.

    From CKPT, train the base schedule, '12' (domain 1 +dw for N steps, then -dw) and '21' on the same data
    (the paper's sections 4.2-4.3), and print the observed excess losses beside the predicted ones.

    Says its cost before it starts (3 x 2N x repeats steps, timed from one measured step). Finished repeats
    are cached in --out: Ctrl-C, then the same command, resumes.

    Example: commute validate sample_checkpoints/checkpoint-1000 --quick --horizon 10 --out runs/h10
    """
    from commute_cli.commands import validate
    from commute_cli.render import tables
    from commute_cli.render.progress import StepProgress
    from commute_cli.render.validate_table import validate_table

    if threads is not None:
        if threads < 1:
            raise CommuteError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    n = alias(horizon, steps_old, "--horizon", "--steps")
    quick_or = validate.QUICK if quick else {}
    opts = validate.ValidateOptions(
        checkpoint=checkpoint,
        domains=domains,
        eval_domains=eval_domains,
        weights=weights,
        dw=dw,
        steps=100 if n is None else n,
        repeats=repeats if repeats is not None else quick_or.get("repeats", 2),
        pair=pair,
        eval_samples=eval_samples if eval_samples is not None else quick_or.get("eval_samples", 256),
        from_dir=from_dir,
        metric=metric.value,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        samples=samples if samples is not None else quick_or.get("samples"),
        blocks=quick_or.get("blocks", 8),
        out=out,
        use_cache=not no_cache,
        device=device.value,
        quick=quick,
    )
    note = (lambda _text: None) if quiet else (lambda text: typer.echo(text, err=True))
    try:
        with StepProgress("validate: branches", enabled=not quiet and fmt is Format.table) as progress:
            result = validate.run_validate(opts, note=note, on_step=progress.step, on_start=progress.start)
    except KeyboardInterrupt as ex:
        interrupted(
            ex, f"interrupted: finished repeats are cached in {out}/cache; run the same command again"
        )
    if fmt is Format.table:
        tables.print_renderable(validate_table(result.table, result.run))
        note(f"results in {result.out}/ (validate.csv, validate.json)")
    else:
        tables.emit_dataframe(result.table, fmt.value)
