"""Losses, gradients and Hessian-vector products of a model over token blocks.

This module and ``engine.hvp`` are the only ones of the project that run autograd. Everything the
criterion needs (``docs/MATH.md``: the gradients g_k and the products H_a v) comes from three calls:

- :func:`loss_only` -- mean loss, no graph (evaluation losses);
- :func:`loss_and_grad` -- mean loss and its gradient;
- ``engine.hvp.hvp`` -- H v for several vectors v through the same samples, with the loss and gradient on
  those samples for free (its two plans, reverse-on-reverse and forward-over-reverse, live there).

Conventions (docs/CONVENTIONS.md):

- A parameter vector is a flat 1-D tensor in the order of :func:`param_list` (de-duplicated
  ``named_parameters()``, tied weights once, ``requires_grad`` only), float32 -- float64 when the
  model is float64, so that float64 reference tests reach ~1e-12.
- Every quantity is a mean over all N blocks. It is accumulated as a *sum* of micro-batch
  contributions (micro-batch mean times micro-batch size), passed through ``reduce`` (the identity
  here; an all-reduce sum under data parallelism) and divided by the global block count. Adding data
  parallelism is thus a matter of passing ``reduce`` and giving each process its own blocks.
- The loss is a hook (:data:`LossFn`), so that other model families plug in: it receives the model
  and a micro-batch of equal-length token blocks and returns the mean next-token cross-entropy.

Why eval mode and eager attention: dropout makes every loss, gradient and HVP random (the bracket is
a difference of two HVP-based terms, so noise there is fatal), and fused attention kernels support
neither double backward (reverse-on-reverse) nor forward-mode AD (forward-over-reverse). Both are
checked: dropout up front (cheap), attention by translating the autograd error into a
:class:`~commute_cli.errors.CommuteError` with the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from commute_cli.errors import CommuteError

LossFn = Callable[[nn.Module, Tensor], Tensor]
"""``loss_fn(model, input_ids[b, T]) -> scalar``: mean next-token cross-entropy over the micro-batch."""

Reduce = Callable[[Tensor], Tensor]
"""Sums a tensor across processes (data parallelism; may reduce in place); ``None`` means a single process."""

_DROPOUT_TYPES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


# --------------------------------------------------------------------------------------------
# Parameter vectors
# --------------------------------------------------------------------------------------------


def param_list(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters every flat vector of the project is laid out over, in order.

    ``named_parameters()`` order, each tensor once (a tied ``lm_head.weight`` is the same tensor as
    ``transformer.wte.weight`` and appears only under the first name; its gradient then includes
    both uses), and only those with ``requires_grad`` (frozen parameters are constants of the loss).
    """
    seen: set[int] = set()
    out: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        out.append((name, p))
    return out


def num_params(model: nn.Module) -> int:
    """Length of a flat parameter vector of ``model`` (see :func:`param_list`)."""
    return sum(p.numel() for _, p in param_list(model))


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors (one per parameter, :func:`param_list` order) into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vec: Tensor, model: nn.Module) -> dict[str, Tensor]:
    """Split a flat vector into ``{name: tensor shaped like the parameter}`` (views of ``vec``).

    A leading batch dimension is kept: a ``[m, n]`` matrix gives ``[m, *shape]`` tensors.
    """
    plist = param_list(model)
    n = sum(p.numel() for _, p in plist)
    if vec.shape[-1] != n:
        raise CommuteError(
            f"a parameter vector has {vec.shape[-1]} entries but the model has {n} trainable parameters",
            hint="vectors must be laid out in curvature.param_list(model) order",
        )
    lead = tuple(vec.shape[:-1])
    pieces = vec.split([p.numel() for _, p in plist], dim=-1)
    return {name: piece.reshape(*lead, *p.shape) for (name, p), piece in zip(plist, pieces, strict=True)}


def flat_params(model: nn.Module) -> Tensor:
    """The current parameters as one flat vector (a detached copy), in :func:`param_list` order."""
    return flatten([p.detach() for _, p in param_list(model)])


def accumulation_dtype(model: nn.Module) -> torch.dtype:
    """float64 for a float64 model (reference tests), float32 otherwise (also for half precision)."""
    for _, p in param_list(model):
        if p.is_floating_point():
            return torch.float64 if p.dtype == torch.float64 else torch.float32
    return torch.float32


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Loss hook
# --------------------------------------------------------------------------------------------


def causal_lm_loss(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of a causal LM over a micro-batch of blocks ``[b, T]``.

    Computed here rather than with ``labels=``: the built-in loss casts logits to float32, which
    would cap float64 reference tests at float32 accuracy. Logits are upcast to float32 (kept
    float64 for a float64 model). Works for Hugging Face causal LMs (``.logits``) and for any
    module returning the logits tensor ``[b, T, V]`` itself.

    The per-token losses are averaged in float64 (the result is a float64 scalar; gradients flow back
    in the parameters' dtype): a float32 mean rounds differently for every grouping of the sequences
    into micro-batches or processes (~1e-7 relative), and the standard error of the loss over design
    blocks, a small difference of such means, would inherit that as ~1e-5 relative noise.
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        out = model(input_ids, use_cache=False)  # no key/value cache: nothing to generate
    else:
        out = model(input_ids)
    logits = out if isinstance(out, Tensor) else out.logits
    if logits.dtype != torch.float64:
        logits = logits.float()
    shift_logits = logits[:, :-1, :]
    labels = input_ids[:, 1:]
    per_token = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), labels.reshape(-1), reduction="none"
    )
    return per_token.double().mean()


# --------------------------------------------------------------------------------------------
# Checks and error translation
# --------------------------------------------------------------------------------------------


def check_model(model: nn.Module) -> None:
    """Refuse a model whose losses would be random: train mode with active dropout.

    Cheap (walks the modules once). Looks at dropout modules and at float attributes named
    ``*dropout*`` (some attention implementations pass ``p=self.attention_dropout`` to a functional
    dropout when ``self.training``). A model in train mode with all dropout at 0 is accepted.
    """
    if not model.training:
        return
    active: list[str] = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, _DROPOUT_TYPES) and module.p > 0:
            active.append(f"{name or 'model'} (p={module.p:g})")
            continue
        for attr, value in vars(module).items():
            if "dropout" in attr and isinstance(value, float) and value > 0:
                active.append(f"{name or 'model'}.{attr} (p={value:g})")
    if active:
        shown = ", ".join(active[:3]) + (f" and {len(active) - 3} more" if len(active) > 3 else "")
        raise CommuteError(
            f"the model is in train mode with dropout active ({shown}), so losses, gradients and "
            "Hessian-vector products would be random",
            hint="call model.eval() before computing curvature",
        )


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    plist = param_list(model)
    if not plist:
        raise CommuteError(
            "the model has no trainable parameters (all have requires_grad=False)",
            hint="gradients and curvature are taken with respect to parameters with requires_grad=True",
        )
    return plist


def check_blocks(blocks: Tensor, micro_batch: int, allow_empty: bool = False) -> None:
    """``allow_empty``: under data parallelism (a ``reduce`` hook) a process may hold no block of a small
    part; it then contributes zero sums and a zero count, and the reduced count is still positive."""
    if blocks.dim() != 2 or blocks.dtype not in (torch.int64, torch.int32):
        raise CommuteError(
            f"token blocks must be an integer tensor [N, T], got {tuple(blocks.shape)} {blocks.dtype}",
            hint="pass a LongTensor of equal-length token blocks",
        )
    if (blocks.shape[0] == 0 and not allow_empty) or blocks.shape[1] < 2:
        raise CommuteError(
            f"need at least one block of at least 2 tokens, got shape {tuple(blocks.shape)}",
            hint="sample more data or use a longer sequence length",
        )
    if micro_batch < 1:
        raise CommuteError(f"micro_batch must be >= 1, got {micro_batch}")


# --------------------------------------------------------------------------------------------
# Accumulation
# --------------------------------------------------------------------------------------------


def micro_batches(blocks: Tensor, micro_batch: int, device: torch.device) -> Iterator[Tensor]:
    for mb in blocks.split(micro_batch):
        if mb.shape[0] == 0:  # split() of an empty tensor yields one empty chunk
            continue
        yield mb.to(device=device, dtype=torch.long, non_blocking=True)


def block_means(
    sums: list[Tensor], count: int, acc_dtype: torch.dtype, reduce: Reduce | None
) -> list[Tensor]:
    """Sum across processes (``reduce``) and divide by the global number of blocks.

    Loss sums are float64 scalars whatever ``acc_dtype`` (see :func:`causal_lm_loss`); vectors keep
    their dtype (a float64 0-dim count does not promote them).
    """
    total = torch.tensor(float(count), dtype=torch.float64, device=sums[0].device)
    if reduce is not None:
        sums = [reduce(s) for s in sums]
        total = reduce(total)
    return [s / total for s in sums]


def grads_or_zeros(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]


# --------------------------------------------------------------------------------------------
# Public computations
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def loss_only(
    model: nn.Module,
    blocks: Tensor,
    micro_batch: int,
    loss_fn: LossFn = causal_lm_loss,
    reduce: Reduce | None = None,
) -> float:
    """Mean loss over all blocks, without building a graph (evaluation losses)."""
    check_model(model)
    check_blocks(blocks, micro_batch, allow_empty=reduce is not None)
    device, acc = model_device(model), accumulation_dtype(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # see causal_lm_loss
    for mb in micro_batches(blocks, micro_batch, device):
        loss_sum += loss_fn(model, mb).detach().double() * mb.shape[0]
    (loss,) = block_means([loss_sum], blocks.shape[0], acc, reduce)
    return float(loss)


def loss_and_grad(
    model: nn.Module,
    blocks: Tensor,
    micro_batch: int,
    loss_fn: LossFn = causal_lm_loss,
    reduce: Reduce | None = None,
) -> tuple[float, Tensor]:
    """Mean loss over all N blocks and its gradient (flat, :func:`param_list` order).

    Uses ``torch.autograd.grad``, so the model's ``.grad`` fields are left untouched.
    """
    check_model(model)
    check_blocks(blocks, micro_batch, allow_empty=reduce is not None)
    plist = trainable(model)
    params = [p for _, p in plist]
    device, acc = model_device(model), accumulation_dtype(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # see causal_lm_loss
    grad_sum = torch.zeros(sum(p.numel() for p in params), dtype=acc, device=device)
    for mb in micro_batches(blocks, micro_batch, device):
        with torch.enable_grad():
            loss = loss_fn(model, mb)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        b = mb.shape[0]
        loss_sum += loss.detach().double() * b
        grad_sum.add_(flatten(grads_or_zeros(grads, params)).to(acc), alpha=b)  # no [n] temporary
    loss_mean, grad_mean = block_means([loss_sum, grad_sum], blocks.shape[0], acc, reduce)
    return float(loss_mean), grad_mean
