"""Finite-difference Hessian-vector products: two first-order gradients per vector, any attention kernel.

``H v ~ (g(theta + eps v) - g(theta - eps v)) / (2 eps)`` (docs/MATH.md "Finite-difference HVPs"). Only
first-order gradients are taken, so fused attention kernels (SDPA, flash attention) and half-precision
weights work, and the autograd graph is a gradient's, not an HVP's. The price is an approximation whose
error the caller measures against the exact product (``commands/stats``: the agreement check of every
``--hvp fd`` analysis).

The step (:func:`fd_step`): the central difference has truncation error ``eps^2 / 6 * |D^4 L[v, v, v, .]|``
(the third derivative of the gradient)
and rounding error ``~ u |g| / eps`` (``u`` the unit roundoff of the weights' dtype); their sum is smallest
for ``eps ~ u^(1/3)`` in the problem's own length scale. That scale is the weights' root-mean-square
``rms(theta) = |theta| / sqrt(n)`` (not ``|theta|``, which grows with the model's size while the curvature's
length scale does not): the step moves the weights by ``eps |v| = FD_EPS_SCALE * u^(1/3) * rms(theta)``.
The constant was measured (MATH.md "Finite-difference HVPs"): on the shipped run's model at initialization
and at steps 500, 1500 and 2500, the float32 error against a float64 exact product is smallest at
``eps |v| / (u^(1/3) rms(theta))`` between 7 and 12.

Weights are perturbed in place and restored from a saved copy afterwards, also when an error is raised:
the model is bit-identical after the call. Both gradients of a vector run over the same micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from commute_cli.engine.curvature import LossFn, Reduce, accumulation_dtype, loss_and_grad, trainable

#: the step is ``FD_EPS_SCALE * u^(1/3) * rms(theta) / |v|`` (docs/MATH.md "Finite-difference HVPs")
FD_EPS_SCALE = 10.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u`` of a floating dtype: half the spacing of numbers at 1 (2^-24 for float32,
    2^-8 for bfloat16, 2^-53 for float64)."""
    return float(torch.finfo(dtype).eps) / 2.0


def fd_step(theta_rms: float, v_norm: float, dtype: torch.dtype, scale: float = FD_EPS_SCALE) -> float:
    """The central difference's step ``eps = scale * u^(1/3) * rms(theta) / |v|`` (0 for a zero ``v``).

    Args:
        theta_rms: root-mean-square of the trainable weights ``|theta| / sqrt(n)`` (a weight's typical size).
        v_norm: norm of the direction ``v`` (same layout).
        dtype: the weights' dtype (its unit roundoff ``u``; :func:`unit_roundoff`).
        scale: the measured constant (:data:`FD_EPS_SCALE`).

    A step below ``u^(1/3)`` of the weights' scale lets rounding (``~ u |g| / eps``) win; above it the
    third derivative (``~ eps^2``) does (MATH.md "Finite-difference HVPs").
    """
    if v_norm == 0.0:
        return 0.0
    return scale * unit_roundoff(dtype) ** (1.0 / 3.0) * theta_rms / v_norm


@dataclass
class FDResult:
    """Products, loss and gradient of :func:`fd_hvp` (float32, float64 for a float64 model).

    Attributes:
        hvps: ``[m, n]`` the central differences ``(g+ - g-) / 2 eps_i``.
        loss: mean loss at ``theta``: ``(L+ + L-) / 2 - eps^2 / 2 <v, H v>`` averaged over the vectors
            (the even Taylor term removed; error ``O(eps^4)``).
        grad: ``[n]`` mean of ``(g+ + g-) / 2`` over the vectors (error ``O(eps^2)``).
        eps: the step of each vector.
        perturbation_error: per vector, ``|(theta+ - theta-) / 2 eps - v| / |v|`` with ``theta+-`` the
            perturbed weights as stored in their dtype: how much rounding the weights changed the direction
            actually differentiated (exactly 0 in exact arithmetic; ``~ u |theta| / (eps |v|)`` otherwise).
            Empty unless :func:`fd_hvp` was asked to ``diagnose``.
    """

    hvps: Tensor
    loss: float
    grad: Tensor
    eps: list[float] = field(default_factory=list)
    perturbation_error: list[float] = field(default_factory=list)


def fd_hvp(
    model: nn.Module,
    blocks: Tensor,
    vectors: Tensor,
    micro_batch: int,
    loss_fn: LossFn,
    reduce: Reduce | None = None,
    scale: float | None = None,
    diagnose: bool = False,
) -> FDResult:
    """Central-difference Hessian-vector products of the mean loss over ``blocks``, ``2 m`` gradients.

    Args:
        model: in eval mode (or without active dropout; ``curvature.check_model``); any attention kernel
            and any floating dtype; gradients and products are accumulated in float32 (float64 for a float64
            model: ``curvature.accumulation_dtype``).
        blocks: ``[N, T]`` token blocks; both gradients of every vector run over the same micro-batches.
        vectors: ``[m, n]`` directions in ``curvature.param_list`` order (any float dtype; used in the
            accumulation dtype).
        micro_batch: sequences per forward pass.
        loss_fn, reduce: as ``curvature.loss_and_grad`` (under data parallelism every process perturbs by
            the same step: the norms are of the same weights and vectors on every process).
        scale: the step's constant (:func:`fd_step`; default :data:`FD_EPS_SCALE`, read at call time).
        diagnose: also compute :attr:`FDResult.perturbation_error` (a dozen passes over the weights per
            vector; the agreement check asks for it, the analysis does not).

    Returns:
        :class:`FDResult`. The weights are restored bit for bit, also on error.
    """
    scale = FD_EPS_SCALE if scale is None else scale
    plist = trainable(model)
    params = [p for _, p in plist]
    acc = accumulation_dtype(model)
    device = params[0].device
    vecs = vectors.detach().to(device=device, dtype=acc)
    sizes = [p.numel() for p in params]
    saved = [p.detach().clone() for p in params]
    n = sum(sizes)
    norms = torch.stack([torch.linalg.vector_norm(s, dtype=acc) for s in saved])
    theta_rms = float(torch.linalg.vector_norm(norms)) / n**0.5
    dtype = params[0].dtype
    m = vecs.shape[0]
    hvps = torch.zeros_like(vecs)
    grad_sum = torch.zeros(vecs.shape[1], dtype=acc, device=device)
    loss_sum = 0.0
    eps_list: list[float] = []
    pert_err: list[float] = []
    try:
        for i in range(m):
            v = vecs[i]
            v_norm = float(v.norm())
            eps = fd_step(theta_rms, v_norm, dtype, scale)
            eps_list.append(eps)
            if eps == 0.0:  # H 0 = 0; the loss and gradient at theta itself
                _restore(params, saved)
                loss, g = loss_and_grad(model, blocks, micro_batch, loss_fn, reduce)
                loss_sum += loss
                grad_sum.add_(g)
                if diagnose:
                    pert_err.append(0.0)
                continue
            pieces = v.split(sizes)
            if diagnose:
                pert_err.append(_perturbation_error(saved, pieces, eps, acc) / v_norm)
            _perturb(params, saved, pieces, eps)
            loss_p, g_p = loss_and_grad(model, blocks, micro_batch, loss_fn, reduce)
            _perturb(params, saved, pieces, -eps)
            loss_m, g_m = loss_and_grad(model, blocks, micro_batch, loss_fn, reduce)
            grad_sum.add_(g_p, alpha=0.5).add_(g_m, alpha=0.5)  # both already in ``acc``
            hv = torch.sub(g_p, g_m, out=hvps[i]).div_(2.0 * eps)  # no [n] temporaries
            vhv = float(torch.dot(v, hv))  # enters the loss as eps^2 / 2 <v, Hv>: float32 is plenty
            loss_sum += 0.5 * (loss_p + loss_m) - 0.5 * eps * eps * vhv
    finally:
        _restore(params, saved)
    return FDResult(hvps, loss_sum / m, grad_sum / m, eps_list, pert_err)


@torch.no_grad()
def _perturb(params: list[nn.Parameter], saved: list[Tensor], pieces: tuple[Tensor, ...], eps: float) -> None:
    """``theta <- saved + eps v`` (rounded once to the weights' dtype), from the saved copy each time."""
    for p, s, piece in zip(params, saved, pieces, strict=True):
        p.copy_(s)
        p.add_(piece.view_as(p), alpha=eps)


@torch.no_grad()
def _restore(params: list[nn.Parameter], saved: list[Tensor]) -> None:
    for p, s in zip(params, saved, strict=True):
        p.copy_(s)


@torch.no_grad()
def _perturbation_error(
    saved: list[Tensor], pieces: tuple[Tensor, ...], eps: float, acc: torch.dtype
) -> float:
    """``|(theta+ - theta-) / 2 eps - v|`` with ``theta+-`` rounded as :func:`_perturb` rounds them."""
    total = 0.0
    for s, piece in zip(saved, pieces, strict=True):
        v = piece.view_as(s)
        plus = s.clone().add_(v, alpha=eps).to(acc)
        minus = s.clone().add_(v, alpha=-eps).to(acc)
        total += float((((plus - minus) / (2.0 * eps)) - v).double().pow(2).sum())
    return total**0.5


# --------------------------------------------------------------------------------------------
# Agreement with the exact product
# --------------------------------------------------------------------------------------------

#: relative error of a finite-difference product against the exact one above which a run warns ...
FD_WARN_ERROR = 1e-2
#: ... and above which it refuses (docs/DECISIONS.md "Finite-difference HVPs behind --hvp fd")
FD_REFUSE_ERROR = 5e-2


@dataclass
class FDAgreement:
    """How finite-difference products compare with exact ones on the same samples and vectors.

    Attributes:
        rel_error: per vector ``|fd - exact| / |exact|`` (Euclidean norms over all parameters).
        cosine: per vector ``<fd, exact> / (|fd| |exact|)``.
        eps: per vector, the finite-difference step.
        perturbation_error: per vector, :attr:`FDResult.perturbation_error`.
        verdict: "ok", "warn" (max relative error above :data:`FD_WARN_ERROR`) or "refuse" (above
            :data:`FD_REFUSE_ERROR`, or a non-finite product).
    """

    rel_error: list[float]
    cosine: list[float]
    eps: list[float]
    perturbation_error: list[float]
    verdict: str

    @property
    def max_rel_error(self) -> float:
        return max(self.rel_error)

    @property
    def min_cosine(self) -> float:
        return min(self.cosine)

    def as_dict(self) -> dict[str, object]:
        return {
            "vectors": len(self.rel_error),
            "rel_error": self.rel_error,
            "max_rel_error": self.max_rel_error,
            "cosine": self.cosine,
            "min_cosine": self.min_cosine,
            "eps": self.eps,
            "perturbation_error": self.perturbation_error,
            "verdict": self.verdict,
            "warn_above": FD_WARN_ERROR,
            "refuse_above": FD_REFUSE_ERROR,
        }


def compare(fd: FDResult, exact: Tensor) -> FDAgreement:
    """Relative error and cosine of ``fd.hvps`` ``[m, n]`` against ``exact`` ``[m, n]``, in float64, and the
    verdict of the thresholds :data:`FD_WARN_ERROR` / :data:`FD_REFUSE_ERROR`."""
    rel: list[float] = []
    cos: list[float] = []
    for a, b in zip(fd.hvps.double(), exact.to(fd.hvps.device).double(), strict=True):
        nb, na = float(b.norm()), float(a.norm())
        rel.append(float((a - b).norm()) / nb if nb > 0 else (0.0 if na == 0 else float("inf")))
        cos.append(float(a @ b) / (na * nb) if na > 0 and nb > 0 else float(na == nb))
    worst = max(rel)
    if not all(math.isfinite(x) for x in rel + cos) or worst > FD_REFUSE_ERROR:
        verdict = "refuse"
    elif worst > FD_WARN_ERROR:
        verdict = "warn"
    else:
        verdict = "ok"
    return FDAgreement(rel, cos, list(fd.eps), list(fd.perturbation_error), verdict)
