"""The resummed prediction on a real model: a Krylov projection of the linearized training dynamics from HVPs.

docs/MATH.md "Resummed prediction" derives it; :mod:`~commute_cli.core.resummed_math` holds the arithmetic
on the projection. Here the model enters, only through gradients and Hessian-vector products
(:mod:`~commute_cli.engine.curvature`).

Per design block (the three disjoint parts of MATH.md "Noise", as in :mod:`commute_cli.engine.estimator`):

1. ``b_k = D^{1/2} g_k^(0)`` for every domain (part 0) and ``u_t = D^{1/2} sum_k c_tk g_k^(2)`` for every
   target (part 2);
2. an orthonormal basis ``V`` of the block Krylov space of ``S_bar = D^{1/2} H_bar^(1) D^{1/2}`` started
   from ``[b_1 .. b_K, u_1 .. u_T]``, the Hessians on part 1: each new block of vectors ``W`` costs one HVP
   pass per domain (``S_k W = D^{1/2} H_k (D^{1/2} W)``, all vectors through one forward pass), the next
   block is ``S_bar W = sum_k wbar_k S_k W`` orthogonalized (twice) against ``V``;
3. ``T_k = V S_k V^T``, ``c_k = V b_k``, ``e_t = V u_t``: a few kilobytes, from which every intervention,
   horizon and order is a small dense computation.

Cost: ``K x m`` HVPs per block for a basis of ``m`` vectors (``K = 2``, ``m = 24``: 48 HVPs per block, against
2 for the bracket's pair plan), plus ``2K`` gradients as in ``commute analyze``. Memory: ``(K + 1) m``
parameter-sized vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from commute_cli.core import resummed_math as rm
from commute_cli.engine import curvature
from commute_cli.engine.hvp import HVPMethod, hvp
from commute_cli.errors import CommuteError

VEC, HVP, PAIR = 0, 1, 2


@dataclass
class Projection:
    """One design block's projected linear system (float64 numpy; see :mod:`commute_cli.core.resummed_math`).

    Attributes:
        T: ``[K, m, m]`` ``V S_k V^T`` (symmetrized; ``asym`` is the largest relative asymmetry before that).
        c: ``[K, m]`` ``V b_k``.
        e: ``[n_targets, m]`` ``V u_t``.
        norms: ``[K]`` ``|b_k|`` (to check that ``c`` keeps them: they start the basis).
        hvps: HVPs spent (vectors times domains).
    """

    T: np.ndarray
    c: np.ndarray
    e: np.ndarray
    norms: np.ndarray
    hvps: int
    asym: float = 0.0

    @property
    def m(self) -> int:
        return int(self.T.shape[1])


@dataclass
class ResummedStats:
    """All blocks of one checkpoint: ``blocks[b]`` is a :class:`Projection`; ``target_coefs`` is
    ``[n_targets, K]``."""

    blocks: list[Projection]
    target_coefs: np.ndarray
    wbar: np.ndarray
    meta: dict = field(default_factory=dict)


def _orthonormalize(new: Tensor, basis: list[Tensor], tol: float) -> list[Tensor]:
    """Rows of ``new`` orthonormalized against ``basis`` and each other (classical Gram-Schmidt, twice, dot
    products in float64); rows whose norm falls below ``tol`` times their original norm are dropped."""
    out: list[Tensor] = []
    for row in new:
        v = row.clone()
        n0 = float(v.double().norm())
        if n0 == 0.0:
            continue
        for _ in range(2):
            for q in basis + out:
                v -= float(torch.dot(q.double(), v.double())) * q
        n1 = float(v.double().norm())
        if n1 <= tol * n0:
            continue
        out.append(v / n1)
    return out


def project_block(
    model: nn.Module,
    vec_parts: Sequence[Tensor],
    hvp_parts: Sequence[Tensor],
    pair_parts: Sequence[Tensor],
    *,
    wbar: Sequence[float],
    target_coefs: np.ndarray,
    D: Tensor | None = None,
    m: int = 24,
    micro_batch: int = 8,
    method: HVPMethod = "rr",
    loss_fn: curvature.LossFn = curvature.causal_lm_loss,
    tol: float = 1e-6,
) -> Projection:
    """The projected linear system of one design block (module docstring, steps 1-3).

    Args:
        model: eval mode, eager attention (HVPs need double backward).
        vec_parts, hvp_parts, pair_parts: ``[K]`` token blocks ``[n, T]`` per domain: parts 0, 1, 2.
        wbar: ``[K]`` the schedule's weights at the checkpoint (the Krylov space is ``S_bar``'s).
        target_coefs: ``[n_targets, K]`` targets ``L = sum_k c_k L_k``.
        D: diagonal preconditioner ``[n]`` (None: Euclidean).
        m: basis size (at most; fewer when the Krylov space is exhausted).
    Returns: :class:`Projection`. Raises :class:`CommuteError` for bad shapes (via curvature).
    """
    K = len(vec_parts)
    if len(hvp_parts) != K or len(pair_parts) != K or len(wbar) != K:
        raise CommuteError("project_block: one part per domain and one weight per domain are needed")
    coefs = np.atleast_2d(np.asarray(target_coefs, dtype=np.float64))
    wb = np.asarray(wbar, dtype=np.float64)
    sqrtD = None if D is None else D.sqrt().to(curvature.model_device(model))

    def half(v: Tensor) -> Tensor:
        return v if sqrtD is None else v * sqrtD.to(v.dtype)

    b = torch.stack([half(curvature.loss_and_grad(model, p, micro_batch, loss_fn)[1]) for p in vec_parts])
    g2 = torch.stack([curvature.loss_and_grad(model, p, micro_batch, loss_fn)[1] for p in pair_parts])
    u = half(torch.as_tensor(coefs, dtype=g2.dtype) @ g2)

    basis: list[Tensor] = []
    images: list[list[Tensor]] = [[] for _ in range(K)]  # images[k][i] = S_k V[i]
    block = _orthonormalize(torch.cat([b, u]), basis, tol)
    hvps = 0
    while block and len(basis) < m:
        block = block[: m - len(basis)]
        W = torch.stack(block)
        SW = []
        for k in range(K):
            res = hvp(model, hvp_parts[k], half(W), micro_batch, method, loss_fn)
            SW.append(half(res.hvps))
            hvps += W.shape[0]
        basis += block
        for k in range(K):
            images[k] += list(SW[k])
        nxt = sum(float(wb[k]) * SW[k] for k in range(K))
        block = _orthonormalize(nxt, basis, tol)  # type: ignore[arg-type]  # K >= 2: a Tensor
    V = torch.stack(basis).double()
    T = np.stack([(V @ torch.stack(images[k]).double().T).cpu().numpy() for k in range(K)])
    scale = max(float(np.abs(T).max()), 1e-300)
    asym = float(np.abs(T - T.transpose(0, 2, 1)).max()) / scale
    T = 0.5 * (T + T.transpose(0, 2, 1))
    c = (b.double() @ V.T).cpu().numpy()
    e = (u.double() @ V.T).cpu().numpy()
    norms = b.double().norm(dim=1).cpu().numpy()
    return Projection(T=T, c=c, e=e, norms=norms, hvps=hvps, asym=asym)


def estimate_resummed(
    model: nn.Module,
    parts: Sequence[Sequence[Sequence[Tensor]]],
    *,
    wbar: Sequence[float],
    target_coefs: np.ndarray,
    D: Tensor | None = None,
    m: int = 24,
    micro_batch: int = 8,
    method: HVPMethod = "rr",
    loss_fn: curvature.LossFn = curvature.causal_lm_loss,
    on_block: Callable[[int], None] | None = None,
) -> ResummedStats:
    """:func:`project_block` on every design block; ``parts[k][b][p]`` as in
    ``estimator.estimate_checkpoint``."""
    K, B = len(parts), len(parts[0])
    blocks = []
    for bi in range(B):
        blocks.append(
            project_block(
                model,
                [parts[k][bi][VEC] for k in range(K)],
                [parts[k][bi][HVP] for k in range(K)],
                [parts[k][bi][PAIR] for k in range(K)],
                wbar=wbar,
                target_coefs=target_coefs,
                D=D,
                m=m,
                micro_batch=micro_batch,
                method=method,
                loss_fn=loss_fn,
            )
        )
        if on_block is not None:
            on_block(bi)
    return ResummedStats(blocks, np.atleast_2d(np.asarray(target_coefs, dtype=np.float64)), np.asarray(wbar))


@dataclass
class Prediction:
    """Per-block predicted ``EL^12``/``EL^21`` of one target (``[B]`` each), the bracket's ``EL^12`` on the
    same projection, and the saturation index; means and standard errors over blocks."""

    el12: np.ndarray
    el21: np.ndarray
    bracket12: np.ndarray
    saturation: np.ndarray

    @staticmethod
    def _se(x: np.ndarray) -> float:
        return float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else float("nan")

    def summary(self) -> dict[str, float]:
        return {
            "el12": float(self.el12.mean()),
            "el12_se": self._se(self.el12),
            "el21": float(self.el21.mean()),
            "el21_se": self._se(self.el21),
            "bracket12": float(self.bracket12.mean()),
            "bracket12_se": self._se(self.bracket12),
            "saturation": float(np.median(self.saturation)),
        }


def predict(
    stats: ResummedStats,
    target: int,
    d: Sequence[float],
    dt: float | tuple[float, float],
    *,
    quadratic_target: bool = False,
    discrete_lrs: tuple[Sequence[float], Sequence[float]] | None = None,
    negative: str = "exact",
) -> Prediction:
    """The resummed prediction for target ``target`` (row of ``stats.target_coefs``), shift ``d`` and phase
    time ``dt`` (sum of the learning rates of one phase), per block. ``quadratic_target`` adds the target's
    own curvature term ``1/2 <y, S_L y>`` (``S_L = sum_k c_k S_k``); ``negative``: see
    :data:`commute_cli.core.resummed_math.NEGATIVE`."""
    coefs = stats.target_coefs[target]
    el12, el21, br, sat = [], [], [], []
    dt_mean = float(np.mean(dt)) if isinstance(dt, tuple) else float(dt)
    for p in stats.blocks:
        TL = np.einsum("k,kij->ij", coefs, p.T) if quadratic_target else None
        res = rm.intervention(
            p.T, p.c, p.e[target], stats.wbar, d, dt, TL=TL, discrete_lrs=discrete_lrs, negative=negative
        )
        el12.append(res.el12)
        el21.append(res.el21)
        br.append(rm.bracket_el(p.T, p.c, p.e[target], stats.wbar, d, dt_mean))
        sat.append(rm.saturation(p.T, p.c, p.e[target], stats.wbar, dt_mean).index)
    return Prediction(np.array(el12), np.array(el21), np.array(br), np.array(sat))


__all__ = ["Prediction", "Projection", "ResummedStats", "estimate_resummed", "predict", "project_block"]
