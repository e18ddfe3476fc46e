"""Batched float64 products against the free stack (``engine.freestack``, issue 24) give the numbers of the
per-vector formula they replaced.

- :class:`FreeStack` alone: queued vectors of several sizes (one larger than the queue), parameter segments,
  chunks far smaller than a segment, against float64 numpy products; the stack is passed over once per
  flush, not once per vector.
- :func:`estimate_products` on a real float32 GPT-2 with K = 4 domains, both plans, a diagonal D and
  parameter groups: every table equals the per-vector formula ``A.double() @ B.double().T`` (the estimator's
  arithmetic before the batching) on the very vectors the estimator computes -- gradients from
  ``curvature.loss_and_grad``, HVPs from ``hvp.hvp`` -- to float64 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from commute_cli.engine import curvature as C
from commute_cli.engine.estimator import HVP, PAIR, VEC, estimate_products
from commute_cli.engine.freestack import FreeStack, gram
from commute_cli.engine.groups import param_groups
from commute_cli.engine.hvp import hvp
from commute_cli.engine.metric import apply_preconditioner

from estimator_population import random_diag, tiny_gpt2


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_queued_products_match_float64_reference_per_segment() -> None:
    R, n = 6, 1000
    segments = [(0, 300, 1), (300, 550, 0), (550, 1000, 2)]
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(R, n, generator=gen)
    stack = FreeStack(
        R,
        n,
        dtype=torch.float32,
        store=torch.device("cpu"),
        compute=torch.device("cpu"),
        segments=segments,
        n_groups=3,
        pending_rows=4,
        chunk_bytes=8 * 10 * 37,  # 37 entries per chunk with 4 queued rows: many chunks per segment
    )
    for i in range(R):
        stack.set_row(i, rows[i])
    got: dict[int, np.ndarray] = {}
    vecs = [torch.randn(m, n, generator=gen) for m in (1, 3, 2, 5)]
    for j, v in enumerate(vecs):
        stack.dot(v, lambda r, j=j: got.__setitem__(j, r.copy()))
    # 1 -> queued; 3 fills the queue (flush 1); 2 queued; 5 does not fit: flush 2, then 5 alone (flush 3)
    assert stack.flushes == 3 and sorted(got) == [0, 1, 2, 3]
    stack.flush()  # nothing queued: no pass over the stack
    assert stack.flushes == 3
    R64 = rows.double().numpy()
    for j, v in enumerate(vecs):
        V64 = v.double().numpy()
        want = np.stack([V64[:, a:b] @ R64[:, a:b].T for a, b, _ in sorted(segments, key=lambda s: s[2])])
        assert got[j].shape == (3, v.shape[0], R)
        assert rel_err(got[j], want) < 1e-13
        assert rel_err(got[j].sum(axis=0), V64 @ R64.T) < 1e-13
        assert rel_err(got[j].sum(axis=0), gram(v, rows)) < 1e-13  # the one-call form agrees
    with pytest.raises(ValueError, match="vectors"):
        stack.dot(torch.zeros(2, n + 1), lambda r: None)
    with pytest.raises(ValueError, match="cover"):
        FreeStack(2, 10, dtype=torch.float32, store=rows.device, compute=rows.device, segments=[(0, 5, 0)])


def test_estimator_equals_per_vector_formula_k4_both_plans_d_and_groups() -> None:
    """K = 4 domains, B = 3 blocks, float32 GPT-2 (two layers, tied embeddings), random D, ``module``
    groups: ``first``, ``W``, ``W_groups`` and the losses of both plans against the per-vector formula."""
    model = tiny_gpt2(n_layer=2).float()
    K, Bb, m = 4, 3, 2
    gen = torch.Generator().manual_seed(11)
    parts = [
        [[torch.randint(0, 16, (m, 8), generator=gen) for _ in range(3)] for _ in range(Bb)] for _ in range(K)
    ]
    n = C.num_params(model)
    D = random_diag(n, seed=2).float()
    coefs = np.array([[0.4, 0.3, 0.2, 0.1], [0.0, 1.0, 0.0, 0.0]])
    T = len(coefs)
    groups = param_groups(model, "module")
    G = groups.n_groups
    masks = [torch.as_tensor(groups.mask(g), dtype=torch.float64) for g in range(G)]

    losses = np.zeros((Bb, K, 3))

    def grad(k: int, b: int, p: int) -> Tensor:
        losses[b, k, p], g = C.loss_and_grad(model, parts[k][b][p], m)
        return g

    def dots(A: list[Tensor], Bm: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``[len(A), rows(Bm)]`` float64 products and their ``[G, ...]`` per-group parts."""
        A64, B64 = torch.stack(A).double(), Bm.double()
        return (A64 @ B64.T).numpy(), np.stack([((A64 * mask) @ B64.T).numpy() for mask in masks])

    g0 = [[grad(k, b, VEC) for k in range(K)] for b in range(Bb)]
    g2 = [[grad(k, b, PAIR) for k in range(K)] for b in range(Bb)]

    # pair plan: free D g_k^(2,d), unit H_a^(1,c) D g_l^(0,c)
    pair = estimate_products(model, parts, plan="pair", D=D, micro_batch=m, groups=groups)
    free = [apply_preconditioner(D, g2[d][k]) for d in range(Bb) for k in range(K)]  # row d*K + k
    W = np.zeros((Bb, Bb, K, K, K))
    Wg = np.zeros((Bb, Bb, G, K, K, K))
    first = np.zeros((Bb, Bb, K, K))
    for c in range(Bb):
        DX = torch.stack([apply_preconditioner(D, g0[c][ell]) for ell in range(K)])
        for a in range(K):
            others = [ell for ell in range(K) if ell != a]
            res = hvp(model, parts[a][c][HVP], DX[others], m)
            losses[c, a, HVP] = res.loss
            full, per_group = dots(free, res.hvps)  # [B*K, K-1]
            for idx, ell in enumerate(others):
                W[:, c, :, a, ell] = full[:, idx].reshape(Bb, K)
                Wg[:, c, :, :, a, ell] = per_group[:, :, idx].reshape(G, Bb, K).transpose(1, 0, 2)
        first[c] = dots(g0[c], torch.stack(free))[0].reshape(K, Bb, K).transpose(1, 0, 2)
    assert pair.W_groups is not None
    assert rel_err(pair.W, W) < 1e-12 and rel_err(pair.W_groups, Wg) < 1e-12
    assert rel_err(pair.first, first) < 1e-12
    assert np.array_equal(pair.losses, losses.mean(axis=2))  # the same passes, bit for bit

    # target plan: free D g_l^(0,e), unit H_a^(1,c) u_t^(c) with u_t = D sum_k c_tk g_k^(2,c)
    target = estimate_products(
        model, parts, plan="target", target_coefs=coefs, D=D, micro_batch=m, groups=groups
    )
    free = [apply_preconditioner(D, g0[e][ell]) for e in range(Bb) for ell in range(K)]  # row e*K + l
    W = np.zeros((Bb, Bb, T, K, K))
    Wg = np.zeros((Bb, Bb, G, T, K, K))
    first = np.zeros((Bb, Bb, K, K))
    for c in range(Bb):
        U = torch.zeros(T, n)
        for k in range(K):
            for t in range(T):
                if coefs[t, k] != 0.0:
                    U[t].add_(g2[c][k], alpha=float(coefs[t, k]))
        U = apply_preconditioner(D, U)
        for a in range(K):
            full, per_group = dots(free, hvp(model, parts[a][c][HVP], U, m).hvps)  # [B*K, T]
            W[:, c, :, a, :] = full.reshape(Bb, K, T).transpose(0, 2, 1)
            Wg[:, c, :, :, a, :] = per_group.reshape(G, Bb, K, T).transpose(1, 0, 3, 2)
            W[:, c, :, a, a] = 0.0
            Wg[:, c, :, :, a, a] = 0.0
        first[:, c] = dots(free, torch.stack(g2[c]))[0].reshape(Bb, K, K)
    assert target.W_groups is not None
    assert rel_err(target.W, W) < 1e-12 and rel_err(target.W_groups, Wg) < 1e-12
    assert rel_err(target.first, first) < 1e-12
    assert np.array_equal(target.losses, losses.mean(axis=2))
