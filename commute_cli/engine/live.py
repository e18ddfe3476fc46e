"""A live training model borrowed for curvature work and handed back exactly as it was.

``commute watch`` measures the criterion on the model a trainer is updating. The estimator needs the
model in eval mode (dropout off: losses, gradients and HVPs are otherwise random) and with eager attention
(fused attention kernels have no double backward; docs/CONVENTIONS.md "Models for curvature work"). Training
must then go on as if nothing had happened: a watched run's weights are bit-identical to an unwatched one's
(tests/test_watch.py). :func:`borrowed` therefore saves and restores everything the measurement could touch:

- every module's ``training`` flag (not just the root's: a trainer may freeze parts in eval mode);
- the attention implementation (``config._attn_implementation``, switched with transformers'
  ``set_attn_implementation``);
- every parameter's ``.grad`` (the estimator uses ``torch.autograd.grad`` and never writes ``.grad``;
  the fields are set to None during the measurement anyway, so gradient accumulation in progress cannot be
  mixed with ours, and the very same tensors are put back);
- the random number generators the trainer draws from: torch's CPU and CUDA generators, numpy's global
  one and Python's ``random`` (data order, dropout masks, sampling).

The optimizer is never touched. Parameters are read, never written.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from commute_cli.errors import CommuteError

CURVATURE_DTYPES = (torch.float32, torch.float64)


@dataclass
class RandomState:
    """The global random generators a training loop draws from, as saved by :meth:`save`."""

    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None
    numpy: Any
    python: Any

    @classmethod
    def save(cls) -> RandomState:
        cuda = (
            torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None
        )
        return cls(torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.torch_cuda is not None:
            torch.cuda.set_rng_state_all(self.torch_cuda)
        np.random.set_state(self.numpy)
        random.setstate(self.python)


def _attn_implementation(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def check_dtype(model: nn.Module) -> None:
    """Refuse a model whose trainable parameters are not float32 or float64.

    Raises:
        CommuteError: half-precision parameters (the curvature products would be rounded to 3 digits);
            mixed precision with float32 master weights (``bf16=True`` in the Trainer) is fine.
    """
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    bad = sorted(str(d) for d in dtypes if d not in CURVATURE_DTYPES)
    if bad:
        raise CommuteError(
            f"the live model's parameters are {', '.join(bad)}: curvature needs float32 or float64 weights",
            hint="train with float32 master weights (mixed precision: the Trainer's bf16=True/fp16=True), "
            "or analyze saved checkpoints with commute analyze (it upcasts them)",
        )


@contextlib.contextmanager
def borrowed(model: nn.Module) -> Iterator[nn.Module]:
    """``with borrowed(model) as m:`` -- ``m`` is ``model`` in eval mode with eager attention, its
    ``.grad`` fields empty; on exit (also on error) modes, attention, ``.grad`` and the random generators are
    exactly as before.

    Raises:
        CommuteError: the parameters are not float32/float64 (:func:`check_dtype`).
    """
    check_dtype(model)
    modes = [(m, m.training) for m in model.modules()]
    attn = _attn_implementation(model)
    params = list(model.parameters())
    grads = [p.grad for p in params]
    rng = RandomState.save()
    switch = getattr(model, "set_attn_implementation", None)  # transformers models
    switched = False
    try:
        for p in params:
            p.grad = None
        model.eval()
        if attn is not None and attn != "eager" and callable(switch):
            switch("eager")
            switched = True
        yield model
    finally:
        if switched:
            switch(attn)  # type: ignore[misc]
        for m, mode in modes:
            m.training = mode
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        rng.restore()
