"""``commute validate``'s three branches: the loaded training state, the same data in every branch, training
and evaluating them, and the per-repeat cache in ``OUT/cache`` (decisions in
:mod:`commute_cli.commands.validate`).

A service of the commands layer (docs/ARCHITECTURE.md): :mod:`commute_cli.commands.validate` imports it.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from commute_cli.commands.validate_inputs import VALIDATE_FORMAT, Setup, ValidateOptions
from commute_cli.core.mixing import BRANCHES, branch_schedules, realized_dw
from commute_cli.core.schedule import Schedule
from commute_cli.engine import training
from commute_cli.errors import CommuteError
from commute_cli.io import atomic, checkpoints, run_inputs, runfiles, sampling, store
from commute_cli.io import data as domain_data


@dataclass
class Branches:
    """What the branches need: the loaded training state, schedules, eval blocks and the cache key."""

    state: training.TrainingState
    schedules: dict[str, Schedule]
    eval_blocks: dict[str, torch.Tensor]
    loss_at_checkpoint: dict[str, float]
    realized_dw: float
    key: str


def load_state(setup: Setup, device: str | torch.device = "cpu") -> training.TrainingState:
    """The checkpoint as a ``TrainingState`` through the one loader (``io.checkpoints.load_model``):
    weights, optimizer state (AdamW when it has second moments, SGD otherwise; plain SGD at the window's
    first rate when none is saved) and the streams positioned where the run left them."""
    tokenizer = checkpoints.load_tokenizer(Path(setup.tokenizer_path))
    blocks = run_inputs.load_blocks(setup.train_sources, tokenizer, setup.seq_len, setup.base_dir)
    resumed = runfiles.read_training_state(setup.checkpoint)
    model = checkpoints.load_model(setup.checkpoint, device=device)
    model.train()
    opt_state = resumed.optimizer_state if setup.has_optimizer_state else None
    is_adam = opt_state is not None and any("exp_avg_sq" in s for s in opt_state.get("state", {}).values())
    decay = checkpoints.decay_parameter_names(model)
    optimizer = training.build_optimizer(model, "adamw" if is_adam else "sgd", setup.lrs[0], decay=decay)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    streams = [
        training.DomainStream(n, b, setup.seed, resumed.positions.get(n, 0)) for n, b in blocks.items()
    ]
    return training.TrainingState(model, optimizer, streams, resumed.step, setup.batch_size)


def eval_blocks_of(setup: Setup, n: int) -> dict[str, torch.Tensor]:
    """The held-out blocks (at most ``n`` per domain, a fixed seeded sample): the same for every branch."""
    tokenizer = checkpoints.load_tokenizer(Path(setup.tokenizer_path))
    out = run_inputs.load_blocks(setup.eval_sources, tokenizer, setup.seq_len, setup.base_dir)
    return {k: b if b.shape[0] <= n else sampling.sample_blocks(b, n, 0) for k, b in out.items()}


def start_fingerprint(setup: Setup, state: training.TrainingState) -> list[Any]:
    """What a continuation of ``setup``'s checkpoint depends on, for cache keys: the checkpoint's files,
    the data, the sequence length, the batch, the stream positions, the rates, the optimizer, torch."""
    return [
        str(setup.checkpoint.resolve()),
        [
            store.file_signature(setup.checkpoint / f)
            for f in ("model.safetensors", "pytorch_model.bin", "optimizer.pt")
        ],
        {n: domain_data.source_fingerprint(s, domain=n) for n, s in setup.train_sources.items()},
        {n: domain_data.source_fingerprint(s, domain=n) for n, s in setup.eval_sources.items()},
        setup.seq_len,
        state.batch_size,
        [s.position for s in state.streams],
        setup.lrs,
        type(state.optimizer).__name__,
        torch.__version__,
    ]


def prepare_branches(setup: Setup, opts: ValidateOptions) -> Branches:
    """Load the training state (model, optimizer, positioned streams), build the schedules, eval once."""
    state = load_state(setup, training.resolve_device(opts.device))
    schedules = branch_schedules(
        setup.schedule, setup.step, opts.steps, setup.pair, opts.dw, state.batch_size
    )
    realized = realized_dw(schedules, setup.step, opts.steps, state.batch_size, setup.pair[0])
    eval_blocks = eval_blocks_of(setup, opts.eval_samples)
    loss0 = training.evaluate(state.model, eval_blocks)
    for name, value in loss0.items():
        if not math.isfinite(value):
            raise CommuteError(f"non-finite {name} loss at {setup.checkpoint}: the weights are broken")
    payload = [
        VALIDATE_FORMAT,
        *start_fingerprint(setup, state),
        opts.eval_samples,
        {b: s.to_records() for b, s in schedules.items()},
    ]
    key = hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:20]
    return Branches(state, schedules, eval_blocks, loss0, realized, key)


def run_branches(
    state: training.TrainingState,
    schedules: Mapping[str, Schedule],
    n_steps: int,
    lr_fn: Callable[[int], float],
    eval_blocks: Mapping[str, torch.Tensor],
    seed: int,
    on_step: Callable[[], None] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    """Train one fork of ``state`` per schedule for ``n_steps`` with streams re-seeded to ``seed`` (same
    positions), and evaluate each. Returns (losses per branch per domain, final stream positions)."""
    losses: dict[str, dict[str, float]] = {}
    positions: dict[str, dict[str, int]] = {}
    for label, schedule in schedules.items():
        branch = state.fork(seed)
        branch.run(schedule, n_steps, lr_fn, on_step=(lambda _r: on_step()) if on_step else None)
        losses[label] = training.evaluate(branch.model, eval_blocks)
        positions[label] = {s.name: s.position for s in branch.streams}
        del branch
    return losses, positions


def _cache_file(opts: ValidateOptions, setup: Setup, prepared: Branches, seed: int) -> Path:
    return Path(opts.out) / "cache" / f"validate-{setup.checkpoint.name}-{prepared.key}-seed{seed}.json"


def _cached(file: Path, use_cache: bool) -> dict[str, Any] | None:
    if not (use_cache and file.is_file()):
        return None
    try:
        entry = json.loads(file.read_text(encoding="utf-8"))
        return entry if set(entry["losses"]) == set(BRANCHES) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged entry is recomputed


def pending_repeats(setup: Setup, opts: ValidateOptions, prepared: Branches) -> int:
    """How many repeats still have to be trained (the others are cached)."""
    return sum(
        _cached(_cache_file(opts, setup, prepared, setup.seed + r), opts.use_cache) is None
        for r in range(opts.repeats)
    )


def time_one_step(prepared: Branches, lr: float, timed: int = 3) -> float:
    """Seconds of one training step at this size, measured on a throwaway fork: one warm-up step (one-time
    costs), then the median of ``timed`` steps (one step slowed by another job swung the estimate 2.7x,
    issue 21)."""
    fork = prepared.state.fork()
    w = [1.0 / len(fork.streams)] * len(fork.streams)
    times = []
    for _ in range(timed + 1):
        t0 = time.perf_counter()
        training.train_step(fork.model, fork.optimizer, fork.streams, w, fork.batch_size, lr)
        if training.model_device(fork.model).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del fork
    return statistics.median(times[1:])


def observe(
    setup: Setup,
    opts: ValidateOptions,
    prepared: Branches,
    on_step: Callable[[], None] | None = None,
    on_repeat: Callable[[int, bool], None] | None = None,
) -> list[dict[str, Any]]:
    """All repeats (cached per repeat in ``OUT/cache``): ``[{"seed", "losses": {branch: {domain: L}}}]``."""
    lr_of = {setup.step + t: lr for t, lr in enumerate(setup.lrs)}
    out = []
    for r in range(opts.repeats):
        seed = setup.seed + r
        file = _cache_file(opts, setup, prepared, seed)
        entry = _cached(file, opts.use_cache)
        if on_repeat is not None:
            on_repeat(r, entry is not None)
        if entry is None:
            t0 = time.perf_counter()
            losses, positions = run_branches(
                prepared.state,
                prepared.schedules,
                2 * opts.steps,
                lambda s: lr_of[s],
                prepared.eval_blocks,
                seed,
                on_step,
            )
            entry = {
                "seed": seed,
                "losses": losses,
                "positions": positions,
                "seconds": time.perf_counter() - t0,
            }
            atomic.write_text(file, json.dumps(entry, indent=1) + "\n")
        for label, values in entry["losses"].items():
            if not all(math.isfinite(v) for v in values.values()):
                raise CommuteError(
                    f"branch {label} diverged (non-finite loss) with stream seed {seed}",
                    hint="use a smaller --dw or --horizon, or a smaller --lr",
                    exit_code=1,
                )
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------ cost


def prediction_seconds(opts: ValidateOptions, n_domains: int, per_step: float, batch: int) -> float:
    """About how long the prediction's analysis of the checkpoint takes when not cached: its gradient-
    sequence equivalents (``core.power.analysis_cost``, one checkpoint, every domain a target) x the time
    per sequence of one measured training step (``per_step / batch``: a step is one gradient of ``batch``
    sequences and an optimizer update)."""
    from commute_cli.core import power
    from commute_cli.core.criterion import choose_plan

    samples = opts.samples if opts.samples is not None else 96  # analyze's default, as predict() uses
    try:
        cost = power.analysis_cost(
            samples, opts.blocks, n_domains, choose_plan(n_domains, n_domains), n_domains
        )
    except ValueError:
        return 0.0
    return cost.gradient_equivalents * per_step / max(batch, 1)


def cost_line(
    opts: ValidateOptions,
    prepared: Branches,
    pending: int,
    steps_left: int,
    per_step: float,
    seq_len: int,
    setup_s: float = 0.0,
    prediction_s: float = 0.0,
) -> str:
    """What the run will cost, said before it starts: steps, sequences and a time from a measured step,
    and the whole command's time: ``setup_s`` (already spent) + training + ``prediction_s`` (when not
    cached)."""
    batch = prepared.state.batch_size
    if not steps_left:
        return f"validate: all {opts.repeats} repeats are cached; computing the prediction"
    training_s = steps_left * per_step
    total = (setup_s + training_s + prediction_s) / 60.0
    return (
        f"validate: {pending} repeat(s) x {len(BRANCHES)} branches x {2 * opts.steps} steps = {steps_left} "
        f"training steps of {batch} sequences x {seq_len} tokens ({steps_left * batch} sequences); "
        f"one step measured {per_step:.3g} s (median of 3), so about {training_s / 60.0:.1f} min of training"
        + (" (--quick)" if opts.quick else " (--quick: about half)")
        + f", then the prediction (the checkpoint's statistics, from or into {Path(opts.out) / 'cache'}; "
        f"about {prediction_s:.0f} s when not cached): about {total:.1f} min in all"
    )
