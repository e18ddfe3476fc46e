"""Independent references the tests compare the package against: nothing here calls the code under test
(``commute_cli``'s curvature, estimator or criterion), so an error there cannot cancel against the same error
in its reference.

- :class:`Quadratics`: K quadratic domains with exact gradient flows (``scipy.linalg.expm`` of the augmented
  affine system) and exact loss differences (docs/MATH.md "Special cases to test");
- dense float64 derivatives of a model's loss as a function of its flat parameter vector, built with
  ``torch.func.functional_call`` and taken by ``torch.autograd.functional``: :func:`functional_loss`,
  :func:`dense_grad`, :func:`dense_hess` (tied weights through ``functional_call``'s tying), and
  :func:`dense_hessian` (any loss of the model's output, tied weights mapped by hand).

The flat vector is in ``param_list`` order (de-duplicated ``named_parameters()``, tied weights once), the
layout of the package's parameter vectors; ``param_list`` is only used to lay it out.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from commute_cli.engine import curvature as C

# ----------------------------------------------------------------------------------------------- quadratics


class Quadratics:
    """K quadratics L_k = 1/2 (x - b_k)^T A_k (x - b_k), A_k = Q diag(lam) Q^T with lam = 0.7^i in (0, 1]."""

    def __init__(self, K: int, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        lam = 0.7 ** np.arange(n)
        A = []
        for _ in range(K):
            Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
            A.append(Q @ np.diag(lam) @ Q.T)
        self.A = np.array(A)
        self.A = 0.5 * (self.A + self.A.transpose(0, 2, 1))
        self.b = rng.standard_normal((K, n))
        self.x0 = rng.standard_normal(n)
        self.K, self.n = K, n

    def grads(self, x: np.ndarray) -> np.ndarray:
        return np.einsum("kij,kj->ki", self.A, x[None, :] - self.b)

    def losses(self, x: np.ndarray) -> np.ndarray:
        d = x[None] - self.b
        return 0.5 * np.einsum("ki,kij,kj->k", d, self.A, d)

    def flow(self, x: np.ndarray, w, t: float, D: np.ndarray | None = None) -> np.ndarray:
        """theta' = -D sum_k w_k A_k (theta - b_k), exactly (augmented matrix exponential)."""
        w = np.asarray(w, dtype=float)
        Dv = np.ones(self.n) if D is None else D
        Aw = np.einsum("k,kij->ij", w, self.A)
        cw = np.einsum("k,kij,kj->i", w, self.A, self.b)
        G = np.zeros((self.n + 1, self.n + 1))
        G[: self.n, : self.n] = -Dv[:, None] * Aw
        G[: self.n, self.n] = Dv * cw
        E = scipy.linalg.expm(t * G)
        return E[: self.n, : self.n] @ x + E[: self.n, self.n]

    def loss_diff(self, x: np.ndarray, y: np.ndarray, c) -> float:
        """L_c(x) - L_c(y), exact for quadratics and free of cancellation."""
        c = np.asarray(c, dtype=float)
        gL = c @ self.grads(y)
        HL = np.einsum("k,kij->ij", c, self.A)
        dlt = x - y
        return float(gL @ dlt + 0.5 * dlt @ HL @ dlt)

    def intervention(self, x, wbar, d, dt, c, D=None) -> float:
        """Observed L(theta_int) - L(theta_base): wbar+d for dt then wbar-d for dt, vs wbar for 2 dt."""
        wbar, d = np.asarray(wbar, float), np.asarray(d, float)
        x_int = self.flow(self.flow(x, wbar + d, dt, D), wbar - d, dt, D)
        x_base = self.flow(x, wbar, 2 * dt, D)
        return self.loss_diff(x_int, x_base, c)


# ------------------------------------------------------------------------------------------ dense derivatives


def functional_loss(model: nn.Module, ids: Tensor, weights: Tensor | None = None):
    """The mean next-token cross-entropy as a function of the flat parameter vector (``param_list`` order).

    ``weights`` (summing to 1) weight the sequences: a pool is passed as its distinct sequences with their
    frequencies. Tied weights (GPT-2's lm_head = wte) are handled by ``functional_call``'s default tying with
    the de-duplicated names (FACTS.md).
    """
    plist = C.param_list(model)
    sizes = [p.numel() for _, p in plist]
    w = torch.full((ids.shape[0],), 1.0 / ids.shape[0], dtype=torch.float64) if weights is None else weights

    def f(theta: Tensor) -> Tensor:
        params = {
            name: piece.view(p.shape) for (name, p), piece in zip(plist, theta.split(sizes), strict=True)
        }
        out = functional_call(model, params, (ids,))
        logits = out if isinstance(out, Tensor) else out.logits
        tok = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        )
        return (w * tok.view(ids.shape[0], -1).mean(1)).sum()

    return f


def dense_grad(model: nn.Module, ids: Tensor, weights: Tensor | None = None) -> Tensor:
    theta = torch.cat([p.detach().reshape(-1) for _, p in C.param_list(model)])
    return torch.autograd.functional.jacobian(functional_loss(model, ids, weights), theta)


def dense_hess(model: nn.Module, ids: Tensor, weights: Tensor | None = None) -> Tensor:
    theta = torch.cat([p.detach().reshape(-1) for _, p in C.param_list(model)])
    return torch.autograd.functional.hessian(functional_loss(model, ids, weights), theta, vectorize=True)


def dense_hessian(model: nn.Module, ids: Tensor, loss_of_output) -> Tensor:
    """Hessian of the mean loss as a function of the flat parameter vector (float64)."""
    plist = C.param_list(model)
    tied = {
        name: other
        for name, p in model.named_parameters(remove_duplicate=False)
        for other, q in plist
        if p is q and name != other
    }
    sizes = [p.numel() for _, p in plist]

    def f(theta: Tensor) -> Tensor:
        d = {n: piece.view(p.shape) for (n, p), piece in zip(plist, theta.split(sizes), strict=True)}
        for name, other in tied.items():
            d[name] = d[other]
        return loss_of_output(functional_call(model, d, (ids,), tie_weights=False), ids)

    theta = torch.cat([p.detach().reshape(-1) for _, p in plist])
    return torch.autograd.functional.hessian(f, theta, vectorize=True)
