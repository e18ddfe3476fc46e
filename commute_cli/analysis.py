"""``commute analyze``: checkpoints x domains -> per-block statistics -> result rows, with a cache.

The pipeline reads top to bottom:

1. :func:`resolve_inputs` turns arguments (or the manifest next to the checkpoints) into checkpoints,
   domains, tokenizer, schedule and targets, and checks them before any long work (preflight);
2. :func:`prepare_samples` tokenizes each domain once (cached), draws the same sample at every checkpoint
   and splits it into design blocks of three disjoint parts (MATH.md "Noise");
3. :func:`run_analysis` estimates every checkpoint (:mod:`commute_cli.estimator`), caching each finished
   checkpoint's scalars so that an interrupted run resumes where it stopped;
4. :func:`summarize_checkpoint` turns the scalars into rows: bracket, predicted loss change of the stated
   intervention with its standard error, regime check and verdict (pure post-processing, no autograd).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import resource
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from commute_cli import __version__, atomic, checkpoints, criterion, curvature, distributed, domains
from commute_cli.errors import CommuteError
from commute_cli.estimator import CheckpointStats, estimate_checkpoint
from commute_cli.schedule import Schedule, load_schedule, parse_weights

CACHE_FORMAT = "commute-stats/2"  # 2: cross estimator (all block combinations, jackknife)

# Regime of validity (MATH.md): the prediction is a second-order expansion in dt. Its size relative to the
# first-order progress of training over the same window is ~ dt x (curvature along the directions
# involved); when that ratio is not small, or when the first-order progress alone would exceed half the
# loss, the number of nats is meaningless (the sign is kept as a weaker hint). See analysis.regime.
REGIME_MAX_RATIO = 0.25
REGIME_MAX_PROGRESS = 0.5


# ------------------------------------------------------------------------------------------------ options


@dataclass
class AnalyzeOptions:
    """Everything ``commute analyze`` takes; saved to ``run.json`` so a run can be repeated."""

    ckpt_dir: Path
    domains: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    seq_len: int | None = None
    samples: int = 96
    blocks: int = 8
    batch_size: int = 8
    hvp_batch_size: int | None = None  # None: half of batch_size (see hvp_micro_batch)
    weights: list[str] = field(default_factory=list)
    schedule: Path | None = None
    targets: list[str] = field(default_factory=list)
    metric: str = "euclid"
    dw: float | None = None
    horizon: int | None = None
    lr: float | None = None
    hvp: str = "rr"
    plan: str = "auto"
    device: str = "auto"
    offload: str = "auto"  # auto, on, off: vector stacks in host memory (see offload_stacks)
    seed: int = 0
    confidence: float = 0.95
    out: Path = Path("commute_out")
    steps: list[int] | None = None
    every: int | None = None
    use_cache: bool = True
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S  # seconds; only under torchrun (WORLD_SIZE > 1)

    def check_dist_timeout(self) -> None:
        """``--dist-timeout``; :func:`run_analysis` checks it before creating the process group."""
        if not (0.0 < self.dist_timeout <= 1e9):  # nan fails too
            raise CommuteError(
                f"--dist-timeout must be a positive number of seconds (at most 1e9), "
                f"got {self.dist_timeout:g}",
                hint="the default is 1800 (30 minutes); it only matters under torchrun",
            )

    def validate(self) -> None:
        if self.samples < 3 * self.blocks:
            raise CommuteError(
                f"--samples {self.samples} is too small for {self.blocks} blocks of 3 disjoint parts",
                hint=f"use --samples >= {3 * self.blocks} (a multiple of {3 * self.blocks})",
            )
        if self.blocks < 2:
            raise CommuteError(f"--blocks must be at least 2 for an error bar, got {self.blocks}")
        if self.batch_size < 1:
            raise CommuteError(f"--batch-size must be positive, got {self.batch_size}")
        if self.hvp_batch_size is not None and self.hvp_batch_size < 1:
            raise CommuteError(f"--hvp-batch-size must be positive, got {self.hvp_batch_size}")
        if self.seq_len is not None and self.seq_len < 2:
            raise CommuteError(f"--seq-len must be at least 2, got {self.seq_len}")
        if (self.dw is not None and not (0.0 < self.dw <= 0.5)) or (
            self.dw is not None and math.isnan(self.dw)
        ):
            raise CommuteError(f"--dw must be in (0, 0.5], got {self.dw}")
        if self.horizon is not None and self.horizon < 1:
            raise CommuteError(f"--horizon must be a positive number of steps, got {self.horizon}")
        if self.lr is not None and not (self.lr > 0.0 and math.isfinite(self.lr)):
            raise CommuteError(f"--lr must be a positive number, got {self.lr}")
        if not (0.5 <= self.confidence < 1.0):
            raise CommuteError(f"--confidence must be in [0.5, 1), got {self.confidence}")
        if self.metric not in ("euclid", "adam"):
            raise CommuteError(f"--metric must be euclid or adam, got {self.metric!r}")
        if self.hvp not in ("rr", "fr"):
            raise CommuteError(f"--hvp must be rr or fr, got {self.hvp!r}")
        if self.offload not in ("auto", "on", "off"):
            raise CommuteError(f"--offload must be auto, on or off, got {self.offload!r}")
        if self.plan not in ("auto", "pair", "target"):
            raise CommuteError(f"--plan must be auto, pair or target, got {self.plan!r}")
        if self.weights and self.schedule is not None:
            raise CommuteError("give either --weights or --schedule, not both")
        self.check_dist_timeout()


@dataclass
class Target:
    """A target loss ``sum_k c_k L_k``: a domain, the schedule's mixture ("mix"), or custom weights."""

    name: str
    kind: str  # "domain" | "mix" | "custom"
    coefs: np.ndarray | None = None  # fixed weights (None for "mix": the schedule's weights at each step)

    def coefs_at(self, wbar: np.ndarray) -> np.ndarray:
        return wbar if self.coefs is None else self.coefs


@dataclass
class Inputs:
    """Resolved inputs of one analysis."""

    refs: list[checkpoints.CheckpointRef]
    names: list[str]
    sources: dict[str, str]
    base_dir: Path | None
    tokenizer: Any
    tokenizer_path: str
    seq_len: int
    schedule: Schedule
    targets: list[Target]
    manifest: checkpoints.Manifest | None


# ------------------------------------------------------------------------------------------------ inputs


def parse_targets(specs: Sequence[str], names: Sequence[str]) -> list[Target]:
    """``--target`` values: a domain name, ``mix``, or custom weights ``en=0.3,ru=0.7``.

    Default (no ``--target``): every domain and ``mix``.
    """
    if not specs:
        specs = [*names, "mix"]
    out: list[Target] = []
    seen: set[str] = set()
    for raw in specs:
        spec = raw.strip()
        if spec in seen:
            continue
        seen.add(spec)
        if spec == "mix":
            out.append(Target("mix", "mix"))
        elif spec in names:
            c = np.zeros(len(names))
            c[list(names).index(spec)] = 1.0
            out.append(Target(spec, "domain", c))
        elif "=" in spec:
            w = parse_weights(spec, list(names))
            c = np.array([w.get(n, 0.0) for n in names], dtype=np.float64)
            out.append(Target(spec, "custom", c))
        else:
            raise CommuteError(
                f"unknown target {spec!r}",
                hint=f"use a domain name ({', '.join(names)}), mix, or weights like {names[0]}=0.5,...",
            )
    return out


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CommuteError(
            "--device cuda was asked for but no CUDA device is available", hint="use --device cpu"
        )
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise CommuteError(f"unknown device {device!r}", hint="use auto, cpu or cuda")
    return torch.device(device)


def resolve_inputs(opts: AnalyzeOptions) -> Inputs:
    """Checkpoints, domains, tokenizer, schedule and targets, all checked before any long work."""
    opts.validate()
    ckpt_dir = Path(opts.ckpt_dir)
    if not ckpt_dir.exists():
        raise CommuteError(f"checkpoint folder {ckpt_dir} does not exist", hint="check the path")
    refs = checkpoints.select(checkpoints.discover(ckpt_dir), steps=opts.steps, every=opts.every)
    checkpoints.check_compatible(refs)
    for ref in refs:  # preflight: a truncated or corrupt weight file fails now, not hours into the run
        checkpoints.validate_weights(ref.path)
    manifest = checkpoints.read_manifest(ckpt_dir)

    if opts.domains:
        sources = domains.parse_domain_specs(opts.domains)
        base_dir: Path | None = None
    elif manifest is not None and (manifest.eval_domains or manifest.domains):
        # Held-out shards when the manifest has them: population gradients without memorisation bias.
        sources = dict(manifest.eval_domains or manifest.domains)
        base_dir = manifest.root
    else:
        raise CommuteError(
            "no domains given and no commute.json manifest next to the checkpoints",
            hint="pass --domains name=path ... (at least two domains)",
        )
    names = list(sources)
    if len(names) < 2:
        raise CommuteError(f"need at least two domains, got {names}", hint="pass --domains a=... b=...")

    if opts.tokenizer:
        tok_path = opts.tokenizer
    elif manifest is not None and manifest.tokenizer is not None:
        tok_path = str(manifest.tokenizer)
    else:
        tok_path = str(refs[0].path)
    tokenizer = checkpoints.load_tokenizer(Path(tok_path))
    checkpoints.check_tokenizer(tokenizer, checkpoints.read_config(refs[0]))

    seq_len = opts.seq_len or (manifest.seq_len if manifest is not None and manifest.seq_len else None)
    if seq_len is None:
        config = checkpoints.read_config(refs[0])
        seq_len = min(
            256, int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 256))
        )

    if opts.weights:
        schedule = Schedule.constant(parse_weights(opts.weights, names))
    elif opts.schedule is not None:
        schedule = load_schedule(Path(opts.schedule), names)
    elif manifest is not None and manifest.schedule:
        schedule = Schedule.from_records(manifest.schedule, names, context=str(manifest.path))
    else:
        raise CommuteError(
            "no weight schedule: the criterion is evaluated around the schedule the run used",
            hint="pass --weights "
            + " ".join(f"{n}={1 / len(names):.2g}" for n in names)
            + " or --schedule FILE",
        )
    targets = parse_targets(opts.targets, names)
    return Inputs(
        refs, names, sources, base_dir, tokenizer, tok_path, int(seq_len), schedule, targets, manifest
    )


def domain_seed(seed: int, name: str) -> int:
    """Seed of a domain's sample: stable across runs and independent of the other domains' names."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def prepare_samples(inputs: Inputs, opts: AnalyzeOptions, cache_dir: Path) -> tuple[list, str]:
    """Per domain: tokenized blocks (cached), a fixed sample, and its split into design blocks x 3 parts.

    Returns ``parts[k][b][p]`` and a digest of all sampled token ids (part of every cache key).
    """
    parts = []
    h = hashlib.sha256()
    for name in inputs.names:
        blocks = domains.cached_blocks(
            inputs.sources[name],
            inputs.tokenizer,
            inputs.seq_len,
            cache_dir,
            domain=name,
            base_dir=inputs.base_dir,
        )
        n = (opts.samples // (3 * opts.blocks)) * 3 * opts.blocks
        if blocks.shape[0] < n:
            raise CommuteError(
                f"domain {name!r} has {blocks.shape[0]} blocks of {inputs.seq_len} tokens, "
                f"fewer than --samples {opts.samples}",
                hint="add data, lower --samples, or shorten --seq-len",
            )
        sample = domains.sample_blocks(blocks, n, domain_seed(opts.seed, name))
        h.update(name.encode())
        h.update(sample.numpy().tobytes())
        parts.append(domains.split_parts(sample, opts.blocks, 3))
    return parts, h.hexdigest()


# ------------------------------------------------------------------------------------------------ metric


def preconditioner(
    ref: checkpoints.CheckpointRef, model: torch.nn.Module, metric: str
) -> tuple[torch.Tensor | None, dict]:
    """The diagonal metric D of MATH.md: None (Euclidean, the paper's choice) or Adam's, with a safeguard.

    A frozen Adam preconditioner ``1/(sqrt(v_hat)+eps)`` is enormous on coordinates whose second moment is
    ~0 (MATH.md "Regime of validity": predictions 3-5 orders of magnitude too large). Safeguard: ``D`` is
    clipped at 100 x its median, so no coordinate moves more than 100 times faster than a typical one.
    This is experimental: MATH.md found the unclipped metric unusable, and the clipped one has not yet been
    shown to beat the Euclidean metric on real runs.
    """
    if metric == "euclid":
        return None, {}
    state = checkpoints.load_adam_state(ref, model)
    if state is None:
        raise CommuteError(
            f"--metric adam needs Adam's second moments, but {ref.path} has no optimizer state",
            hint="use --metric euclid, or save optimizer.pt with the checkpoints",
        )
    names = [n for n, _ in curvature.param_list(model)]
    v = checkpoints.flat_exp_avg_sq(state, names)
    D = criterion.adam_preconditioner(v, state.step or 1, state.betas[1], state.eps)
    cap = 100.0 * float(D.median())
    clipped = float((cap < D).double().mean())
    D = D.clamp(max=cap)
    return D, {"adam_step": state.step, "clip_cap": cap, "clipped_fraction": clipped}


# ------------------------------------------------------------------------------------------------ cache


def hvp_micro_batch(opts: AnalyzeOptions) -> int:
    """Sequences per forward pass of the HVPs: ``--hvp-batch-size``, by default half of ``--batch-size``.

    A reverse-on-reverse HVP keeps ~3x the autograd memory of a gradient at the same micro-batch
    (benchmarks/bench_analysis.py: 12M GPT-2, 4 x 256 tokens: gradient +650 MB, HVP +1980 MB, HVP at 2
    sequences +1130 MB), so at half the micro-batch the whole analysis stays within ~2x the memory of a
    gradient pass at ``--batch-size``; on CPU the HVP is as fast per sequence at half the micro-batch.
    """
    return opts.hvp_batch_size if opts.hvp_batch_size is not None else max(1, opts.batch_size // 2)


OFFLOAD_FRACTION = 0.25


def offload_stacks(opts: AnalyzeOptions, model: torch.nn.Module, K: int, T: int, plan: str) -> bool:
    """Whether the estimator keeps its stack of free factors in host memory (``--offload``).

    ``auto`` offloads on a GPU when the stack -- ``B K`` parameter-sized float32 vectors, ``B`` = ``--blocks``
    (:func:`commute_cli.estimator.estimate_products`) -- would take more than a quarter of the GPU memory
    still free after loading the model: the rest is needed by the unit's ``K`` (pair) or ``T`` (target)
    vectors and the autograd graph of an HVP (~3x a gradient's). A 1.2B-parameter model with K = 2 and
    B = 8 has 77 GB of stack, so on most cards it goes to host memory; the tiny and small models never do.
    Offloading changes no number (dot products still run on the GPU, in the same chunks) and costs host-device
    copies of the stack for every HVP.
    """
    if opts.offload != "auto":
        return opts.offload == "on"
    device = curvature.model_device(model)
    if device.type != "cuda":
        return False
    n = curvature.num_params(model)
    stacks = opts.blocks * K * n * 4
    free, _total = torch.cuda.mem_get_info(device)
    return stacks > OFFLOAD_FRACTION * free


def _stats_key(
    ref: checkpoints.CheckpointRef,
    opts: AnalyzeOptions,
    plan: str,
    sample_digest: str,
    target_coefs: np.ndarray | None,
    device: torch.device,
    world: int = 1,
) -> str:
    weights = sorted(p for p in ref.path.iterdir() if p.name.startswith(("model", "pytorch_model")))
    files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
    if opts.metric == "adam":
        files += [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in ref.path.glob("optimizer*")]
    payload = [
        CACHE_FORMAT,
        str(ref.path.resolve()),
        files,
        sample_digest,
        opts.blocks,  # the same sample split into a different number of design blocks gives other statistics
        opts.metric,
        opts.hvp,
        plan,
        opts.batch_size,
        hvp_micro_batch(opts),
        None if target_coefs is None else np.round(target_coefs, 12).tolist(),
        device.type,
    ]
    if world > 1:  # other summation order: equal to float32 rounding, not bit for bit
        payload.append(f"world={world}")
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:24]


def weights_digest(folder: Path) -> str:
    """SHA-256 over a checkpoint's weight files (names and contents), recorded in ``run.json`` so a result
    can be traced to the exact weights. Streams the files: I/O-bound, ~1 s per GB."""
    h = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.is_file() and file.name.startswith(("model", "pytorch_model")):
            h.update(file.name.encode() + b"\0")
            with file.open("rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()


def _load_cached(file: Path) -> CheckpointStats | None:
    from safetensors import safe_open
    from safetensors.numpy import load_file

    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="numpy") as fh:
            meta = fh.metadata() or {}
        arrays = load_file(str(file))
        return CheckpointStats.from_arrays(
            meta["plan"], arrays, int(meta["seqs_per_part"]), meta.get("estimator", "cross")
        )
    except Exception:  # a damaged entry is recomputed, never trusted
        return None


def _save_cached(file: Path, stats: CheckpointStats, meta: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in stats.to_arrays().items()}
    with atomic.replacing(file) as tmp:
        save_file(
            arrays,
            tmp,
            metadata={
                **meta,
                "plan": stats.plan,
                "seqs_per_part": str(stats.seqs_per_part),
                "estimator": stats.estimator,
            },
        )


# ------------------------------------------------------------------------------------------------ preview


def preview(opts: AnalyzeOptions) -> dict[str, Any]:
    """What ``commute analyze`` would run, before the long work (``--dry-run``).

    Resolves and checks every input as the real run does, counts the gradient and HVP passes
    (:func:`commute_cli.power.analysis_cost`), and times two gradients of one micro-batch of random tokens on
    the first checkpoint (the second is kept) to estimate the compute time. Nothing is sampled, cached or
    written. Returns the numbers as a dict (``seconds_per_gradient_sequence``, ``estimated_seconds``, the
    :class:`~commute_cli.power.Cost` fields, ``checkpoints``, ``plan``, ``domains``, ``targets``).
    """
    from commute_cli import power

    quiet_libraries()
    inputs = resolve_inputs(opts)
    K, T = len(inputs.names), len(inputs.targets)
    plan = criterion.choose_plan(K, T) if opts.plan == "auto" else opts.plan
    cost = power.analysis_cost(opts.samples, opts.blocks, K, plan, n_targets=T, checkpoints=len(inputs.refs))
    device = _resolve_device(opts.device)
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
    }


# ------------------------------------------------------------------------------------------------ rows


def default_horizon(steps: Sequence[int | None], index: int) -> int:
    """Half the spacing to the next checkpoint (the previous one for the last); 1 when unknown."""
    known = [s for s in steps if s is not None]
    if len(known) < 2 or steps[index] is None:
        return 1
    s = steps[index]
    nxt = [t for t in known if t > s]
    prv = [t for t in known if t < s]
    spacing = (min(nxt) - s) if nxt else (s - max(prv))
    return max(1, spacing // 2)


def regime_horizon(
    stats: CheckpointStats,
    *,
    wbar: np.ndarray,
    targets: Sequence[Target],
    pairs: Sequence[tuple[int, int, float]],
    lr: float,
    horizon: int,
) -> int:
    """The longest horizon <= ``horizon`` at which every (target, pair) prediction is inside the regime.

    Both regime quantities scale exactly with the horizon h (see :func:`regime`: the ratio ~ h, the
    progress ~ h), so the bound is solved in closed form; one horizon per checkpoint keeps the targets'
    numbers comparable. Never below 1 step; a prediction still outside at 1 step is flagged, not hidden.
    """
    best = horizon
    mix_rate = float(stats.first_order(wbar, wbar).mean())
    mix_loss = float((stats.losses @ wbar).mean())
    dt = lr * horizon
    for target in targets:
        Mb = stats.interaction(target.coefs_at(wbar))
        for i, j, pair_dw in pairs:
            el = float(_el_unit(Mb, wbar, i, j, pair_dw).mean()) * dt * dt
            ratio, progress, _ = regime(el, mix_rate, mix_loss, dt)
            if math.isinf(ratio):
                return 1
            if ratio > REGIME_MAX_RATIO:
                best = min(best, math.floor(horizon * REGIME_MAX_RATIO / ratio))
            if progress > REGIME_MAX_PROGRESS * mix_loss:
                best = min(best, math.floor(horizon * REGIME_MAX_PROGRESS * mix_loss / progress))
    return max(1, best)


def regime(el: float, mix_rate: float, mix_loss: float, dt: float) -> tuple[float, float, bool]:
    """Is a prediction inside the local regime? Returns ``(ratio, progress, inside)``.

    The prediction is the second-order term of an expansion in dt (MATH.md "Regime of validity"). Its
    size against the first-order progress of training in the same window,
    ``ratio = |EL| / (2 dt <gbar, D gbar>)``, is ~ dt x (curvature along the directions involved): when it
    is not small, higher orders matter and the nats are meaningless. The denominator is the training
    mixture's own first-order decrease rate ``<gbar, D gbar> >= 0``, well estimated and never near zero
    while training makes progress (a target's own progress can cross zero and would make the ratio
    noise). Also outside: a first-order progress ``2 dt <gbar, D gbar>`` above ``REGIME_MAX_PROGRESS`` of
    the mixture loss (a linear prediction that eats half the loss cannot be local). A non-positive
    progress rate (converged or noise) leaves no scale to compare with: outside.
    """
    progress = 2.0 * dt * mix_rate
    if progress <= 0.0:
        return math.inf, progress, False
    ratio = abs(el) / progress
    inside = ratio <= REGIME_MAX_RATIO and progress <= REGIME_MAX_PROGRESS * mix_loss
    return ratio, progress, inside


def _el_unit(Mb: np.ndarray, wbar: np.ndarray, i: int, j: int, dw: float) -> np.ndarray:
    """Per-block ``EL^{ij}`` at ``dt = 1`` (it scales as dt^2): ``sum C[a, l] M[a, l]`` (MATH.md)."""
    d = np.zeros(len(wbar))
    d[i], d[j] = dw, -dw
    C = criterion.pair_coefficients(torch.as_tensor(wbar, dtype=torch.float64), torch.as_tensor(d)).numpy()
    return np.einsum("al,bal->b", C, Mb)


def pair_list(wbar: np.ndarray, dw: float | None) -> list[tuple[int, int, float]]:
    """Unordered pairs ``i < j`` with their intervention size: ``--dw`` or half the smaller weight (the
    proof of Corollary 3.2(b)); with a zero weight, half the other one, so the bracket's sign is still
    reported (the verdict is then 'consistent': no admissible intervention)."""
    out = []
    K = len(wbar)
    for i in range(K):
        for j in range(i + 1, K):
            pair_dw = dw if dw is not None else 0.5 * min(wbar[i], wbar[j])
            if pair_dw <= 0.0:
                pair_dw = 0.5 * max(wbar[i], wbar[j])
            out.append((i, j, float(pair_dw)))
    return out


def summarize_checkpoint(
    stats: CheckpointStats,
    *,
    step: int | None,
    names: Sequence[str],
    wbar: np.ndarray,
    targets: Sequence[Target],
    lr: float,
    horizon: int,
    dw: float | None,
    confidence: float,
) -> list[dict[str, Any]]:
    """Rows of ``results.csv`` for one checkpoint: one per (target, unordered domain pair ``i < j``).

    For each pair the intervention is ``d = +dw`` on i, ``-dw`` on j around ``wbar`` for ``horizon`` steps
    each way (dt = lr x horizon, MATH.md "Notation"); ``el_ij`` is the predicted ``EL^{ij}`` in nats
    (negative: moving i earlier and j later lowers the target), ``bracket`` the (preconditioned) bracket
    ``< D g_L, H_j D g_i - H_i D g_j >``. Significance is tested on ``el_ij``'s per-block estimates.

    Regime of validity: see :func:`regime` (``regime_ratio``, ``first_order`` = the mixture's first-order
    progress ``2 dt <gbar, D gbar>`` over the window, ``in_regime``).
    """
    rows: list[dict[str, Any]] = []
    dt = lr * horizon
    mix_rate = float(stats.first_order(wbar, wbar).mean())  # <gbar, D gbar>: training's own progress rate
    mix_loss = float((stats.losses @ wbar).mean())
    for target in targets:
        c = target.coefs_at(wbar)
        Mb = stats.interaction(c)  # [B, K, K]
        target_loss = float((stats.losses @ c).mean())
        for i, j, pair_dw in pair_list(wbar, dw):
            el = criterion.summarize_blocks(_el_unit(Mb, wbar, i, j, pair_dw) * dt * dt, confidence)
            br = criterion.summarize_blocks(Mb[:, j, i] - Mb[:, i, j], confidence)
            ratio, progress, inside = regime(el.mean, mix_rate, mix_loss, dt)
            wi, wj = float(wbar[i]), float(wbar[j])
            rows.append(
                {
                    "step": step,
                    "target": target.name,
                    "domain_i": names[i],
                    "domain_j": names[j],
                    "w_i": wi,
                    "w_j": wj,
                    "target_loss": target_loss,
                    "bracket": br.mean,
                    "bracket_se": br.se,
                    "el_ij": el.mean,
                    "el_se": el.se,
                    "t": el.t,
                    "t_crit": el.t_crit,
                    "significant": el.significant,
                    "dw": pair_dw,
                    "horizon": horizon,
                    "lr": lr,
                    "dt": dt,
                    "first_order": progress,
                    "regime_ratio": ratio,
                    "in_regime": inside,
                    "verdict": criterion.verdict(el.significant, wi, wj),
                    "direction": criterion.direction_words(el.mean, names[i], names[j])
                    if el.significant
                    else "",
                    "n_blocks": stats.n_blocks,
                }
            )
    return rows


def loss_rows(
    stats: CheckpointStats, step: int | None, names: Sequence[str], confidence: float
) -> list[dict]:
    rows = []
    for k, name in enumerate(names):
        s = criterion.summarize_blocks(stats.losses[:, k], confidence)
        rows.append({"step": step, "domain": name, "loss": s.mean, "loss_se": s.se})
    return rows


# ------------------------------------------------------------------------------------------------ run


@dataclass
class AnalysisResult:
    results: pd.DataFrame
    losses: pd.DataFrame
    run: dict[str, Any]
    out: Path


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".probe-", dir=out)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise CommuteError(
            f"output folder {out} is not writable ({err.strerror})", hint="pass --out DIR"
        ) from err


def _peak_rss_mb() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 1024.0 if sys.platform != "darwin" else ru / 2**20


def run_analysis(
    opts: AnalyzeOptions,
    *,
    on_checkpoint_start: Callable[[int, checkpoints.CheckpointRef, int, bool], None] | None = None,
    on_block: Callable[[int], None] | None = None,
) -> AnalysisResult:
    """The whole ``analyze`` job. Progress callbacks let the CLI draw bars without this module knowing.

    Under torchrun (``WORLD_SIZE > 1``) every rank runs this with the same options: each takes a slice
    of every part and sums through ``torch.distributed`` (:mod:`commute_cli.distributed`); rank 0 alone
    reads the data, reads and writes the cache and the outputs, and calls the progress callbacks.
    """
    t0 = time.perf_counter()
    quiet_libraries()
    try:
        opts.check_dist_timeout()
    except CommuteError as err:  # every rank has the same options: print it once
        err.silent = not distributed.is_main_process()  # type: ignore[attr-defined]
        raise
    ctx, device = distributed.setup(_resolve_device(opts.device), timeout_s=opts.dist_timeout)
    try:
        return _run_analysis(opts, ctx, device, t0, on_checkpoint_start, on_block)
    finally:
        ctx.close()


def _run_analysis(
    opts: AnalyzeOptions,
    ctx: distributed.DistContext,
    device: torch.device,
    t0: float,
    on_checkpoint_start: Callable[[int, checkpoints.CheckpointRef, int, bool], None] | None,
    on_block: Callable[[int], None] | None,
) -> AnalysisResult:
    if not ctx.is_main:
        on_checkpoint_start = on_block = None
    inputs = ctx.agree(lambda: resolve_inputs(opts))
    assert inputs is not None
    out = Path(opts.out)
    ctx.agree(lambda: _check_writable(out), main_only=True)
    cache_dir = out / "cache"
    # Tokenized once per run (and cached across runs) by rank 0; the sample goes to the other ranks.
    prepared = ctx.broadcast(ctx.agree(lambda: prepare_samples(inputs, opts, cache_dir), main_only=True))
    assert prepared is not None
    parts, sample_digest = prepared
    local_parts = [[[ctx.shard(p) for p in blk] for blk in dom] for dom in parts]
    K, T = len(inputs.names), len(inputs.targets)
    plan = criterion.choose_plan(K, T) if opts.plan == "auto" else opts.plan
    steps = [r.step for r in inputs.refs]

    result_rows: list[dict] = []
    loss_table: list[dict] = []
    per_ckpt: list[dict] = []
    for idx, ref in enumerate(inputs.refs):
        step = ref.step if ref.step is not None else 0
        wbar = np.array([inputs.schedule.weights_at(step)[n] for n in inputs.names], dtype=np.float64)
        coefs = np.stack([t.coefs_at(wbar) for t in inputs.targets]) if plan == "target" else None
        lr = opts.lr if opts.lr is not None else checkpoints.learning_rate(ref)
        if lr is None:
            raise CommuteError(
                f"no learning rate for {ref.name}: trainer_state.json has none logged",
                hint="pass --lr (the learning rate around these checkpoints)",
            )
        key = _stats_key(ref, opts, plan, sample_digest, coefs, device, ctx.world)
        entry = cache_dir / f"stats-{ref.name}-{key}.safetensors"
        stats = ctx.broadcast(_load_cached(entry) if opts.use_cache and ctx.is_main else None)
        if on_checkpoint_start is not None:
            on_checkpoint_start(idx, ref, opts.blocks, stats is not None)
        extra: dict[str, Any] = {}
        if stats is None:
            tc = time.perf_counter()
            # every rank loads its own copy; a failure on any rank stops all of them
            model = ctx.agree(lambda ref=ref: checkpoints.load_model(ref, device=device))
            metric = ctx.agree(lambda ref=ref, model=model: preconditioner(ref, model, opts.metric))
            assert model is not None and metric is not None
            D, extra = metric
            offload = offload_stacks(opts, model, K, T, plan)
            extra["offload"] = offload
            stats = estimate_checkpoint(
                model,
                local_parts,
                plan=plan,
                target_coefs=coefs,
                D=D,
                method=opts.hvp,
                micro_batch=opts.batch_size,
                hvp_micro_batch=hvp_micro_batch(opts),
                offload=offload,
                on_block=on_block,
                reduce=ctx.reduce_fn(),
            )
            del model, D
            extra["seconds"] = time.perf_counter() - tc
            meta = {"checkpoint": str(ref.path), "format": CACHE_FORMAT}
            ctx.agree(
                lambda entry=entry, stats=stats, meta=meta: _save_cached(entry, stats, meta), main_only=True
            )
        if not np.all(np.isfinite(stats.losses)):
            raise CommuteError(
                f"non-finite loss at {ref.name} (nan or inf): the checkpoint's weights are broken",
                hint="check the checkpoint, or leave it out with --steps",
                exit_code=2,
            )
        if opts.horizon is not None:
            horizon = opts.horizon
        else:
            horizon = regime_horizon(
                stats,
                wbar=wbar,
                targets=inputs.targets,
                pairs=pair_list(wbar, opts.dw),
                lr=float(lr),
                horizon=default_horizon(steps, idx),
            )
        result_rows += summarize_checkpoint(
            stats,
            step=ref.step,
            names=inputs.names,
            wbar=wbar,
            targets=inputs.targets,
            lr=float(lr),
            horizon=horizon,
            dw=opts.dw,
            confidence=opts.confidence,
        )
        loss_table += loss_rows(stats, ref.step, inputs.names, opts.confidence)
        per_ckpt.append(
            {
                "name": ref.name,
                "step": ref.step,
                "lr": lr,
                "cache": entry.name,
                "weights_sha256": weights_digest(ref.path),
                **extra,
            }
        )

    results = pd.DataFrame(result_rows)
    losses = pd.DataFrame(loss_table)
    run = {
        "command": "analyze",
        "commute_version": __version__,
        "argv": sys.argv,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "versions": _versions(),
        "domains": {n: inputs.sources[n] for n in inputs.names},
        "data_base_dir": None if inputs.base_dir is None else str(inputs.base_dir),
        "data_sha256": {
            n: domains.source_fingerprint(inputs.sources[n], domain=n, base_dir=inputs.base_dir)
            for n in inputs.names
        },
        "tokenizer": inputs.tokenizer_path,
        "seq_len": inputs.seq_len,
        "targets": [{"name": t.name, "kind": t.kind} for t in inputs.targets],
        "schedule": json.loads(inputs.schedule.to_json()),
        "plan": plan,
        "estimator": "cross",  # every block combination, jackknife SE (docs/math_estimator.md)
        "hvps_per_block": criterion.plan_hvp_count(K, T)[plan],
        "samples_per_domain": int(sum(p.shape[0] for blk in parts[0] for p in blk)),
        "sample_digest": sample_digest,
        "device": str(device),
        "world_size": ctx.world,
        "hvp_batch_size": hvp_micro_batch(opts),
        "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "checkpoints": per_ckpt,
        "elapsed_seconds": time.perf_counter() - t0,
        "peak_rss_mb": _peak_rss_mb(),
        "regime": {"max_ratio": REGIME_MAX_RATIO, "max_progress_fraction": REGIME_MAX_PROGRESS},
    }

    def write_outputs() -> None:
        atomic.write_text(out / "results.csv", results.to_csv(index=False))
        atomic.write_text(out / "losses.csv", losses.to_csv(index=False))
        atomic.write_text(out / "run.json", json.dumps(run, indent=2, default=str) + "\n")

    ctx.agree(write_outputs, main_only=True)
    return AnalysisResult(results, losses, run, out)


def quiet_libraries() -> None:
    """transformers' per-load progress bars and config warnings would bury the table; keep errors only."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except Exception:  # pragma: no cover - older datasets
        pass


def _versions() -> dict[str, str]:
    import datasets
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


_STEP_LIST = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*$")


def parse_steps(text: str | None) -> list[int] | None:
    """``--steps 2000,8000``."""
    if text is None:
        return None
    if not _STEP_LIST.match(text):
        raise CommuteError(
            f"--steps must be a comma-separated list of steps, got {text!r}", hint="e.g. --steps 2000,8000"
        )
    return [int(s) for s in text.split(",")]
