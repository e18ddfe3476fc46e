"""``engine.live.borrowed``: a training model lent for curvature work comes back exactly as it was."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from commute_cli.engine import curvature, live
from commute_cli.errors import CommuteError


def _model() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                        eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config).train()  # dropout 0.1, sdpa attention


def test_borrowed_restores_modes_attention_grads_and_generators() -> None:
    model = _model()
    model.transformer.h[0].mlp.eval()  # a frozen part stays in eval mode afterwards
    params = list(model.parameters())
    for p in params[::2]:
        p.grad = torch.randn_like(p)
    grads = [p.grad for p in params]
    modes = {name: m.training for name, m in model.named_modules()}
    x = torch.randint(0, 40, (2, 8))

    def seed() -> None:
        torch.manual_seed(5)
        np.random.seed(5)
        random.seed(5)

    seed()
    expected = (torch.rand(3), np.random.rand(3), random.random())  # the next draws of these states
    seed()

    with live.borrowed(model) as m:
        assert m is model and not any(mod.training for mod in m.modules())
        assert m.config._attn_implementation == "eager"
        assert all(p.grad is None for p in params)
        loss, _grad = curvature.loss_and_grad(m, x, 2)  # real curvature work, which draws nothing
        assert torch.isfinite(torch.as_tensor(loss))
        torch.rand(100), np.random.rand(7), random.random()  # anything that draws from the generators

    assert model.config._attn_implementation == "sdpa"
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is g for p, g in zip(params, grads, strict=True))  # the same tensors, untouched
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_borrowed_restores_on_error() -> None:
    model = _model()
    with pytest.raises(RuntimeError), live.borrowed(model):
        raise RuntimeError("boom")
    assert model.training and model.config._attn_implementation == "sdpa"


def test_half_precision_weights_are_refused() -> None:
    model = _model().to(torch.bfloat16)
    with pytest.raises(CommuteError, match="float32 or float64"), live.borrowed(model):
        pass
    assert model.training  # nothing was switched
