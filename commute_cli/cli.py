"""Command-line interface: parse arguments, call one function, render. No math and no I/O logic here."""

from __future__ import annotations

import sys
from enum import Enum
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


class Format(str, Enum):
    """``--format``: a table on the terminal, or data only (csv/json) on stdout."""

    table = "table"
    csv = "csv"
    json = "json"


class Metric(str, Enum):
    euclid = "euclid"
    adam = "adam"


class Hvp(str, Enum):
    rr = "rr"
    fr = "fr"


class Plan(str, Enum):
    auto = "auto"
    pair = "pair"
    target = "target"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Offload(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


class Optimizer(str, Enum):
    adamw = "adamw"
    sgd = "sgd"


class LrSchedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


class PlotKind(str, Enum):
    criterion = "criterion"
    pairs = "pairs"
    decomposition = "decomposition"
    orders = "orders"


def _alias(new: int | None, old: int | None, new_flag: str, old_flag: str) -> int | None:
    """The value of a renamed option: the new flag, or its hidden old name (not both)."""
    if old is None:
        return new
    if new is not None:
        raise CommuteError(
            f"{old_flag} is the old name of {new_flag}: give one of them", hint=f"use {new_flag}"
        )
    return old


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
    fmt: Format = typer.Option(Format.table, "--format", help="table, or csv/json (data only, to stdout)."),
    out: Path | None = typer.Option(None, "--out", help="Write the output to this file instead of stdout."),
) -> None:
    """Check the criterion on quadratic domains with exact flows (the paper's Table 1, constant 1/2).

    Prints observed / predicted excess loss of a full swap (L1 then L2, vs. the mixture); -> 1 as dt -> 0.

    Example: commute toy --dim 20 --samples 10
    """
    from commute_cli.commands import toy
    from commute_cli.render import tables

    if dim < 2:
        raise CommuteError(f"--dim must be at least 2, got {dim}")
    if samples < 1:
        raise CommuteError(f"--samples must be at least 1, got {samples}")
    df = toy.run_table1(dim=dim, samples=samples, seed=seed)
    tables.emit(df, fmt.value, tables.table1, out)


@app.command("analyze")
def analyze_command(
    ckpt_dir: Path = typer.Argument(
        ...,
        metavar="CKPT_DIR",
        help="Checkpoint folder: checkpoint-N/ subfolders, step-N folders, or one model.",
    ),
    domains: list[str] = typer.Option(
        [],
        "--domains",
        help="name=source per domain (file, folder, or hub name; c4/mc4 aliases). "
        "Several may follow one flag. Default: the commute.json manifest next to the checkpoints. "
        "Read: .jsonl/.ndjson/.json, .txt, .csv (each also as .gz, .bz2, .xz, .zst, .lz4), .parquet, "
        ".arrow, save_to_disk folders, folders of shards (nested too), hub datasets. Only the documents "
        "the sample needs are read, spread over up to 16 shards.",
    ),
    text_field: list[str] = typer.Option(
        [],
        "--text-field",
        help="name=column: the column holding a domain's text when it is not 'text', e.g. "
        "--text-field code=content. Several may follow one flag.",
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
        None, "--seq-len", help="Tokens per sequence (default: manifest, else <= 256)."
    ),
    samples: int | None = typer.Option(
        None,
        "--samples",
        help="Sequences per domain per checkpoint (the same sequences everywhere). Default 96.",
    ),
    budget: float | None = typer.Option(
        None,
        "--budget",
        metavar="SECONDS",
        help="Compute time to spend instead of --samples: the most sequences whose estimated time fits "
        "(one timed gradient, as --dry-run). Fixed before any estimate, so the test keeps its error rate.",
    ),
    blocks: int = typer.Option(
        8, "--blocks", help="Independent sample blocks (groups of sequences) for the error bars."
    ),
    micro_batch: int | None = typer.Option(
        None, "--micro-batch", help="Sequences per forward pass (memory, not statistics). Default 8."
    ),
    batch_size_old: int | None = typer.Option(None, "--batch-size", hidden=True),
    hvp_batch_size: int | None = typer.Option(
        None,
        "--hvp-batch-size",
        help="Micro-batch of the Hessian-vector products (default: half of --micro-batch; an HVP needs "
        "~3x the memory of a gradient).",
    ),
    metric: Metric = typer.Option(
        Metric.euclid,
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
    hvp: Hvp = typer.Option(
        Hvp.rr, "--hvp", help="rr (reverse-on-reverse, the paper's) or fr (forward-over-reverse)."
    ),
    plan: Plan = typer.Option(Plan.auto, "--plan", help="HVP plan: auto (cheaper), pair, or target."),
    device: Device = typer.Option(
        Device.auto,
        "--device",
        help="auto, cpu or cuda. Weights are upcast to float32 (bf16/fp16 too); eager attention.",
    ),
    offload: Offload = typer.Option(
        Offload.auto,
        "--offload",
        help="auto, on or off: keep the stack of free gradients (--blocks x domains parameter-sized "
        "vectors) in host memory, for large models on one GPU. auto: only when it would take over a quarter "
        "of the free GPU memory. Same results.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample draw."),
    confidence: float = typer.Option(0.95, "--confidence", help="Confidence level of the significance test."),
    min_effect: float = typer.Option(
        0.01,
        "--min-effect",
        help="Smallest effect worth reporting, as a fraction of the loss decrease training makes over the "
        "same window; smaller effects are 'negligible' even when significant.",
    ),
    name: str | None = typer.Option(
        None,
        "--name",
        help="Write the results to OUT/NAME/ (default: OUT/, or OUT/run-ID/ if OUT holds another run).",
    ),
    steps: str | None = typer.Option(None, "--steps", help="Only these steps, e.g. 2000,8000."),
    every: int | None = typer.Option(None, "--every", help="Only steps that are multiples of N."),
    out: Path = typer.Option(
        Path("commute_out"), "--out", help="Folder for results.csv, losses.csv, run.json, cache."
    ),
    fmt: Format = typer.Option(Format.table, "--format", help="table, or csv/json (results to stdout)."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Also draw the criterion figure (the one of `commute plot`) to this PNG."
    ),
    no_cache: bool = typer.Option(False, "--no-cache", help="Recompute every checkpoint even if cached."),
    decompose: str | None = typer.Option(
        None,
        "--decompose",
        help="Also split every bracket by parameter group into decomposition.csv: kind (embeddings, "
        "attention, mlp, norms, head), layer, module (layer x kind), or a map 'NAME=REGEX;NAME=REGEX' "
        "on parameter names. No extra gradient or HVP pass.",
    ),
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
    interrupted run resumes.

    Example: commute analyze run/ --domains en=en.jsonl ru=ru.jsonl
    """
    from commute_cli.commands import analyze as analysis
    from commute_cli.engine.distributed import is_main_process
    from commute_cli.render import tables
    from commute_cli.render.progress import AnalysisProgress

    batch_size = _alias(micro_batch, batch_size_old, "--micro-batch", "--batch-size")
    fmt_value = fmt.value
    main_rank = is_main_process()  # under torchrun only rank 0 draws, prints and writes
    opts = analysis.AnalyzeOptions(
        ckpt_dir=ckpt_dir,
        domains=domains,
        text_fields=text_field,
        tokenizer=tokenizer,
        seq_len=seq_len,
        samples=96 if samples is None else samples,
        blocks=blocks,
        batch_size=8 if batch_size is None else batch_size,
        hvp_batch_size=hvp_batch_size,
        weights=weights,
        schedule=schedule,
        targets=target,
        metric=metric.value,
        dw=dw,
        horizon=horizon,
        lr=lr,
        hvp=hvp.value,
        plan=plan.value,
        device=device.value,
        offload=offload.value,
        seed=seed,
        confidence=confidence,
        min_effect=min_effect,
        out=out,
        name=name,
        steps=analysis.parse_steps(steps),
        every=every,
        use_cache=not no_cache,
        dist_timeout=dist_timeout,
        decompose=decompose,
    )
    if budget is not None:
        if samples is not None:
            raise CommuteError("give either --samples or --budget, not both")
        from commute_cli.commands.preview import samples_for_budget

        opts.samples = samples_for_budget(opts, budget)
        typer.echo(f"--budget {budget:g} s: --samples {opts.samples}", err=True)
    if dry_run:
        from commute_cli.commands.preview import preview

        p = preview(opts)
        typer.echo(
            f"dry run: {p['checkpoints']} checkpoint(s), domains {', '.join(p['domains'])}, targets "
            f"{', '.join(p['targets'])}, {p['plan']} plan; {p['samples_used']} sequences of {p['seq_len']} "
            f"tokens per domain ({p['seqs_per_part']} per part x 3 parts x {blocks} blocks)\n"
            f"  gradient passes: {p['gradient_sequences']} sequences\n"
            f"  HVP passes: {p['hvp_sequences']} sequences, {p['vectors_per_hvp']} vector(s) each\n"
            f"  total: {p['gradient_equivalents']:.0f} gradient-sequence equivalents; one gradient sequence "
            f"took {p['seconds_per_gradient_sequence'] * 1e3:.1f} ms on {p['device']}\n"
            f"  estimated compute time: {p['estimated_seconds']:.0f} s without the cache (plus loading and "
            "sampling; checkpoints already in --out's cache take seconds; the FLOP-count model is an upper "
            "bound where HVPs run faster than 1+2v gradients)"
        )
        return
    try:
        with AnalysisProgress(enabled=not quiet and fmt_value == "table" and main_rank) as progress:
            result = analysis.run_analysis(
                opts, on_checkpoint_start=progress.checkpoint, on_block=progress.block
            )
    except KeyboardInterrupt:
        again = "the same command without --no-cache" if no_cache else "the same command again"
        typer.echo(
            f"interrupted: nothing was written but the statistics of finished checkpoints ({out}/cache); "
            f"run {again} to resume where it stopped",
            err=True,
        )
        sys.exit(130)
    if not main_rank:
        return
    for text in result.notes:
        typer.echo(text, err=True)
    if plot is not None:
        from commute_cli.io import atomic
        from commute_cli.render import figures

        fig = figures.criterion_figure(result.results, result.losses, run=result.run)
        atomic.write_bytes(plot, figures.png_bytes(fig))
    if metric is Metric.adam:
        from commute_cli.engine.metric import ADAM_WARNING

        typer.echo(ADAM_WARNING, err=True)
    if fmt_value == "table":
        tables.print_renderable(
            tables.analysis_tables(result.results, result.losses, run=result.run, out=result.out)
        )
        files = "results.csv, losses.csv, baselines.csv" + (", decomposition.csv" if decompose else "")
        where = f"results in {result.out}/ ({files}, run.json)"
        typer.echo(where + (f"; plot in {plot}" if plot else ""), err=True)
    else:
        tables.emit_dataframe(result.results, fmt_value)


@app.command("train")
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
        None, "--batch-size", help="Sequences per step, split by the weights (default: --init's, else 16)."
    ),
    seq_len: int | None = typer.Option(
        None, "--seq-len", help="Tokens per sequence (default: --init's or the manifest's, else 128)."
    ),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate."),
    optimizer: Optimizer = typer.Option(Optimizer.adamw, "--optimizer", help="adamw or sgd."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Decoupled weight decay (AdamW)."),
    lr_schedule: LrSchedule = typer.Option(LrSchedule.constant, "--lr-schedule", help="constant or cosine."),
    warmup: int = typer.Option(0, "--warmup", help="Linear warmup steps."),
    init: str | None = typer.Option(
        None, "--init", help="Model config JSON, or a checkpoint to continue (weights, optimizer, step)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialization and the data streams."),
    threads: int | None = typer.Option(None, "--threads", help="torch.set_num_threads (default: torch's)."),
    device: Device = typer.Option(Device.auto, "--device", help="auto (CUDA when available), cpu or cuda."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace checkpoints of another run in OUT_DIR."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or messages."),
) -> None:
    """Train a small causal LM (a tiny GPT-2 by default) on a weighted mixture of domains.

    Saves checkpoints in the Hugging Face Trainer layout and, when done, a commute.json manifest, so that
    'commute analyze OUT_DIR' needs no flags (data outside OUT_DIR is recorded by absolute path). Ctrl-C
    keeps the finished checkpoints and prints the command that resumes.

    Example: commute train run/ --domains en=en.jsonl ru=ru.jsonl --tokenizer tok/ --steps 100 --save-every 50
    """
    from commute_cli.commands import train
    from commute_cli.io.data import parse_domain_specs

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
        optimizer=optimizer.value,
        weight_decay=weight_decay,
        lr_schedule=lr_schedule.value,
        warmup=warmup,
        init=init,
        seed=seed,
        threads=threads,
        device=device.value,
        overwrite=overwrite,
        quiet=quiet,
        argv=list(_ARGV),
    )
    try:
        out = train.train(config)
    except KeyboardInterrupt as ex:
        _interrupted(ex, "interrupted: training stopped")
    if not quiet:
        typer.echo(f"checkpoints and commute.json in {out}/", err=True)


@app.command("validate")
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
    """Check the criterion against real training (the paper's sections 4.2-4.3): from CKPT, train the base
    schedule, '12' (domain 1 +dw for N steps, then -dw) and '21' on the same data, and print the observed
    excess losses beside the predicted ones.

    Says its cost before it starts (3 x 2N x repeats steps, timed from one measured step). Finished repeats
    are cached in --out: Ctrl-C, then the same command, resumes.

    Example: commute validate run/checkpoint-100 --quick --horizon 20
    """
    from commute_cli.commands import validate
    from commute_cli.render import tables
    from commute_cli.render.progress import ValidateProgress
    from commute_cli.render.validate_table import validate_table

    if threads is not None:
        if threads < 1:
            raise CommuteError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    n = _alias(horizon, steps_old, "--horizon", "--steps")
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
        with ValidateProgress(enabled=not quiet and fmt is Format.table) as progress:
            result = validate.run_validate(opts, note=note, on_step=progress.step, on_start=progress.start)
    except KeyboardInterrupt as ex:
        _interrupted(
            ex, f"interrupted: finished repeats are cached in {out}/cache; run the same command again"
        )
    if fmt is Format.table:
        tables.print_renderable(validate_table(result.table, result.run))
        note(f"results in {result.out}/ (validate.csv, validate.json)")
    else:
        tables.emit_dataframe(result.table, fmt.value)


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
    single_pair: bool = typer.Option(
        False,
        "--single-pair",
        help="One pair per checkpoint (K >= 4 may otherwise move disjoint pairs at once).",
    ),
    fmt: Format = typer.Option(Format.table, "--format", help="table, or csv/json (data to stdout)."),
) -> None:
    """Turn suboptimal verdicts into one schedule with the same data per domain, and predict its effect.

    Around each checkpoint where the target is 'suboptimal', one domain goes up before it and down after.

    Prints each shift with its predicted effect on every target; writes schedule.json/.csv (--schedule).

    Example: commute recommend --target ru --from commute_out/
    """
    import json

    from commute_cli.commands import recommend
    from commute_cli.io import store
    from commute_cli.render import tables

    result = store.load_analysis(from_dir)
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
        about=result.label(),
        stats=recommend.load_block_stats(result),
        confidence=float(result.run.get("options", {}).get("confidence", 0.95)),
        single_pair=single_pair,
    )
    typer.echo(f"recommendation for {rec.about}", err=True)
    folder = out if out is not None else from_dir
    files = recommend.write_recommendation(rec, folder)
    stale = recommend.earlier_recommendation(folder) if not files else None
    if stale:
        typer.echo(
            f"note: the files in {folder}/ are from an earlier recommend ({stale}); left unchanged", err=True
        )
    if fmt is Format.table:
        tables.print_renderable(tables.recommend_report(rec))
        if files:
            where = ", ".join(str(f) for f in files)
            typer.echo(f"wrote {where}; rerun with: commute train RUN --schedule {files[0]}", err=True)
    elif fmt is Format.csv:
        tables.emit_dataframe(rec.table(), fmt.value)
    else:
        typer.echo(json.dumps(rec.to_dict(), indent=2, ensure_ascii=False, default=str))


@app.command("plot")
def plot_command(
    output: Path = typer.Option(..., "-o", "--output", help="PNG file to write."),
    from_dir: Path = typer.Option(Path("commute_out"), "--from", help="Folder of `commute analyze` results."),
    validate_csv: Path | None = typer.Option(
        None, "--validate", help="validate.csv for the loss plane (default: FROM/validate.csv if present)."
    ),
    kind: PlotKind = typer.Option(
        PlotKind.criterion,
        "--kind",
        help="criterion (over steps, with the loss panel), pairs (domains x domains heatmap per checkpoint), "
        "decomposition (parameter groups x checkpoints; needs analyze --decompose), orders (the bracket "
        "beside the first-order alignment).",
    ),
    target: str | None = typer.Option(
        None, "--target", help="Target of the decomposition heatmap (default: the first in the file)."
    ),
) -> None:
    """Draw the criterion figure: per target, the table's numbers with their 95% intervals.

    Each checkpoint's intervention window (± horizon) is shaded by its verdict; a last panel shows the
    per-domain losses.

    With `commute validate` results (validate.csv), also the loss plane of the paper's Figures 3-4.
    `--kind pairs|decomposition|orders` draws the heatmaps and the first-order comparison instead.

    Example: commute plot --from commute_out/ -o criterion.png
    """
    import pandas as pd

    from commute_cli.io import atomic, store
    from commute_cli.render import figures

    if kind is not PlotKind.criterion:
        _plot_heatmap(kind, output, from_dir, target)
        return
    result = store.load_analysis(from_dir)
    losses = store.load_losses(from_dir)
    vfile = validate_csv if validate_csv is not None else from_dir / "validate.csv"
    validate = None
    if vfile.is_file():
        try:
            validate = figures.check_validate_table(pd.read_csv(vfile), str(vfile))
        except CommuteError as err:
            if validate_csv is not None:
                raise
            typer.echo(f"note: {err.one_line()[7:]}; plotting without the loss plane", err=True)
    elif validate_csv is not None:
        raise CommuteError(f"{vfile} does not exist", hint="run `commute validate` or leave out --validate")
    fig = figures.criterion_figure(result.results, losses, validate, run=result.run)
    path = atomic.write_bytes(output, figures.png_bytes(fig))
    typer.echo(f"wrote {path} ({result.label()})", err=True)


def _plot_heatmap(kind: PlotKind, output: Path, from_dir: Path, target: str | None) -> None:
    """``commute plot --kind pairs|decomposition|orders``: render/heatmaps.py, written atomically."""
    import pandas as pd

    from commute_cli.io import atomic, store
    from commute_cli.render import heatmaps

    result = store.load_analysis(from_dir)
    needs = {PlotKind.decomposition: "decomposition.csv", PlotKind.orders: "baselines.csv"}.get(kind)
    extra = None
    if needs is not None:
        file = from_dir / needs
        if not file.is_file():
            hint = (
                "run `commute analyze ... --decompose kind`"
                if kind is PlotKind.decomposition
                else ("run `commute analyze` again (it writes baselines.csv)")
            )
            raise CommuteError(f"{file} does not exist", hint=hint)
        extra = pd.read_csv(file)
    with atomic.replacing(output, suffix=".png") as tmp:
        if kind is PlotKind.pairs:
            heatmaps.plot_pair_heatmap(result.results, tmp)
        elif kind is PlotKind.orders:
            heatmaps.plot_orders(result.results, extra, tmp)
        else:
            assert extra is not None
            name = target or str(extra["target"].iloc[0])
            if name not in set(extra["target"].astype(str)):
                raise CommuteError(
                    f"no decomposition rows for target {name!r}",
                    hint="targets in the file: " + ", ".join(dict.fromkeys(extra["target"].astype(str))),
                )
            heatmaps.plot_decomposition_heatmap(extra, tmp, name)
    typer.echo(f"wrote {output} ({result.label()})", err=True)


@app.command("help")
def help_command(
    topic: str = typer.Argument("columns", help="The topic: columns (every output file's columns)."),
) -> None:
    """Explain the output: `commute help columns` gives the meaning and unit of every CSV column.

    Example: commute help columns
    """
    from commute_cli.render import columns, tables

    if topic != "columns":
        raise CommuteError(f"unknown help topic {topic!r}", hint="use: commute help columns")
    tables.print_renderable(columns.columns_help())


#: options that take several values after one flag (``--domains en=a ru=b``), which click lacks
_MULTI_VALUE_OPTIONS = ("--domains", "--weights", "--eval-domains", "--text-field")


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


_ARGV: list[str] = []
"""The arguments of this invocation (after ``commute``), for resume hints."""


def _interrupted(ex: KeyboardInterrupt, fallback: str) -> None:
    """Ctrl-C inside a command: one line saying what was kept and how to resume, exit 130."""
    typer.echo(str(ex) if str(ex) else fallback, err=True)
    sys.exit(130)


def _is_click_error(exc: BaseException) -> bool:
    """A click usage/parameter error from click itself or from the copy that typer bundles (typer._click):
    matched by class name, so it holds under every typer/click version."""
    return any(k.__name__ == "ClickException" for k in type(exc).__mro__)


def _show_click_error(exc: Exception) -> int:
    """Print a click usage error as one line with a hint (like every other commute error); its exit code.

    Plain ``commute`` (click's NoArgsIsHelpError) names the commands instead of printing the whole help.
    """
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) or "commute"
    if type(exc).__name__ == "NoArgsIsHelpError":
        names = ", ".join(sorted(c.name or "" for c in app.registered_commands))
        typer.echo(f"error: no command given (hint: one of {names}; see '{path} --help')", err=True)
        return 2
    try:
        message = exc.format_message()  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - every click error has it
        message = str(exc)
    message = " ".join(str(message).replace("Value error, ", "").split())
    typer.echo(f"error: {message} (hint: see '{path} --help')", err=True)
    code = int(getattr(exc, "exit_code", 2))
    return 2 if code == 1 else code


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``commute`` console script and ``python -m commute_cli``.

    Exit codes: 0 done; 1 a failure while running (``CommuteError(exit_code=1)``); 2 bad input or usage
    (one line, or typer's usage panel); 130 interrupted (Ctrl-C). Tracebacks only under ``--debug``.
    """
    raw = list(sys.argv[1:] if argv is None else argv)
    _ARGV[:] = raw
    args = expand_multi_value(raw)
    try:
        code = app(args=args, standalone_mode=False, prog_name="commute")
    except CommuteError as err:
        if _DEBUG:
            raise
        if not getattr(err, "silent", False):  # data parallel: another rank already printed it
            typer.echo(err.one_line(), err=True)
        sys.exit(err.exit_code)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if type(exc).__name__ == "Abort":  # click's Abort (EOF on a prompt)
            typer.echo("aborted", err=True)
            sys.exit(130)
        if _is_click_error(exc):
            sys.exit(_show_click_error(exc))
        raise
    if isinstance(code, int) and code != 0:  # typer turns Ctrl-C outside a command into Exit(130) -> 130
        if code == 130:
            typer.echo("interrupted", err=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
