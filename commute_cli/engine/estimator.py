"""Unbiased estimates, with honest error bars, of the criterion's inner products at one checkpoint.

This is the statistical heart of ``commute analyze`` (docs/MATH.md "Estimator"). Every quantity the criterion
needs is an inner product of the form ``< D g_k, H_a D g_l >`` (and ``< g_k, D g_l >`` for the first-order
progress used by the regime check). A product of two means taken on the *same* samples is biased by
``tr(H Cov)/n``, which is as large as the signal in LLM training, so each domain's sample is split into
``B`` design blocks of three disjoint parts:

- part 0: gradients ``g_l^(0)`` of the domain whose gradient field is differentiated (``D g_l``);
- part 1: the Hessian-vector products ``H_a^(1) v``;
- part 2: gradients ``g_k^(2)`` that make up the target's gradient ``g_L``.

Every triple product has one factor per part. An HVP needs its vector before it runs, so the HVP of block
``c`` and its vector form a *unit* computed together (``H_a^(1,c) D g_l^(0,c)`` in the pair plan); the
remaining factor is *free*: it is paired with every unit of every block. Hence the raw products
(:class:`Products`) are ``B x B`` tables ``W[d, c]`` = free factor of block ``d`` against unit ``c``; each
entry multiplies three factors measured on three disjoint sets of sequences, so each is unbiased, whatever
``d`` and ``c``.

Two estimators reduce a table to the ``[B, ...]`` per-block values that the rest of the tool reads (their
mean is the estimate, their ``sd / sqrt(B)`` the standard error, Student t with ``B - 1`` degrees of
freedom):

- ``"cross"`` (default): the mean of *all* ``B^2`` entries, with delete-one-block jackknife pseudo-values.
  The noise-only part of a triple product is then averaged over ``B^2`` combinations instead of ``B``;
  at equal gradient and HVP cost it is the lowest-variance unbiased estimator that keeps an exact
  jackknife (docs/MATH.md "Estimator").
- ``"block"``: the diagonal ``W[b, b]``, each block from its own three parts only (the original design).

Two HVP plans give the same per-block numbers (MATH.md "Cost"); the cheaper one is used:

- pair plan (``K(K-1)`` HVPs per block): unit ``H_a^(1,c) D g_l^(0,c)``, free factor ``D g_k^(2,d)``:
  ``W[d, c, k, a, l] = < D g_k^(2,d), H_a^(1,c) D g_l^(0,c) >`` for ``a != l``; any target later;
- target plan (``K*T`` HVPs per block): unit ``H_a^(1,c) u_t^(c)`` with ``u_t = D sum_k c_tk g_k^(2)``, free
  factor ``D g_l^(0,e)``: ``W[e, c, t, a, l] = < H_a^(1,c) u_t^(c), D g_l^(0,e) >``; only the targets fixed
  in advance.

The diagonals of the two plans' tables are the same numbers (symmetry of ``H_a``), so the block estimator
does not depend on the plan. The cross estimator does, within its error bar: the free factor is the
target's gradient in the pair plan and the differentiated gradient in the target plan. Both are unbiased.

Only scalars leave this module: a :class:`CheckpointStats` is a few kilobytes whatever the model size, so it
is what the cache stores and what every later command reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from commute_cli.core.checkpoint_stats import CheckpointStats
from commute_cli.engine import curvature
from commute_cli.engine.freestack import FreeStack
from commute_cli.engine.groups import ParamGroups
from commute_cli.engine.hvp import HVPMethod, hvp
from commute_cli.engine.metric import apply_preconditioner

Tensor = torch.Tensor

# parts of a design block
VEC, HVP, PAIR = 0, 1, 2

#: reductions of a ``B x B`` table of products to per-block values (see the module docstring)
ESTIMATORS = ("cross", "block")


def jackknife_values(W: np.ndarray) -> np.ndarray:
    """Delete-one-block jackknife pseudo-values of the mean of a ``B x B`` table of unbiased products.

    Args:
        W: ``[B, B, ...]``; ``W[d, c]`` pairs the free factor of block ``d`` with the unit of block ``c``
            (trailing axes are independent quantities).

    Returns:
        ``[B, ...]`` values ``p_b = est + (B - 1) (mean_j est_(-j) - est_(-b))`` with ``est`` the mean of
        all ``B^2`` entries and ``est_(-b)`` the mean over ``d != b, c != b`` (block ``b`` deleted from both
        roles). Their mean is exactly ``est``; ``sd(p) / sqrt(B)`` is exactly the jackknife standard error
        ``sqrt((B-1)/B sum_b (est_(-b) - mean_j est_(-j))^2)`` (docs/MATH.md "Estimator"). Linear in ``W``.

    Raises:
        ValueError: fewer than 2 blocks, or the first two axes differ.
    """
    W = np.asarray(W, dtype=np.float64)
    B = W.shape[0]
    if W.ndim < 2 or W.shape[1] != B or B < 2:
        raise ValueError(f"need a [B, B, ...] table with B >= 2, got shape {W.shape}")
    total = W.sum(axis=(0, 1))
    rows = W.sum(axis=1)  # free factor of block b against every unit
    cols = W.sum(axis=0)  # every free factor against the unit of block b
    diag = np.einsum("bb...->b...", W)
    loo = (total - rows - cols + diag) / float((B - 1) ** 2)
    est = total / float(B * B)
    return est + (B - 1) * (loo.mean(axis=0) - loo)


def block_values(W: np.ndarray) -> np.ndarray:
    """``[B, ...]`` per-block values ``W[b, b]`` of a ``[B, B, ...]`` table: each block's own three parts."""
    return np.einsum("bb...->b...", np.asarray(W, dtype=np.float64)).copy()


def reduce_table(W: np.ndarray, estimator: str) -> np.ndarray:
    """``[B, ...]`` per-block values of a ``[B, B, ...]`` table by ``estimator`` ("cross" or "block")."""
    if estimator == "cross":
        return jackknife_values(W)
    if estimator == "block":
        return block_values(W)
    raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")


@dataclass
class Products:
    """Raw products of every (free block, unit block) combination at one checkpoint (float64 numpy).

    Attributes:
        plan: "pair" or "target".
        losses: ``[B, K]`` mean loss of every domain on each block (all three parts).
        first: ``[B, B, K, K]``, ``first[e, d, k, l] = < g_k^(0,e), D g_l^(2,d) >``.
        W: pair plan ``[B, B, K, K, K]``, ``W[d, c, k, a, l] = < D g_k^(2,d), H_a^(1,c) D g_l^(0,c) >``
            (zero on a == l); target plan ``[B, B, T, K, K]``,
            ``W[e, c, t, a, l] = < H_a^(1,c) u_t^(c), D g_l^(0,e) >`` (zero on a == l).
        target_coefs: ``[T, K]`` (target plan) or ``None``.
        seqs_per_part: sequences per part and domain.
        W_groups: ``[B, B, G, ...]`` (only with ``groups``): ``W`` with every inner product summed over one
            parameter group's entries only; ``W_groups.sum(axis=2)`` equals ``W`` (which is computed as that
            sum) to float64 rounding.
        group_labels: the ``G`` labels (``None`` without groups).
    """

    plan: str
    losses: np.ndarray
    first: np.ndarray
    W: np.ndarray
    target_coefs: np.ndarray | None
    seqs_per_part: int
    W_groups: np.ndarray | None = None
    group_labels: list[str] | None = None

    def stats(self, estimator: str = "cross") -> CheckpointStats:
        """The per-block values of ``estimator`` (:func:`reduce_table`) as a :class:`CheckpointStats`.

        The per-group tables, when present, are reduced the same way (the reduction is linear, so the
        groups' per-block values add up to the totals' and their standard errors come from the same design).
        """
        W = reduce_table(self.W, estimator)
        return CheckpointStats(
            plan=self.plan,
            losses=self.losses,
            first=reduce_table(self.first, estimator),
            Q=W if self.plan == "pair" else None,
            M=W if self.plan == "target" else None,
            target_coefs=self.target_coefs,
            seqs_per_part=self.seqs_per_part,
            estimator=estimator,
            groups=None if self.W_groups is None else reduce_table(self.W_groups, estimator),
            group_labels=None if self.group_labels is None else list(self.group_labels),
        )


def estimate_checkpoint(
    model: nn.Module,
    parts: Sequence[Sequence[Sequence[Tensor]]],
    *,
    plan: str,
    target_coefs: np.ndarray | None = None,
    D: Tensor | None = None,
    method: HVPMethod = "rr",
    micro_batch: int = 8,
    loss_fn: curvature.LossFn = curvature.causal_lm_loss,
    on_block: Callable[[int], None] | None = None,
    reduce: curvature.Reduce | None = None,
    hvp_micro_batch: int | None = None,
    offload: bool = False,
    estimator: str = "cross",
    groups: ParamGroups | None = None,
) -> CheckpointStats:
    """Per-block estimates of one checkpoint: :func:`estimate_products` reduced by ``estimator``.

    ``estimator``: "cross" (default; all ``B^2`` combinations, jackknife values) or "block" (each block
    from its own parts). Same arguments, cost and memory as :func:`estimate_products`; ``groups`` adds the
    per-group decomposition (:attr:`CheckpointStats.groups`).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    products = estimate_products(
        model,
        parts,
        plan=plan,
        target_coefs=target_coefs,
        D=D,
        method=method,
        micro_batch=micro_batch,
        loss_fn=loss_fn,
        on_block=on_block,
        reduce=reduce,
        hvp_micro_batch=hvp_micro_batch,
        offload=offload,
        groups=groups,
    )
    return products.stats(estimator)


def estimate_products(
    model: nn.Module,
    parts: Sequence[Sequence[Sequence[Tensor]]],
    *,
    plan: str,
    target_coefs: np.ndarray | None = None,
    D: Tensor | None = None,
    method: HVPMethod = "rr",
    micro_batch: int = 8,
    loss_fn: curvature.LossFn = curvature.causal_lm_loss,
    on_block: Callable[[int], None] | None = None,
    reduce: curvature.Reduce | None = None,
    hvp_micro_batch: int | None = None,
    offload: bool = False,
    groups: ParamGroups | None = None,
) -> Products:
    """Every (free block, unit block) product of one checkpoint (see the module docstring).

    Args:
        model: the checkpoint's model (eval mode, eager attention).
        parts: ``parts[k][b][p]``: token blocks ``[n, T]`` of domain ``k``, design block ``b``, part ``p``.
        plan: "pair" or "target" (:func:`commute_cli.core.criterion.choose_plan`).
        target_coefs: ``[T, K]`` target weights; required for the target plan.
        D: diagonal preconditioner ``[n]`` or ``None`` (Euclidean metric).
        method: "rr" or "fr" HVPs.
        micro_batch: sequences per forward pass.
        on_block: called with the block index after each unit block (progress).
        reduce: data parallelism (engine.distributed): ``parts`` hold this process's slice of
            every part and ``reduce`` sums across processes; every mean is then over all processes' sequences,
            so every process holds the same vectors and computes the same tables.
        hvp_micro_batch: sequences per forward pass of the HVPs (default ``micro_batch``). A
            reverse-on-reverse HVP keeps ~3x the autograd memory of a gradient at the same micro-batch.
        offload: keep the free factors' ``[B*K, n]`` stack in host memory instead of on the model's device
            (``--offload``); dot products still run on the model's device, chunk by chunk.
        groups: a partition of the flat parameter vector (:func:`commute_cli.engine.groups.param_groups`):
            every product of ``W`` is summed over each group's entries alone (the free stack's products run
            segment by segment, :class:`~commute_cli.engine.freestack.FreeStack`) into
            :attr:`Products.W_groups`, and ``W`` is then the sum of its groups (the same float64 chunked
            products, summed in another order: equal to the plain path to float64 rounding). No gradient or
            HVP pass is added; without ``groups`` nothing changes.

    Two phases. (1) The free factor of every block: ``BK`` gradient passes over one part each (part 2 in the
    pair plan, part 0 in the target plan), kept as a ``[B*K, n]`` stack (preconditioned). (2) Per unit block:
    ``K`` gradient passes over the other gradient part (the HVP vectors ``D g_l^(0)`` in the pair plan; the
    target vectors ``u_t`` in the target plan), then ``K`` HVP passes with ``K-1`` (pair) or ``T`` (target)
    vectors each, sharing one forward pass per micro-batch; every HVP is dotted with the whole free stack.
    Gradient and HVP passes are exactly those of the per-block design; only dot products are added.

    Dot products: every unit vector (the unit's gradients for ``first``, the HVP outputs for ``W``) is queued
    on the free stack (:class:`~commute_cli.engine.freestack.FreeStack`) and up to ``2K`` of them are formed
    together, in one float64 GEMM per chunk of the parameter axis; each block's products are complete before
    ``on_block``. ``B^2 K^2 (T + 1)`` (target) or ``B^2 K^3`` (pair) inner products of length ``n``, which
    every entry of the tables needs, and the stack converted to float64 about ``B`` (target) or ``B K / 2``
    (pair) times per checkpoint, not once per unit vector (issue 24; benchmarks/bench_scaling.py).

    Memory: the free stack, ``B K`` parameter-sized float32 vectors (``2K`` in the per-block design; with
    ``offload``, in host memory), plus ``K`` (pair) or ``T`` (target) vectors of the unit in progress, at most
    ``2K`` queued unit vectors besides the HVP call's outputs, and float64 chunk buffers of a fixed size
    (:data:`~commute_cli.engine.freestack.CHUNK_BYTES_CPU`). Why the stack itself must be kept whole:
    docs/DECISIONS.md "The free stack is kept whole".
    """
    K = len(parts)
    B = len(parts[0])
    if plan not in ("pair", "target"):
        raise ValueError(f"unknown plan {plan!r}")
    if plan == "target" and target_coefs is None:
        raise ValueError("the target plan needs target_coefs")
    device = curvature.model_device(model)
    store = torch.device("cpu") if offload else device  # where the free stack lives
    Dd = None if D is None else D.to(device)
    T = 0 if target_coefs is None else int(target_coefs.shape[0])
    losses = np.zeros((B, K, 3))
    first = np.zeros((B, B, K, K))
    W = np.zeros((B, B, K, K, K)) if plan == "pair" else np.zeros((B, B, T, K, K))
    G = 0 if groups is None else groups.n_groups
    Wg = None if groups is None else np.zeros((B, B, G, *W.shape[2:]))
    seqs = int(parts[0][0][VEC].shape[0])
    if reduce is not None:  # this process holds a slice of each part: count every process's sequences
        seqs = round(float(reduce(torch.tensor(float(seqs), dtype=torch.float64, device=device))))
    hvp_mb = micro_batch if hvp_micro_batch is None else hvp_micro_batch
    free_part, unit_part = (PAIR, VEC) if plan == "pair" else (VEC, PAIR)

    def grad(k: int, b: int, p: int) -> Tensor:
        losses[b, k, p], g = curvature.loss_and_grad(model, parts[k][b][p], micro_batch, loss_fn, reduce)
        return g

    # (1) free factors: D g_k^(2,d) (pair) or D g_l^(0,e) (target), row d*K + k
    FREE: FreeStack | None = None
    for d in range(B):
        for k in range(K):
            g = grad(k, d, free_part)
            if FREE is None:
                FREE = FreeStack(
                    B * K,
                    g.shape[0],
                    dtype=g.dtype,
                    store=store,
                    compute=device,
                    segments=None if groups is None else groups.segments,
                    n_groups=max(G, 1),
                    pending_rows=2 * K,
                )
            FREE.set_row(d * K + k, g if Dd is None else apply_preconditioner(Dd, g))  # copies to ``store``
            del g
    assert FREE is not None

    # (2) units: every product with the free stack is queued and formed in batches (engine.freestack);
    # the sinks below only file a [G, m, B*K] block of products into the tables
    def first_row(c: int, ell: int, r: np.ndarray) -> None:  # first[c, d, l, k] = < g_l^(0,c), D g_k^(2,d) >
        first[c, :, ell, :] = r.sum(axis=0)[0].reshape(B, K)

    def first_col(c: int, k: int, r: np.ndarray) -> None:  # first[e, c, l, k] = < D g_l^(0,e), g_k^(2,c) >
        first[:, c, :, k] = r.sum(axis=0)[0].reshape(B, K)

    def pair_w(c: int, a: int, others: list[int], r: np.ndarray) -> None:
        # < D g_k^(2,d), H_a^(1,c) D g_l^(0,c) > for every d, k and l != a; r is [G, K-1, B*K]
        gdots = r.transpose(0, 2, 1).reshape(-1, B, K, K - 1)
        dots = gdots.sum(axis=0)
        for idx, ell in enumerate(others):
            W[:, c, :, a, ell] = dots[:, :, idx]
            if Wg is not None:
                Wg[:, c, :, :, a, ell] = gdots[:, :, :, idx].transpose(1, 0, 2)

    def target_w(c: int, a: int, r: np.ndarray) -> None:
        # < H_a^(1,c) u_t^(c), D g_l^(0,e) > for every t, e and l; r is [G, T, B*K]
        gdots = r.reshape(-1, T, B, K)
        W[:, c, :, a, :] = gdots.sum(axis=0).transpose(1, 0, 2)
        W[:, c, :, a, a] = 0.0
        if Wg is not None:
            Wg[:, c, :, :, a, :] = gdots.transpose(2, 0, 1, 3)
            Wg[:, c, :, :, a, a] = 0.0

    for c in range(B):
        if plan == "pair":
            DX = None  # D g_l^(0,c): the HVP vectors
            for ell in range(K):
                g = grad(ell, c, unit_part)
                if DX is None:
                    DX = g.new_empty((K, g.shape[0]))
                DX[ell] = g if Dd is None else apply_preconditioner(Dd, g)
                # without D the row of DX is g itself: queue the view (DX is not changed in place later)
                FREE.dot(DX[ell : ell + 1] if Dd is None else g.unsqueeze(0), partial(first_row, c, ell))
                del g
            assert DX is not None
            for a in range(K):
                others = [ell for ell in range(K) if ell != a]
                res = hvp(model, parts[a][c][HVP], DX[others], hvp_mb, method, loss_fn, reduce)
                FREE.dot(res.hvps, partial(pair_w, c, a, others))
                losses[c, a, HVP] = res.loss
                del res
            del DX
        else:
            assert target_coefs is not None
            U = None  # u_t = D sum_k c_tk g_k^(2,c)
            for k in range(K):
                g = grad(k, c, unit_part)
                FREE.dot(g.unsqueeze(0), partial(first_col, c, k))
                if U is None:
                    U = g.new_zeros((T, g.shape[0]))
                for t in range(T):
                    if target_coefs[t, k] != 0.0:
                        U[t].add_(g, alpha=float(target_coefs[t, k]))
                del g
            assert U is not None
            if Dd is not None:
                U = apply_preconditioner(Dd, U)
            for a in range(K):
                res = hvp(model, parts[a][c][HVP], U, hvp_mb, method, loss_fn, reduce)
                FREE.dot(res.hvps, partial(target_w, c, a))
                losses[c, a, HVP] = res.loss
                del res
            del U
        FREE.flush()  # this block's products are complete before its progress is reported
        if on_block is not None:
            on_block(c)
    del FREE
    return Products(
        plan=plan,
        losses=losses.mean(axis=2),  # parts have equal sizes
        first=first,
        W=W,
        target_coefs=None if target_coefs is None else np.asarray(target_coefs, dtype=np.float64),
        seqs_per_part=seqs,
        W_groups=Wg,
        group_labels=None if groups is None else list(groups.labels),
    )
