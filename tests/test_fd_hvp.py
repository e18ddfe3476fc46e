"""Finite-difference HVPs (``engine.fd_hvp``, ``--hvp fd``) against independent references.

- a dense float64 Hessian (``references.dense_hessian``): the error is the Taylor term ``eps^2 c`` predicted
  by the analysis (docs/MATH.md "Finite-difference HVPs"; ``c = D^4 L[v, v, v, .] / 6``), the same vector at
  two steps;
- in float32, a bound derived term by term: each gradient's rounding error (measured against float64 at the
  very weights the finite difference used), the rounding of the perturbed weights (through the dense Hessian)
  and the truncation term;
- SDPA against eager attention: equal up to the two kernels' own float32 rounding;
- a bfloat16 copy of the shipped run's model against the exact product of the same weights;
- the weights bit-identical afterwards, also after an error; the CLI end to end on a tiny run.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from commute_cli.engine import curvature as C
from commute_cli.engine import fd_hvp as FD
from commute_cli.engine.hvp import hvp
from commute_cli.errors import CommuteError

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from cli_runner import cli  # noqa: E402
from references import dense_hessian  # noqa: E402
from tiny_run import make_run  # noqa: E402

VOCAB, T = 32, 8
REPO = Path(__file__).resolve().parent.parent


def tiny_gpt2(dtype: torch.dtype = torch.float64, attn: str = "eager", seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0,
        attn_implementation=attn,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(config)
    return model.eval().to(dtype)


def copy_as(model: nn.Module, dtype: torch.dtype, attn: str = "eager") -> GPT2LMHeadModel:
    other = tiny_gpt2(dtype, attn)
    other.load_state_dict({k: t.to(dtype) for k, t in model.state_dict().items()})
    return other


def blocks(n: int = 4, seed: int = 1) -> Tensor:
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def ce(out, ids: Tensor) -> Tensor:
    logits = out.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class Recording:
    """A loss hook that remembers the weights of every gradient it is called for (one micro-batch a call)."""

    def __init__(self) -> None:
        self.weights: list[Tensor] = []

    def __call__(self, model: nn.Module, ids: Tensor) -> Tensor:
        self.weights.append(C.flat_params(model).clone())
        return C.causal_lm_loss(model, ids)


def grad_at(model: nn.Module, flat: Tensor, ids: Tensor) -> Tensor:
    """The gradient of ``model`` with its weights set to ``flat`` (restored afterwards)."""
    plist = C.param_list(model)
    backup = C.flat_params(model)
    with torch.no_grad():
        for (_, p), piece in zip(plist, C.unflatten(flat.to(backup.dtype), model).values(), strict=True):
            p.copy_(piece)
    try:
        return C.loss_and_grad(model, ids, ids.shape[0])[1]
    finally:
        with torch.no_grad():
            for (_, p), piece in zip(plist, C.unflatten(backup, model).values(), strict=True):
                p.copy_(piece)


@pytest.fixture(scope="module")
def case():
    model = tiny_gpt2()
    ids = blocks(4)
    H = dense_hessian(model, ids, ce)
    v = torch.randn(C.num_params(model), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # the truncation vector c = (fd - Hv) / eps^2 at a step where truncation dominates rounding (float64)
    fd = FD.fd_hvp(model, ids, v[None], 4, C.causal_lm_loss, scale=1e4)
    return model, ids, H, v, (fd.hvps[0] - H @ v) / fd.eps[0] ** 2


def test_error_is_the_predicted_taylor_term_float64(case) -> None:
    """Central difference: ``fd - H v = eps^2 c + O(eps^4)`` with ``c = D^4 L[v, v, v, .] / 6``. Where
    truncation dominates float64 rounding, the error over ``eps^2`` is the same vector at two steps 3x apart
    (so the error grows 9x); at the default step (``eps |v| ~ 10 u^(1/3) rms(theta)``: truncation and
    rounding both ``~ u^(2/3)`` = 2.4e-11 times their constants) the relative error is below 1e-9."""
    model, ids, H, v, c = case
    exact = H @ v
    fd = FD.fd_hvp(model, ids, v[None], 4, C.causal_lm_loss, scale=3e4)
    c3 = (fd.hvps[0] - exact) / fd.eps[0] ** 2
    assert float(c.norm()) * FD.fd_hvp(model, ids, v[None], 4, C.causal_lm_loss, scale=1e4).eps[
        0
    ] ** 2 > 1e-5 * float(
        exact.norm()
    )  # truncation is far above float64 rounding (~1e-10 relative) at these steps
    assert float((c3 - c).norm()) <= 0.05 * float(c.norm())
    fd = FD.fd_hvp(model, ids, v[None], 4, C.causal_lm_loss)
    assert float((fd.hvps[0] - exact).norm()) <= 1e-9 * float(exact.norm())
    # loss: the even Taylor term removed (O(eps^4)); gradient: the mean of the two, O(eps^2)
    loss, g = C.loss_and_grad(model, ids, 4)
    assert fd.loss == pytest.approx(loss, rel=1e-12)
    assert float((fd.grad - g).norm()) <= 1e-9 * float(g.norm())


def test_float32_error_within_the_derived_bound(case) -> None:
    """``|fd32 - Hv| <= (r+ + r-) / 2 eps + |H (dbar - v)| + eps^2 |c|``, ``c`` the float64 truncation
    vector, r+- the float32 gradients' own rounding errors at the perturbed weights actually used (against
    float64 gradients at the same weights), ``dbar = (theta+ - theta-) / 2 eps`` the direction the rounded
    weights really moved in."""
    model64, ids, H, v, c = case
    model32 = copy_as(model64, torch.float32)
    rec = Recording()
    fd = FD.fd_hvp(model32, ids, v.float()[None], ids.shape[0], rec, diagnose=True)
    eps = fd.eps[0]
    assert len(rec.weights) == 2  # one gradient at theta + eps v, one at theta - eps v
    plus, minus = (w.double() for w in rec.weights)
    r = [float((grad_at(model32, w, ids).double() - grad_at(model64, w, ids)).norm()) for w in (plus, minus)]
    dbar = (plus - minus) / (2 * eps)
    exact = H @ v.float().double()
    bound = (r[0] + r[1]) / (2 * eps) + float((H @ (dbar - v.float().double())).norm())
    bound += 1.1 * eps**2 * float(c.norm()) + 1e-6 * float(exact.norm())
    err = float((fd.hvps[0].double() - exact).norm())
    assert err <= bound, (err, bound)
    assert bound <= 1e-3 * float(exact.norm())  # and the bound is not vacuous
    assert fd.perturbation_error[0] == pytest.approx(
        float((dbar - v.float().double()).norm() / v.norm()), rel=1e-3
    )


def test_sdpa_equals_eager_to_rounding(case) -> None:
    """The same finite difference through SDPA and through eager attention (float32): the perturbed weights
    are identical, and the products differ by no more than the two kernels' float32 rounding errors (against
    float64 eager gradients at those weights) allow."""
    model64, ids, _, v, _ = case
    eager, sdpa = copy_as(model64, torch.float32), copy_as(model64, torch.float32, "sdpa")
    rec_e, rec_s = Recording(), Recording()
    fd_e = FD.fd_hvp(eager, ids, v.float()[None], ids.shape[0], rec_e)
    fd_s = FD.fd_hvp(sdpa, ids, v.float()[None], ids.shape[0], rec_s)
    assert fd_e.eps == fd_s.eps
    assert all(torch.equal(a, b) for a, b in zip(rec_e.weights, rec_s.weights, strict=True))
    eps = fd_e.eps[0]
    rounding = 0.0
    for w in rec_e.weights:
        g64 = grad_at(model64, w.double(), ids)
        rounding += float((grad_at(eager, w, ids).double() - g64).norm())
        rounding += float((grad_at(sdpa, w, ids).double() - g64).norm())
    diff = float((fd_s.hvps - fd_e.hvps).double().norm())
    assert diff <= rounding / (2 * eps)
    assert diff <= 1e-3 * float(fd_e.hvps.norm())


def test_weights_restored_bit_identically_also_after_an_error() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_gpt2(dtype, "sdpa")
        before = {k: t.clone() for k, t in model.state_dict().items()}
        ids = blocks(4)
        V = torch.randn(2, C.num_params(model), generator=torch.Generator().manual_seed(3))
        res = hvp(model, ids, V, 2, "fd")
        assert res.hvps.shape == V.shape and res.hvps.dtype == torch.float32 and res.fd_eps is not None
        assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())

        calls = {"n": 0}

        def failing(m: nn.Module, x: Tensor, calls: dict[str, int] = calls) -> Tensor:
            calls["n"] += 1
            if calls["n"] == 3:  # in the gradient at theta - eps v: weights are perturbed now
                raise RuntimeError("interrupted")
            return C.causal_lm_loss(m, x)

        with pytest.raises(RuntimeError, match="interrupted"):
            hvp(model, ids, V, 2, "fd", loss_fn=failing)
        assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())


def test_step_rule() -> None:
    """``eps |v| = FD_EPS_SCALE u^(1/3) rms(theta)``; a zero vector gives a zero product at no step."""
    assert FD.unit_roundoff(torch.float32) == 2.0**-24 and FD.unit_roundoff(torch.bfloat16) == 2.0**-8
    assert FD.fd_step(0.1, 2.0, torch.float32) * 2.0 == pytest.approx(FD.FD_EPS_SCALE * 2.0**-8 * 0.1)
    model = tiny_gpt2(torch.float32)
    ids = blocks(2)
    res = FD.fd_hvp(model, ids, torch.zeros(1, C.num_params(model)), 2, C.causal_lm_loss)
    assert res.eps == [0.0] and float(res.hvps.abs().max()) == 0.0
    loss, g = C.loss_and_grad(model, ids, 2)
    assert res.loss == pytest.approx(loss, rel=1e-12) and torch.equal(res.grad, g)


def _shipped_case(ckpt: str = "checkpoint-1500"):
    from transformers import AutoTokenizer

    from commute_cli.io import checkpoints, sampling

    root = REPO / "sample_checkpoints"
    tok = AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    texts = {
        lang: [json.loads(line)["text"] for line in (root / f"data/{lang}/validation.jsonl").open()][:200]
        for lang in ("en", "ru")
    }
    en = sampling.pack_blocks(texts["en"], tok, 128)
    ru = sampling.pack_blocks(texts["ru"], tok, 128)
    model32 = checkpoints.load_model(root / ckpt)
    V = torch.stack([C.loss_and_grad(model32, ru[:4], 4)[1], C.loss_and_grad(model32, en[8:12], 4)[1]])
    return root / ckpt, en[:4], V


def test_shipped_model_fp32_and_bf16_agreement() -> None:
    """On the shipped run's model: float32 with SDPA within 1e-3 (measured 1-4e-5; warnings start at 1e-2);
    a bfloat16 copy within 1e-1 of the exact product of its own (bf16-rounded) weights (measured 1.5-4.8e-2
    at steps 500-2500, benchmarks/results/bench_fd_hvp.json: two weight roundings of 2^-8 set the floor)."""
    from commute_cli.io import checkpoints

    path, ids, V = _shipped_case()
    for dtype, bound in ((torch.float32, 1e-3), (torch.bfloat16, 1e-1)):
        model = checkpoints.load_model(path, dtype=dtype, attn_implementation="sdpa")
        assert model.config._attn_implementation == "sdpa"
        exact_model = checkpoints.load_model(path, dtype=dtype)
        exact_model.double()
        exact = hvp(exact_model, ids, V.double(), 4, "rr").hvps
        agreement = FD.compare(FD.fd_hvp(model, ids, V, 4, C.causal_lm_loss), exact)
        assert agreement.max_rel_error <= bound, (dtype, agreement)
        assert agreement.min_cosine >= 1 - bound
        assert agreement.verdict == ("ok" if dtype == torch.float32 else "warn")


def test_a_poor_step_is_refused(case) -> None:
    """A step 1e5 times too large makes a poor product, which the comparison refuses."""
    model, ids, H, v, _ = case
    poor = FD.compare(FD.fd_hvp(model, ids, v[None], 4, C.causal_lm_loss, scale=1e6), (H @ v)[None])
    assert poor.verdict == "refuse" and poor.max_rel_error > FD.FD_REFUSE_ERROR


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run", steps=(0, 10, 20))


FAST = ["--samples", "24", "--blocks", "4", "--quiet"]


def test_cli_fd_end_to_end_matches_rr(run_dir, tmp_path, capsys) -> None:
    import pandas as pd

    code, _, err_fd = cli(["analyze", run_dir, "--out", tmp_path / "fd", "--hvp", "fd", *FAST], capsys)
    assert code == 0, err_fd
    code, _, err_rr = cli(["analyze", run_dir, "--out", tmp_path / "rr", *FAST], capsys)
    assert code == 0, err_rr
    line = [ln for ln in err_fd.splitlines() if "--hvp fd at checkpoint-" in ln]
    assert len(line) == 1 and "relative error" in line[0]
    assert "--hvp fd" not in err_rr
    run = json.loads((tmp_path / "fd" / "run.json").read_text())
    check = run["fd_agreement"]
    assert check["checkpoint"] == run["checkpoints"][0]["name"] and check["vectors"] == 2
    assert check["verdict"] == "ok" and check["max_rel_error"] <= FD.FD_WARN_ERROR
    assert run["checkpoints"][0]["attn_implementation"] == "sdpa"
    assert "fd_agreement" not in json.loads((tmp_path / "rr" / "run.json").read_text())
    fd = pd.read_csv(tmp_path / "fd" / "results.csv")
    rr = pd.read_csv(tmp_path / "rr" / "results.csv")
    assert list(fd["verdict"]) == list(rr["verdict"])
    assert ((fd["el_ij"] - rr["el_ij"]).abs() <= 1e-2 * rr["el_se"]).all()


def test_cli_refuses_a_poor_finite_difference(run_dir, tmp_path, capsys, monkeypatch) -> None:
    """The refusal path, reached with a real (deliberately far too large) step: one line, exit 2, a hint
    naming the exact path."""
    monkeypatch.setattr(FD, "FD_EPS_SCALE", 1e7)
    code, _, err = cli(["analyze", run_dir, "--out", tmp_path / "fd", "--hvp", "fd", *FAST], capsys)
    assert code == 2
    assert "disagree with exact ones" in err and "--hvp rr" in err


def test_bad_method_names_the_choices() -> None:
    model = tiny_gpt2()
    with pytest.raises(CommuteError, match="unknown HVP method"):
        hvp(model, blocks(2), torch.zeros(1, C.num_params(model), dtype=torch.float64), 1, method="xx")  # type: ignore[arg-type]


def test_reduce_hook_and_micro_batches(case) -> None:
    """Under data parallelism the sums go through ``reduce`` (a fake two-process all-reduce doubling every sum
    leaves the means, hence the steps and products, unchanged), and the micro-batch size changes only the
    summation order (float64: agreement to rounding divided by the step)."""
    model, ids, _, v, _ = case
    ref = FD.fd_hvp(model, ids, v[None], 4, C.causal_lm_loss)
    calls: list[int] = []

    def twice(t: Tensor) -> Tensor:
        calls.append(t.numel())
        return 2 * t

    doubled = FD.fd_hvp(model, ids, v[None], 4, C.causal_lm_loss, reduce=twice)
    assert calls and doubled.eps == ref.eps and doubled.loss == pytest.approx(ref.loss, rel=1e-14)
    assert torch.allclose(doubled.hvps, ref.hvps, rtol=0, atol=1e-12 * float(ref.hvps.abs().max()))
    single = FD.fd_hvp(model, ids, v[None], 1, C.causal_lm_loss)
    assert float((single.hvps - ref.hvps).norm()) <= 1e-9 * float(ref.hvps.norm())
