"""The commands that need no model: ``commute toy`` (the criterion on quadratics), and the readers of
analyze's results, ``recommend`` and ``plot``, and ``help``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from commute_cli.cli.app import AdviceKind, Device, Format, PlotKind, help_paragraphs
from commute_cli.errors import CommuteError


@help_paragraphs
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


@help_paragraphs
def recommend_command(
    target: str = typer.Option(..., "--target", help="The loss to improve: a target of the analysis."),
    from_dir: Path = typer.Option(Path("commute_out"), "--from", help="Folder of `commute analyze` results."),
    kind: AdviceKind = typer.Option(
        AdviceKind.phases,
        "--kind",
        help="phases: a late-phase schedule continued from a saved checkpoint, measured on real "
        "continuations before it is proposed; local: small swaps around suboptimal checkpoints (predicted).",
    ),
    start: int | None = typer.Option(
        None,
        "--start",
        help="phases: the checkpoint step the change starts at (default: the earliest analysed); 0 retrains "
        "from scratch (advice for the next run of the recipe; each arm costs the whole run).",
    ),
    seeds: int = typer.Option(5, "--seeds", help="phases: stream seeds of the finalists (paired per seed)."),
    finalists: int = typer.Option(
        2, "--finalists", help="phases: candidates confirmed on every seed after the one-seed screen."
    ),
    candidates: int | None = typer.Option(
        None,
        "--candidates",
        help="phases: screen at most N candidates, the bracket's best first (default all).",
    ),
    no_verify: bool = typer.Option(
        False,
        "--no-verify",
        help="phases: no training; the bracket's best candidate as an unverified hypothesis (size unknown).",
    ),
    device: Device = typer.Option(Device.cpu, "--device", help="phases: where continuations train."),
    jobs: int | None = typer.Option(
        None,
        "--jobs",
        help="phases: continuations trained at once, one thread each (default: a CPU's cores, at most 4; "
        "on a GPU 1).",
    ),
    max_shift: float = typer.Option(0.1, "--max-shift", help="local: largest change of a domain's weight."),
    out: Path | None = typer.Option(
        None, "--out", help="Folder for schedule.json, schedule.csv, recommend.json (default: --from)."
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        help="Weights in whole rows of a batch of B (default: the run's commute.json when found).",
    ),
    until: int | None = typer.Option(
        None,
        "--until",
        help="The run's last step (default: the manifest's max_steps, else the last checkpoint).",
    ),
    single_pair: bool = typer.Option(
        False,
        "--single-pair",
        help="local: one pair per checkpoint (K >= 4 may otherwise move disjoint pairs at once).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    fmt: Format = typer.Option(Format.table, "--format", help="table, or csv/json (data to stdout)."),
    export: list[str] = typer.Option(
        [],
        "--export",
        help="Also write the proposed schedule for another trainer, beside schedule.json (repeatable): "
        "csv-steps, hf-interleave, megatron, nanotron. Needs the run's batch size.",
    ),
) -> None:
    """Turn the analysis into one schedule with the same data per domain, and say what it gains.

    --kind phases (the default): the criterion along the run ranks late-phase schedules (one domain raised
    at the end, starting at a saved checkpoint); each is continued to the run's last step on real training,
    paired with the run's schedule over stream seeds, and the best measured one is proposed with every other
    candidate, the practitioner's heuristics among them, beside it. This trains: it prints its cost first.

    --kind local: around each checkpoint where the target is 'suboptimal', one domain goes up before it and
    down after (predicted, not measured).

    Writes recommend.json (what was measured or predicted) and, when a schedule is proposed,
    schedule.json/.csv for `commute train --init CHECKPOINT --schedule`, with the command that applies it.

    Example: commute recommend --target ru --kind local

    Example: commute recommend --target mix --no-verify --out runs/advice

    Example: commute recommend --target mix --no-verify --out runs/advice --export nanotron --export megatron
    """
    import json

    from commute_cli.io import exports, store

    result = store.load_analysis(from_dir)
    folder = out if out is not None else from_dir
    exporting = exports.ExportPlan.check(export, folder, batch_size, result.run_manifest())  # before training
    typer.echo(f"recommendation for {result.label()}", err=True)
    _name_other_runs(from_dir)
    if kind is AdviceKind.phases:
        _recommend_phases(
            result, target, folder, start=start, seeds=seeds, finalists=finalists, candidates=candidates,
            verify=not no_verify, device=device.value, jobs=jobs, batch_size=batch_size, until=until,
            quiet=quiet, fmt=fmt, exporting=exporting,
        )  # fmt: skip
        return
    from commute_cli.commands import recommend
    from commute_cli.render import tables
    from commute_cli.render.recommend_table import recommend_report

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
    if single_pair and len(result.schedule.domains) < 4:
        typer.echo(
            f"note: --single-pair changes nothing here: with {len(result.schedule.domains)} domains no two "
            "pairs are disjoint (several pairs move together only with 4 or more)",
            err=True,
        )
    files = recommend.write_recommendation(rec, folder)
    stale = recommend.earlier_recommendation(folder) if not files else None
    if stale:
        typer.echo(
            f"note: the files in {folder}/ are from an earlier recommend ({stale}); left unchanged", err=True
        )
    if fmt is Format.table:
        tables.print_renderable(recommend_report(rec))
        if rec.proposed and result.run.get("size_note"):
            typer.echo(f"note: {result.run['size_note']}; recommend --kind phases measures instead", err=True)
        if files:
            where = ", ".join(str(f) for f in files)
            typer.echo(f"wrote {where}", err=True)
            typer.echo(
                _apply_line(result, files[0], recommend.first_change(rec), rec.last_step, target), err=True
            )
    elif fmt is Format.csv:
        tables.emit_dataframe(rec.table(), fmt.value)
    else:
        typer.echo(json.dumps(rec.to_dict(), indent=2, ensure_ascii=False, default=str))
    _export(exporting, rec.schedule if rec.proposed else None, rec.last_step, rec.summary())


def _apply_line(result: Any, schedule_file: Path, first_change: int, last: int, target: str) -> str:
    """``apply with: commute train ...``: the schedule trained from the latest saved checkpoint at or before
    its first change (from scratch when there is none), with the run's manifest."""
    from commute_cli.render.phase_table import train_line

    given = str(result.run.get("options", {}).get("ckpt_dir") or result.checkpoint_dir)
    manifest_dir = given if Path(given).is_dir() else str(result.checkpoint_dir)
    init = result.checkpoint_before(first_change)
    model_config, seed = None, None
    if init is None:  # from scratch: the run's model config (its first checkpoint's) and seed
        earliest = min((s for s in result.checkpoint_steps if s > 0), default=None)
        first = result.checkpoint_before(earliest) if earliest is not None else None
        model_config = str(first[1] / "config.json") if first else None
        seed = int(result.run_manifest().get("seed") or 0)
    line = train_line(
        manifest_dir,
        str(init[1]) if init else None,
        str(schedule_file),
        last,
        f"runs/{target}-recommended",
        model_config=model_config,
        seed=seed,
    )
    where = (
        f"continues checkpoint {init[0]}"
        if init
        else "trains from scratch with the run's model config and seed"
    )
    return f"apply with ({where}): {line}"


def _recommend_phases(
    result: Any,
    target: str,
    folder: Path,
    *,
    start: int | None,
    seeds: int,
    finalists: int,
    candidates: int | None,
    verify: bool,
    device: str,
    jobs: int | None,
    batch_size: int | None,
    until: int | None,
    quiet: bool,
    fmt: Format,
    exporting: Any,
) -> None:
    import json

    from commute_cli.commands import phase_advice
    from commute_cli.commands.stats import quiet_libraries
    from commute_cli.render import tables
    from commute_cli.render.phase_table import phase_report
    from commute_cli.render.progress import StepProgress

    last = until if until is not None else phase_advice.run_last_step(result)
    first = start if start is not None else phase_advice.default_start(result, last)
    batch = batch_size if batch_size is not None else phase_advice.run_batch_size(result)
    advice = phase_advice.plan(result, target, first, last, batch, max_candidates=candidates)
    if jobs is None:
        jobs = 1 if device != "cpu" else max(1, min(os.cpu_count() or 1, 4))
    if jobs < 1:
        raise CommuteError(f"--jobs must be at least 1, got {jobs}")
    if verify:
        quiet_libraries()
        checkpoint, _scratch = phase_advice.start_checkpoint(result, first)
        with StepProgress("recommend: continuations", enabled=not quiet and fmt is Format.table) as bar:
            advice = phase_advice.verify(
                advice, checkpoint, seeds=seeds, finalists=finalists, cache=result.folder / "cache",
                device=device, workers=jobs, note=lambda m: typer.echo(m, err=True), progress=bar,
            )  # fmt: skip
    else:
        advice = phase_advice.unverified(advice)
    files = phase_advice.write_advice(advice, folder)
    if fmt is Format.table:
        tables.print_renderable(phase_report(advice))
        typer.echo(f"wrote {', '.join(str(f) for f in files)}", err=True)
        if advice.chosen is not None:
            typer.echo(_apply_line(result, files[0], advice.chosen.start, advice.last, target), err=True)
    elif fmt is Format.csv:
        tables.emit_dataframe(phase_advice.measured_table(advice), fmt.value)
    else:
        typer.echo(json.dumps(advice.to_dict(), indent=2, ensure_ascii=False, default=str))
    _export(exporting, advice.chosen.schedule if advice.chosen else None, advice.last, advice.summary())


def _export(plan: Any, schedule: Any, last: int, why: str) -> None:
    """``recommend --export``: the proposed schedule in each format asked for (``io.exports``), or why not."""
    if not plan.formats:
        return
    if schedule is None:
        typer.echo(f"nothing exported ({', '.join(plan.formats)}): no schedule proposed; {why}", err=True)
        return
    files = plan.write(schedule, last)
    typer.echo(f"exported {', '.join(str(f) for f in files)}", err=True)


@help_paragraphs
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

    Example: commute plot -o criterion.png
    """
    from commute_cli.io import atomic, store
    from commute_cli.render import figures

    if kind is not PlotKind.criterion:
        _plot_heatmap(kind, output, from_dir, target)
        return
    result = store.load_analysis(from_dir)
    _name_other_runs(from_dir)
    losses = store.load_losses(from_dir)
    vfile = validate_csv if validate_csv is not None else from_dir / "validate.csv"
    validate = None
    if vfile.is_file():
        try:
            validate = figures.check_validate_table(store.read_table(vfile), str(vfile))
        except CommuteError as err:
            if validate_csv is not None:
                raise
            typer.echo(f"note: {err.one_line()[7:]}; plotting without the loss plane", err=True)
    elif validate_csv is not None:
        raise CommuteError(f"{vfile} does not exist", hint="run `commute validate` or leave out --validate")
    fig = figures.criterion_figure(result.results, losses, validate, run=result.run)
    path = atomic.write_bytes(output, figures.png_bytes(fig))
    drawn = f"; loss plane from {vfile}{_validation_words(vfile)}" if validate is not None else ""
    typer.echo(f"wrote {path} ({result.label()}{drawn})", err=True)


def _validation_words(vfile: Path) -> str:
    """`` (checkpoint-1000, horizon 100)``: which validation the loss plane draws, from the validate.json
    beside ``vfile`` ('' when it is not there): a later validate into the same folder replaces it."""
    import json

    try:
        run = json.loads(vfile.with_suffix(".json").read_text(encoding="utf-8"))["run"]
        return f" ({Path(str(run['checkpoint'])).name}, horizon {run['options']['steps']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _plot_heatmap(kind: PlotKind, output: Path, from_dir: Path, target: str | None) -> None:
    """``commute plot --kind pairs|decomposition|orders``: render/heatmaps.py, written atomically."""
    from commute_cli.io import atomic, store
    from commute_cli.render import heatmaps

    result = store.load_analysis(from_dir)
    _name_other_runs(from_dir)
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
        extra = store.read_table(file)
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
            if "el" not in extra:
                raise CommuteError(
                    f"{from_dir / 'decomposition.csv'} has no el column (written by an older commute)",
                    hint="run `commute analyze ... --decompose` again (the cached statistics make it quick)",
                )
            heatmaps.plot_decomposition_heatmap(extra, tmp, name)
    typer.echo(f"wrote {output} ({result.label()})", err=True)


def _name_other_runs(from_dir: Path) -> None:
    """One line when ``--from`` holds other analyses in subfolders (``run-<id>/``, ``--name``): which, how
    they differ from the one read, and the flag that picks one (issue 21: no silent choice)."""
    from commute_cli.io import store

    others = store.other_analyses(from_dir)
    if not others:
        return
    shown = [f"{path}/" + (f" ({'; '.join(differs)})" if differs else "") for path, differs in others[:3]]
    more = f" and {len(others) - 3} more" if len(others) > 3 else ""
    typer.echo(
        f"note: this reads {from_dir}/; it also holds {', '.join(shown)}{more}: choose one with "
        f"--from {others[0][0]}",
        err=True,
    )


@help_paragraphs
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
