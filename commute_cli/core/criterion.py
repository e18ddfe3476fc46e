"""The Lie-bracket criterion as pure numpy functions over ``[..., K, K]`` statistics.

No torch and no files here (the package's dependency rule: ``core`` imports nothing of the package but
:mod:`commute_cli.errors`). Signs and constants follow ``docs/MATH.md``, which corrects the paper: its
eq. (6) and eq. (7) disagree in sign, and its section 4.1 prints 1/8 where the exact flows give 1/2.

Notation (docs/MATH.md "Notation"):

- ``K`` domains, gradients ``g_k = grad L_k``, Hessians ``H_k`` (only used through Hessian-vector products);
- ``D``: the diagonal preconditioner (the identity for the Euclidean metric; see ``engine/metric.py``);
- a target ``L = sum_k c_k L_k`` with ``g_L = c @ g``;
- the interaction matrix of one target, ``M[a, b] = < D g_L, H_a D g_b >``.

Every quantity of docs/MATH.md "What an intervention does to the target" is a fixed antisymmetric linear
combination of the entries of ``M``, so once ``M`` is known every intervention and every pair is a dot
product. The functions broadcast over leading axes: ``M`` may be one ``[K, K]`` matrix (the exact-flow
tests) or ``[B, K, K]`` per-block estimates (the pipeline) -- the same code serves both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import numpy as np

from commute_cli.errors import CommuteError

ArrayLike = Any  # anything ``np.asarray`` takes: lists, numpy arrays, CPU tensors

__all__ = [
    "BlockSummary",
    "Verdict",
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


def _f64(x: ArrayLike) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def ordered_pairs(K: int) -> list[tuple[int, int]]:
    """All ordered pairs ``(a, b)`` with ``a != b``: the HVPs ``H_a (D g_b)`` of the pair plan."""
    return [(a, b) for a in range(K) for b in range(K) if a != b]


# --------------------------------------------------------------------------------------------------
# bracket and coefficients


def bracket(hvp_B_gA: ArrayLike, hvp_A_gB: ArrayLike) -> np.ndarray:
    """Lie bracket of two gradient fields, ``R(A, B) = H_B g_A - H_A g_B`` (docs/MATH.md "The bracket").

    Training on A for ``dt`` and then on B for ``dt`` ends at ``theta_AB``, and
    ``theta_AB - theta_BA = dt^2 R(A, B) + o(dt^2)`` (Theorem 3.1 with the sign fixed).

    Args:
        hvp_B_gA: ``Hess(B) @ grad(A)``, ``[n]``.
        hvp_A_gB: ``Hess(A) @ grad(B)``, ``[n]``.
    """
    return _f64(hvp_B_gA) - _f64(hvp_A_gB)


def pair_coefficients(wbar: ArrayLike, d: ArrayLike) -> np.ndarray:
    """``C[..., a, b] = wbar_a d_b - d_a wbar_b``: coefficient of ``<D g_L, H_a D g_b>`` in the change.

    docs/MATH.md "What an intervention does": ``Hbar D g_d - H_d D gbar = sum_{a,b} C[a, b] H_a D g_b``.
    ``C`` is antisymmetric, so the diagonal never contributes (the interaction matrix may leave it at 0).
    ``wbar`` and ``d`` are ``[..., K]`` (broadcast); the result is ``[..., K, K]`` float64.

    Raises:
        ValueError: ``wbar`` and ``d`` have different lengths.
    """
    w, dd = _f64(wbar), _f64(d)
    if w.ndim < 1 or dd.ndim < 1 or w.shape[-1] != dd.shape[-1]:
        raise ValueError(f"wbar {w.shape} and d {dd.shape} must both end in K entries")
    return w[..., :, None] * dd[..., None, :] - dd[..., :, None] * w[..., None, :]


# --------------------------------------------------------------------------------------------------
# interaction matrix: two HVP plans


def interaction_pair_plan(u: ArrayLike, pair_hvps: Mapping[tuple[int, int], ArrayLike], K: int) -> np.ndarray:
    """Interaction matrix from the pair plan (the paper's): ``M[a, b] = < u, H_a (D g_b) >``.

    docs/MATH.md "Cost": ``K(K-1)`` HVPs, one per ordered pair, after which every target is a dot product.

    Args:
        u: ``D g_L`` for the target, ``[n]``.
        pair_hvps: ``pair_hvps[(a, b)] = H_a (D g_b)`` for every ordered ``a != b`` (``[n]`` each).
        K: number of domains (>= 2).

    Returns:
        ``[K, K]`` float64 with a zero diagonal (its coefficient is ``wbar_a d_a - d_a wbar_a = 0``).

    Raises:
        ValueError: ``K < 2`` or a pair is missing.
    """
    if K < 2:
        raise ValueError(f"need at least 2 domains, got K={K}")
    uu = _f64(u)
    M = np.zeros((K, K))
    for a, b in ordered_pairs(K):
        if (a, b) not in pair_hvps:
            raise ValueError(f"pair plan is missing H_{a} (D g_{b})")
        M[a, b] = float(uu @ _f64(pair_hvps[(a, b)]))
    return M


def interaction_target_plan(target_hvps: ArrayLike, Dg: ArrayLike) -> np.ndarray:
    """Interaction matrix from the target plan: ``M[a, b] = < H_a u, D g_b >`` with ``u = D g_L``.

    docs/MATH.md "Cost": by symmetry of ``H_a``, ``<u, H_a D g_b> = <H_a u, D g_b>``, so one target needs
    only ``K`` HVPs ``h_a = H_a u``. Equal to :func:`interaction_pair_plan` up to rounding.

    Args:
        target_hvps: ``[K, n]`` (or a sequence of ``K`` vectors), ``target_hvps[a] = H_a u``.
        Dg: ``[K, n]`` (or a sequence), ``Dg[b] = D g_b``.

    Returns:
        ``[K, K]`` float64 with a zero diagonal.
    """
    h = (
        np.stack([_f64(v) for v in target_hvps])
        if isinstance(target_hvps, (list, tuple))
        else _f64(target_hvps)
    )
    G = np.stack([_f64(v) for v in Dg]) if isinstance(Dg, (list, tuple)) else _f64(Dg)
    if h.ndim != 2 or G.ndim != 2 or h.shape != G.shape:
        raise ValueError(f"target_hvps {h.shape} and Dg {G.shape} must both be [K, n]")
    if h.shape[0] < 2:
        raise ValueError(f"need at least 2 domains, got K={h.shape[0]}")
    M = h @ G.T
    np.fill_diagonal(M, 0.0)
    return M


def plan_hvp_count(K: int, T: int) -> dict[str, int]:
    """HVPs needed by each plan for ``K`` domains and ``T`` targets: pair ``K(K-1)``, target ``K*T``."""
    return {"pair": K * (K - 1), "target": K * T}


def choose_plan(K: int, T: int) -> Literal["pair", "target"]:
    """The cheaper HVP plan (docs/MATH.md "Cost"): pair if ``K(K-1) <= K*T`` (ties go to pair).

    K = 2 with any target count -> pair (2 HVPs); K = 8 with one target -> target (8 versus 56).
    """
    if K < 2 or T < 1:
        raise ValueError(f"need K >= 2 domains and T >= 1 targets, got K={K}, T={T}")
    cost = plan_hvp_count(K, T)
    return "pair" if cost["pair"] <= cost["target"] else "target"


# --------------------------------------------------------------------------------------------------
# predictions (broadcast over leading axes of M)


def _square(M: ArrayLike) -> np.ndarray:
    m = _f64(M)
    if m.ndim < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"M must be [..., K, K], got {m.shape}")
    return m


def predicted_change(M: ArrayLike, wbar: ArrayLike, d: ArrayLike, dt: float) -> np.ndarray:
    """Predicted ``L(theta_int) - L(theta_base)`` in nats (docs/MATH.md "What an intervention does").

    The intervention trains on ``wbar + d`` for ``dt`` and then on ``wbar - d`` for ``dt`` (same total
    data); the baseline trains on ``wbar`` for ``2 dt``. To second order (remainder ``O(dt^3)``)::

        dt^2 * < g_L, D (Hbar D g_d - H_d D gbar) > = dt^2 * sum_{a,b} C[a, b] M[a, b]

    with ``C = pair_coefficients(wbar, d)``; for ``D = I`` this is ``dt^2 P(L_d, Lbar; L)``.

    Args:
        M: ``[..., K, K]`` interaction matrices (e.g. ``[B, K, K]`` per-block estimates).
        wbar: ``[K]`` weights around which the intervention is made.
        d: ``[K]`` shift; must sum to 0 (data conserved).
        dt: time of each half, ``lr x steps``.

    Returns:
        ``M.shape[:-2]`` float64 (a 0-d array for one matrix).

    Raises:
        ValueError: shapes disagree or ``d`` does not sum to 0.
    """
    m = _square(M)
    K = m.shape[-1]
    w, dd = _f64(wbar), _f64(d)
    if w.shape != (K,) or dd.shape != (K,):
        raise ValueError(f"wbar {w.shape} and d {dd.shape} must have K={K} entries")
    total = float(dd.sum())
    if abs(total) > 1e-6 * max(1.0, float(np.abs(dd).sum())):
        raise ValueError(f"intervention weights d must sum to 0 (total data unchanged), got sum {total:.3g}")
    C = pair_coefficients(w, dd)
    return np.asarray((dt**2) * np.einsum("ab,...ab->...", C, m))


def bracket_value(M: ArrayLike, i: int, j: int) -> np.ndarray:
    """``< D g_L, H_j D g_i - H_i D g_j > = M[..., j, i] - M[..., i, j]``; ``P(L_i, L_j; L)`` for ``D = I``.

    ``P(L_i, L_j; L) = < g_L, R(L_i, L_j) >`` (docs/MATH.md "The bracket"). A full swap from
    ``(1/2, 1/2)`` (train on i, then on j) changes the target by ``(1/2) dt^2`` times this value.
    """
    if i == j:
        raise ValueError("bracket_value needs two different domains")
    m = _square(M)
    return np.asarray(m[..., j, i] - m[..., i, j])


def two_domain_excess(M: ArrayLike, wbar: ArrayLike, i: int, j: int, dw: float, dt: float) -> np.ndarray:
    """``EL^{ij}`` in nats: predicted excess of the target for ``d = +dw`` on domain i, ``-dw`` on j.

    docs/MATH.md special case ("ij" means domain i up first)::

        EL^{ij} = dt^2 dw < g_L, D (Hbar D (g_i - g_j) - (H_i - H_j) D gbar) >

    and ``EL^{ji} = -EL^{ij}``. Negative means moving domain i earlier and j later lowers the target.
    Broadcasts over the leading axes of ``M`` like :func:`predicted_change`.
    """
    m = _square(M)
    K = m.shape[-1]
    if i == j or not (0 <= i < K and 0 <= j < K):
        raise ValueError(f"need two different domain indices in [0, {K}), got {i}, {j}")
    d = np.zeros(K)
    d[i], d[j] = dw, -dw
    return predicted_change(m, wbar, d, dt)


# --------------------------------------------------------------------------------------------------
# noise: block design (docs/MATH.md "Noise")


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

    @property
    def lo(self) -> float:
        """Lower end of the two-sided confidence interval ``mean - t_crit se``."""
        return self.mean - self.t_crit * self.se

    @property
    def hi(self) -> float:
        """Upper end of the two-sided confidence interval ``mean + t_crit se``."""
        return self.mean + self.t_crit * self.se


def summarize_blocks(values: ArrayLike, confidence: float = 0.95) -> BlockSummary:
    """Mean, standard error and a two-sided t test over independent per-block estimates ``[B]``.

    docs/MATH.md "Noise": each block's estimate multiplies factors measured on disjoint samples, so it is
    unbiased; blocks are independent, so ``SE = sd / sqrt(B)`` and ``mean / SE`` follows Student t with
    ``B - 1`` degrees of freedom. A value is flagged only when ``|mean| > t_{B-1} * SE``.

    Raises:
        CommuteError: fewer than 2 blocks, a confidence outside (0, 1), or a non-finite estimate.
    """
    from scipy import stats

    x = _f64(values).reshape(-1)
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


class Verdict(StrEnum):
    """The words of the ``verdict`` column (docs/MATH.md Corollary 3.2(b) plus practical significance)."""

    SUBOPTIMAL = "suboptimal"
    CONSISTENT = "consistent"
    INSUFFICIENT = "insufficient signal"
    NEGLIGIBLE = "negligible"


def verdict(significant: bool, w_i: float, w_j: float, negligible: bool = False) -> Verdict:
    """Corollary 3.2(b) (docs/MATH.md) for one pair of domains at one checkpoint.

    A locally optimal schedule has, wherever the bracket term for ``(i, j)`` is non-zero, ``w_i = 0`` or
    ``w_j = 0``. So:

    - ``negligible`` (see ``core/regime.py`` :func:`~commute_cli.core.regime.is_negligible`): the effect is
      below the minimum worth reporting -- "negligible", significant or not;
    - significant and both weights > 0: "suboptimal" (an admissible reordering lowers the target);
    - significant but a weight is 0: "consistent" (the only improving move would need a negative weight);
    - not significant: "insufficient signal" (cannot tell a zero from noise).
    """
    if negligible:
        return Verdict.NEGLIGIBLE
    if not significant:
        return Verdict.INSUFFICIENT
    return Verdict.SUBOPTIMAL if (w_i > 0.0 and w_j > 0.0) else Verdict.CONSISTENT


def direction_words(el_ij: float, name_i: str, name_j: str) -> str:
    """Which way to reorder, from the sign of ``EL^{ij}`` (docs/MATH.md: negative means i earlier, j later).

    ``EL^{ij} < 0`` -> "move i earlier, j later"; ``> 0`` -> "move j earlier, i later"; 0 -> no preference.
    """
    v = float(el_ij)
    if v < 0.0:
        return f"move {name_i} earlier, {name_j} later"
    if v > 0.0:
        return f"move {name_j} earlier, {name_i} later"
    return f"no preferred order between {name_i} and {name_j}"
