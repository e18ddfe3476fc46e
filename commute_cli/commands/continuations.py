"""Real continuations from a saved checkpoint: each candidate schedule trained to the run's last step, paired
with the schedule that was run on the same stream seed, and the final held-out losses compared.

A service of the commands layer (docs/ARCHITECTURE.md): ``commands/recommend.py`` imports it (lazily, so
that a recommendation without verification starts without torch). It is the measured half of "advice that
pays off" (docs/MATH.md "Schedules of useful size"): the bracket says which way to move data, a continuation
says what the move realises.

- The start is one saved checkpoint, loaded through the one loader with its optimizer state and stream
  positions (``validate_branches.load_state``); every arm is a fork of it, so all arms at one seed read the
  same rows of every domain in the same order up to where their schedules differ, and the unchanged arm at
  the run's own seed reproduces the run.
- Or the start is the run's step 0 (``scratch``): the model ``commute train`` would build from the run's
  model config and seed, a fresh optimizer with the manifest's settings, the streams at their beginnings
  (``train_setup.model_and_optimizer``, the code path of a run from scratch). A retrain costs the whole run
  per arm, and measures schedules that differ from the first step.
- Learning rates: the run's manifest schedule (``--lr``-free), as ``commute train --init`` would continue.
- Each (start, schedule, seed) result is cached in ``OUT/cache/continue-<key>.json``, so a rerun or another
  target reuses it; the key covers the checkpoint files, the data, the eval sample, the schedule and the seed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from commute_cli.commands.train_setup import UNSET, TrainConfig, inherit_training, model_and_optimizer
from commute_cli.commands.validate_branches import eval_blocks_of, load_state, start_fingerprint
from commute_cli.commands.validate_inputs import Setup, ValidateOptions, resolve_setup
from commute_cli.core.schedule import Schedule
from commute_cli.engine import training
from commute_cli.errors import CommuteError
from commute_cli.io import atomic, checkpoints, run_inputs

FORMAT = "commute-continue/1"


@dataclass
class Start:
    """A loaded start: the training state at the checkpoint, the held-out blocks and the rates to ``last``."""

    setup: Setup
    state: training.TrainingState
    eval_blocks: dict[str, torch.Tensor]
    last: int
    key: str
    scratch: bool = False

    @property
    def label(self) -> str:
        """``scratch`` or the checkpoint's folder name (cache file names, messages)."""
        return "scratch" if self.scratch else self.setup.checkpoint.name

    @property
    def steps(self) -> int:
        """Updates from the checkpoint to the last step."""
        return self.last - self.setup.step

    def lr(self, step: int) -> float:
        return self.setup.lrs[min(step - self.setup.step, len(self.setup.lrs) - 1)]


def load_start(
    checkpoint: Path,
    last: int,
    note: Callable[[str], None],
    device: str = "cpu",
    eval_samples: int = 100_000,
    scratch: bool = False,
) -> Start:
    """Resolve and load ``checkpoint`` (with its run's manifest, data and tokenizer) for continuations to
    ``last``; with ``scratch``, the run's step 0 instead (``checkpoint`` supplies the run's model config,
    manifest, data and tokenizer). Raises ``CommuteError`` (one line) for what ``commute validate`` refuses,
    and, with ``scratch``, for a run whose manifest records no optimizer and learning-rate schedule."""
    opts = ValidateOptions(checkpoint=Path(checkpoint), eval_samples=eval_samples, device=device)
    setup = resolve_setup(opts, note, until=last, scratch=scratch)
    dev = training.resolve_device(device)
    state = scratch_state(setup, dev) if scratch else load_state(setup, dev)
    blocks = eval_blocks_of(setup, eval_samples)
    payload = [
        FORMAT,
        *start_fingerprint(setup, state),
        {n: int(b.shape[0]) for n, b in blocks.items()},
        last,
        *(["scratch"] if scratch else []),
    ]
    key = hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:16]
    return Start(setup, state, blocks, int(last), key, scratch)


def scratch_state(setup: Setup, device: torch.device) -> training.TrainingState:
    """The run's step 0 as ``commute train`` builds it without ``--init``: the model from the checkpoint's
    ``config.json`` initialized from the run's seed, the optimizer with the manifest's settings, every
    stream at its beginning. A one-line error when the run folder has no manifest."""
    manifest = checkpoints.read_manifest(setup.checkpoint)
    if manifest is None:
        raise CommuteError(
            f"cannot retrain {setup.checkpoint}'s run from scratch: no commute.json beside it",
            hint="continue from a saved checkpoint instead (--start STEP)",
        )
    config = TrainConfig(out_dir=setup.checkpoint, domains=dict(setup.train_sources), seed=setup.seed)
    config = inherit_training(replace(config, unset=UNSET), manifest)
    tokenizer = checkpoints.load_tokenizer(Path(setup.tokenizer_path))
    model, optimizer = model_and_optimizer(
        config, tokenizer, setup.seq_len, setup.checkpoint / "config.json", None, None, device
    )
    blocks = run_inputs.load_blocks(setup.train_sources, tokenizer, setup.seq_len, setup.base_dir)
    streams = [training.DomainStream(n, blocks[n], setup.seed, 0) for n in setup.names]
    return training.TrainingState(model, optimizer, streams, 0, setup.batch_size, config.max_grad_norm)


def _cache_file(cache: Path, start: Start, schedule: Schedule, seed: int) -> Path:
    sched = hashlib.sha256(json.dumps(schedule.to_records()).encode()).hexdigest()[:12]
    return cache / f"continue-{start.label}-{start.key}-{sched}-seed{seed}.json"


def cached_losses(cache: Path | None, start: Start, schedule: Schedule, seed: int) -> dict[str, float] | None:
    """The final losses of an earlier identical continuation, when cached."""
    if cache is None:
        return None
    file = _cache_file(cache, start, schedule, seed)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    losses = data.get("losses") if isinstance(data, dict) else None
    return {str(k): float(v) for k, v in losses.items()} if isinstance(losses, dict) else None


def continue_run(
    start: Start,
    schedule: Schedule,
    seed: int,
    *,
    cache: Path | None = None,
    on_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Train a fork of the start with ``schedule`` to the last step (streams re-seeded to ``seed``, same
    positions) and return its final held-out loss per domain (nats per token). Cached when ``cache``."""
    hit = cached_losses(cache, start, schedule, seed)
    if hit is not None:
        return hit
    began = time.monotonic()
    branch = start.state.fork(seed)
    branch.run(schedule, start.steps, start.lr, on_step=(lambda _r: on_step()) if on_step else None)
    losses = training.evaluate(branch.model, start.eval_blocks)
    del branch
    if cache is not None:
        record: dict[str, Any] = {
            "format": FORMAT,
            "checkpoint": str(start.setup.checkpoint),
            "last": start.last,
            "seed": seed,
            "schedule": schedule.to_records(),
            "losses": losses,
            "seconds": round(time.monotonic() - began, 2),
        }
        cache.mkdir(parents=True, exist_ok=True)
        atomic.write_text(_cache_file(cache, start, schedule, seed), json.dumps(record, indent=1) + "\n")
    return losses


def seconds_per_step(start: Start, schedule: Schedule, n: int = 3) -> float:
    """Seconds per training step of this start, timed on ``n`` real steps of a throwaway fork."""
    branch = start.state.fork(start.setup.seed)
    began = time.monotonic()
    branch.run(schedule, n, start.lr)
    per = (time.monotonic() - began) / n
    del branch
    return per


# ------------------------------------------------------------------------------------------------ workers

_WORKER: dict[str, Any] = {}


def _worker_init(checkpoint: str, last: int, device: str, threads: int, scratch: bool) -> None:
    """A worker process: one thread, its own loaded start (spawned, so nothing is shared with the parent)."""
    from commute_cli.commands.stats import quiet_libraries

    torch.set_num_threads(threads)
    quiet_libraries()
    _WORKER["start"] = load_start(Path(checkpoint), last, lambda _m: None, device=device, scratch=scratch)


def _worker_run(records: list[dict[str, Any]], seed: int, cache: str | None) -> dict[str, float]:
    schedule = Schedule.from_records(records)
    return continue_run(_WORKER["start"], schedule, seed, cache=Path(cache) if cache else None)


def run_many(
    start: Start,
    jobs: list[tuple[Schedule, int]],
    *,
    workers: int = 1,
    cache: Path | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[dict[str, float]]:
    """:func:`continue_run` for every ``(schedule, seed)`` of ``jobs``, in this process (``workers`` 1) or in
    ``workers`` spawned processes of one thread each (each loads the start itself; results are identical,
    as every continuation is a deterministic function of the start, the schedule and the seed).
    ``on_done(steps)`` is called as each job ends. Returns the final losses in the order of ``jobs``."""
    if workers <= 1 or len(jobs) <= 1:
        out = []
        for schedule, seed in jobs:
            out.append(
                continue_run(
                    start, schedule, seed, cache=cache, on_step=(lambda: on_done(1)) if on_done else None
                )
            )
        return out
    import concurrent.futures as cf
    import multiprocessing as mp

    args = (
        str(start.setup.checkpoint),
        start.last,
        str(training.model_device(start.state.model)),
        1,
        start.scratch,
    )
    results: list[dict[str, float] | None] = [None] * len(jobs)
    with cf.ProcessPoolExecutor(
        workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=args
    ) as ex:
        futures = {
            ex.submit(_worker_run, schedule.to_records(), seed, str(cache) if cache else None): k
            for k, (schedule, seed) in enumerate(jobs)
        }
        for fut in cf.as_completed(futures):
            results[futures[fut]] = fut.result()
            if on_done is not None:
                on_done(start.steps)
    return [r for r in results if r is not None]
