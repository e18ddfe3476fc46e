"""Unbiased per-block estimates of the criterion's inner products at one checkpoint.

This is the statistical heart of ``commute analyze`` (MATH.md "Noise" and "Cost"). Every quantity the
criterion needs is an inner product of the form ``< D g_k, H_a D g_l >`` (and ``< g_k, D g_l >`` for the
first-order progress used by the regime check). A product of two means taken on the *same* samples is
biased by ``tr(H Cov)/n``, which is as large as the signal in LLM training, so each domain's sample is
split into ``B`` design blocks of three disjoint parts:

- part 0: gradients ``g_l^(0)`` of the domain whose gradient field is differentiated (``D g_l``);
- part 1: the Hessian-vector products ``H_a^(1) v``;
- part 2: gradients ``g_k^(2)`` that make up the target's gradient ``g_L``.

Each block gives one estimate made only of its own parts: a product of three independent factors, hence
unbiased; blocks are independent, so their spread is an honest standard error.

Two HVP plans give the same numbers (MATH.md "Cost"); the cheaper one is used:

- pair plan (``K(K-1)`` HVPs per block): ``Q[k, a, l] = < D g_k^(2), H_a^(1) D g_l^(0) >`` for ``a != l``;
  any target ``c`` later gives ``M = sum_k c_k Q[k]`` without new HVPs;
- target plan (``K*T`` HVPs per block): ``M_t[a, l] = < H_a^(1) u_t, D g_l^(0) >`` with
  ``u_t = D sum_k c_tk g_k^(2)``; only the targets fixed in advance. The parts play the same roles as in
  the pair plan, so on the same samples both plans give the same numbers (up to rounding), by symmetry
  of ``H_a``.

Only scalars leave this module: a :class:`CheckpointStats` is a few kilobytes whatever the model size, so it
is what the cache stores and what every later command reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from commute_cli.core.regime import CheckpointStats
from commute_cli.engine import curvature
from commute_cli.engine.metric import apply_preconditioner

Tensor = torch.Tensor

# parts of a design block
VEC, HVP, PAIR = 0, 1, 2


#: entries of the parameter axis per float64 chunk in :func:`_gram` (8 MB per row and chunk on CUDA, 2 on CPU)
_GRAM_CHUNK_CPU = 1 << 18
_GRAM_CHUNK_CUDA = 1 << 20


def _gram(A: Tensor, B: Tensor, compute: torch.device | None = None) -> np.ndarray:
    """``A @ B.T`` accumulated in float64 (dot products of long float32 vectors lose digits otherwise).

    Chunked over the parameter axis: float64 copies of whole ``[K, n]`` stacks would cost ``16 K n`` bytes,
    more than the gradients themselves (1.5 GB for K = 8 and a 12M-parameter model). ``A`` and ``B`` may
    live on different devices (a stack offloaded to host memory against HVPs on the GPU): each chunk is
    moved to ``compute`` (default ``A``'s device), so offloading changes where vectors wait, not the
    arithmetic -- the same chunks are summed in the same order on the same device.
    """
    dev = A.device if compute is None else compute
    out = torch.zeros(A.shape[0], B.shape[0], dtype=torch.float64, device=dev)
    n = A.shape[-1]
    step = _GRAM_CHUNK_CUDA if dev.type == "cuda" else _GRAM_CHUNK_CPU
    for start in range(0, n, step):
        a = A[:, start : start + step].to(dev, non_blocking=True).double()
        b = B[:, start : start + step].to(dev, non_blocking=True).double()
        out += a @ b.T
    return out.cpu().numpy()


def estimate_checkpoint(
    model: nn.Module,
    parts: Sequence[Sequence[Sequence[Tensor]]],
    *,
    plan: str,
    target_coefs: np.ndarray | None = None,
    D: Tensor | None = None,
    method: str = "rr",
    micro_batch: int = 8,
    loss_fn: curvature.LossFn = curvature.causal_lm_loss,
    on_block: Callable[[int], None] | None = None,
    reduce: curvature.Reduce | None = None,
    hvp_micro_batch: int | None = None,
    offload: bool = False,
) -> CheckpointStats:
    """All per-block inner products of one checkpoint (see the module docstring).

    Args:
        model: the checkpoint's model (eval mode, eager attention).
        parts: ``parts[k][b][p]``: token blocks ``[n, T]`` of domain ``k``, design block ``b``, part ``p``.
        plan: "pair" or "target" (:func:`commute_cli.core.criterion.choose_plan`).
        target_coefs: ``[T, K]`` target weights; required for the target plan.
        D: diagonal preconditioner ``[n]`` or ``None`` (Euclidean metric).
        method: "rr" or "fr" HVPs.
        micro_batch: sequences per forward pass.
        on_block: called with the block index after each block (progress).
        reduce: data parallelism (engine.distributed): ``parts`` hold this process's slice of
            every part and ``reduce`` sums across processes; every mean is then over all processes' sequences.
        hvp_micro_batch: sequences per forward pass of the HVPs (default ``micro_batch``). A
            reverse-on-reverse HVP keeps ~3x the autograd memory of a gradient at the same micro-batch.
        offload: keep the per-block vector stacks (``D g^(0)``, ``g^(2)`` or ``u``) in host memory instead of
            on the model's device; only the vectors of the HVP pass in progress and one gradient are on the
            device. For models whose ``2K`` parameter-sized stacks do not fit next to the model and its
            autograd graph (``--offload``). Same numbers: dot products still run on the model's device.

    Cost per block: ``2K`` gradient passes over one part each, and ``K`` HVP passes with ``K-1`` (pair)
    or ``T`` (target) vectors each; the vectors share one forward pass per micro-batch.

    Memory: ``D g^(0)`` as a ``[K, n]`` stack (``g^(0)`` itself is never needed once preconditioned, since
    ``<g0, D g2> = <D g0, g2>``), ``g^(2)`` as a second ``[K, n]`` stack in the pair plan but streamed into
    ``u_t`` in the target plan, the HVP outputs, and chunked float64 dot products (:func:`_gram`); nothing
    depends on the number of samples.
    """
    K = len(parts)
    B = len(parts[0])
    if plan not in ("pair", "target"):
        raise ValueError(f"unknown plan {plan!r}")
    if plan == "target" and target_coefs is None:
        raise ValueError("the target plan needs target_coefs")
    device = curvature.model_device(model)
    store = torch.device("cpu") if offload else device  # where the [K, n] stacks live
    Dd = None if D is None else D.to(device)
    Ds = None if D is None else D.to(store)
    losses = np.zeros((B, K))
    first = np.zeros((B, K, K))
    Q = np.zeros((B, K, K, K)) if plan == "pair" else None
    T = 0 if target_coefs is None else int(target_coefs.shape[0])
    M = np.zeros((B, T, K, K)) if plan == "target" else None
    seqs = int(parts[0][0][VEC].shape[0])
    if reduce is not None:  # this process holds a slice of each part: count every process's sequences
        seqs = round(float(reduce(torch.tensor(float(seqs), dtype=torch.float64, device=device))))

    hvp_mb = micro_batch if hvp_micro_batch is None else hvp_micro_batch

    for b in range(B):
        DG0: Tensor | None = None  # D g_k^(0): the HVP vectors of the pair plan
        G2: Tensor | None = None  # g_k^(2) (pair plan)
        U: Tensor | None = None  # u_t = D sum_k c_tk g_k^(2) (target plan)
        loss_parts = np.zeros((K, 3))
        for k in range(K):
            loss_parts[k, VEC], g = curvature.loss_and_grad(
                model, parts[k][b][VEC], micro_batch, loss_fn, reduce
            )
            if DG0 is None:
                DG0 = g.new_empty((K, g.shape[0]), device=store)
            DG0[k] = g if Dd is None else apply_preconditioner(Dd, g)  # copies to ``store``
            del g
        assert DG0 is not None
        for ell in range(K):
            loss_parts[ell, PAIR], g = curvature.loss_and_grad(
                model, parts[ell][b][PAIR], micro_batch, loss_fn, reduce
            )
            # <D g_k^(0), g_l^(2)> = <g_k^(0), D g_l^(2)>
            first[b, :, ell] = _gram(DG0, g.unsqueeze(0), compute=device)[:, 0]
            if plan == "pair":
                if G2 is None:
                    G2 = g.new_empty((K, g.shape[0]), device=store)
                G2[ell] = g
            else:
                if U is None:
                    U = g.new_zeros((T, g.shape[0]), device=store)
                g_s = g.to(store)
                for t in range(T):
                    if target_coefs[t, ell] != 0.0:  # type: ignore[index]
                        U[t].add_(g_s, alpha=float(target_coefs[t, ell]))  # type: ignore[index]
                del g_s
            del g
        if plan == "target":
            assert U is not None
            U = apply_preconditioner(Ds, U)

        for a in range(K):
            if plan == "pair":
                assert G2 is not None
                others = [ell for ell in range(K) if ell != a]
                res = curvature.hvp(model, parts[a][b][HVP], DG0[others], hvp_mb, method, loss_fn, reduce)
                # <D g_k^(2), H_a D g_l^(0)> = <g_k^(2), D H_a D g_l^(0)>
                dots = _gram(G2, apply_preconditioner(Dd, res.hvps), compute=device)  # [K, K-1]
                for idx, ell in enumerate(others):
                    Q[b, :, a, ell] = dots[:, idx]  # type: ignore[index]
            else:
                assert U is not None
                res = curvature.hvp(model, parts[a][b][HVP], U, hvp_mb, method, loss_fn, reduce)
                M[b, :, a, :] = _gram(res.hvps, DG0, compute=device)  # type: ignore[index]
                M[b, :, a, a] = 0.0  # type: ignore[index]
            loss_parts[a, HVP] = res.loss
            del res
        losses[b] = loss_parts.mean(axis=1)  # parts have equal sizes
        del DG0, G2, U
        if on_block is not None:
            on_block(b)
    return CheckpointStats(
        plan=plan,
        losses=losses,
        first=first,
        Q=Q,
        M=M,
        target_coefs=None if target_coefs is None else np.asarray(target_coefs, dtype=np.float64),
        seqs_per_part=seqs,
    )
