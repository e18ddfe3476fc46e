"""The diagonal metric ``D`` of docs/MATH.md for one checkpoint: Euclidean (``None``) or Adam's, clipped.

One room for the whole idea: the formula (:func:`adam_preconditioner`), applying it
(:func:`apply_preconditioner`), the safeguard (:data:`ADAM_CLIP`) and the one warning users see
(:data:`ADAM_WARNING`). Torch-side because ``D`` is parameter-sized; the criterion itself
(``core/criterion.py``) only sees scalars.
"""

from __future__ import annotations

from typing import Any

import torch

from commute_cli.errors import CommuteError

Tensor = torch.Tensor

ADAM_CLIP = 100.0
"""Adam's ``D`` is clipped at this multiple of its median (coordinates whose second moment is ~0 would make
``D`` ~ 1/eps = 1e8 and the prediction explode; docs/MATH.md "Regime of validity")."""

ADAM_WARNING = (
    "warning: --metric adam is experimental: Adam's frozen second moments (clipped at 100x their median) "
    "as the metric; on the shipped AdamW run its predictions were ~100x too large and right in sign 10/20 "
    "times, against 16/20 for euclid (docs/DECISIONS.md)"
)
"""The one warning printed by every command that accepts ``--metric adam``."""


def apply_preconditioner(D: Tensor | None, v: Tensor) -> Tensor:
    """``D v`` for a diagonal preconditioner given as its diagonal ``[n]`` (``None`` means the identity).

    Works on a single vector ``[n]`` or a stack ``[..., n]`` (the diagonal broadcasts over the last axis).

    Raises:
        ValueError: ``D`` is not ``[n]`` with ``n = v.shape[-1]``.
    """
    if D is None:
        return v
    if D.ndim != 1 or D.shape[0] != v.shape[-1]:
        raise ValueError(f"preconditioner has shape {tuple(D.shape)}, vectors have length {v.shape[-1]}")
    return D.to(v.dtype) * v


def adam_preconditioner(exp_avg_sq: Tensor, step: int, beta2: float, eps: float) -> Tensor:
    """Adam's diagonal metric ``D = 1 / (sqrt(v_hat) + eps)``, ``v_hat = v / (1 - beta2^step)``.

    docs/MATH.md "Notation" (D frozen over the window). Only the formula; :func:`preconditioner` adds the
    clip. Float64 stays float64, narrower dtypes are lifted to float32.

    Raises:
        CommuteError: ``step < 1`` (no bias correction possible).
    """
    if step < 1:
        raise CommuteError(f"Adam step must be >= 1 for bias correction, got {step}")
    acc = torch.float64 if exp_avg_sq.dtype == torch.float64 else torch.float32
    v_hat = exp_avg_sq.to(acc) / (1.0 - beta2**step)
    return 1.0 / (v_hat.sqrt() + eps)


def clip_metric(D: Tensor, clip: float = ADAM_CLIP) -> tuple[Tensor, dict[str, float]]:
    """``D`` clipped at ``clip x median(D)``; returns it with ``clip_cap`` and ``clipped_fraction``."""
    cap = clip * float(D.median())
    clipped = float((cap < D).double().mean())
    return D.clamp(max=cap), {"clip_cap": cap, "clipped_fraction": clipped}


def adam_metric(exp_avg_sq: Tensor, step: int, beta2: float, eps: float) -> tuple[Tensor, dict[str, Any]]:
    """Adam's metric for one checkpoint with the safeguard: :func:`adam_preconditioner`, then
    :func:`clip_metric`. ``exp_avg_sq`` is the optimizer's second moment flattened in the order of
    ``curvature.param_list`` (the order of every gradient; the caller reads it from the checkpoint).

    Returns ``(D, extra)``; ``extra`` records ``adam_step``, ``clip_cap`` and ``clipped_fraction`` for
    ``run.json``.
    """
    D, extra = clip_metric(adam_preconditioner(exp_avg_sq, step, beta2, eps))
    return D, {"adam_step": step, **extra}
