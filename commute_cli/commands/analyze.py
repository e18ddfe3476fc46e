"""``commute analyze``: checkpoints x domains -> per-block statistics -> result rows, with a cache.

The use case reads top to bottom:

1. :func:`~commute_cli.commands.options.resolve_inputs` turns arguments (or the manifest next to the
   checkpoints) into checkpoints, domains, tokenizer, schedule and targets, and checks them before any long
   work (preflight);
2. :func:`prepare_samples` draws each domain's sample once per run with a bounded read (only the documents
   the sample needs, spread over the shards: ``io.sampling.sample_domain``), uses the same sample at every
   checkpoint and splits it into design blocks of three disjoint parts (docs/MATH.md "Noise");
3. :func:`checkpoint_stats` estimates one checkpoint (``engine.estimator``) or reads it from the shared
   content-addressed cache (``io.store``), so an interrupted run resumes and ``validate`` reuses it;
4. ``core.rows.summarize_checkpoint`` turns the scalars into rows through ``core.regime.predict_pair``:
   bracket, predicted loss change of the stated intervention with its standard error, regime and verdict;
5. the rows, losses and ``run.json`` are written as one :class:`~commute_cli.io.store.AnalysisRun`, in a
   folder of their own when ``--out`` holds another run (``store.choose_folder``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from commute_cli import __version__
from commute_cli.commands.options import (  # resolve_inputs, parse_steps: re-exported for old callers
    AnalyzeOptions,
    Inputs,
    parse_steps,
    resolve_inputs,
)
from commute_cli.commands.outputs import RowTables, write_folder
from commute_cli.commands.stats import (  # noqa: F401 (re-exported: benchmarks and tests use them here)
    checkpoint_stats,
    domain_seed,
    hvp_micro_batch,
    offload_stacks,
    peak_rss_mb,
    prepare_samples,
    quiet_libraries,
    stats_key,
    versions,
)
from commute_cli.core import criterion
from commute_cli.core.known_sizes import known_size_error
from commute_cli.core.regime import (
    REGIME_MAX_PROGRESS,
    REGIME_MAX_RATIO,
    Regime,
    Target,
    choose_horizon,
    parse_targets,
)
from commute_cli.engine import distributed
from commute_cli.engine.training import resolve_device
from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints, saved_optimizer, store
from commute_cli.io.learning_rate import find_learning_rate
from commute_cli.io.store import check_writable

__all__ = [
    "AnalysisResult",
    "AnalyzeOptions",
    "Inputs",
    "Target",
    "checkpoint_stats",
    "parse_steps",
    "parse_targets",
    "prepare_samples",
    "resolve_inputs",
    "run_analysis",
]


# ------------------------------------------------------------------------------------------------ inputs


def _data_split(inputs: Inputs) -> str:
    """Which data was analysed: "validation" (the manifest's held-out eval_domains), "train" (the
    manifest's training domains) or "given" (--domains)."""
    m = inputs.manifest
    if m is not None and m.eval_domains and dict(m.eval_domains) == dict(inputs.sources):
        return "validation"
    if m is not None and m.domains and dict(m.domains) == dict(inputs.sources):
        return "train"
    return "given"


# ------------------------------------------------------------------------------------------------ run


@dataclass
class AnalysisResult:
    results: pd.DataFrame
    losses: pd.DataFrame
    run: dict[str, Any]
    out: Path  # the folder the results are in (``--out``, or a run folder under it)
    notes: list[str] = field(default_factory=list)
    baselines: pd.DataFrame | None = None  # first-order baselines (baselines.csv)
    decomposition: pd.DataFrame | None = None  # per-group brackets (decomposition.csv, --decompose)


def run_analysis(
    opts: AnalyzeOptions,
    *,
    on_checkpoint_start: Callable[[int, checkpoints.CheckpointRef, int, bool, int], None] | None = None,
    on_block: Callable[[int], None] | None = None,
) -> AnalysisResult:
    """The whole ``analyze`` job. Progress callbacks let the CLI draw bars without this module knowing.

    Under torchrun (``WORLD_SIZE > 1``) every rank runs this with the same options: each takes a slice
    of every part and sums through ``torch.distributed`` (:mod:`commute_cli.engine.distributed`); rank 0 alone
    reads the data, reads and writes the cache and the outputs, and calls the progress callbacks.
    """
    t0 = time.perf_counter()
    quiet_libraries()
    try:
        opts.check_dist_timeout()
    except CommuteError as err:  # every rank has the same options: print it once
        err.silent = not distributed.is_main_process()  # type: ignore[attr-defined]
        raise
    ctx, device = distributed.setup(resolve_device(opts.device), timeout_s=opts.dist_timeout)
    finished = False
    try:
        result = _run_analysis(opts, ctx, device, t0, on_checkpoint_start, on_block)
        finished = True
        return result
    finally:
        ctx.close(finished=finished)


def _run_analysis(
    opts: AnalyzeOptions,
    ctx: distributed.DistContext,
    device: torch.device,
    t0: float,
    on_checkpoint_start: Callable[[int, checkpoints.CheckpointRef, int, bool, int], None] | None,
    on_block: Callable[[int], None] | None,
) -> AnalysisResult:
    if not ctx.is_main:
        on_checkpoint_start = on_block = None
    inputs = ctx.agree(lambda: resolve_inputs(opts))
    assert inputs is not None
    if ctx.is_main:  # before the long work, shown under -q too: they say what the run will not do as asked
        for text in inputs.notes:
            print(text, file=sys.stderr)
    root = Path(opts.out)
    identity_fields = {
        # the options that change the rows' numbers are part of the question (store.QUESTION_OPTIONS)
        "options": {
            "ckpt_dir": str(opts.ckpt_dir),
            "metric": opts.metric,
            **{k: getattr(opts, k) for k in store.QUESTION_OPTIONS},
        },
        "ckpt_dir_resolved": str(Path(opts.ckpt_dir).resolve()),
        "domains": {n: inputs.sources[n] for n in inputs.names},
        "text_fields": dict(inputs.text_fields),
        "schedule": json.loads(inputs.schedule.to_json()),
        "targets": [{"name": t.name, "kind": t.kind} for t in inputs.targets],
        # a subset of the checkpoints (--steps, --every) is another analysis: it never replaces the full one
        "selected_steps": [r.step for r in inputs.refs],
    }
    run_id = store.run_identity(identity_fields)
    chosen = ctx.agree(lambda: store.choose_folder(root, run_id, opts.name, identity_fields), main_only=True)
    out, note = chosen if chosen is not None else (root, None)

    def check_folders() -> None:
        check_writable(root)
        check_writable(out)

    ctx.agree(check_folders, main_only=True)
    cache_dir = root / "cache"
    # Drawn once per run by rank 0 (a bounded read); the sample goes to the other ranks.
    prepared = ctx.broadcast(ctx.agree(lambda: prepare_samples(inputs, opts), main_only=True))
    assert prepared is not None
    parts, sample_digest, data_provenance = prepared
    local_parts = [[[ctx.shard(p) for p in blk] for blk in dom] for dom in parts]
    K, T = len(inputs.names), len(inputs.targets)
    plan = criterion.choose_plan(K, T) if opts.plan == "auto" else opts.plan
    # the horizon comes from the spacing of ALL the run's checkpoints, not only the selected ones (--steps,
    # --every), so that selecting checkpoints never changes the question asked at them
    all_steps = sorted({r.step for r in checkpoints.discover(Path(opts.ckpt_dir)) if r.step is not None})
    tables = RowTables()
    per_ckpt: list[dict] = []
    lr_found = {ref.name: find_learning_rate(ref, opts.lr) for ref in inputs.refs}  # before any long work
    for ref in inputs.refs:
        if lr_found[ref.name].value is None:
            raise CommuteError(
                f"no learning rate for {ref.name}: no scheduler.pt, trainer_state.json or optimizer lr",
                hint="pass --lr (the learning rate around these checkpoints)",
            )
    skipped = [ref for ref in inputs.refs if lr_found[ref.name].is_zero]
    if len(skipped) == len(inputs.refs):
        raise CommuteError(
            "the learning rate is 0 at every checkpoint: no update follows them, nothing to predict",
            hint="pass --lr with the rate of the window around them, or choose other checkpoints",
        )
    for ref in skipped:  # end of a decay to 0, first step of a warmup from 0: not an ordinary row
        if ctx.is_main:  # shown under -q too: a checkpoint the user asked for is missing from the table
            print(
                f"note: skipping {ref.name}: lr = {lr_found[ref.name].describe()}: no update follows it, so "
                "the predicted change is 0 by construction (pass --lr to analyze it anyway)",
                file=sys.stderr,
            )

    for idx, ref in enumerate(inputs.refs):
        step = ref.step if ref.step is not None else 0
        wbar = np.array([inputs.schedule.weights_at(step)[n] for n in inputs.names], dtype=np.float64)
        coefs = np.stack([t.coefs_at(wbar) for t in inputs.targets]) if plan == "target" else None
        if lr_found[ref.name].is_zero:
            continue
        lr = lr_found[ref.name].value
        assert lr is not None  # checked above, before any long work
        start = (
            None
            if on_checkpoint_start is None
            else (lambda c, i=idx, r=ref: on_checkpoint_start(i, r, opts.blocks, c, len(inputs.refs)))
        )
        fd_check = opts.hvp == "fd" and not any("fd_check" in c for c in per_ckpt)  # once per analysis
        entry = checkpoint_stats(
            ref, opts, parts=local_parts, sample_digest=sample_digest, plan=plan, coefs=coefs, device=device,
            cache_dirs=[cache_dir], ctx=ctx, on_start=start, on_block=on_block, fd_check=fd_check,
        )  # fmt: skip
        if fd_check and "fd_check" in entry.info and ctx.is_main:
            print(fd_check_line(ref.name, entry.info["fd_check"]), file=sys.stderr)
        stats = entry.stats
        if not np.all(np.isfinite(stats.losses)):
            raise CommuteError(
                f"non-finite loss at {ref.name} (nan or inf): the checkpoint's weights are broken",
                hint="check the checkpoint, or leave it out with --steps",
                exit_code=2,
            )
        horizon, reason = (
            choose_horizon(all_steps, all_steps.index(ref.step), opts.horizon)
            if ref.step in all_steps
            else choose_horizon([ref.step], 0, opts.horizon)
        )
        tables.add(
            stats, opts, step=ref.step, names=inputs.names, wbar=wbar, targets=inputs.targets, lr=float(lr),
            horizon=horizon, horizon_reason=reason,
        )  # fmt: skip
        per_ckpt.append(
            {
                "name": ref.name,
                "step": ref.step,
                "lr": lr,
                "lr_source": lr_found[ref.name].as_dict(),
                "horizon": horizon,
                "horizon_reason": reason,
                "cache": entry.file.name,
                "cached": entry.cached,
                **entry.info,
            }
        )

    # what real interventions measured about these sizes on this optimizer family (docs/MATH.md, issue 15)
    optimizer = saved_optimizer.optimizer_name(
        inputs.refs[0], inputs.manifest.optimizer if inputs.manifest is not None else None
    )
    known = known_size_error(optimizer, opts.metric)
    size_note = known.note() if known is not None else None
    saturated = any(r["regime"] == Regime.SATURATED for r in tables.results)
    if known is not None and known.family == "sgd" and not saturated:
        # the SGD record was measured on saturated windows (dt x curvature 1.5-35); inside the regime plain
        # SGD matches real interventions within a factor 0.6-0.9 (tests/test_intervention.py)
        size_note = None
    results, losses, baselines_df, decomposition_df = tables.frames(run_id, opts.decompose is not None)
    run = {
        "format": store.ANALYSIS_FORMAT,
        "command": "analyze",
        "run_id": run_id,
        **identity_fields,
        "commute_version": __version__,
        "argv": sys.argv,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "versions": versions(),
        "data_split": _data_split(inputs),
        "data_base_dir": None if inputs.base_dir is None else str(inputs.base_dir),
        # sha256 of the text each sample was drawn from (the bounded read never hashes whole corpora)
        "data_sha256": {n: data_provenance[n]["text_sha256"] for n in inputs.names},
        "data": data_provenance,
        "tokenizer": inputs.tokenizer_path,
        "seq_len": inputs.seq_len,
        "plan": plan,
        "estimator": "cross",  # every block combination, jackknife SE (docs/MATH.md "Estimator")
        "hvps_per_block": criterion.plan_hvp_count(K, T)[plan],
        "samples_per_domain": int(sum(p.shape[0] for blk in parts[0] for p in blk)),
        "sample_digest": sample_digest,
        "device": str(device),
        "world_size": ctx.world,
        "hvp_batch_size": hvp_micro_batch(opts),
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "checkpoints": per_ckpt,
        # the run's last checkpoint (of all, not only the selected ones): the figure's windows end there
        "last_step": all_steps[-1] if all_steps else None,
        "skipped_checkpoints": [
            {"name": r.name, "step": r.step, "reason": "lr = 0", "lr_source": lr_found[r.name].as_dict()}
            for r in skipped
        ],
        "elapsed_seconds": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "regime": {
            "max_ratio": REGIME_MAX_RATIO,
            "max_progress_fraction": REGIME_MAX_PROGRESS,
            "judged_on": "interval",
        },
        "min_effect": opts.min_effect,
        "optimizer": optimizer,
        "size_note": size_note,
        "schedule_from": inputs.schedule_from,
    }
    if opts.hvp == "fd":  # the finite-difference products' measured agreement with exact ones
        checked = [c for c in per_ckpt if "fd_check" in c]
        run["fd_agreement"] = (
            {"checkpoint": checked[0]["name"], **checked[0]["fd_check"]} if checked else None
        )

    def write_outputs() -> dict[str, Any]:
        merged = store.merge_rerun(store.read_run_json(out), run)
        write_folder(out, results, losses, baselines_df, decomposition_df, merged)  # run.json last
        return merged

    run = ctx.agree(write_outputs, main_only=True) or run
    notes = [note] if note else []
    if size_note:
        notes.append(f"note: {size_note}")
    return AnalysisResult(results, losses, run, out, notes, baselines_df, decomposition_df)


def fd_check_line(name: str, check: dict[str, Any]) -> str:
    """The one line every ``--hvp fd`` analysis prints: the finite-difference products' agreement with exact
    ones (``commands.stats.fd_agreement``), a warning above the threshold."""
    head = "warning: " if check["verdict"] != "ok" else ""
    tail = (
        f" (above {check['warn_above']:g}: compare with --hvp rr before relying on small effects)"
        if check["verdict"] != "ok"
        else ""
    )
    return (
        f"{head}--hvp fd at {name}: finite-difference HVPs vs exact on {check['vectors']} vectors: "
        f"relative error {check['max_rel_error']:.1e}, cosine {check['min_cosine']:.6f}{tail}"
    )


_check_writable = check_writable  # the names validate and older callers import
_resolve_device = resolve_device
