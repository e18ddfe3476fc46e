"""Quadratic domains with exact gradient flows: the paper's toy check (section 4.1, Appendix B).

Each domain is ``L_k(theta) = 1/2 (theta - b_k)^T A_k (theta - b_k)`` with ``A_k = C_k^T diag(0.7^j) C_k``
(``C_k`` random orthogonal) and ``b_k ~ N(0, I)``. The flow ``theta' = -D sum_k w_k A_k (theta - b_k)`` is
affine, so it is solved exactly by the matrix exponential of the augmented system::

    d/dt [theta; 1] = [[-D A_w, D c_w], [0, 0]] [theta; 1],   A_w = sum w_k A_k,  c_w = sum w_k A_k b_k

which never inverts ``A_w`` (its eigenvalues go down to 0.7^99 ~ 1e-15, hopeless to invert).

Predictions are computed through :mod:`commute_cli.core.criterion` (the same code that runs on real models),
so this module is an end-to-end check of that code's signs and constants against exact flows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from commute_cli.core import criterion
from commute_cli.engine.metric import apply_preconditioner

Tensor = torch.Tensor
Weights = Sequence[float] | Tensor

DTYPE = torch.float64


def random_orthogonal(dim: int, generator: torch.Generator | None = None) -> Tensor:
    """Haar-random orthogonal matrix: QR of a Gaussian with the signs of R's diagonal folded into Q."""
    G = torch.randn(dim, dim, generator=generator, dtype=DTYPE)
    Q, R = torch.linalg.qr(G)
    s = torch.sign(torch.diagonal(R))
    s[s == 0] = 1.0
    return Q * s


@dataclass(frozen=True)
class QuadraticDomains:
    """``K`` quadratic losses ``L_k = 1/2 (theta - b_k)^T A_k (theta - b_k)`` in float64.

    Attributes:
        A: ``[K, n, n]`` symmetric positive semi-definite Hessians.
        b: ``[K, n]`` minimizers.
    """

    A: Tensor
    b: Tensor

    def __post_init__(self) -> None:
        if self.A.ndim != 3 or self.A.shape[1] != self.A.shape[2] or self.b.shape != self.A.shape[:2]:
            raise ValueError(
                f"A must be [K, n, n] and b [K, n]; got {tuple(self.A.shape)}, {tuple(self.b.shape)}"
            )

    @classmethod
    def random(
        cls, K: int = 2, dim: int = 100, decay: float = 0.7, generator: torch.Generator | None = None
    ) -> QuadraticDomains:
        """Appendix B: eigenvalues ``decay**j`` (j < dim), random orthogonal ``C_k``, ``b_k ~ N(0, I)``."""
        lam = decay ** torch.arange(dim, dtype=DTYPE)
        As = []
        for _ in range(K):
            C = random_orthogonal(dim, generator)
            A = C.T @ (lam[:, None] * C)
            As.append(0.5 * (A + A.T))  # exactly symmetric
        b = torch.randn(K, dim, generator=generator, dtype=DTYPE)
        return cls(torch.stack(As), b)

    @property
    def K(self) -> int:
        return int(self.A.shape[0])

    @property
    def dim(self) -> int:
        return int(self.A.shape[1])

    def _weights(self, w: Weights | None) -> Tensor:
        if w is None:
            return torch.full((self.K,), 1.0 / self.K, dtype=DTYPE)
        v = torch.as_tensor(w, dtype=DTYPE)
        if v.shape != (self.K,):
            raise ValueError(f"expected {self.K} weights, got shape {tuple(v.shape)}")
        return v

    def losses(self, theta: Tensor) -> Tensor:
        """Per-domain losses ``[..., K]`` at ``theta`` ``[..., n]``."""
        r = theta.unsqueeze(-2) - self.b  # [..., K, n]
        return 0.5 * torch.einsum("...ki,kij,...kj->...k", r, self.A, r)

    def loss(self, theta: Tensor, c: Weights | None = None) -> Tensor:
        """Target ``L = sum_k c_k L_k`` at ``theta`` ``[..., n]`` (``c=None``: uniform mixture)."""
        return self.losses(theta) @ self._weights(c)

    def grad(self, theta: Tensor) -> Tensor:
        """Per-domain gradients ``g[..., k, :] = A_k (theta - b_k)``, shape ``[..., K, n]``."""
        r = theta.unsqueeze(-2) - self.b
        return torch.einsum("kij,...kj->...ki", self.A, r)

    def hess(self) -> Tensor:
        """Per-domain Hessians ``[K, n, n]`` (constant for quadratics)."""
        return self.A

    def hvp(self, k: int, v: Tensor) -> Tensor:
        """``H_k v``."""
        return self.A[k] @ v

    def loss_difference(self, x: Tensor, y: Tensor, c: Weights | None = None) -> Tensor:
        """``L(x) - L(y)`` for the target ``c``, without cancellation.

        Exact for quadratics: ``L(x) - L(y) = <grad L(y), x - y> + 1/2 (x - y)^T H_L (x - y)``. Subtracting
        two losses of size O(1) would lose ~6 of 16 digits of a 1e-6 difference; this keeps them.
        """
        cw = self._weights(c)
        delta = x - y
        gL = torch.einsum("k,...kn->...n", cw, self.grad(y))
        HL = torch.einsum("k,kij->ij", cw, self.A)
        return (gL * delta).sum(-1) + 0.5 * torch.einsum("...i,ij,...j->...", delta, HL, delta)

    def generator_matrix(self, weights: Weights, D: Tensor | None = None) -> Tensor:
        """Augmented ``[n+1, n+1]`` matrix ``[[-D A_w, D c_w], [0, 0]]`` of the affine flow."""
        w = self._weights(weights)
        Aw = torch.einsum("k,kij->ij", w, self.A)
        cw = torch.einsum("k,kij,kj->i", w, self.A, self.b)
        n = self.dim
        G = torch.zeros(n + 1, n + 1, dtype=DTYPE)
        Dv = torch.ones(n, dtype=DTYPE) if D is None else D.to(DTYPE)
        G[:n, :n] = -Dv[:, None] * Aw
        G[:n, n] = Dv * cw
        return G

    def flow(self, theta: Tensor, weights: Weights, t: float | Tensor, D: Tensor | None = None) -> Tensor:
        """Exact flow of ``theta' = -D sum_k w_k g_k`` for time ``t`` (constant weights).

        Args:
            theta: ``[..., n]`` starting points.
            weights: ``K`` domain weights (any real numbers; they need not be a distribution).
            t: a time, or a tensor of times broadcastable to ``theta.shape[:-1]`` (batched exponentials).
            D: diagonal preconditioner ``[n]`` (positive), or ``None`` for the identity.
        """
        G = self.generator_matrix(weights, D)
        tt = torch.as_tensor(t, dtype=DTYPE)
        E = torch.linalg.matrix_exp(tt[..., None, None] * G)  # [..., n+1, n+1]
        n = self.dim
        return torch.einsum("...ij,...j->...i", E[..., :n, :n], theta) + E[..., :n, n]

    def interaction(self, theta: Tensor, c: Weights | None = None, D: Tensor | None = None) -> np.ndarray:
        """Interaction matrix ``M[a, b] = <D g_L, H_a D g_b>`` at ``theta`` ``[n]``, through criterion.py.

        Uses the cheaper plan for one target (:func:`criterion.choose_plan`), exactly as a real run would.
        """
        g = self.grad(theta)  # [K, n]
        Dg = apply_preconditioner(D, g)
        u = apply_preconditioner(D, self._weights(c) @ g)
        if criterion.choose_plan(self.K, 1) == "pair":
            hvps = {(a, b): self.hvp(a, Dg[b]) for a, b in criterion.ordered_pairs(self.K)}
            return criterion.interaction_pair_plan(u, hvps, self.K)
        return criterion.interaction_target_plan(torch.stack([self.hvp(a, u) for a in range(self.K)]), Dg)


def intervention_endpoints(
    domains: QuadraticDomains,
    theta: Tensor,
    wbar: Weights,
    d: Weights,
    dt: float | Tensor,
    D: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """End points ``(theta_int, theta_base)``: ``wbar +- d`` for ``dt`` each, versus ``wbar`` for ``2 dt``.

    Batched like :meth:`QuadraticDomains.flow` (``theta`` ``[..., n]``, ``dt`` broadcastable to its batch).
    """
    w = domains._weights(wbar)
    dd = domains._weights(d)
    dtt = torch.as_tensor(dt, dtype=DTYPE)
    first = domains.flow(theta, w + dd, dtt, D)
    theta_int = domains.flow(first, w - dd, dtt, D)
    theta_base = domains.flow(theta, w, 2.0 * dtt, D)
    return theta_int, theta_base


@dataclass(frozen=True)
class InterventionResult:
    """Observed (exact flows) and predicted (criterion.py, second order) change of the target."""

    observed: float
    predicted: float
    theta_int: Tensor
    theta_base: Tensor

    @property
    def ratio(self) -> float:
        return self.observed / self.predicted


def run_intervention(
    domains: QuadraticDomains,
    theta: Tensor,
    wbar: Weights,
    d: Weights,
    dt: float,
    c: Weights | None = None,
    D: Tensor | None = None,
) -> InterventionResult:
    """One intervention from ``theta`` ``[n]``: exact ``L(theta_int) - L(theta_base)`` and its prediction.

    The prediction is :func:`criterion.predicted_change` on the interaction matrix at ``theta`` (MATH.md
    "What an intervention does"); the target is ``L = sum c_k L_k`` (``c=None``: uniform mixture).
    """
    theta_int, theta_base = intervention_endpoints(domains, theta, wbar, d, dt, D)
    observed = float(domains.loss_difference(theta_int, theta_base, c))
    M = domains.interaction(theta, c, D)
    predicted = float(criterion.predicted_change(M, domains._weights(wbar), domains._weights(d), dt))
    return InterventionResult(observed, predicted, theta_int, theta_base)


def run_table1(
    dim: int = 100,
    samples: int = 100,
    seed: int = 0,
    ts: Sequence[float] = (0.1, 0.3, 1.0, 3.0),
    dts: Sequence[float] = (1e-3, 1e-2, 1e-1),
) -> pd.DataFrame:
    """Reproduce the paper's Table 1 with MATH.md's constant (1/2, not the paper's 1/8).

    For each sample: fresh ``A_1, A_2, b_1, b_2`` (Appendix B) and ``theta_0 ~ N(0, I)``; ``theta(t)`` is
    the exact flow of the ``(1/2, 1/2)`` mixture. From ``theta(t)``: ``theta_12`` trains on ``L_1`` for
    ``dt`` then on ``L_2`` for ``dt``; ``theta_base`` trains on the mixture for ``2 dt``. With
    ``L = (L_1 + L_2) / 2``::

        ratio = [L(theta_12) - L(theta_base)] / [(1/2) dt^2 P(L_1, L_2; L)(theta(t))]

    where the denominator is ``criterion.predicted_change`` for ``wbar = (1/2, 1/2)``, ``d = (1/2, -1/2)``.

    Returns:
        DataFrame with one row per ``(t, dt)``: columns ``t, dt, median, p10, p90, n`` (``n``: finite ratios).
    """
    if dim < 2 or samples < 1:
        raise ValueError(f"need dim >= 2 and samples >= 1, got dim={dim}, samples={samples}")
    gen = torch.Generator().manual_seed(seed)
    t_vec = torch.tensor(list(ts), dtype=DTYPE)
    dt_col = torch.tensor(list(dts), dtype=DTYPE)[:, None]  # [J, 1]: one exponential per dt, shared by all t
    T, J = len(ts), len(dts)
    wbar = torch.tensor([0.5, 0.5], dtype=DTYPE)
    d = torch.tensor([0.5, -0.5], dtype=DTYPE)
    ratios = np.empty((samples, T, J))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 100x100 matrices: intra-op threads only add contention (10x slower on 2 cores)
    try:
        for s in range(samples):
            dom = QuadraticDomains.random(K=2, dim=dim, generator=gen)
            theta0 = torch.randn(dim, generator=gen, dtype=DTYPE)
            theta_t = dom.flow(theta0.expand(T, dim), wbar, t_vec)  # [T, n]
            theta_int, theta_base = intervention_endpoints(dom, theta_t, wbar, d, dt_col)  # [J, T, n]
            observed = dom.loss_difference(theta_int, theta_base, wbar)  # [J, T]
            for i in range(T):
                M = dom.interaction(theta_t[i], wbar)
                for j in range(J):
                    predicted = float(criterion.predicted_change(M, wbar, d, float(dts[j])))
                    ratios[s, i, j] = float(observed[j, i]) / predicted if predicted != 0.0 else np.nan
    finally:
        torch.set_num_threads(threads)
    rows = []
    for i, t in enumerate(ts):
        for j, dt in enumerate(dts):
            r = ratios[:, i, j]
            r = r[np.isfinite(r)]
            med, p10, p90 = (np.nan,) * 3 if r.size == 0 else np.percentile(r, [50, 10, 90])
            rows.append(
                {"t": float(t), "dt": float(dt), "median": med, "p10": p10, "p90": p90, "n": int(r.size)}
            )
    return pd.DataFrame(rows, columns=["t", "dt", "median", "p10", "p90", "n"])
