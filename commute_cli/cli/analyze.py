"""``commute analyze``: its flags, the budget and dry-run answers, the run with its progress bars, render."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from commute_cli.cli.app import Device, Format, Hvp, Metric, Offload, Plan, alias, help_paragraphs
from commute_cli.errors import CommuteError

if TYPE_CHECKING:
    from commute_cli.commands.analyze import AnalysisResult


@help_paragraphs
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
        help="Sequences per domain per checkpoint (the same sequences everywhere), rounded down to a "
        "multiple of 3 x --blocks (a note says so). Default 96.",
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
        None,
        "--dw",
        help="Weight shift of the intervention (default: half the smaller weight; at most the smaller weight "
        "of each reported pair at every selected checkpoint).",
    ),
    horizon: int | None = typer.Option(
        None,
        "--horizon",
        help="Steps each way (default: half the spacing to the neighbouring checkpoint; a row outside the "
        "local regime keeps it and says so in its regime column; only recommend shortens a shift).",
    ),
    lr: float | None = typer.Option(
        None,
        "--lr",
        help="Learning rate (default: from the checkpoint: scheduler.pt, trainer_state.json, optimizer.pt or "
        "nanoGPT's ckpt.pt; run.json says which).",
    ),
    hvp: Hvp = typer.Option(
        Hvp.rr,
        "--hvp",
        help="rr (reverse-on-reverse, the paper's), fr (forward-over-reverse), or fd: finite differences of "
        "two gradients with fused (SDPA) attention, ~2 gradients per product; its agreement with exact "
        "products is measured on 2 vectors, printed and saved to run.json, and refused above 5%.",
    ),
    plan: Plan = typer.Option(Plan.auto, "--plan", help="HVP plan: auto (cheaper), pair, or target."),
    device: Device = typer.Option(
        Device.auto,
        "--device",
        help="auto, cpu or cuda. Weights are upcast to float32 (bf16/fp16 too); eager attention "
        "(SDPA with --hvp fd).",
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
        Path("commute_out"),
        "--out",
        help="Folder for results.csv, losses.csv, baselines.csv, run.json, cache.",
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
    quiet: bool = typer.Option(
        False,
        "--quiet",
        "-q",
        help="No progress bars (on a terminal) or progress lines (stderr to a file or pipe: one per "
        "checkpoint and at least one a minute, COMMUTE_PROGRESS_INTERVAL seconds when set).",
    ),
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

    Results go to --out (results.csv, losses.csv, baselines.csv, run.json); finished checkpoints are cached
    there, so an interrupted run resumes.

    Example: commute analyze sample_checkpoints/ --steps 1000,2000 --samples 48
    """
    from commute_cli.commands import analyze as analysis
    from commute_cli.engine.distributed import is_main_process
    from commute_cli.render import tables
    from commute_cli.render.analysis_progress import AnalysisProgress

    batch_size = alias(micro_batch, batch_size_old, "--micro-batch", "--batch-size")
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
        n_cached = len(p["cached"])
        cache_words = (
            f"{n_cached} of {p['checkpoints']} checkpoint(s) already in {out}/cache (read in seconds)"
            if n_cached
            else (
                f"none of the {p['checkpoints']} checkpoint(s) in {out}/cache"
                if not no_cache
                else "--no-cache: every checkpoint is computed"
            )
        )
        timing = (
            f"one gradient sequence took {p['seconds_per_gradient_sequence'] * 1e3:.1f} ms on {p['device']}"
            + (
                f", one HVP sequence {p['seconds_per_hvp_sequence'] * 1e3:.1f} ms"
                if p["seconds_per_hvp_sequence"]
                else ""
            )
            + f" (medians of 3), loading one {p['load_seconds']:.1f} s"
            if n_cached < p["checkpoints"]
            else "nothing to compute"
        )
        typer.echo(
            f"dry run: {p['checkpoints']} checkpoint(s), domains {', '.join(p['domains'])}, targets "
            f"{', '.join(p['targets'])}, {p['plan']} plan; {p['samples_used']} sequences of {p['seq_len']} "
            f"tokens per domain ({p['seqs_per_part']} per part x 3 parts x {blocks} blocks)\n"
            f"  gradient passes: {p['gradient_sequences']} sequences\n"
            f"  HVP passes: {p['hvp_sequences']} sequences, {p['vectors_per_hvp']} vector(s) each\n"
            f"  dot products: {p['dot_products']} of parameter-sized vectors in float64, "
            f"{100 * p['dot_product_share']:.1f}% of the passes' FLOPs\n"
            f"  total: {p['gradient_equivalents']:.0f} gradient-sequence equivalents; {timing}\n"
            f"  cache: {cache_words}\n"
            f"  estimated time: {p['estimated_seconds']:.0f} s (start-up {p['startup_seconds']:.0f} s, the "
            f"sample {p['sampling_seconds']:.0f} s, {p['checkpoints'] - n_cached} checkpoint(s) to load and "
            "compute; "
            "benchmarks/bench_estimates.py measures this estimate against real runs)"
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
    cached = [c for c in result.run.get("checkpoints", []) if c.get("cached")]
    if cached and not quiet:
        n = len(result.run.get("checkpoints", []))
        how = "nothing was computed" if len(cached) == n else f"{n - len(cached)} computed now"
        cache_dir = out / "cache"
        typer.echo(
            f"cache: {len(cached)} of {n} checkpoints read from {cache_dir} ({how}; --no-cache recomputes)",
            err=True,
        )
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
        _print_bottom_line(result)
    else:
        tables.emit_dataframe(result.results, fmt_value)


def _print_bottom_line(result: AnalysisResult) -> None:
    """The table's last lines (stdout): the one change the rows support, or that none is (issue 21)."""
    from commute_cli.core.bottom_line import bottom_line
    from commute_cli.render.bottom_line import bottom_line_lines
    from commute_cli.render.tables import table_confidence

    results, run = result.results, result.run
    line = bottom_line(
        results.to_dict("records"), run.get("optimizer"), str(run.get("options", {}).get("metric", "euclid"))
    )
    for text in bottom_line_lines(line, str(result.out), table_confidence(results)):
        typer.echo(text)
