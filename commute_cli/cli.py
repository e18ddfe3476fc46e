"""Command-line interface: parse arguments, call one function, render. No math and no I/O logic here."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from commute_cli import __version__
from commute_cli.errors import CommuteError

app = typer.Typer(
    name="commute",
    help=(
        "Checkpoint analyzer for multi-domain training. At each saved checkpoint it evaluates the "
        "Lie-bracket criterion of 'Commute your domains' (gradients and Hessian-vector products of the "
        "per-domain losses) and tells where the domain-weight schedule was locally suboptimal, which "
        "way to shift weights, and how much loss that is worth, with error bars."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_DEBUG = False


def _version(value: bool) -> None:
    if value:
        typer.echo(f"commute {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    global _DEBUG
    _DEBUG = debug


@app.command("toy")
def toy_command(
    dim: int = typer.Option(100, "--dim", help="Dimension of the quadratic domains (paper: 100)."),
    samples: int = typer.Option(100, "--samples", help="Random instances (A_k, b_k, theta_0) per cell."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    fmt: str = typer.Option("table", "--format", help="table, csv or json (csv/json: data only, to stdout)."),
    out: Path | None = typer.Option(None, "--out", help="Write the output to this file instead of stdout."),
) -> None:
    """Check the criterion on quadratic domains with exact flows (the paper's Table 1, constant 1/2).

    Prints observed / predicted excess loss of a full swap (L1 then L2, vs. the mixture); -> 1 as dt -> 0.
    """
    from commute_cli import report, toy

    if dim < 2:
        raise CommuteError(f"--dim must be at least 2, got {dim}")
    if samples < 1:
        raise CommuteError(f"--samples must be at least 1, got {samples}")
    if fmt not in {f.value for f in report.OutputFormat}:
        raise CommuteError(f"--format must be table, csv or json, got {fmt!r}")
    df = toy.run_table1(dim=dim, samples=samples, seed=seed)
    report.emit(df, fmt, report.table1, out)


@app.command("analyze")
def analyze_command(
    ckpt_dir: Path = typer.Argument(
        ..., help="Checkpoint folder: checkpoint-N/ subfolders, step-N folders, or one model."
    ),
    domains: list[str] = typer.Option(
        [],
        "--domains",
        help="name=source per domain (file, folder, or hub name; c4/mc4 aliases). "
        "Several may follow one flag. Default: the commute.json manifest next to the checkpoints.",
    ),
    weights: list[str] = typer.Option(
        [], "--weights", help="Constant schedule, e.g. --weights en=0.8 ru=0.2."
    ),
    schedule: Path | None = typer.Option(None, "--schedule", help="Piecewise schedule file (CSV or JSON)."),
    target: list[str] = typer.Option(
        [],
        "--target",
        help="Target loss: a domain, 'mix', or weights en=0.3,ru=0.7. Repeatable. "
        "Default: every domain and mix.",
    ),
    tokenizer: str | None = typer.Option(
        None, "--tokenizer", help="Tokenizer folder (default: manifest or checkpoint)."
    ),
    seq_len: int | None = typer.Option(
        None, "--seq-len", help="Tokens per block (default: manifest, else <= 256)."
    ),
    samples: int = typer.Option(
        96, "--samples", help="Blocks per domain per checkpoint (same blocks everywhere)."
    ),
    blocks: int = typer.Option(8, "--blocks", help="Independent sample blocks for the error bars."),
    batch_size: int = typer.Option(8, "--batch-size", help="Micro-batch (sequences per forward pass)."),
    hvp_batch_size: int | None = typer.Option(
        None,
        "--hvp-batch-size",
        help="Micro-batch of the Hessian-vector products (default: half of --batch-size; an HVP needs "
        "~3x the memory of a gradient).",
    ),
    metric: str = typer.Option(
        "euclid",
        "--metric",
        help="euclid (D = I, the paper's) or adam (experimental: Adam's second moments).",
    ),
    dw: float | None = typer.Option(
        None, "--dw", help="Weight shift of the intervention (default: half the smaller weight)."
    ),
    horizon: int | None = typer.Option(
        None,
        "--horizon",
        help="Steps each way (default: half the checkpoint spacing, shortened to stay in regime).",
    ),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default: from trainer_state.json)."),
    hvp: str = typer.Option(
        "rr", "--hvp", help="rr (reverse-on-reverse, the paper's) or fr (forward-over-reverse)."
    ),
    plan: str = typer.Option("auto", "--plan", help="HVP plan: auto (cheaper), pair, or target."),
    device: str = typer.Option(
        "auto",
        "--device",
        help="auto, cpu or cuda. Weights are upcast to float32 (bf16/fp16 too); eager attention.",
    ),
    offload: str = typer.Option(
        "auto",
        "--offload",
        help="auto, on or off: keep the stack of free gradients (--blocks x domains parameter-sized "
        "vectors) in host memory, for large models on one GPU. auto: only when it would take over a quarter "
        "of the free GPU memory. Same results.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample draw."),
    confidence: float = typer.Option(0.95, "--confidence", help="Confidence level of the significance test."),
    steps: str | None = typer.Option(None, "--steps", help="Only these steps, e.g. 2000,8000."),
    every: int | None = typer.Option(None, "--every", help="Only steps that are multiples of N."),
    out: Path = typer.Option(
        Path("commute_out"), "--out", help="Folder for results.csv, losses.csv, run.json, cache."
    ),
    fmt: str = typer.Option("table", "--format", help="table, csv or json (csv/json: results to stdout)."),
    plot: Path | None = typer.Option(None, "--plot", help="Also draw the criterion over steps to this PNG."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute every checkpoint even if cached."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Check the inputs, print the number of gradient and HVP passes and an estimated time, and stop.",
    ),
    dist_timeout: float = typer.Option(
        1800.0,
        "--dist-timeout",
        metavar="SECONDS",
        help="Under torchrun: how long a rank waits for the others in one collective before giving up "
        "(default 30 minutes). Ignored for a single process.",
    ),
) -> None:
    """Evaluate the criterion at every checkpoint, with error bars.

    Flags where the order of domains was locally suboptimal and which way to shift weights.

    Results go to --out (results.csv, losses.csv, run.json); finished checkpoints are cached there, so an
    interrupted run resumes. Example: commute analyze ckpts/ --domains en=data/en.jsonl ru=data/ru/
    """
    from commute_cli import analysis, report
    from commute_cli.distributed import is_main_process
    from commute_cli.progress import AnalysisProgress

    if fmt not in {f.value for f in report.OutputFormat}:
        raise CommuteError(f"--format must be table, csv or json, got {fmt!r}")
    main_rank = is_main_process()  # under torchrun only rank 0 draws, prints and writes
    opts = analysis.AnalyzeOptions(
        ckpt_dir=ckpt_dir,
        domains=domains,
        tokenizer=tokenizer,
        seq_len=seq_len,
        samples=samples,
        blocks=blocks,
        batch_size=batch_size,
        hvp_batch_size=hvp_batch_size,
        weights=weights,
        schedule=schedule,
        targets=target,
        metric=metric,
        dw=dw,
        horizon=horizon,
        lr=lr,
        hvp=hvp,
        plan=plan,
        device=device,
        offload=offload,
        seed=seed,
        confidence=confidence,
        out=out,
        steps=analysis.parse_steps(steps),
        every=every,
        use_cache=not no_cache,
        dist_timeout=dist_timeout,
    )
    if dry_run:
        p = analysis.preview(opts)
        typer.echo(
            f"dry run: {p['checkpoints']} checkpoint(s), domains {', '.join(p['domains'])}, targets "
            f"{', '.join(p['targets'])}, {p['plan']} plan; {p['samples_used']} sequences of {p['seq_len']} "
            f"tokens per domain ({p['seqs_per_part']} per part x 3 parts x {blocks} blocks)\n"
            f"  gradient passes: {p['gradient_sequences']} sequences\n"
            f"  HVP passes: {p['hvp_sequences']} sequences, {p['vectors_per_hvp']} vector(s) each\n"
            f"  total: {p['gradient_equivalents']:.0f} gradient-sequence equivalents; one gradient sequence "
            f"took {p['seconds_per_gradient_sequence'] * 1e3:.1f} ms on {p['device']}\n"
            f"  estimated compute time: {p['estimated_seconds']:.0f} s (plus loading and tokenizing)"
        )
        return
    try:
        with AnalysisProgress(enabled=not quiet and fmt == "table" and main_rank) as progress:
            result = analysis.run_analysis(
                opts, on_checkpoint_start=progress.checkpoint, on_block=progress.block
            )
    except KeyboardInterrupt:
        typer.echo(
            f"interrupted: finished checkpoints are cached in {out}/cache; "
            "run the same command again to resume where it stopped",
            err=True,
        )
        sys.exit(130)
    if not main_rank:
        return
    if plot is not None:
        report.plot_analysis(result.results, result.losses, plot)
    if metric == "adam":
        typer.echo(
            "warning: --metric adam is experimental: on the shipped AdamW run its predictions were ~100x too "
            "large and right in sign 10/20 times, against 16/20 for euclid (docs/DECISIONS.md)",
            err=True,
        )
    if fmt == "table":
        report.print_renderable(report.analysis_tables(result.results, result.losses))
        where = f"results in {result.out}/ (results.csv, losses.csv, run.json)"
        typer.echo(where + (f"; plot in {plot}" if plot else ""), err=True)
    else:
        report.emit_dataframe(result.results, fmt)


@app.command("train")
def train_command(
    out_dir: Path = typer.Argument(
        ..., help="Folder for checkpoint-N/ subfolders and the commute.json manifest."
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
        None, "--tokenizer", help="Tokenizer folder (AutoTokenizer, offline)."
    ),
    weights: list[str] = typer.Option(
        [], "--weights", help="Constant weights, e.g. --weights en=0.8 ru=0.2."
    ),
    schedule: Path | None = typer.Option(None, "--schedule", help="Piecewise schedule file (CSV or JSON)."),
    steps: int = typer.Option(1000, "--steps", help="Final global step (like the HF Trainer's max_steps)."),
    save_every: int = typer.Option(
        200, "--save-every", help="Save a checkpoint every N steps (and at the end)."
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per step, split by the weights."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per sequence."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate."),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw or sgd."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Decoupled weight decay (AdamW)."),
    lr_schedule: str = typer.Option("constant", "--lr-schedule", help="constant or cosine."),
    warmup: int = typer.Option(0, "--warmup", help="Linear warmup steps."),
    init: str | None = typer.Option(
        None, "--init", help="Model config JSON, or a checkpoint to continue (weights, optimizer, step)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialization and the data streams."),
    threads: int | None = typer.Option(None, "--threads", help="torch.set_num_threads (default: torch's)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace checkpoints of another run in OUT_DIR."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or messages."),
) -> None:
    """Train a small causal LM (a tiny GPT-2 by default) on a weighted mixture of domains.

    Saves checkpoints in the Hugging Face Trainer layout and a commute.json manifest, so that 'commute
    analyze OUT_DIR' needs no flags.

    Example: commute train run/ --domains en=en.jsonl ru=ru.jsonl --tokenizer tok/ --weights en=0.8 ru=0.2
    """
    from commute_cli import train
    from commute_cli.domains import parse_domain_specs

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
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        lr_schedule=lr_schedule,
        warmup=warmup,
        init=init,
        seed=seed,
        threads=threads,
        overwrite=overwrite,
        quiet=quiet,
    )
    out = train.train(config)
    if not quiet:
        typer.echo(f"checkpoints and commute.json in {out}/", err=True)


@app.command("validate")
def validate_command(
    checkpoint: Path = typer.Argument(..., help="One checkpoint folder (with optimizer.pt when saved)."),
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
    steps: int = typer.Option(100, "--steps", help="N: steps of each half (branches train 2N steps)."),
    repeats: int = typer.Option(2, "--repeats", help="Stream seeds (the SE of the observed excess loss)."),
    pair: str | None = typer.Option(
        None, "--pair", help="i,j: domain i up first in '12' (default with two domains: their order)."
    ),
    eval_samples: int = typer.Option(256, "--eval-samples", help="Held-out blocks per domain (at most)."),
    from_dir: Path | None = typer.Option(
        None, "--from", help="Read the prediction from this analyze output when it has matching rows."
    ),
    metric: str = typer.Option("euclid", "--metric", help="euclid or adam (experimental): the prediction's."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default: the run's schedule or log)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Rows per step (default: the run's)."),
    seed: int | None = typer.Option(None, "--seed", help="Stream seed of repeat 0 (default: the run's)."),
    samples: int | None = typer.Option(
        None, "--samples", help="Blocks per domain for the prediction (default: analyze's)."
    ),
    threads: int | None = typer.Option(None, "--threads", help="torch.set_num_threads (default: torch's)."),
    out: Path = typer.Option(
        Path("commute_out"), "--out", help="Folder for validate.csv, validate.json and the cache."
    ),
    fmt: str = typer.Option("table", "--format", help="table, csv or json (csv/json: rows to stdout)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Retrain the branches even if cached."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or notes."),
) -> None:
    """Check the criterion against real training (the paper's sections 4.2-4.3): from CKPT, train the base
    schedule, '12' (domain 1 +dw for N steps, then -dw) and '21' on the same data, and print the observed
    excess losses beside the predicted ones.

    Example: commute validate sample_checkpoints/checkpoint-1000 --dw 0.15 --steps 100 --repeats 2
    """
    from commute_cli import report, validate

    if fmt not in {f.value for f in report.OutputFormat}:
        raise CommuteError(f"--format must be table, csv or json, got {fmt!r}")
    if threads is not None:
        if threads < 1:
            raise CommuteError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    opts = validate.ValidateOptions(
        checkpoint=checkpoint,
        domains=domains,
        eval_domains=eval_domains,
        weights=weights,
        dw=dw,
        steps=steps,
        repeats=repeats,
        pair=pair,
        eval_samples=eval_samples,
        from_dir=from_dir,
        metric=metric,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        samples=samples,
        out=out,
        use_cache=not no_cache,
    )
    note = (lambda _text: None) if quiet else (lambda text: typer.echo(text, err=True))
    with validate.ValidateProgress(enabled=not quiet and fmt == "table") as progress:
        result = validate.run_validate(opts, note=note, on_step=progress.step, on_start=progress.start)
    if fmt == "table":
        report.print_renderable(validate.validate_table(result))
        note(f"results in {result.out}/ (validate.csv, validate.json)")
    else:
        report.emit_dataframe(result.table, fmt)


@app.command("recommend")
def recommend_command(
    target: str = typer.Option(..., "--target", help="The loss to improve: a target of the analysis."),
    from_dir: Path = typer.Option(Path("commute_out"), "--from", help="Folder of `commute analyze` results."),
    max_shift: float = typer.Option(0.1, "--max-shift", help="Largest change of a domain's weight."),
    out: Path | None = typer.Option(
        None, "--out", help="Folder for schedule.json, schedule.csv, recommend.json (default: --from)."
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        help="Shifts in whole rows of a batch of B (default: the run's commute.json when found).",
    ),
    until: int | None = typer.Option(
        None, "--until", help="The run's last step (default: the last analysed checkpoint)."
    ),
    fmt: str = typer.Option("table", "--format", help="table, csv or json (csv/json: data to stdout)."),
) -> None:
    """Turn suboptimal verdicts into one schedule with the same data per domain, and predict its effect.

    Around each checkpoint where the target is 'suboptimal', one domain goes up before it and down after.

    Prints each shift with its predicted effect on every target; writes schedule.json/.csv (--schedule).

    Example: commute recommend --target ru --from commute_out/
    """
    import json

    from commute_cli import recommend, report

    if fmt not in {f.value for f in report.OutputFormat}:
        raise CommuteError(f"--format must be table, csv or json, got {fmt!r}")
    result = recommend.load_analysis(from_dir)
    batch = batch_size if batch_size is not None else recommend.run_batch_size(result)
    rec = recommend.recommend(
        result.results,
        result.schedule,
        result.checkpoint_steps,
        target,
        max_shift=max_shift,
        last_step=until,
        grid=recommend.shift_grid(batch),
        regime=result.regime,
    )
    folder = out if out is not None else from_dir
    files = recommend.write_recommendation(rec, folder)
    stale = recommend.earlier_recommendation(folder) if not files else None
    if stale:
        typer.echo(
            f"note: the files in {folder}/ are from an earlier recommend ({stale}); left unchanged", err=True
        )
    if fmt == "table":
        report.print_renderable(report.recommend_report(rec))
        if files:
            where = ", ".join(str(f) for f in files)
            typer.echo(f"wrote {where}; rerun with: commute train RUN --schedule {files[0]}", err=True)
    elif fmt == "csv":
        report.emit_dataframe(rec.table(), fmt)
    else:
        typer.echo(json.dumps(rec.to_dict(), indent=2, ensure_ascii=False, default=str))


@app.command("plot")
def plot_command(
    output: Path = typer.Option(..., "-o", "--output", help="PNG file to write."),
    from_dir: Path = typer.Option(Path("commute_out"), "--from", help="Folder of `commute analyze` results."),
    validate_csv: Path | None = typer.Option(
        None, "--validate", help="validate.csv for the loss plane (default: FROM/validate.csv if present)."
    ),
) -> None:
    """Draw the criterion over steps (± SE, verdicts shaded) per target and pair, and the losses.

    With `commute validate` results (validate.csv), also the loss plane of the paper's Figures 3-4.

    Example: commute plot --from commute_out/ -o criterion.png
    """
    import pandas as pd

    from commute_cli import recommend, report

    result = recommend.load_analysis(from_dir)
    losses = recommend.load_losses(from_dir)
    vfile = validate_csv if validate_csv is not None else from_dir / "validate.csv"
    validate = None
    if vfile.is_file():
        try:
            validate = report.check_validate_table(pd.read_csv(vfile), str(vfile))
        except CommuteError as err:
            if validate_csv is not None:
                raise
            typer.echo(f"note: {err.one_line()[7:]}; plotting without the loss plane", err=True)
    elif validate_csv is not None:
        raise CommuteError(f"{vfile} does not exist", hint="run `commute validate` or leave out --validate")
    path = report.plot_report(result.results, losses, output, validate)
    typer.echo(f"wrote {path}", err=True)


#: options that take several values after one flag (``--domains en=a ru=b``), which click lacks
_MULTI_VALUE_OPTIONS = ("--domains", "--weights", "--eval-domains")


def expand_multi_value(argv: list[str]) -> list[str]:
    """``--domains a=x b=y`` -> ``--domains a=x --domains b=y``: values are the following ``name=...``
    tokens (a value must contain '=', so a positional path after them is left alone)."""
    out: list[str] = []
    current: str | None = None
    for tok in argv:
        if tok in _MULTI_VALUE_OPTIONS:
            current = tok
            out.append(tok)
            continue
        if current is not None and not tok.startswith("-") and "=" in tok and out[-1] != current:
            out.append(current)
        elif tok.startswith("-") or "=" not in tok:
            current = None
        out.append(tok)
    return out


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``commute`` console script and ``python -m commute_cli``."""
    args = expand_multi_value(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=args, standalone_mode=False, prog_name="commute")
    except CommuteError as err:
        if _DEBUG:
            raise
        if not getattr(err, "silent", False):  # data parallel: another rank already printed it
            typer.echo(err.one_line(), err=True)
        sys.exit(err.exit_code)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
