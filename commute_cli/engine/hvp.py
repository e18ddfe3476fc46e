"""Hessian-vector products of a model's mean loss over token blocks: :func:`hvp` and its two exact plans,
reverse-on-reverse (``"rr"``, the paper's) and forward-over-reverse (``"fr"``, ``torch.func``), with the
translation of "this operation has no double backward / forward AD" into an actionable error; and the
finite-difference approximation ``"fd"`` (``engine.fd_hvp``: two gradients, any attention kernel).

Parameter vectors, the model and block checks and the micro-batch sums are ``engine.curvature``'s
(its docstring states the conventions: flat vectors in ``param_list`` order, means over all blocks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from commute_cli.engine.curvature import (
    LossFn,
    Reduce,
    accumulation_dtype,
    block_means,
    causal_lm_loss,
    check_blocks,
    check_model,
    flatten,
    grads_or_zeros,
    micro_batches,
    model_device,
    trainable,
)
from commute_cli.engine.fd_hvp import fd_hvp
from commute_cli.errors import CommuteError

HVPMethod = Literal["rr", "fr", "fd"]
HVP_METHODS: tuple[str, ...] = ("rr", "fr", "fd")

_AD_UNSUPPORTED = re.compile(
    r"derivative for .* is not implemented|forward AD with .* does not support|"
    r"does not support forward|not implemented for forward|double backward",
    re.IGNORECASE,
)


def _translate_ad_error(err: BaseException, model: nn.Module, method: str) -> CommuteError | None:
    """Turn "this op has no double backward / forward AD" into an actionable error, else None."""
    msg = str(err)
    if not _AD_UNSUPPORTED.search(msg):
        return None
    what = "double backward" if method == "rr" else "forward-mode AD"
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    first_line = msg.strip().splitlines()[0] if msg.strip() else type(err).__name__
    attn_note = f" (attention implementation: {attn!r})" if attn is not None else ""
    return CommuteError(
        f"Hessian-vector products ({method}) need {what} through every operation of the model, and "
        f"one does not support it{attn_note}: {first_line}",
        hint='load the model with attn_implementation="eager" (fused attention kernels such as SDPA '
        "and flash attention have no double backward or forward-mode AD)",
    )


@dataclass
class HVPResult:
    """H v for each input vector, plus the loss and gradient on the same samples (free by-products).

    ``hvps[i] = H vectors[i]`` with H the Hessian of the mean loss over all blocks.
    """

    hvps: Tensor
    loss: float
    grad: Tensor
    fd_eps: list[float] | None = None  # "fd" only: the step of each vector (engine.fd_hvp)


def hvp(
    model: nn.Module,
    blocks: Tensor,
    vectors: Tensor,
    micro_batch: int,
    method: HVPMethod = "rr",
    loss_fn: LossFn = causal_lm_loss,
    reduce: Reduce | None = None,
    fr_chunk: int | None = None,
) -> HVPResult:
    """Exact Hessian-vector products of the mean loss over ``blocks`` for ``m`` vectors at once.

    ``vectors`` is ``[m, n]`` (a single ``[n]`` vector is treated as ``m = 1``; the result is always
    ``[m, n]``); it is moved to the model's device and dtype. Both methods share one forward pass per
    micro-batch among all vectors (MATH.md, "Cost": several vectors through the same samples):

    - ``"rr"`` (reverse-on-reverse, the paper's): one gradient with ``create_graph=True`` per
      micro-batch, then one double backward ``d<g, v_i>/dtheta`` per vector on the retained graph.
    - ``"fr"`` (forward-over-reverse): ``torch.func.jvp`` of the gradient, the tangents batched with
      ``vmap`` (``fr_chunk`` vectors per call, all by default) so the primal forward and backward are
      computed once per chunk. Its memory grows with the chunk; ``"rr"``'s hardly grows with m.

    Measured (benchmarks/bench_hvp.py, 14M GPT-2, batch 4 x 256, 1 thread, noisy shared CPU): time per
    vector / gradient time rr 3.1, 2.6, 2.6 and fr 5.4, 4.3, 2.9 for m = 1, 2, 4; peak memory above
    baseline gradient 0.7 GB, rr 2.1 GB (m=1) / 2.6 GB (m=4), fr 2.5 GB / 6.8 GB. Hence "rr" by default.
    On an H200 (124M GPT-2, 4 x 1024): rr 3.17, 2.67, 2.43 and fr 3.35, 2.87, 2.43 per vector. The floor in
    matrix-multiply FLOPs is 3.0, 2.5, 2.25 for any exact method (docs/DECISIONS.md), so both methods run
    within ~10% of the arithmetic they must do.

    In float64 both agree with a dense Hessian to ~1e-12; in float32 with each other to ~1e-6.

    - ``"fd"`` (not exact): the central difference ``(g(theta + eps v) - g(theta - eps v)) / 2 eps`` of two
      gradients per vector (``engine.fd_hvp.fd_hvp``; ``fr_chunk`` unused). Works with fused attention
      kernels and half-precision weights; its loss is the mean of the two perturbed losses less the even
      Taylor term and its gradient their mean (``O(eps^2)``). Its error is measured, not assumed
      (docs/MATH.md "Finite-difference HVPs"). Measured (benchmarks/bench_fd_hvp.py, 2.1M GPT-2, 1 thread):
      2.0 SDPA gradient passes per product at 256-1024 tokens, against 3.6-4.1 for "rr" with eager
      attention (9.2 at 2048 tokens).
    """
    if method not in HVP_METHODS:
        raise CommuteError(f"unknown HVP method {method!r}", hint='use "rr", "fr" or "fd"')
    check_model(model)
    check_blocks(blocks, micro_batch, allow_empty=reduce is not None)
    plist = trainable(model)
    params = [p for _, p in plist]
    n = sum(p.numel() for p in params)
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2 or vectors.shape[1] != n:
        raise CommuteError(
            f"HVP vectors must be [m, {n}] (the model's trainable parameters), got {tuple(vectors.shape)}",
            hint="lay vectors out in curvature.param_list(model) order",
        )
    if vectors.shape[0] == 0:
        raise CommuteError("no vectors given for Hessian-vector products")
    if fr_chunk is not None and fr_chunk < 1:
        raise CommuteError(f"fr_chunk must be >= 1, got {fr_chunk}")
    if method == "fd":
        fd = fd_hvp(model, blocks, vectors, micro_batch, loss_fn, reduce)
        return HVPResult(hvps=fd.hvps, loss=fd.loss, grad=fd.grad, fd_eps=fd.eps)
    device, acc = model_device(model), accumulation_dtype(model)
    compute_dtype = params[0].dtype
    vecs = vectors.detach().to(device=device, dtype=compute_dtype)
    m = vecs.shape[0]

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # see causal_lm_loss
    grad_sum = torch.zeros(n, dtype=acc, device=device)
    hvp_sum = torch.zeros(m, n, dtype=acc, device=device)
    step = _rr_micro_batch if method == "rr" else _fr_micro_batch
    try:
        for mb in micro_batches(blocks, micro_batch, device):
            loss, grad, hv = step(model, plist, mb, vecs, loss_fn, fr_chunk)
            b = mb.shape[0]
            loss_sum += loss.double() * b
            grad_sum.add_(grad.to(acc), alpha=b)
            hvp_sum.add_(hv.to(acc), alpha=b)  # no [m, n] temporary
    except (RuntimeError, NotImplementedError) as err:
        translated = _translate_ad_error(err, model, method)
        if translated is None:
            raise
        raise translated from err
    loss_mean, grad_mean, hvp_mean = block_means([loss_sum, grad_sum, hvp_sum], blocks.shape[0], acc, reduce)
    return HVPResult(hvps=hvp_mean, loss=float(loss_mean), grad=grad_mean)


def _rr_micro_batch(
    model: nn.Module,
    plist: list[tuple[str, nn.Parameter]],
    mb: Tensor,
    vecs: Tensor,
    loss_fn: LossFn,
    fr_chunk: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Micro-batch mean loss, gradient and H v_i by reverse-on-reverse, one forward for all v_i.

    ``autograd.grad(grads, params, grad_outputs=v)`` is d<g, v>/dtheta without building the dot
    product; gradient entries that do not depend on the parameters (no graph) contribute nothing.
    """
    params = [p for _, p in plist]
    with torch.enable_grad():
        loss = loss_fn(model, mb)
        grads = grads_or_zeros(
            torch.autograd.grad(loss, params, create_graph=True, allow_unused=True), params
        )
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    hvs = torch.zeros(vecs.shape, dtype=vecs.dtype, device=vecs.device)
    if live:
        sizes = [p.numel() for p in params]
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s)
        for k in range(vecs.shape[0]):
            v_pieces = vecs[k].split(sizes)
            outs = [v_pieces[i].view_as(grads[i]) for i in live]
            hv = torch.autograd.grad(
                [grads[i] for i in live],
                params,
                grad_outputs=outs,
                retain_graph=k < vecs.shape[0] - 1,
                allow_unused=True,
            )
            for j, h in enumerate(hv):
                if h is not None:
                    hvs[k, offsets[j] : offsets[j + 1]] = h.reshape(-1)
    return loss.detach(), flatten([g.detach() for g in grads]), hvs


class _BoundLoss(nn.Module):
    """``loss_fn(model, x)`` as a module, so ``functional_call`` can swap the model's parameters.

    Registering the model as a submodule makes its tied weights visible to ``functional_call``
    (``tie_weights=True``), which then feeds the one de-duplicated tensor to every use -- passing
    both tied names raises, and ``tie_weights=False`` gives a wrong embedding gradient (FACTS.md).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, input_ids: Tensor) -> Tensor:
        return self._loss_fn(self.model, input_ids)


def _fr_micro_batch(
    model: nn.Module,
    plist: list[tuple[str, nn.Parameter]],
    mb: Tensor,
    vecs: Tensor,
    loss_fn: LossFn,
    fr_chunk: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Micro-batch mean loss, gradient and H v_i by forward-over-reverse (``torch.func``)."""
    from torch.func import functional_call, grad_and_value, jvp, vmap

    bound = _BoundLoss(model, loss_fn)
    names = [f"model.{name}" for name, _ in plist]
    primals = {key: p.detach() for key, (_, p) in zip(names, plist, strict=True)}
    sizes = [p.numel() for _, p in plist]
    shapes = [p.shape for _, p in plist]

    def loss_of(pdict: dict[str, Tensor]) -> Tensor:
        return functional_call(bound, pdict, (mb,))

    grad_value = grad_and_value(loss_of)

    def one(tangent_flat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pieces = tangent_flat.split(sizes)
        tangents = {key: t.view(s) for key, t, s in zip(names, pieces, shapes, strict=True)}
        (g, loss), (hv, _) = jvp(grad_value, (primals,), (tangents,))  # type: ignore[misc]  # (out, tangent)
        return loss, flatten([g[k] for k in names]), flatten([hv[k] for k in names])

    with torch.enable_grad():
        if vecs.shape[0] == 1:
            loss, grad, hv = one(vecs[0])
            return loss.detach(), grad.detach(), hv.detach().unsqueeze(0)
        losses, grads, hvs = vmap(one, chunk_size=fr_chunk)(vecs)
    return losses[0].detach(), grads[0].detach(), hvs.detach()
