"""``commute validate``: the paper's intervention experiment (sections 4.2-4.3) on a user's checkpoint.

From one checkpoint (with its optimizer state when saved) three branches of ``2N`` steps are trained on the
same per-domain sample streams:

- ``base``: the run's own schedule ``w(t)``;
- ``12``: ``w + d`` for N steps, then ``w - d`` for N steps, ``d = +dw`` on the pair's first domain and
  ``-dw`` on its second (docs/MATH.md "Two domains": "12" means domain 1 up first);
- ``21``: the reverse.

Every domain's loss is then evaluated on the same held-out blocks, and the observed excess losses
``EL_k^12 = L_k(theta_12) - L_k(theta_base)`` and ``EL_k^21`` (mean and SE over ``R`` repeats that differ
only in the stream seed) are put next to the criterion's prediction at the checkpoint (``commute analyze``
with target k, ``--dw dw``, ``--horizon N``, ``dt = lr N``; ``EL^21 = -EL^12`` to second order).

Decisions (docs/DECISIONS.md, "commute validate"):

- Same data in every branch: each domain has its own stream (``engine.training.DomainStream``) and every
  branch takes exactly the same rows of every domain over the window (``core.mixing.realize_counts``).
- Repeats differ only in the stream seed (repeat r uses ``seed + r``; repeat 0 the checkpoint's own seed).
  Each finished repeat is cached in ``OUT/cache``: an interrupted or repeated run does not train it again.
- Without saved optimizer state the branches use plain SGD, the dynamics the criterion is derived for.
- Cost: ``3 x 2N x R`` training steps of ``B`` sequences, plus one analysis of the checkpoint for the
  prediction. The cost is said before starting, from a measured step; ``--quick`` trades precision for
  time (see :data:`QUICK`).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from commute_cli import __version__
from commute_cli.core.mixing import (
    BRANCHES,
    branch_schedules,
    max_dw,
    realized_dw,
    repeat_summary,
    signs_agree,
)
from commute_cli.core.schedule import Schedule
from commute_cli.engine import training
from commute_cli.errors import CommuteError
from commute_cli.io import atomic, checkpoints, runfiles, sampling
from commute_cli.io import data as domain_data

VALIDATE_FORMAT = "commute-validate/1"
PREDICT_DIR = "validate-predict"
"""Sub-folder of ``--out`` where the on-the-fly ``analyze`` run (and its cache) lives, so that validate never
overwrites the ``results.csv`` of a user's own ``commute analyze``."""

QUICK = {"repeats": 1, "eval_samples": 64, "samples": 48, "blocks": 4}
"""``--quick``: one stream seed (the observed effect has no SE, so no significance), 64 held-out blocks per
domain instead of 256 (noisier losses), and a prediction from 48 sequences per domain in 4 blocks instead of
96 in 8 (wider error bars). The intervention itself (N, dw, the three branches) is unchanged, so the signs
and sizes it measures are real, at about half the default's training time."""

Note = Callable[[str], None]


# ------------------------------------------------------------------------------------------------ options


@dataclass
class ValidateOptions:
    """Everything ``commute validate`` takes; saved in ``validate.json``."""

    checkpoint: Path
    domains: list[str] = field(default_factory=list)
    """Training domains ``name=source`` (default: the run's manifest)."""
    eval_domains: list[str] = field(default_factory=list)
    """Held-out domains ``name=source`` (default: the manifest's ``eval_domains``, else the training data)."""
    weights: list[str] = field(default_factory=list)
    """Constant base schedule (default: the checkpoint's ``commute_state.json``, else the manifest)."""
    dw: float = 0.15
    steps: int = 100
    """N (``--horizon``): steps of each half of the intervention (the prediction's horizon)."""
    repeats: int = 2
    pair: str | None = None
    eval_samples: int = 256
    from_dir: Path | None = None
    metric: str = "euclid"
    lr: float | None = None
    batch_size: int | None = None
    seed: int | None = None
    samples: int | None = None
    """Blocks per domain for the prediction (default: ``commute analyze``'s)."""
    blocks: int = 8
    confidence: float = 0.95
    out: Path = Path("commute_out")
    use_cache: bool = True
    device: str = "cpu"
    """Where the branches train (``auto``, ``cpu``, ``cuda``); the prediction runs on the same device."""
    quick: bool = False

    def validate(self) -> None:
        if not (isinstance(self.dw, (int, float)) and math.isfinite(self.dw) and 0.0 < self.dw <= 0.5):
            raise CommuteError(f"--dw must be in (0, 0.5], got {self.dw}")
        if self.steps < 1:
            raise CommuteError(f"--horizon must be a positive number of steps, got {self.steps}")
        if self.repeats < 1:
            raise CommuteError(
                f"--repeats must be at least 1, got {self.repeats}", hint="2 or more for an SE"
            )
        if self.eval_samples < 1:
            raise CommuteError(f"--eval-samples must be positive, got {self.eval_samples}")
        if self.metric not in ("euclid", "adam"):
            raise CommuteError(f"--metric must be euclid or adam, got {self.metric!r}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0.0):
            raise CommuteError(f"--lr must be a positive number, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            raise CommuteError(f"--batch-size must be positive, got {self.batch_size}")
        if not (0.5 <= self.confidence < 1.0):
            raise CommuteError(f"--confidence must be in [0.5, 1), got {self.confidence}")


# ------------------------------------------------------------------------------------------------ inputs


@dataclass
class Setup:
    """Resolved inputs of one validation (everything checked before any training)."""

    checkpoint: Path
    step: int
    names: list[str]
    pair: tuple[int, int]
    schedule: Schedule
    lrs: list[float]
    lr_source: str
    has_optimizer_state: bool
    batch_size: int
    seed: int
    train_sources: dict[str, str]
    eval_sources: dict[str, str]
    eval_held_out: bool
    tokenizer_path: str
    seq_len: int
    base_dir: Path | None = None

    @property
    def lr_mean(self) -> float:
        return float(np.mean(self.lrs))


_read_json = runfiles.read_json


def parse_pair(text: str | None, names: Sequence[str]) -> tuple[int, int]:
    """``--pair en,ru`` -> indices; the default for two domains is their order (domain 1 = the first)."""
    if text is None:
        if len(names) == 2:
            return (0, 1)
        raise CommuteError(
            f"{len(names)} domains: say which pair to intervene on",
            hint=f"pass --pair {names[0]},{names[1]} (the first one goes up first in '12')",
        )
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise CommuteError(f"--pair must be two domain names like en,ru, got {text!r}")
    unknown = [p for p in parts if p not in names]
    if unknown:
        raise CommuteError(
            f"unknown domain {unknown[0]!r} in --pair {text}", hint=f"the domains are {', '.join(names)}"
        )
    if parts[0] == parts[1]:
        raise CommuteError(f"--pair needs two different domains, got {text!r}")
    return (list(names).index(parts[0]), list(names).index(parts[1]))


def _learning_rates(
    opts: ValidateOptions, folder: Path, step: int, manifest: checkpoints.Manifest | None, has_state: bool
) -> tuple[list[float], str]:
    """The rate of every step of the window: ``--lr``, the manifest's schedule (with optimizer state), the
    logged rate, else a one-line error."""
    n_total = 2 * opts.steps
    raw = manifest.raw if manifest is not None else {}
    opt = manifest.optimizer if manifest is not None and manifest.optimizer else {}
    logged = checkpoints.learning_rate(checkpoints.CheckpointRef(folder, step, folder.name))
    if opts.lr is not None:
        return [float(opts.lr)] * n_total, "--lr"
    if has_state and isinstance(opt.get("lr"), (int, float)) and isinstance(raw.get("max_steps"), int):
        kind = (manifest.lr_schedule if manifest is not None else None) or "constant"
        warm = int(raw.get("warmup_steps") or 0)
        lrs = [
            training.lr_at(s, float(opt["lr"]), kind, int(raw["max_steps"]), warm)
            for s in range(step, step + n_total)
        ]
        return lrs, f"manifest ({kind}, base {float(opt['lr']):g})"
    if logged is not None:
        return [float(logged)] * n_total, "trainer_state.json"
    what = "no optimizer state, and no learning rate" if not has_state else "no learning rate"
    raise CommuteError(
        f"{folder} has {what} (no trainer_state.json log or manifest)",
        hint="pass --lr (the learning rate to continue training with)",
    )


def resolve_setup(opts: ValidateOptions, note: Note) -> Setup:
    """Checkpoint, domains, schedule, pair, learning rates: all checked before any long work."""
    opts.validate()
    pending: list[str] = []  # notes are shown only once every input is known to be good
    emit, note = note, pending.append
    folder = Path(opts.checkpoint).expanduser()
    if not folder.exists():
        raise CommuteError(f"checkpoint {folder} does not exist", hint="pass a checkpoint-N folder")
    if not checkpoints.is_checkpoint_dir(folder):
        raise CommuteError(
            f"{folder} is not a model checkpoint (config.json and model weights)",
            hint="pass one checkpoint folder, e.g. sample_checkpoints/checkpoint-1000",
        )
    runfiles.check_complete(folder)
    checkpoints.validate_weights(folder)  # pickle and truncation checks before anything is loaded
    inputs = runfiles.resolve_run_inputs(
        folder,
        domains=domain_data.parse_domain_specs(opts.domains) if opts.domains else None,
        eval_domains=domain_data.parse_domain_specs(opts.eval_domains) if opts.eval_domains else None,
        weights=opts.weights or None,
        batch_size=opts.batch_size,
        seed=opts.seed,
        note=note,
    )
    step = checkpoints.discover(folder)[0].step or 0
    names = inputs.names
    if not names:
        raise CommuteError(
            f"no training domains for {folder}: no --domains and no commute.json next to it",
            hint="pass --domains name=source ... (the data the run trained on)",
        )
    if len(names) < 2:
        raise CommuteError(f"need at least two domains, got {names}", hint="pass --domains a=... b=...")
    held_out = bool(inputs.eval_domains) and set(names) <= set(inputs.eval_domains)
    if opts.eval_domains and not held_out:
        raise CommuteError(
            f"--eval-domains names ({', '.join(inputs.eval_domains)}) differ from the training domains "
            f"({', '.join(names)})",
            hint="give held-out data for exactly the training domains",
        )
    if held_out:
        eval_sources = {n: inputs.eval_domains[n] for n in names}
    else:
        eval_sources = dict(inputs.domains)
        note(
            "note: no held-out data (--eval-domains or the manifest's eval_domains): "
            "evaluating on training data"
        )
    schedule = inputs.schedule
    if schedule is None:
        raise CommuteError(
            f"no weight schedule for {folder}",
            hint="pass --weights " + " ".join(f"{n}={1 / len(names):.2g}" for n in names),
        )
    pair = parse_pair(opts.pair, names)
    limit = max_dw(schedule, step, opts.steps, pair)
    if opts.dw > limit + 1e-12:
        w = schedule.weights_at(step)
        raise CommuteError(
            f"--dw {opts.dw:g} is too large for the weights {names[pair[0]]}={w[names[pair[0]]]:g}, "
            f"{names[pair[1]]}={w[names[pair[1]]]:g}: a weight would leave [0, 1]",
            hint=f"use --dw <= {limit:g}"
            if limit > 0
            else "pick a pair whose weights are both inside (0, 1)",
        )
    has_state = (folder / "optimizer.pt").is_file()
    lrs, source = _learning_rates(opts, folder, step, inputs.manifest, has_state)
    if not has_state:
        note(f"note: {folder} has no optimizer state: the branches use plain SGD at lr {lrs[0]:g}")
    if opts.metric == "adam":
        note(
            "warning: --metric adam is experimental (docs/MATH.md 'Regime of validity'): Adam's frozen "
            "second moments, clipped at 100x their median, as the metric"
        )
    if inputs.tokenizer_path is None:
        raise CommuteError(f"no tokenizer for {folder}", hint="save the tokenizer with the checkpoint")
    for text in pending:
        emit(text)
    return Setup(
        checkpoint=folder,
        step=int(step),
        names=names,
        pair=pair,
        schedule=schedule,
        lrs=lrs,
        lr_source=source,
        has_optimizer_state=has_state,
        batch_size=int(inputs.batch_size or runfiles.DEFAULT_BATCH_SIZE),
        seed=int(inputs.seed or 0),
        train_sources=dict(inputs.domains),
        eval_sources=eval_sources,
        eval_held_out=held_out,
        tokenizer_path=str(inputs.tokenizer_path),
        seq_len=int(inputs.seq_len or runfiles.DEFAULT_SEQ_LEN),
        base_dir=inputs.base_dir,
    )


# ------------------------------------------------------------------------------------------------ branches


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
    blocks = runfiles.load_blocks(setup.train_sources, tokenizer, setup.seq_len, setup.base_dir)
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


def _eval_blocks(setup: Setup, n: int) -> dict[str, torch.Tensor]:
    """The held-out blocks (at most ``n`` per domain, a fixed seeded sample): the same for every branch."""
    tokenizer = checkpoints.load_tokenizer(Path(setup.tokenizer_path))
    out = runfiles.load_blocks(setup.eval_sources, tokenizer, setup.seq_len, setup.base_dir)
    return {k: b if b.shape[0] <= n else sampling.sample_blocks(b, n, 0) for k, b in out.items()}


def _file_sig(path: Path) -> list[Any]:
    return [path.name, path.stat().st_size, path.stat().st_mtime_ns] if path.is_file() else [path.name, None]


def prepare_branches(setup: Setup, opts: ValidateOptions) -> Branches:
    """Load the training state (model, optimizer, positioned streams), build the schedules, eval once."""
    state = load_state(setup, training.resolve_device(opts.device))
    schedules = branch_schedules(
        setup.schedule, setup.step, opts.steps, setup.pair, opts.dw, state.batch_size
    )
    realized = realized_dw(schedules, setup.step, opts.steps, state.batch_size, setup.pair[0])
    eval_blocks = _eval_blocks(setup, opts.eval_samples)
    loss0 = training.evaluate(state.model, eval_blocks)
    for name, value in loss0.items():
        if not math.isfinite(value):
            raise CommuteError(f"non-finite {name} loss at {setup.checkpoint}: the weights are broken")
    payload = [
        VALIDATE_FORMAT,
        str(setup.checkpoint.resolve()),
        [_file_sig(setup.checkpoint / f) for f in ("model.safetensors", "pytorch_model.bin", "optimizer.pt")],
        {n: domain_data.source_fingerprint(s, domain=n) for n, s in setup.train_sources.items()},
        {n: domain_data.source_fingerprint(s, domain=n) for n, s in setup.eval_sources.items()},
        opts.eval_samples,
        setup.seq_len,
        state.batch_size,
        [s.position for s in state.streams],
        {b: s.to_records() for b, s in schedules.items()},
        setup.lrs,
        type(state.optimizer).__name__,
        torch.__version__,
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


def time_one_step(prepared: Branches, lr: float) -> float:
    """Seconds of one training step at this size, measured on a throwaway fork (the second of two steps,
    so that one-time costs do not count)."""
    fork = prepared.state.fork()
    w = [1.0 / len(fork.streams)] * len(fork.streams)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        training.train_step(fork.model, fork.optimizer, fork.streams, w, fork.batch_size, lr)
        if training.model_device(fork.model).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del fork
    return times[-1]


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


# ------------------------------------------------------------------------------------------------ predictions


def _prediction_rows(
    stats: Any, setup: Setup, dw: float, horizon: int, lr: float, confidence: float
) -> dict[str, dict[str, Any]]:
    """The criterion's ``EL^12`` for every target domain from one checkpoint's statistics, through
    ``core.regime.predict_pair`` (the function that makes analyze's rows): ``+dw`` on the pair's first
    domain, ``dt = lr x horizon``."""
    from commute_cli.core.regime import Regime, predict_pair

    w = setup.schedule.weights_at(setup.step)
    wbar = np.array([w[n] for n in setup.names], dtype=np.float64)
    i, j = setup.pair
    found = {}
    for k, target in enumerate(setup.names):
        coefs = np.zeros(len(setup.names))
        coefs[k] = 1.0
        p = predict_pair(
            stats, wbar=wbar, coefs=coefs, i=i, j=j, dw=dw, dt=lr * horizon, confidence=confidence
        )
        found[target] = {
            "pred_el12": p.el.mean,
            "pred_el12_se": p.el.se,
            "pred_t": p.el.t,
            "pred_significant": p.el.significant,
            "in_regime": p.regime.regime != Regime.OUTSIDE,
            "regime": str(p.regime.regime),
            "regime_ratio": p.regime.ratio,
            "pred_bracket": p.bracket.mean,
            "pred_verdict": str(p.verdict),
            "dt": p.dt,
        }
    return found


def predict(setup: Setup, opts: ValidateOptions, dw: float, note: Note) -> tuple[dict[str, dict], str]:
    """The criterion's predicted ``EL_k^12`` for every target k at validate's own ``(dw, --steps, lr)``.

    The checkpoint's statistics come from the shared content-addressed cache (``io.store``) when a
    ``commute analyze`` of the same checkpoint, data and sample settings left them there (``OUT/cache``, or
    ``FROM/cache`` with ``--from``); only otherwise are they computed (and cached for next time). The
    sample is analyze's: the held-out data, ``seq_len`` and ``--samples``/``--blocks`` with seed 0, so the
    defaults of both commands meet in the same cache entry. No nested analysis, no float matching.
    """
    from commute_cli.commands.options import AnalyzeOptions, Inputs
    from commute_cli.commands.stats import checkpoint_stats, prepare_samples
    from commute_cli.commands.stats import resolve_device as _resolve_device
    from commute_cli.core.criterion import choose_plan
    from commute_cli.io import checkpoints

    out = Path(opts.out)
    dirs = [out / "cache"]
    if opts.from_dir is not None:
        dirs += [Path(opts.from_dir) / "cache", Path(opts.from_dir).parent / "cache"]
    sized = {} if opts.samples is None else {"samples": opts.samples}
    aopts = AnalyzeOptions(
        ckpt_dir=setup.checkpoint,
        blocks=opts.blocks,
        metric=opts.metric,
        seed=0,
        confidence=opts.confidence,
        use_cache=opts.use_cache,
        device=str(getattr(opts, "device", "auto")),
        **sized,
    )
    aopts.validate()
    ref = checkpoints.discover(setup.checkpoint)[0]
    tokenizer = checkpoints.load_tokenizer(Path(setup.tokenizer_path))
    seq_len = setup.seq_len
    if seq_len is None:  # analyze's default
        config = checkpoints.read_config(ref)
        seq_len = min(
            256, int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 256))
        )
    inputs = Inputs(
        [ref], list(setup.names), dict(setup.eval_sources), None, tokenizer, setup.tokenizer_path,
        int(seq_len), setup.schedule, [], None,
    )  # fmt: skip
    parts, digest, _provenance = prepare_samples(inputs, aopts)
    K = len(setup.names)
    entry = checkpoint_stats(
        ref, aopts, parts=parts, sample_digest=digest, plan=choose_plan(K, K), coefs=None,
        device=_resolve_device(aopts.device), cache_dirs=dirs,
    )  # fmt: skip
    found = _prediction_rows(entry.stats, setup, dw, opts.steps, setup.lr_mean, opts.confidence)
    how = "read from the statistics cache" if entry.cached else "computed now and cached"
    if opts.from_dir is not None and not entry.cached:
        note(f"note: no cached statistics for {setup.checkpoint} in {opts.from_dir}/: computing them now")
    return found, f"{how} ({entry.file})"


# ------------------------------------------------------------------------------------------------ table


def combine(
    setup: Setup,
    opts: ValidateOptions,
    repeats: Sequence[Mapping[str, Any]],
    predicted: Mapping[str, Mapping[str, Any]],
    loss0: Mapping[str, float],
    dw: float,
) -> pd.DataFrame:
    """One row per target domain k: observed EL^12, EL^21 (mean, SE over repeats) beside the prediction.

    ``obs_sym = (EL^12 + EL^21) / 2`` is the part of the observed effect that the second-order theory says
    is zero (``EL^21 = -EL^12``): large against ``obs_el12`` means higher-order terms or noise dominate.
    """
    i, j = (setup.names[k] for k in setup.pair)
    rows = []
    for k in setup.names:
        el12 = [r["losses"]["12"][k] - r["losses"]["base"][k] for r in repeats]
        el21 = [r["losses"]["21"][k] - r["losses"]["base"][k] for r in repeats]
        m12, se12, sig12 = repeat_summary(el12, opts.confidence)
        m21, se21, sig21 = repeat_summary(el21, opts.confidence)
        msym, sesym, _ = repeat_summary(
            [(a + b) / 2 for a, b in zip(el12, el21, strict=True)], opts.confidence
        )
        p = predicted[k]
        pred12 = float(p["pred_el12"])
        rows.append(
            {
                "step": setup.step,
                "target": k,
                "domain_1": i,
                "domain_2": j,
                "dw": dw,
                "horizon": opts.steps,
                "lr": setup.lr_mean,
                "dt": float(p["dt"]),
                "metric": opts.metric,
                "repeats": len(repeats),
                "loss_ckpt": float(loss0[k]),
                "loss_base": float(np.mean([r["losses"]["base"][k] for r in repeats])),
                "obs_el12": m12,
                "obs_el12_se": se12,
                "obs_el12_significant": sig12,
                "obs_el21": m21,
                "obs_el21_se": se21,
                "obs_el21_significant": sig21,
                "obs_sym": msym,
                "obs_sym_se": sesym,
                "pred_el12": pred12,
                "pred_el12_se": float(p["pred_el12_se"]),
                "pred_el21": -pred12,
                "pred_significant": bool(p["pred_significant"]),
                "pred_bracket": float(p["pred_bracket"]),
                "sign_agree_12": signs_agree(pred12, m12),
                "sign_agree_21": signs_agree(-pred12, m21),
                "ratio_obs_pred": m12 / pred12 if pred12 != 0.0 else math.nan,
                "regime_ratio": float(p["regime_ratio"]),
                "in_regime": bool(p["in_regime"]),
            }
        )
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ run


@dataclass
class ValidateResult:
    table: pd.DataFrame
    run: dict[str, Any]
    repeats: list[dict[str, Any]]
    out: Path


def _stderr_note(text: str) -> None:
    print(text, file=sys.stderr)


def run_validate(
    opts: ValidateOptions,
    *,
    note: Note = _stderr_note,
    on_step: Callable[[], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> ValidateResult:
    """The whole ``validate`` job: resolve, train the branches (cached), predict, combine, write files.

    ``on_start(total_steps)`` is called once with the number of training steps still to run.
    """
    from commute_cli.commands.stats import quiet_libraries
    from commute_cli.io.store import check_writable as _check_writable

    t0 = time.perf_counter()
    quiet_libraries()
    setup = resolve_setup(opts, note)
    out = Path(opts.out)
    _check_writable(out)
    prepared = prepare_branches(setup, opts)
    dw = prepared.realized_dw
    if abs(dw - opts.dw) > 1e-9:
        note(
            f"note: with batch size {prepared.state.batch_size} and {opts.steps} steps the shift realized is "
            f"dw = {dw:.6g} (asked {opts.dw:g}); predicting for the realized one"
        )
    pending = pending_repeats(setup, opts, prepared)
    steps_left = pending * len(BRANCHES) * 2 * opts.steps
    per_step = time_one_step(prepared, setup.lrs[0]) if steps_left else 0.0
    note(cost_line(opts, prepared, pending, steps_left, per_step, setup.seq_len))
    if on_start is not None:
        on_start(steps_left)
    try:
        repeats = observe(setup, opts, prepared, on_step=on_step)
    except KeyboardInterrupt:
        done = opts.repeats - pending_repeats(setup, opts, prepared)
        raise KeyboardInterrupt(
            f"interrupted: {done} of {opts.repeats} repeats finished and are cached in {out}/cache; "
            "run the same command again to resume (finished repeats are not trained again)"
        ) from None
    predicted, source = predict(setup, opts, dw, note)
    table = combine(setup, opts, repeats, predicted, prepared.loss_at_checkpoint, dw)
    run = {
        "command": "validate",
        "format": VALIDATE_FORMAT,
        "commute_version": __version__,
        "argv": sys.argv,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "checkpoint": str(setup.checkpoint),
        "step": setup.step,
        "domains": setup.train_sources,
        "eval_domains": setup.eval_sources,
        "eval_held_out": setup.eval_held_out,
        "eval_blocks": {n: int(b.shape[0]) for n, b in prepared.eval_blocks.items()},
        "pair": [setup.names[k] for k in setup.pair],
        "dw_asked": opts.dw,
        "dw_realized": dw,
        "batch_size": prepared.state.batch_size,
        "optimizer": type(prepared.state.optimizer).__name__
        + ("" if setup.has_optimizer_state else " (no saved state)"),
        "lr_source": setup.lr_source,
        "lr_mean": setup.lr_mean,
        "lr_first_last": [setup.lrs[0], setup.lrs[-1]],
        "stream_seeds": [r["seed"] for r in repeats],
        "schedules": {b: s.to_records() for b, s in prepared.schedules.items()},
        "prediction": source,
        "cache_key": prepared.key,
        "device": str(training.model_device(prepared.state.model)),
        "quick": opts.quick,
        "seconds_per_step": per_step or None,
        "elapsed_seconds": time.perf_counter() - t0,
    }
    payload = {"run": run, "rows": json.loads(table.to_json(orient="records")), "repeats": repeats}
    atomic.write_text(out / "validate.csv", table.to_csv(index=False))
    atomic.write_text(out / "validate.json", json.dumps(payload, indent=2, default=str) + "\n")
    return ValidateResult(table, run, list(repeats), out)


# ------------------------------------------------------------------------------------------------ cost


def cost_line(
    opts: ValidateOptions, prepared: Branches, pending: int, steps_left: int, per_step: float, seq_len: int
) -> str:
    """What the run will cost, said before it starts: steps, sequences and a time from a measured step."""
    batch = prepared.state.batch_size
    if not steps_left:
        return f"validate: all {opts.repeats} repeats are cached; computing the prediction"
    minutes = steps_left * per_step / 60.0
    return (
        f"validate: {pending} repeat(s) x {len(BRANCHES)} branches x {2 * opts.steps} steps = {steps_left} "
        f"training steps of {batch} sequences x {seq_len} tokens ({steps_left * batch} sequences); "
        f"one step measured {per_step:.3g} s, so about {minutes:.1f} min of training"
        + (" (--quick)" if opts.quick else " (--quick: about half)")
        + f", then the prediction (the checkpoint's statistics, from or into {Path(opts.out) / 'cache'})"
    )


__all__ = [
    "BRANCHES",
    "ValidateOptions",
    "ValidateResult",
    "combine",
    "observe",
    "predict",
    "run_branches",
    "run_validate",
]
