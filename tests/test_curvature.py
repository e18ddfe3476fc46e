"""Checks of curvature.py against references that do not share its code path.

- dense float64 Hessians from ``torch.autograd.functional.hessian`` of a loss of the flat parameter
  vector, where tied weights are fed explicitly under both names (``tie_weights=False``), so neither
  the HVP loops nor ``functional_call``'s tying logic are reused;
- central finite differences of the float64 loss;
- the model's own ``backward()`` on the full batch, and the built-in ``labels=`` loss in float32;
- an untied copy of the model for the tied embedding gradient.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from commute_cli.engine import curvature as C
from commute_cli.engine.hvp import hvp
from commute_cli.errors import CommuteError

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from references import dense_hessian  # noqa: E402

VOCAB = 32
T = 8


def tiny_gpt2_config(attn: str = "eager", **overrides: object) -> GPT2Config:
    kwargs: dict[str, object] = {
        "n_layer": 1,
        "n_embd": 8,
        "n_head": 2,
        "vocab_size": VOCAB,
        "n_positions": 16,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "attn_implementation": attn,
    }
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def tiny_gpt2(dtype: torch.dtype = torch.float64, attn: str = "eager", seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(tiny_gpt2_config(attn))
    return model.eval().to(dtype)


class MLPLM(nn.Module):
    """A causal LM without attention: each position sees its own token and its predecessor's."""

    def __init__(self, vocab: int = VOCAB, d: int = 6, hidden: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(2 * d, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        e = self.emb(ids)
        prev = torch.cat([torch.zeros_like(e[:, :1]), e[:, :-1]], dim=1)
        return self.out(torch.tanh(self.fc(torch.cat([e, prev], dim=-1))))


class MLPRegressor(nn.Module):
    def __init__(self, d_in: int = T, hidden: int = 7) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x))).squeeze(-1)


def regression_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """A non-LM loss hook: features are the scaled token ids, the target a fixed function of them."""
    dtype = next(model.parameters()).dtype
    x = ids.to(dtype) / VOCAB
    target = torch.sin(3 * x).sum(-1)
    return ((model(x) - target) ** 2).mean()


def blocks(n: int = 4, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, T), generator=g)


def rand_vectors(m: int, n: int, dtype: torch.dtype = torch.float64, seed: int = 2) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=torch.float64).to(dtype)


def reference_ce(logits: Tensor, ids: Tensor) -> Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def gpt2_loss(out, ids: Tensor) -> Tensor:
    return reference_ce(out.logits, ids)


@pytest.fixture(scope="module")
def gpt2_case():
    model = tiny_gpt2()
    ids = blocks(4)
    return model, ids, dense_hessian(model, ids, gpt2_loss)


@pytest.fixture(scope="module")
def mlp_case():
    torch.manual_seed(3)
    model = MLPLM().double().eval()
    ids = blocks(5, seed=4)
    return model, ids, dense_hessian(model, ids, reference_ce)


# ------------------------------------------------------------------------------------------------
# Parameter vectors
# ------------------------------------------------------------------------------------------------


def test_param_list_deduplicates_tied_weights() -> None:
    model = tiny_gpt2()
    names = [n for n, _ in C.param_list(model)]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    assert model.lm_head.weight is model.transformer.wte.weight
    assert C.num_params(model) == sum(p.numel() for p in model.parameters())
    vec = C.flat_params(model)
    assert vec.shape == (C.num_params(model),) and vec.dtype == torch.float64
    back = C.unflatten(vec, model)
    for name, p in C.param_list(model):
        assert torch.equal(back[name], p.detach())
    batched = C.unflatten(torch.stack([vec, 2 * vec]), model)
    assert batched["transformer.wpe.weight"].shape == (2, *model.transformer.wpe.weight.shape)
    assert torch.equal(C.flatten(list(back.values())), vec)


def test_param_list_skips_frozen() -> None:
    model = tiny_gpt2()
    model.transformer.wpe.weight.requires_grad_(False)
    names = [n for n, _ in C.param_list(model)]
    assert "transformer.wpe.weight" not in names
    _, grad = C.loss_and_grad(model, blocks(2), 2)
    assert grad.numel() == C.num_params(model)


# ------------------------------------------------------------------------------------------------
# Hessian-vector products against a dense Hessian
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rr", "fr"])
def test_hvp_matches_dense_hessian_gpt2(gpt2_case, method: str) -> None:
    model, ids, H = gpt2_case
    V = rand_vectors(3, H.shape[0])
    res = hvp(model, ids, V, micro_batch=4, method=method)
    ref = V @ H
    assert res.hvps.shape == (3, H.shape[0]) and res.hvps.dtype == torch.float64
    assert (res.hvps - ref).abs().max() <= 1e-10 * ref.abs().max()
    # loss and gradient on the same samples come for free
    with torch.no_grad():
        assert res.loss == pytest.approx(float(gpt2_loss(model(ids), ids)), rel=1e-13)
    _, grad = C.loss_and_grad(model, ids, 4)
    assert torch.allclose(res.grad, grad, rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", ["rr", "fr"])
def test_hvp_matches_dense_hessian_mlp_lm(mlp_case, method: str) -> None:
    model, ids, H = mlp_case
    V = rand_vectors(4, H.shape[0], seed=5)
    res = hvp(model, ids, V, micro_batch=2, method=method)
    ref = V @ H
    assert (res.hvps - ref).abs().max() <= 1e-10 * ref.abs().max()


@pytest.mark.parametrize("method", ["rr", "fr"])
def test_hvp_custom_loss_hook_regression(method: str) -> None:
    torch.manual_seed(6)
    model = MLPRegressor().double()
    ids = blocks(6, seed=7)
    V = rand_vectors(2, C.num_params(model), seed=8)
    res = hvp(model, ids, V, micro_batch=4, method=method, loss_fn=regression_loss)

    def f(theta: Tensor) -> Tensor:
        d = C.unflatten(theta, model)
        return regression_loss_functional(model, d, ids)

    theta = C.flat_params(model)
    H = torch.autograd.functional.hessian(f, theta, vectorize=True)
    ref = V @ H
    assert (res.hvps - ref).abs().max() <= 1e-10 * ref.abs().max()


def regression_loss_functional(model: nn.Module, d: dict[str, Tensor], ids: Tensor) -> Tensor:
    x = ids.double() / VOCAB
    target = torch.sin(3 * x).sum(-1)
    return ((functional_call(model, d, (x,)) - target) ** 2).mean()


def test_rr_fr_symmetry_and_float32(gpt2_case) -> None:
    model64, ids, H = gpt2_case
    n = H.shape[0]
    V = rand_vectors(2, n, seed=9)
    u, v = V[0], V[1]
    rr = hvp(model64, ids, V, 4, "rr").hvps
    fr = hvp(model64, ids, V, 4, "fr").hvps
    assert (rr - fr).abs().max() <= 1e-12 * rr.abs().max()
    assert float(u @ rr[1]) == pytest.approx(float(v @ rr[0]), rel=1e-12)

    model32 = tiny_gpt2(torch.float32)
    model32.load_state_dict({k: t.float() for k, t in model64.state_dict().items()})
    V32 = V.float()
    rr32 = hvp(model32, ids, V32, 4, "rr")
    fr32 = hvp(model32, ids, V32, 4, "fr")
    assert rr32.hvps.dtype == torch.float32 and rr32.grad.dtype == torch.float32
    scale = rr.abs().max()
    assert (rr32.hvps.double() - rr).abs().max() <= 1e-5 * scale
    assert (fr32.hvps.double() - rr).abs().max() <= 1e-5 * scale
    assert (rr32.hvps - fr32.hvps).abs().max() <= 1e-5 * scale
    a, b = float(u.float() @ rr32.hvps[1]), float(v.float() @ rr32.hvps[0])
    assert a == pytest.approx(b, rel=1e-5)


def test_fr_chunks_and_single_vector(gpt2_case) -> None:
    model, ids, H = gpt2_case
    V = rand_vectors(3, H.shape[0], seed=10)
    full = hvp(model, ids, V, 4, "fr").hvps
    chunked = hvp(model, ids, V, 4, "fr", fr_chunk=2).hvps
    single = hvp(model, ids, V[1], 4, "fr").hvps
    assert single.shape == (1, H.shape[0])
    assert torch.allclose(chunked, full, rtol=0, atol=1e-13)
    assert torch.allclose(single[0], full[1], rtol=0, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------


def _shifted_loss(model: nn.Module, ids: Tensor, direction: Tensor, eps: float) -> float:
    with torch.no_grad():
        backup = C.flat_params(model)
        for (_, p), piece in zip(C.param_list(model), C.unflatten(direction, model).values(), strict=True):
            p.add_(eps * piece)
        try:
            return C.loss_only(model, ids, 2)
        finally:
            for (_, p), piece in zip(C.param_list(model), C.unflatten(backup, model).values(), strict=True):
                p.copy_(piece)


def test_gradient_matches_finite_differences_and_backward() -> None:
    model = tiny_gpt2()
    ids = blocks(4, seed=11)
    loss, grad = C.loss_and_grad(model, ids, 3)
    for d in rand_vectors(3, grad.numel(), seed=12):
        d = d / d.norm()  # unit directions keep the O(eps^2) third-order error near 1e-10
        eps = 1e-5
        fd = (_shifted_loss(model, ids, d, eps) - _shifted_loss(model, ids, d, -eps)) / (2 * eps)
        assert float(grad @ d) == pytest.approx(fd, rel=1e-8, abs=1e-10)

    # the model's own backward on the whole batch, through .grad
    model.zero_grad(set_to_none=True)
    full = reference_ce(model(ids).logits, ids)
    full.backward()
    own = torch.cat([p.grad.reshape(-1) for _, p in C.param_list(model)])
    model.zero_grad(set_to_none=True)
    assert loss == pytest.approx(float(full), rel=1e-14)
    assert torch.allclose(grad, own, rtol=0, atol=1e-14)

    # the built-in labels= loss (float32 logits) agrees to float32 precision
    builtin = model(ids, labels=ids).loss
    assert loss == pytest.approx(float(builtin), rel=1e-6)


def test_loss_and_grad_leave_model_grads_alone() -> None:
    model = tiny_gpt2()
    C.loss_and_grad(model, blocks(2), 1)
    hvp(model, blocks(2), rand_vectors(1, C.num_params(model)), 1, "rr")
    assert all(p.grad is None for p in model.parameters())


def test_tied_embedding_gradient_includes_lm_head() -> None:
    model = tiny_gpt2()
    ids = blocks(3, seed=13)
    _, grad = C.loss_and_grad(model, ids, 3)
    g_wte = C.unflatten(grad, model)["transformer.wte.weight"]

    # untied copy: same numbers, separate lm_head
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        untied = GPT2LMHeadModel(tiny_gpt2_config(tie_word_embeddings=False)).eval().double()
    untied.load_state_dict(model.state_dict())
    untied.lm_head.weight.data = model.transformer.wte.weight.detach().clone()
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    _, ugrad = C.loss_and_grad(untied, ids, 3)
    parts = C.unflatten(ugrad, untied)
    assert torch.allclose(g_wte, parts["transformer.wte.weight"] + parts["lm_head.weight"], atol=1e-14)
    assert not torch.allclose(g_wte, parts["transformer.wte.weight"], atol=1e-6)

    # finite difference on one embedding coordinate of a token that occurs as input
    row = int(ids[0, 0])
    direction = torch.zeros_like(grad)
    offset = 0  # wte is the first parameter
    direction[offset + row * model.config.n_embd + 1] = 1.0
    eps = 1e-5
    fd = (_shifted_loss(model, ids, direction, eps) - _shifted_loss(model, ids, direction, -eps)) / (2 * eps)
    assert float(g_wte[row, 1]) == pytest.approx(fd, rel=1e-7)


# ------------------------------------------------------------------------------------------------
# Micro-batches
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rr", "fr"])
def test_micro_batch_accumulation(method: str) -> None:
    model = tiny_gpt2()
    ids = blocks(5, seed=14)
    V = rand_vectors(2, C.num_params(model), seed=15)
    ref = hvp(model, ids, V, 5, method)
    for mb in (1, 2, 3):
        res = hvp(model, ids, V, mb, method)
        assert res.loss == pytest.approx(ref.loss, rel=1e-13)
        assert torch.allclose(res.grad, ref.grad, rtol=0, atol=1e-13)
        assert torch.allclose(res.hvps, ref.hvps, rtol=0, atol=1e-12)
        loss, grad = C.loss_and_grad(model, ids, mb)
        assert loss == pytest.approx(ref.loss, rel=1e-13)
        assert torch.allclose(grad, ref.grad, rtol=0, atol=1e-13)
        assert C.loss_only(model, ids, mb) == pytest.approx(ref.loss, rel=1e-13)


def test_reduce_hook_is_applied() -> None:
    """A fake two-process all-reduce (every sum doubled) leaves the means unchanged."""
    model = tiny_gpt2()
    ids = blocks(3, seed=16)
    V = rand_vectors(1, C.num_params(model), seed=17)
    ref = hvp(model, ids, V, 2, "rr")
    calls: list[int] = []

    def twice(t: Tensor) -> Tensor:
        calls.append(t.numel())
        return 2 * t

    res = hvp(model, ids, V, 2, "rr", reduce=twice)
    assert calls and res.loss == pytest.approx(ref.loss, rel=1e-14)
    assert torch.allclose(res.hvps, ref.hvps, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------------
# Clear errors
# ------------------------------------------------------------------------------------------------


def test_train_mode_with_dropout_is_refused() -> None:
    model = tiny_gpt2().train()
    ids = blocks(2)
    V = rand_vectors(1, C.num_params(model))
    for call in (
        lambda: C.loss_only(model, ids, 2),
        lambda: C.loss_and_grad(model, ids, 2),
        lambda: hvp(model, ids, V, 2, "rr"),
    ):
        with pytest.raises(CommuteError, match="dropout") as info:
            call()
        assert "eval()" in (info.value.hint or "")


def test_train_mode_without_dropout_is_accepted() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = tiny_gpt2_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg).double().train()
    ids = blocks(2)
    a = C.loss_and_grad(model, ids, 2)[1]
    b = C.loss_and_grad(model, ids, 2)[1]
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["rr", "fr"])
def test_sdpa_attention_gives_a_clear_error(method: str) -> None:
    """Measured with torch 2.13 CPU: SDPA's flash-attention CPU kernel has neither double backward
    ("derivative for ..._backward is not implemented") nor forward AD (NotImplementedError), in
    float32 and float64 alike. First-order gradients work."""
    model = tiny_gpt2(attn="sdpa")
    ids = blocks(2)
    C.loss_and_grad(model, ids, 2)  # first order is fine
    V = rand_vectors(1, C.num_params(model))
    with pytest.raises(CommuteError, match="sdpa") as info:
        hvp(model, ids, V, 2, method)
    assert 'attn_implementation="eager"' in (info.value.hint or "")


def test_sdpa_math_backend_works() -> None:
    """The documented escape hatch (FACTS.md): SDPA restricted to the math backend is differentiable."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    eager, sdpa = tiny_gpt2(), tiny_gpt2(attn="sdpa")
    ids = blocks(2)
    V = rand_vectors(1, C.num_params(eager))
    ref = hvp(eager, ids, V, 2, "rr").hvps
    with sdpa_kernel(SDPBackend.MATH):
        got = hvp(sdpa, ids, V, 2, "rr").hvps
    assert torch.allclose(got, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


def test_bad_inputs() -> None:
    model = tiny_gpt2()
    n = C.num_params(model)
    with pytest.raises(CommuteError):
        hvp(model, blocks(2), torch.zeros(1, n + 1, dtype=torch.float64), 1)
    with pytest.raises(CommuteError):
        hvp(model, blocks(2), torch.zeros(1, n, dtype=torch.float64), 1, method="xx")  # type: ignore[arg-type]
    with pytest.raises(CommuteError):
        C.loss_and_grad(model, blocks(2).float(), 1)
    with pytest.raises(CommuteError):
        C.loss_and_grad(model, blocks(2), 0)
    frozen = tiny_gpt2().requires_grad_(False)
    with pytest.raises(CommuteError, match="no trainable"):
        C.loss_and_grad(frozen, blocks(2), 1)


@pytest.mark.parametrize("method", ["rr", "fr"])
def test_hvp_flops_are_three_gradients_and_shared_per_vector(method: str) -> None:
    """The FLOP floor derived in docs/DECISIONS.md and printed by benchmarks/bench_hvp.py: an exact
    HVP costs 3 gradients in matrix-multiply FLOPs for one vector, and ``(1 + 2m) / m`` gradients per vector
    when m vectors share one forward and backward pass. Counted independently by torch's FLOP counter on a
    real GPT-2 (tied weights, eager attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=16, attn_implementation="eager"
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(config).eval()
    blocks = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    vecs = torch.randn(4, C.num_params(model), generator=torch.Generator().manual_seed(2))

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    grad = flops(lambda: C.loss_and_grad(model, blocks, micro_batch=4))
    assert grad > 0
    for m in (1, 2, 4):
        total = flops(lambda m=m: hvp(model, blocks, vecs[:m], micro_batch=4, method=method))
        assert total / grad / m == pytest.approx((1 + 2 * m) / m, rel=1e-3), (m, total / grad)
