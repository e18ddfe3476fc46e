"""The Lie-bracket criterion as pure functions over vectors.

Everything here works on flat 1-D torch tensors (any float dtype, any device) and small ``[K, K]``
matrices; nothing loads a model or a file. Signs and constants follow ``docs/MATH.md``, which
corrects the paper (summarised there): eq. (6) and eq. (7) disagree in sign, and section 4.1
prints 1/8 where the exact flows give 1/2.

Notation (MATH.md "Notation"):

- ``K`` domains, ``g[k] = grad L_k`` stacked as a ``[K, n]`` tensor, ``H_k = Hess L_k`` (symmetric; only
  ever used through Hessian-vector products computed by the caller);
- ``D``: the diagonal preconditioner as a 1-D ``[n]`` tensor, or ``None`` for the identity (plain
  gradient descent, the paper's Euclidean metric);
- a target ``L = sum_k c_k L_k`` with ``g_L = c @ g``;
- the interaction matrix of one target, ``M[a, b] = < D g_L, H_a D g_b >``.

Every quantity of MATH.md ("What an intervention does to the target") is a fixed antisymmetric linear
combination of the entries of ``M``, so once ``M`` is known (``K(K-1)`` or ``K`` Hessian-vector
products, see :func:`choose_plan`) every intervention and every pair is a dot product.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from commute_cli.errors import CommuteError

Tensor = torch.Tensor
Weights = Sequence[float] | Tensor | np.ndarray

__all__ = [
    "BlockSummary",
    "Verdict",
    "adam_preconditioner",
    "apply_preconditioner",
    "bracket",
    "bracket_value",
    "choose_plan",
    "direction_words",
    "interaction_pair_plan",
    "interaction_target_plan",
    "ordered_pairs",
    "pair_coefficients",
    "plan_hvp_count",
    "predicted_change",
    "summarize_blocks",
    "two_domain_excess",
    "verdict",
]


# --------------------------------------------------------------------------------------------------
# small helpers


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, anything narrower is lifted to float32 (MATH.md
    "Attention and precision": accumulate in float32 even for half-precision checkpoints)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_vector(x: Weights, like: Tensor, name: str, length: int | None = None) -> Tensor:
    v = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(v.shape)}")
    if length is not None and v.shape[0] != length:
        raise ValueError(f"{name} has {v.shape[0]} entries, expected {length}")
    return v


def apply_preconditioner(D: Tensor | None, v: Tensor) -> Tensor:
    """``D v`` for a diagonal preconditioner given as its diagonal (``None`` means the identity).

    Works on a single vector ``[n]`` or a stack ``[..., n]`` (the diagonal broadcasts over the last axis).
    """
    if D is None:
        return v
    if D.ndim != 1 or D.shape[0] != v.shape[-1]:
        raise ValueError(f"preconditioner has shape {tuple(D.shape)}, vectors have length {v.shape[-1]}")
    return D.to(v.dtype) * v


def ordered_pairs(K: int) -> list[tuple[int, int]]:
    """All ordered pairs ``(a, b)`` with ``a != b``: the HVPs ``H_a (D g_b)`` of the pair plan."""
    return [(a, b) for a in range(K) for b in range(K) if a != b]


# --------------------------------------------------------------------------------------------------
# bracket and coefficients


def bracket(hvp_B_gA: Tensor, hvp_A_gB: Tensor) -> Tensor:
    """Lie bracket of two gradient fields, ``R(A, B) = H_B g_A - H_A g_B`` (MATH.md "The bracket").

    This is Theorem 3.1 with the sign fixed by MATH.md: training on A for ``dt`` and then on B for
    ``dt`` ends at ``theta_AB``, and ``theta_AB - theta_BA = dt^2 R(A, B) + o(dt^2)``.

    Args:
        hvp_B_gA: ``Hess(B) @ grad(A)``.
        hvp_A_gB: ``Hess(A) @ grad(B)``.
    """
    return hvp_B_gA - hvp_A_gB


def pair_coefficients(wbar: Weights, d: Weights) -> Tensor:
    """``C[a, b] = wbar_a d_b - d_a wbar_b``: coefficient of ``<D g_L, H_a D g_b>`` in the change.

    From MATH.md "What an intervention does": ``Hbar D g_d - H_d D gbar = sum_{a,b} C[a, b] H_a D g_b``.
    ``C`` is antisymmetric, so the diagonal ``a == b`` never contributes (that is why the interaction
    matrix may leave its diagonal at 0). Returned as float64 on the CPU unless ``wbar`` is a tensor,
    in which case its device and dtype are kept.
    """
    like = wbar if isinstance(wbar, Tensor) else torch.zeros((), dtype=torch.float64)
    w = _as_vector(wbar, like, "wbar")
    dd = _as_vector(d, like, "d", length=w.shape[0])
    return torch.outer(w, dd) - torch.outer(dd, w)


# --------------------------------------------------------------------------------------------------
# interaction matrix: two HVP plans


def interaction_pair_plan(u: Tensor, pair_hvps: Mapping[tuple[int, int], Tensor], K: int) -> Tensor:
    """Interaction matrix from the pair plan (the paper's): ``M[a, b] = < u, H_a (D g_b) >``.

    MATH.md "Cost": ``K(K-1)`` HVPs, one per ordered pair, after which every target is a dot product.

    Args:
        u: ``D g_L`` for the target, ``[n]``.
        pair_hvps: ``pair_hvps[(a, b)] = H_a (D g_b)`` for every ordered ``a != b`` (``[n]`` each).
        K: number of domains (>= 2).

    Returns:
        ``[K, K]`` tensor in the accumulation dtype of ``u`` (float64 stays float64, narrower -> float32).
        The diagonal is 0: its coefficient in every quantity is ``wbar_a d_a - d_a wbar_a = 0``.
    """
    if K < 2:
        raise ValueError(f"need at least 2 domains, got K={K}")
    acc = _acc_dtype(u.dtype)
    uu = u.to(acc)
    M = torch.zeros((K, K), dtype=acc, device=u.device)
    for a, b in ordered_pairs(K):
        if (a, b) not in pair_hvps:
            raise ValueError(f"pair plan is missing H_{a} (D g_{b})")
        M[a, b] = torch.dot(uu, pair_hvps[(a, b)].to(device=u.device, dtype=acc))
    return M


def interaction_target_plan(target_hvps: Tensor | Sequence[Tensor], Dg: Tensor | Sequence[Tensor]) -> Tensor:
    """Interaction matrix from the target plan: ``M[a, b] = < H_a u, D g_b >`` with ``u = D g_L``.

    MATH.md "Cost": by symmetry of ``H_a``, ``<u, H_a D g_b> = <H_a u, D g_b>``, so one target needs only
    ``K`` HVPs ``h_a = H_a u`` (all with the same vector ``u``). Equal to :func:`interaction_pair_plan`
    up to rounding.

    Args:
        target_hvps: ``[K, n]`` (or a sequence of ``K`` vectors), ``target_hvps[a] = H_a u``.
        Dg: ``[K, n]`` (or a sequence), ``Dg[b] = D g_b``.

    Returns:
        ``[K, K]`` tensor with a zero diagonal (see :func:`interaction_pair_plan`).
    """
    h = target_hvps if isinstance(target_hvps, Tensor) else torch.stack(list(target_hvps))
    G = Dg if isinstance(Dg, Tensor) else torch.stack(list(Dg))
    if h.ndim != 2 or G.ndim != 2 or h.shape != G.shape:
        raise ValueError(f"target_hvps {tuple(h.shape)} and Dg {tuple(G.shape)} must both be [K, n]")
    if h.shape[0] < 2:
        raise ValueError(f"need at least 2 domains, got K={h.shape[0]}")
    acc = _acc_dtype(h.dtype)
    M = h.to(acc) @ G.to(device=h.device, dtype=acc).T
    M.fill_diagonal_(0.0)
    return M


def plan_hvp_count(K: int, T: int) -> dict[str, int]:
    """HVPs needed by each plan for ``K`` domains and ``T`` targets: pair ``K(K-1)``, target ``K*T``."""
    return {"pair": K * (K - 1), "target": K * T}


def choose_plan(K: int, T: int) -> Literal["pair", "target"]:
    """The cheaper HVP plan (MATH.md "Cost"): pair if ``K(K-1) <= K*T`` (ties go to pair), else target.

    K = 2 with any target count -> pair (2 HVPs); K = 8 with one target -> target (8 versus 56).
    """
    if K < 2 or T < 1:
        raise ValueError(f"need K >= 2 domains and T >= 1 targets, got K={K}, T={T}")
    cost = plan_hvp_count(K, T)
    return "pair" if cost["pair"] <= cost["target"] else "target"


# --------------------------------------------------------------------------------------------------
# predictions


def predicted_change(M: Tensor, wbar: Weights, d: Weights, dt: float) -> Tensor:
    """Predicted ``L(theta_int) - L(theta_base)`` for an intervention (MATH.md "What an intervention does").

    The intervention trains on ``wbar + d`` for ``dt`` and then on ``wbar - d`` for ``dt`` (same total
    data); the baseline trains on ``wbar`` for ``2 dt``. To second order::

        dt^2 * < g_L, D (Hbar D g_d - H_d D gbar) > = dt^2 * sum_{a,b} C[a, b] M[a, b]

    with ``C = pair_coefficients(wbar, d)``. For ``D = I`` this is ``dt^2 P(L_d, Lbar; L)``. The remainder is
    ``O(dt^3)``. ``wbar`` need not sum to 1 for the algebra, but ``d`` must sum to 0 (data conserved).

    Returns:
        0-dim tensor on ``M``'s device.
    """
    K = M.shape[0]
    if M.ndim != 2 or M.shape[1] != K:
        raise ValueError(f"M must be [K, K], got {tuple(M.shape)}")
    w = _as_vector(wbar, M, "wbar", length=K)
    dd = _as_vector(d, M, "d", length=K)
    total = float(dd.sum())
    if abs(total) > 1e-6 * max(1.0, float(dd.abs().sum())):
        raise CommuteError(
            f"intervention weights d must sum to 0 (total data unchanged), got sum {total:.3g}",
            hint="move weight from one domain to another: +dw on one, -dw on the other",
        )
    C = pair_coefficients(w, dd)
    return (dt**2) * (C * M).sum()


def bracket_value(M: Tensor, i: int, j: int) -> Tensor:
    """``< D g_L, H_j D g_i - H_i D g_j > = M[j, i] - M[i, j]``; for ``D = I`` this is ``P(L_i, L_j; L)``.

    ``P(L_i, L_j; L) = < g_L, R(L_i, L_j) >`` (MATH.md "The bracket"). A full swap from ``(1/2, 1/2)``
    (train on i, then on j) changes the target by ``(1/2) dt^2`` times this value.
    """
    if i == j:
        raise ValueError("bracket_value needs two different domains")
    return M[j, i] - M[i, j]


def two_domain_excess(M: Tensor, wbar: Weights, i: int, j: int, dw: float, dt: float) -> Tensor:
    """``EL^{ij}``: predicted excess of the target for ``d = +dw`` on domain i, ``-dw`` on domain j.

    MATH.md special case ("ij" means domain i up first)::

        EL^{ij} = dt^2 dw < g_L, D (Hbar D (g_i - g_j) - (H_i - H_j) D gbar) >

    and ``EL^{ji} = -EL^{ij}``. Negative means moving domain i earlier and j later lowers the target.
    """
    K = M.shape[0]
    if i == j or not (0 <= i < K and 0 <= j < K):
        raise ValueError(f"need two different domain indices in [0, {K}), got {i}, {j}")
    d = torch.zeros(K, dtype=M.dtype, device=M.device)
    d[i] = dw
    d[j] = -dw
    return predicted_change(M, wbar, d, dt)


# --------------------------------------------------------------------------------------------------
# noise: block design (MATH.md "Noise")


@dataclass(frozen=True)
class BlockSummary:
    """Mean of per-block estimates with a Student-t test of ``mean != 0``.

    Attributes:
        mean: mean over blocks.
        se: standard error ``sd / sqrt(B)`` (``sd`` with ``ddof=1``).
        t: ``mean / se`` (``+-inf`` when ``se == 0`` and ``mean != 0``; 0 when both are 0).
        t_crit: two-sided critical value of Student t with ``B - 1`` degrees of freedom.
        significant: ``|t| > t_crit``.
        n_blocks: ``B``.
    """

    mean: float
    se: float
    t: float
    t_crit: float
    significant: bool
    n_blocks: int


def summarize_blocks(values: Sequence[float] | np.ndarray | Tensor, confidence: float = 0.95) -> BlockSummary:
    """Mean, standard error and a two-sided t test over independent per-block estimates.

    MATH.md "Noise": each block's estimate multiplies factors measured on disjoint samples, so it is
    unbiased; blocks are independent, so ``SE = sd / sqrt(B)`` and ``mean / SE`` follows Student t with
    ``B - 1`` degrees of freedom. A value is flagged only when ``|mean| > t_{B-1} * SE``.
    """
    from scipy import stats

    if isinstance(values, Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    B = int(x.size)
    if B < 2:
        raise CommuteError(
            f"need at least 2 blocks for an error bar, got {B}", hint="use more blocks (8 is typical)"
        )
    if not (0.0 < confidence < 1.0):
        raise CommuteError(f"confidence must be strictly between 0 and 1, got {confidence}")
    if not np.all(np.isfinite(x)):
        raise CommuteError("a per-block estimate is not finite (nan or inf)", exit_code=1)
    mean = float(x.mean())
    se = float(x.std(ddof=1) / math.sqrt(B))
    t = mean / se if se > 0.0 else (0.0 if mean == 0.0 else math.copysign(math.inf, mean))
    t_crit = float(stats.t.ppf(0.5 + confidence / 2.0, B - 1))
    return BlockSummary(mean=mean, se=se, t=t, t_crit=t_crit, significant=bool(abs(t) > t_crit), n_blocks=B)


# --------------------------------------------------------------------------------------------------
# wording


Verdict = Literal["suboptimal", "consistent", "insufficient signal"]


def verdict(significant: bool, w_i: float, w_j: float) -> Verdict:
    """Corollary 3.2(b) (MATH.md) for one pair of domains at one checkpoint.

    A locally optimal schedule has, wherever the bracket term for ``(i, j)`` is non-zero, ``w_i = 0`` or
    ``w_j = 0``. So:

    - significant and both weights > 0: "suboptimal" (an admissible reordering lowers the target);
    - significant but a weight is 0: "consistent" (the only improving move would need a negative weight);
    - not significant: "insufficient signal" (cannot tell a zero from noise).
    """
    if not significant:
        return "insufficient signal"
    return "suboptimal" if (w_i > 0.0 and w_j > 0.0) else "consistent"


def direction_words(el_ij: float, name_i: str, name_j: str) -> str:
    """Which way to reorder, from the sign of ``EL^{ij}`` (MATH.md: negative means i earlier, j later).

    ``EL^{ij} < 0`` -> "move i earlier, j later"; ``> 0`` -> "move j earlier, i later"; 0 -> no preference.
    """
    v = float(el_ij)
    if v < 0.0:
        return f"move {name_i} earlier, {name_j} later"
    if v > 0.0:
        return f"move {name_j} earlier, {name_i} later"
    return f"no preferred order between {name_i} and {name_j}"


# --------------------------------------------------------------------------------------------------
# preconditioner


def adam_preconditioner(exp_avg_sq: Tensor, step: int, beta2: float, eps: float) -> Tensor:
    """Adam's diagonal metric ``D = 1 / (sqrt(v_hat) + eps)``, ``v_hat = v / (1 - beta2^step)``.

    MATH.md "Notation" (D frozen over the window). Only the formula: MATH.md "Regime of validity" warns
    that coordinates with tiny second moments make ``D`` explode, so callers must add safeguards.
    """
    if step < 1:
        raise CommuteError(f"Adam step must be >= 1 for bias correction, got {step}")
    acc = _acc_dtype(exp_avg_sq.dtype)
    v_hat = exp_avg_sq.to(acc) / (1.0 - beta2**step)
    return 1.0 / (v_hat.sqrt() + eps)
