"""``commute analyze --dry-run``: what the analysis would run and about how long it would take, before the
long work.

Resolves and checks the inputs exactly as ``commute analyze`` does
(:func:`~commute_cli.commands.options.resolve_inputs`), draws the sample (the same bounded read, so the
statistics cache can be looked up under the run's own keys), then counts and times instead of estimating:
nothing is cached or written.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from commute_cli import __started__
from commute_cli.commands.options import AnalyzeOptions, Inputs, resolve_inputs
from commute_cli.commands.stats import hvp_micro_batch, prepare_samples, quiet_libraries, stats_key
from commute_cli.core import criterion, power
from commute_cli.engine import curvature
from commute_cli.engine.hvp import hvp
from commute_cli.engine.training import resolve_device
from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints, store

__all__ = ["cached_checkpoints", "preview", "time_gradient", "time_hvp"]

TIMED_PASSES = 3
"""Timed gradient passes after one warm-up; their median is the time per sequence (one pass swung 10x
between two dry runs on a loaded machine, issue 21)."""


def time_gradient(model: torch.nn.Module, ids: torch.Tensor, device: torch.device) -> float:
    """Seconds per sequence of one gradient pass over ``ids`` (``[batch, seq_len]``): one warm-up pass,
    then the median of :data:`TIMED_PASSES` (robust to one pass slowed by another job)."""
    times = []
    for k in range(TIMED_PASSES + 1):
        t0 = time.perf_counter()
        curvature.loss_and_grad(model, ids, ids.shape[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / ids.shape[0]


def time_hvp(
    model: torch.nn.Module, ids: torch.Tensor, vectors: int, method: str, device: torch.device
) -> float:
    """Seconds per sequence of one Hessian-vector-product pass over ``ids`` (``[batch, seq_len]``) with
    ``vectors`` random vectors at once (``engine.hvp.hvp``, as the estimator runs it): one warm-up pass, then
    the median of :data:`TIMED_PASSES`. Measured rather than taken as ``1 + 2v`` gradients: on the shipped
    run the FLOP count overstated the analysis 1.5x (benchmarks/bench_estimates.py)."""
    n = curvature.num_params(model)
    v = torch.randn(vectors, n, generator=torch.Generator().manual_seed(0))
    times = []
    for k in range(TIMED_PASSES + 1):
        t0 = time.perf_counter()
        hvp(model, ids, v, ids.shape[0], method)  # type: ignore[arg-type]  # "rr" or "fr", checked by options
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / ids.shape[0]


def cached_checkpoints(
    inputs: Inputs, opts: AnalyzeOptions, plan: str, sample_digest: str, device: torch.device
) -> list[str]:
    """The checkpoints whose statistics ``commute analyze`` would read from ``--out``'s cache (its own key,
    :func:`commute_cli.commands.stats.stats_key`, single process); empty with ``--no-cache``."""
    if not opts.use_cache:
        return []
    cache_dir = Path(opts.out) / "cache"
    if not cache_dir.is_dir():
        return []
    found = []
    for ref in inputs.refs:
        step = ref.step if ref.step is not None else 0
        wbar = np.array([inputs.schedule.weights_at(step)[n] for n in inputs.names], dtype=np.float64)
        coefs = np.stack([t.coefs_at(wbar) for t in inputs.targets]) if plan == "target" else None
        key = stats_key(ref, opts, plan, sample_digest, coefs, device)
        if store.stats_file(cache_dir, ref.name, key).is_file():
            found.append(ref.name)
    return found


def preview(opts: AnalyzeOptions, *, look_up_cache: bool = True) -> dict[str, Any]:
    """What ``commute analyze`` would run, before the long work (``--dry-run``), and about how long it takes.

    Resolves and checks every input as the real run does, draws the sample (timed: the run draws the same
    one) and looks its checkpoints up in ``--out``'s cache under the run's own keys, counts the gradient
    and HVP passes (:func:`commute_cli.core.power.analysis_cost`), and times gradients of one micro-batch
    of random tokens on the first checkpoint left to compute (:func:`time_gradient`) and HVPs with the
    run's vector count (:func:`time_hvp`). The estimate, in seconds of wall time, is ``start-up +
    sampling + first load + (uncached - 1) x later load + the uncached checkpoints' gradient and HVP
    sequences x their measured times``, where start-up is this process's own time from
    importing commute to the end of the input checks (the cached checkpoints' reads are left out). Nothing
    is cached or written. ``look_up_cache=False`` (``--budget``): no sample, no cache look-up and no HVP
    timing: every checkpoint counted, and compute from the FLOP-count model (:func:`power.estimated_seconds`).

    Returns the numbers as a dict: ``seconds_per_gradient_sequence``, ``estimated_seconds``, ``cached``
    (checkpoint names), ``startup_seconds``, ``sampling_seconds``, ``first_load_seconds``, ``load_seconds``,
    ``compute_seconds``,
    the :class:`~commute_cli.core.power.Cost` fields of all checkpoints, ``dot_product_share``,
    ``checkpoints``, ``plan``,
    ``domains``, ``targets``.
    """
    quiet_libraries()
    inputs = resolve_inputs(opts)
    for text in inputs.notes:  # the same notes as the run (rounded --samples, pairs left out)
        print(text, file=sys.stderr)
    K, T = len(inputs.names), len(inputs.targets)
    plan = criterion.choose_plan(K, T) if opts.plan == "auto" else opts.plan
    n = len(inputs.refs)
    cost = power.analysis_cost(opts.samples, opts.blocks, K, plan, n_targets=T, checkpoints=n)
    device = resolve_device(opts.device)
    startup = time.perf_counter() - __started__  # imports and input checks: the real run pays them as well
    sampling, cached = 0.0, []
    if look_up_cache:
        t0 = time.perf_counter()
        _, digest, _ = prepare_samples(inputs, opts)
        sampling = time.perf_counter() - t0
        cached = cached_checkpoints(inputs, opts, plan, digest, device)
    todo = n - len(cached)
    per_seq = load = load_first = 0.0
    per_hvp_seq: float | None = None
    if todo:
        first = next(r for r in inputs.refs if r.name not in cached)
        t0 = time.perf_counter()
        model = checkpoints.load_model(first, device=device)
        load_first = time.perf_counter() - t0  # with the one-time imports the real run pays once too
        load = load_first
        if todo > 1:
            t0 = time.perf_counter()
            model = checkpoints.load_model(first, device=device)
            load = time.perf_counter() - t0
        vocab = int(getattr(model.config, "vocab_size", 2))
        gen = torch.Generator().manual_seed(0)
        # the run's forward passes: a part's sequences in micro-batches (never more than the part holds)
        mb = opts.batch_size if not look_up_cache else min(opts.batch_size, cost.seqs_per_part)
        ids = torch.randint(0, vocab, (mb, inputs.seq_len), generator=gen)
        per_seq = time_gradient(model, ids, device)
        if look_up_cache:  # --budget keeps the FLOP-count model of core.power (one timed quantity)
            hvp_ids = ids[: min(hvp_micro_batch(opts), cost.seqs_per_part)]
            per_hvp_seq = time_hvp(model, hvp_ids, cost.vectors_per_hvp, opts.hvp, device)
    if per_hvp_seq is None:
        compute = power.estimated_seconds(cost, per_seq) * todo / n if todo else 0.0
    else:
        compute = (cost.gradient_sequences * per_seq + cost.hvp_sequences * per_hvp_seq) * todo / n
    return {
        **asdict(cost),
        "checkpoints": n,
        "cached": cached,
        "plan": plan,
        "domains": list(inputs.names),
        "targets": [t.name for t in inputs.targets],
        "seq_len": inputs.seq_len,
        "device": str(device),
        "seconds_per_gradient_sequence": per_seq,
        "dot_product_share": power.dot_product_share(cost, inputs.seq_len),
        "seconds_per_hvp_sequence": per_hvp_seq,
        "startup_seconds": startup,
        "sampling_seconds": sampling,
        "load_seconds": load,
        "first_load_seconds": load_first,
        "compute_seconds": compute,
        "estimated_seconds": startup + sampling + load_first + max(todo - 1, 0) * load + compute,
    }


def samples_for_budget(opts: AnalyzeOptions, budget: float) -> int:
    """``--budget SECONDS``: the largest ``--samples`` whose estimated compute time fits
    (:func:`commute_cli.core.power.samples_for_budget`, timed by :func:`preview`). Chosen before any estimate
    is made, so the verdicts' test keeps its error rate.

    Raises:
        CommuteError: a budget that is not a positive number, or below one sequence per part.
    """
    if not (budget > 0 and math.isfinite(budget)):
        raise CommuteError(f"--budget must be a positive number of seconds, got {budget:g}")
    p = preview(opts, look_up_cache=False)
    try:
        return power.samples_for_budget(
            budget, p["seconds_per_gradient_sequence"], opts.blocks, len(p["domains"]), p["plan"],
            len(p["targets"]), p["checkpoints"],
        )  # fmt: skip
    except ValueError as err:
        raise CommuteError(str(err), hint="raise --budget, or lower --blocks or the checkpoints") from err
