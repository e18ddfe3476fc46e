"""Per-checkpoint statistics, shared by ``commute analyze`` and ``commute validate``: the sample, the
metric, and the cached estimate of one checkpoint.

A checkpoint's :class:`~commute_cli.core.checkpoint_stats.CheckpointStats` depend on the weights, the sample
(data, tokenizer, ``seq_len``, ``--samples``, ``--blocks``, ``--seed``), the metric, the HVP plan and
method, the micro-batches and the device type -- not on targets, ``--dw``, ``--horizon`` or the
confidence, which are post-processing (``core.regime``). So every command that needs them at a checkpoint
asks :func:`checkpoint_stats`, which looks them up in the one content-addressed cache (``io.store``)
before computing anything.
"""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import resource
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from commute_cli.commands.options import AnalyzeOptions, Inputs
from commute_cli.core.checkpoint_stats import CheckpointStats
from commute_cli.engine import curvature, distributed, metric
from commute_cli.engine import groups as param_groups
from commute_cli.engine.estimator import HVP, VEC, estimate_checkpoint
from commute_cli.engine.fd_hvp import FD_REFUSE_ERROR, FDAgreement, compare, fd_hvp
from commute_cli.engine.hvp import HVPMethod, hvp
from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints, sampling, store


def domain_seed(seed: int, name: str) -> int:
    """Seed of a domain's sample: stable across runs and independent of the other domains' names."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def prepare_samples(
    inputs: Inputs, opts: AnalyzeOptions, cache_dir: Path | None = None
) -> tuple[list, str, dict[str, dict]]:
    """Per domain: a fixed sample of ``--samples`` blocks and its split into design blocks x 3 parts.

    Each sample is drawn by :func:`commute_cli.io.sampling.sample_domain` with the domain's seed
    (:func:`domain_seed`): a bounded read whose cost does not grow with the corpus, deterministic for the
    same files, tokenizer and seed, so a resumed run gets the same sample. Returns ``parts[k][b][p]``, a
    digest of all sampled token ids (part of every statistics cache key) and each domain's provenance (which
    shards and rows the sample came from; written to ``run.json``). ``cache_dir`` is unused: the sample is
    cheaper to draw than a cache of whole tokenized domains was to check.
    """
    del cache_dir
    parts = []
    provenance: dict[str, dict] = {}
    h = hashlib.sha256()
    n = opts.samples_used  # rounded down to whole design blocks (opts.samples_note says so)
    for name in inputs.names:
        drawn = sampling.sample_domain(
            inputs.sources[name],
            inputs.tokenizer,
            inputs.seq_len,
            n,
            domain_seed(opts.seed, name),
            domain=name,
            base_dir=inputs.base_dir,
            text_field=inputs.text_fields.get(name),
        )
        h.update(name.encode())
        h.update(drawn.blocks.numpy().tobytes())
        parts.append(sampling.split_parts(drawn.blocks, opts.blocks, 3))
        provenance[name] = drawn.provenance
    return parts, h.hexdigest(), provenance


# ------------------------------------------------------------------------------------------------ stats


def checkpoint_metric(
    ref: checkpoints.CheckpointRef, model: torch.nn.Module, name: str
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """The diagonal metric ``D`` for one checkpoint (``engine.metric``): None for ``euclid``; for ``adam``,
    the checkpoint's second moments (read here, the IO side) through :func:`metric.adam_metric`."""
    if name == "euclid":
        return None, {}
    state = checkpoints.load_adam_state(ref, model)
    if state is None:
        raise CommuteError(
            f"--metric adam needs Adam's second moments, but {ref.path} has no optimizer state",
            hint="use --metric euclid, or save optimizer.pt with the checkpoints",
        )
    v = checkpoints.flat_exp_avg_sq(state, [n for n, _ in curvature.param_list(model)])
    return metric.adam_metric(v, state.step or 1, state.betas[1], state.eps)


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
    (:func:`~engine.estimator.estimate_products`) -- would take more than a quarter of the GPU memory
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


def stats_key(
    ref: checkpoints.CheckpointRef,
    opts: AnalyzeOptions,
    plan: str,
    sample_digest: str,
    target_coefs: np.ndarray | None,
    device: torch.device,
    world: int = 1,
) -> str:
    """Content key of a checkpoint's statistics: everything that determines them, nothing that does not
    (targets, ``--dw``, ``--horizon`` and the confidence are post-processing; docs/DECISIONS.md)."""
    files = [store.file_signature(p) for p in checkpoints.weight_files(ref)]
    if opts.metric == "adam" and ref.path.is_dir():  # a nanoGPT ckpt.pt holds its optimizer in the same file
        for p in sorted(ref.path.glob("optimizer*")):  # a file, or a DCP folder (FSDP's optimizer_0/)
            files += [store.file_signature(f) for f in (sorted(p.iterdir()) if p.is_dir() else [p])]
    payload = [
        store.CACHE_FORMAT,
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
    if opts.decompose is not None:  # per-group tables stored beside the totals (which are unchanged)
        payload.append(f"decompose={opts.decompose}")
    return store.content_key(payload)


def estimate_model(
    model: torch.nn.Module,
    opts: AnalyzeOptions,
    *,
    parts: list,
    plan: str,
    coefs: np.ndarray | None,
    D: torch.Tensor | None,
    ctx: distributed.DistContext,
    on_block: Callable[[int], None] | None = None,
) -> tuple[CheckpointStats, bool]:
    """The statistics of one model as it is now (``engine.estimator.estimate_checkpoint``) with analyze's
    options: micro-batches, HVP method, offloading (:func:`offload_stacks`), ``--decompose`` groups and the
    data-parallel reduce of ``ctx``. Returns the statistics and whether the stacks were offloaded.

    The one place both ``analyze`` (a loaded checkpoint, :func:`checkpoint_stats`) and ``watch`` (the live
    model of a running trainer, ``commands.watch``) measure a model; ``parts[k][b][p]`` is this process's
    slice of the sample (``[n, seq_len]`` token ids), the model is in eval mode with eager attention.
    """
    offload = offload_stacks(opts, model, len(parts), 0 if coefs is None else len(coefs), plan)
    groups = None if opts.decompose is None else param_groups.param_groups(model, opts.decompose)
    stats = estimate_checkpoint(
        model,
        parts,
        plan=plan,
        target_coefs=coefs,
        D=D,
        method=cast("HVPMethod", opts.hvp),
        micro_batch=opts.batch_size,
        hvp_micro_batch=hvp_micro_batch(opts),
        offload=offload,
        on_block=on_block,
        reduce=ctx.reduce_fn(),
        groups=groups,
    )
    return stats, offload


@dataclass
class StatsEntry:
    """One checkpoint's statistics, where they are cached, and what computing them cost (``run.json``)."""

    stats: CheckpointStats
    file: Path
    cached: bool
    info: dict[str, Any]


def checkpoint_stats(
    ref: checkpoints.CheckpointRef,
    opts: AnalyzeOptions,
    *,
    parts: list,
    sample_digest: str,
    plan: str,
    coefs: np.ndarray | None,
    device: torch.device,
    cache_dirs: Sequence[Path],
    ctx: distributed.DistContext | None = None,
    on_start: Callable[[bool], None] | None = None,
    on_block: Callable[[int], None] | None = None,
    fd_check: bool = False,
) -> StatsEntry:
    """The statistics of one checkpoint: from the first of ``cache_dirs`` that holds them, else estimated
    (and saved to ``cache_dirs[0]``). ``parts[k][b][p]`` is this process's slice of the sample.

    ``on_start(cached)`` is called once it is known whether the cache had them (progress bars).
    With ``--hvp fd`` the model is loaded with fused (SDPA) attention; ``fd_check`` (analyze sets it at the
    first checkpoint it computes) first compares finite-difference products with exact ones
    (:func:`fd_agreement`), stores the comparison in ``info["fd_check"]`` and refuses a poor one.
    """
    ctx = ctx or distributed.DistContext()
    key = stats_key(ref, opts, plan, sample_digest, coefs, device, ctx.world)
    file = store.stats_file(cache_dirs[0], ref.name, key)
    found = None
    if opts.use_cache and ctx.is_main:
        for folder in cache_dirs:
            found = store.load_stats(store.stats_file(folder, ref.name, key))
            if found is not None:
                file = store.stats_file(folder, ref.name, key)
                break
    found = ctx.broadcast(found)
    if on_start is not None:
        on_start(found is not None)
    if found is not None:
        stats, meta = found
        info = json.loads(meta.get("info", "{}"))
        file = Path(ctx.broadcast(str(file)))
        if "weights_sha256" not in info and ctx.is_main:  # an entry written before digests were stored
            info["weights_sha256"] = store.weights_digest(checkpoints.weight_files(ref))
        return StatsEntry(stats, file, True, info)
    tc = time.perf_counter()
    # every rank loads its own copy; a failure on any rank stops all of them
    attn = "sdpa" if opts.hvp == "fd" else "eager"  # fused attention only where no double backward is taken
    model = ctx.agree(lambda: checkpoints.load_model(ref, device=device, attn_implementation=attn))
    assert model is not None  # agree() raises on every rank when any rank failed
    got = ctx.agree(functools.partial(checkpoint_metric, ref, model, opts.metric))
    assert got is not None
    D, info = got
    if opts.hvp == "fd":
        info = {**info, "attn_implementation": attn}
    if opts.hvp == "fd" and fd_check:
        agreement = fd_agreement(ref, model, parts, opts, device, D, ctx.reduce_fn())
        info = {**info, "fd_check": agreement.as_dict()}
        if agreement.verdict == "refuse":
            raise CommuteError(
                f"finite-difference HVPs (--hvp fd) disagree with exact ones at {ref.name}: relative error "
                f"{agreement.max_rel_error:.2g} (refused above {FD_REFUSE_ERROR:g}), cosine "
                f"{agreement.min_cosine:.6f}",
                hint="use the exact path: --hvp rr (eager attention, float32)",
            )
    stats, offload = estimate_model(model, opts, parts=parts, plan=plan, coefs=coefs, D=D, ctx=ctx,
                                    on_block=on_block)  # fmt: skip
    del model, D
    info = {**info, "offload": offload, "seconds": time.perf_counter() - tc}
    if ctx.is_main:
        info["weights_sha256"] = store.weights_digest(checkpoints.weight_files(ref))
    meta = {"checkpoint": str(ref.path), "info": json.dumps(info)}
    ctx.agree(lambda: store.save_stats(file, stats, meta), main_only=True)
    return StatsEntry(stats, file, False, info)


def fd_agreement(
    ref: checkpoints.CheckpointRef,
    model: torch.nn.Module,
    parts: list,
    opts: AnalyzeOptions,
    device: torch.device,
    D: torch.Tensor | None,
    reduce: curvature.Reduce | None,
) -> FDAgreement:
    """Finite-difference against exact products of the first design block's first unit (pair plan).

    The vectors are ``D g_1^(0)`` and ``D g_0^(0)`` (domains 1 and 0, part 0 of block 0: the vectors the
    analysis itself differentiates), the products ``H_0^(1)`` on domain 0's HVP part of block 0; the exact
    ones by reverse-on-reverse on a second, eager float32 copy of the checkpoint, which also computes the
    vectors (so both paths get the same ones), the finite differences on ``model`` (engine.fd_hvp).
    The exact products run one sequence per pass, the least double-backward memory beside the fd model.
    Costs two gradients, two exact and two finite-difference products, once per analysis.
    """
    exact = checkpoints.load_model(ref, device=device)  # eager, float32
    vectors = []
    for ell in (1, 0):
        _, g = curvature.loss_and_grad(exact, parts[ell][0][VEC], opts.batch_size, reduce=reduce)
        vectors.append(g if D is None else metric.apply_preconditioner(D.to(g.device), g))
    V = torch.stack(vectors)
    blocks = parts[0][0][HVP]
    reference = hvp(exact, blocks, V, 1, "rr", reduce=reduce).hvps  # one sequence: least memory beside fd's
    del exact
    fd = fd_hvp(model, blocks, V, hvp_micro_batch(opts), curvature.causal_lm_loss, reduce, diagnose=True)
    return compare(fd, reference)


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


def versions() -> dict[str, str]:
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


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB)."""
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru / 1024.0 if sys.platform != "darwin" else ru / 2**20
