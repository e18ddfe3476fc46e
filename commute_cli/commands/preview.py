"""``commute analyze --dry-run``: what the analysis would run and about how long it would take, before the
long work.

Resolves and checks the inputs exactly as ``commute analyze`` does
(:func:`~commute_cli.commands.options.resolve_inputs`), then counts and times instead of sampling and
estimating: nothing is sampled, cached or written.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from typing import Any

import torch

from commute_cli.commands.options import AnalyzeOptions, resolve_inputs
from commute_cli.commands.stats import quiet_libraries
from commute_cli.core import criterion, power
from commute_cli.engine import curvature
from commute_cli.engine.training import resolve_device
from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints

__all__ = ["preview"]


def preview(opts: AnalyzeOptions) -> dict[str, Any]:
    """What ``commute analyze`` would run, before the long work (``--dry-run``).

    Resolves and checks every input as the real run does, counts the gradient and HVP passes
    (:func:`commute_cli.core.power.analysis_cost`), and times two gradients of one micro-batch of random
    tokens on the first checkpoint (the second is kept) to estimate the compute time. Nothing is sampled,
    cached or written. Returns the numbers as a dict (``seconds_per_gradient_sequence``,
    ``estimated_seconds``, the :class:`~commute_cli.core.power.Cost` fields, ``dot_product_share``,
    ``checkpoints``, ``plan``, ``domains``, ``targets``).
    """
    quiet_libraries()
    inputs = resolve_inputs(opts)
    for text in inputs.notes:  # the same notes as the run (rounded --samples, pairs left out)
        print(text, file=sys.stderr)
    K, T = len(inputs.names), len(inputs.targets)
    plan = criterion.choose_plan(K, T) if opts.plan == "auto" else opts.plan
    cost = power.analysis_cost(opts.samples, opts.blocks, K, plan, n_targets=T, checkpoints=len(inputs.refs))
    device = resolve_device(opts.device)
    model = checkpoints.load_model(inputs.refs[0], device=device)
    vocab = int(getattr(model.config, "vocab_size", 2))
    ids = torch.randint(
        0, vocab, (opts.batch_size, inputs.seq_len), generator=torch.Generator().manual_seed(0)
    )
    seconds = 0.0
    for _ in range(2):
        t0 = time.perf_counter()
        curvature.loss_and_grad(model, ids, opts.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    per_seq = seconds / opts.batch_size
    return {
        **asdict(cost),
        "checkpoints": len(inputs.refs),
        "plan": plan,
        "domains": list(inputs.names),
        "targets": [t.name for t in inputs.targets],
        "seq_len": inputs.seq_len,
        "device": str(device),
        "seconds_per_gradient_sequence": per_seq,
        "estimated_seconds": power.estimated_seconds(cost, per_seq),
        "dot_product_share": power.dot_product_share(cost, inputs.seq_len),
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
    p = preview(opts)
    try:
        return power.samples_for_budget(
            budget, p["seconds_per_gradient_sequence"], opts.blocks, len(p["domains"]), p["plan"],
            len(p["targets"]), p["checkpoints"],
        )  # fmt: skip
    except ValueError as err:
        raise CommuteError(str(err), hint="raise --budget, or lower --blocks or the checkpoints") from err
