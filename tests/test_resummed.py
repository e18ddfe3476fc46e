"""Checks of the resummed prediction (resummed_math.py, resummed.py) against independent references.

- exact flows of quadratic losses by an independent stiff ODE solver (``scipy.integrate.solve_ivp``, Radau) in
  the original coordinates ``x' = -D (g_w + H_w x)``, in the small and the saturating regime;
- closed forms: eigen-decomposition solution of one phase, the settled limit ``y -> -S^{-1} b``, matrix powers
  for discrete steps, the bracket's dt^2 law (MATH.md) as dt -> 0;
- on a real model: HVP-based projections against dense float64 Hessians
  (``torch.autograd.functional.hessian``) with a Krylov space built separately in numpy, and with the full
  space, against the dense exact flow.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.integrate import solve_ivp
from scipy.linalg import expm
from torch import Tensor, nn

from commute_cli.core import known_sizes as ks
from commute_cli.core import resummed_math as rm
from commute_cli.engine import resummed as R
from commute_cli.errors import CommuteError

from references import dense_grad, dense_hess

# ------------------------------------------------------------------------------------------------ quadratics


def random_quadratic(n: int, K: int, seed: int, scale: float = 1.0, psd: bool = True):
    """``K`` quadratic domains ``L_k(x) = <g_k, x> + 1/2 <x, H_k x>`` and a diagonal ``D``."""
    rng = np.random.default_rng(seed)
    H = []
    for _ in range(K):
        Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        lam = scale * rng.uniform(0.1, 1.0, n) * np.logspace(0, 2, n)
        if not psd:
            lam[:2] *= -0.05
        H.append((Q * lam) @ Q.T)
    g = rng.normal(size=(K, n))
    D = rng.uniform(0.5, 2.0, n)
    return np.array(H), g, D


def projected_full(H, g, D, coefs):
    """The full-space system in ``y = D^{-1/2} x`` (basis = identity)."""
    s = np.sqrt(D)
    T = np.array([s[:, None] * Hk * s[None, :] for Hk in H])
    c = g * s
    e = (coefs @ g) * s
    TL = np.einsum("k,kij->ij", coefs, T)
    return T, c, e, TL


def ode_reference(H, g, D, coefs, phases, rtol=1e-11):
    """Target change after the phases, by solve_ivp on ``x' = -D (g_w + H_w x)`` (independent of expm)."""
    x = np.zeros(H.shape[1])
    for w, dt in phases:
        Hw = np.einsum("k,kij->ij", w, H)
        gw = w @ g
        sol = solve_ivp(
            lambda _t, x, gw=gw, Hw=Hw: -D * (gw + Hw @ x),
            (0.0, dt),
            x,
            method="Radau",
            rtol=rtol,
            atol=1e-13,
            jac=lambda _t, _x, Hw=Hw: -D[:, None] * Hw,
        )
        x = sol.y[:, -1]
    gL = coefs @ g
    HL = np.einsum("k,kij->ij", coefs, H)
    return float(gL @ x + 0.5 * x @ HL @ x)


def ode_intervention(H, g, D, coefs, wbar, d, dt):
    base = ode_reference(H, g, D, coefs, [(wbar, dt), (wbar, dt)])
    return (
        ode_reference(H, g, D, coefs, [(wbar + d, dt), (wbar - d, dt)]) - base,
        ode_reference(H, g, D, coefs, [(wbar - d, dt), (wbar + d, dt)]) - base,
    )


WBAR = np.array([0.8, 0.2])
DSHIFT = np.array([0.15, -0.15])
COEFS = np.array([0.0, 1.0])


def test_flow_matches_eigendecomposition_in_both_regimes() -> None:
    rng = np.random.default_rng(0)
    n = 6
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = np.array([1e-3, 0.1, 1.0, 10.0, 1e3, 1e5])  # dt x lam from 1e-3 to 1e5
    S = (Q * lam) @ Q.T
    c, y0 = rng.normal(size=n), rng.normal(size=n)
    for dt in (1e-3, 1.0):
        a, b = Q.T @ y0, Q.T @ c
        ref = Q @ (np.exp(-dt * lam) * a - (-np.expm1(-dt * lam)) / lam * b)
        np.testing.assert_allclose(rm.flow(S, c, y0, dt), ref, rtol=1e-9, atol=1e-12)
    # settled: the stiff directions sit at -S^{-1} c
    y = rm.flow(S, c, y0, 1e3)
    settled = Q[:, 3:] @ (Q[:, 3:].T @ -np.linalg.solve(S, c))
    np.testing.assert_allclose(Q[:, 3:].T @ y, Q[:, 3:].T @ settled, rtol=1e-7, atol=1e-12)  # stiffness 1e8


@pytest.mark.parametrize("scale", [1e-3, 3.0], ids=["small-dt-curvature", "saturating"])
def test_intervention_equals_exact_flow_of_quadratics(scale: float) -> None:
    H, g, D = random_quadratic(8, 2, seed=1, scale=scale)
    T, c, e, TL = projected_full(H, g, D, COEFS)
    dt = 0.5
    lam_dt = dt * np.linalg.eigvalsh(np.einsum("k,kij->ij", WBAR, T)).max()
    assert (lam_dt < 0.1) if scale < 1 else (lam_dt > 100)  # the two regimes
    ref12, ref21 = ode_intervention(H, g, D, COEFS, WBAR, DSHIFT, dt)
    got = rm.intervention(T, c, e, WBAR, DSHIFT, dt, TL=TL)
    assert got.el12 == pytest.approx(ref12, rel=1e-6, abs=1e-12)
    assert got.el21 == pytest.approx(ref21, rel=1e-6, abs=1e-12)


def test_intervention_with_negative_curvature_and_unequal_phases() -> None:
    H, g, D = random_quadratic(7, 3, seed=5, scale=0.3, psd=False)
    coefs = np.array([0.2, 0.5, 0.3])
    wbar, d = np.array([0.5, 0.3, 0.2]), np.array([0.1, -0.05, -0.05])
    T, c, e, TL = projected_full(H, g, D, coefs)
    base = ode_reference(H, g, D, coefs, [(wbar, 0.4), (wbar, 0.7)])
    ref12 = ode_reference(H, g, D, coefs, [(wbar + d, 0.4), (wbar - d, 0.7)]) - base
    got = rm.intervention(T, c, e, wbar, d, (0.4, 0.7), TL=TL)
    assert got.el12 == pytest.approx(ref12, rel=1e-6)


def test_negative_curvature_rules() -> None:
    rng = np.random.default_rng(7)
    n = 5
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = np.array([-30.0, -0.5, 0.0, 2.0, 400.0])
    S = (Q * lam) @ Q.T
    c, y0 = rng.normal(size=n), rng.normal(size=n)
    for dt in (1e-3, 0.2):
        # exact: the same as the augmented expm; clamp / abs: the exact flow of the modified matrix
        np.testing.assert_allclose(rm.flow(S, c, y0, dt, "exact"), rm.flow(S, c, y0, dt), rtol=1e-12)
        for rule, mod in (("clamp", np.maximum(lam, 0.0)), ("abs", np.abs(lam))):
            A = np.zeros((n + 1, n + 1))
            A[:n, :n] = -(Q * mod) @ Q.T
            A[:n, n] = -c
            ref = (expm(dt * A) @ np.append(y0, 1.0))[:n]
            np.testing.assert_allclose(rm.flow(S, c, y0, dt, rule), ref, rtol=1e-8, atol=1e-12)
    # PSD systems: every rule is the exact flow
    H, g, D = random_quadratic(6, 2, seed=8, scale=0.3)
    T, c2, e, TL = projected_full(H, g, D, COEFS)
    exact = rm.intervention(T, c2, e, WBAR, DSHIFT, 0.7, TL=TL)
    for rule in ("clamp", "abs"):
        assert rm.intervention(T, c2, e, WBAR, DSHIFT, 0.7, TL=TL, negative=rule).el12 == pytest.approx(
            exact.el12, rel=1e-8
        )
    with pytest.raises(CommuteError, match="negative-curvature rule"):
        rm.flow(S, c, y0, 1.0, "nope")


def test_reduces_to_the_bracket_as_dt_goes_to_zero() -> None:
    H, g, D = random_quadratic(8, 2, seed=2, scale=0.01)  # |S| ~ 2
    T, c, e, TL = projected_full(H, g, D, COEFS)
    # the bracket in the original coordinates (MATH.md): dt^2 <g_L, D (Hbar D g_d - H_d D gbar)>
    Hbar, Hd = np.einsum("k,kij->ij", WBAR, H), np.einsum("k,kij->ij", DSHIFT, H)
    gbar, gd, gL = WBAR @ g, DSHIFT @ g, COEFS @ g
    unit = float(gL @ (D * (Hbar @ (D * gd) - Hd @ (D * gbar))))
    assert rm.bracket_el(T, c, e, WBAR, DSHIFT, 1.0) == pytest.approx(unit, rel=1e-12)
    errors = []
    for dt in (1e-4, 1e-3, 1e-2):
        got = rm.intervention(T, c, e, WBAR, DSHIFT, dt, TL=TL)
        errors.append(abs(got.el12 / (unit * dt * dt) - 1.0))
        assert got.el21 / got.el12 == pytest.approx(-1.0, abs=50 * dt)
    assert errors[0] < 1e-2
    assert errors[1] == pytest.approx(
        10 * errors[0], rel=0.05
    )  # the remainder is O(dt^3): one decade per decade
    assert errors[2] == pytest.approx(10 * errors[1], rel=0.1)


def test_saturates_where_the_bracket_grows_like_dt_squared() -> None:
    H, g, D = random_quadratic(6, 2, seed=3)
    T, c, e, TL = projected_full(H, g, D, COEFS)
    big = [rm.intervention(T, c, e, WBAR, DSHIFT, dt, TL=TL).el12 for dt in (1e3, 1e4)]
    assert big[1] == pytest.approx(big[0], rel=1e-9)
    # the settled limit: phase 2's minimizer against the base mixture's minimizer
    Sm, bm = np.einsum("k,kij->ij", WBAR - DSHIFT, T), (WBAR - DSHIFT) @ c
    Sb, bb = np.einsum("k,kij->ij", WBAR, T), WBAR @ c
    ym, yb = -np.linalg.solve(Sm, bm), -np.linalg.solve(Sb, bb)
    limit = rm.target_change(e, TL, ym) - rm.target_change(e, TL, yb)
    assert big[1] == pytest.approx(limit, rel=1e-8)
    assert rm.bracket_el(T, c, e, WBAR, DSHIFT, 1e4) / rm.bracket_el(
        T, c, e, WBAR, DSHIFT, 1e3
    ) == pytest.approx(100)


def test_discrete_steps_match_matrix_powers_and_approach_the_flow() -> None:
    H, g, D = random_quadratic(5, 2, seed=4, scale=0.01)
    T, c, e, TL = projected_full(H, g, D, COEFS)
    Tw, cw = np.einsum("k,kij->ij", WBAR, T), WBAR @ c
    lr, n = 0.05, 40
    A = np.eye(5) - lr * Tw
    y0 = np.ones(5)
    An = np.linalg.matrix_power(A, n)
    ref = An @ y0 - (np.eye(5) - An) @ np.linalg.solve(Tw, cw)
    np.testing.assert_allclose(rm.steps(Tw, cw, y0, [lr] * n), ref, rtol=1e-10)
    flow = rm.intervention(T, c, e, WBAR, DSHIFT, 1.0, TL=TL).el12
    fine = rm.intervention(
        T, c, e, WBAR, DSHIFT, 1.0, TL=TL, discrete_lrs=([1e-3] * 1000, [1e-3] * 1000)
    ).el12
    assert fine == pytest.approx(flow, rel=1e-2)


def test_intervention_refuses_a_shift_that_changes_the_data() -> None:
    H, g, D = random_quadratic(3, 2, seed=0)
    T, c, e, _ = projected_full(H, g, D, COEFS)
    with pytest.raises(CommuteError, match="total data"):
        rm.intervention(T, c, e, WBAR, [0.1, 0.0], 1.0)


def test_saturation_index_is_dt_times_rayleigh_quotient() -> None:
    H, g, D = random_quadratic(6, 2, seed=6)
    T, c, e, _ = projected_full(H, g, D, COEFS)
    Sbar = np.einsum("k,kij->ij", WBAR, T)
    s = rm.saturation(T, c, e, WBAR, 0.01, names=["en", "ru"])
    assert s.per_vector["ru"] == pytest.approx(0.01 * (c[1] @ Sbar @ c[1]) / (c[1] @ c[1]))
    assert s.index == max(s.per_vector.values())
    assert rm.saturation(T, c, e, WBAR, 1e-9).settled_fraction == 0.0
    assert rm.saturation(T, c, e, WBAR, 1e9).settled_fraction == pytest.approx(1.0)
    # the cheap index from analyze's statistics: other domains' curvature along each D^{1/2} g_l
    Q = np.zeros((1, 2, 2, 2))
    first = np.zeros((1, 2, 2))
    for k in range(2):
        for ell in range(2):
            first[0, k, ell] = c[k] @ c[ell]
            for a in range(2):
                if a != ell:
                    Q[0, k, a, ell] = c[k] @ T[a] @ c[ell]
    rho = [WBAR[1] * (c[0] @ T[1] @ c[0]) / (c[0] @ c[0]), WBAR[0] * (c[1] @ T[0] @ c[1]) / (c[1] @ c[1])]
    assert rm.saturation_from_stats(Q, first, WBAR, 0.5)[0] == pytest.approx(0.5 * max(rho))


# ------------------------------------------------------------------------------------------------ real models

VOCAB = 6


class BigramLM(nn.Module):
    """A causal LM small enough for the whole Krylov space: 6 x 3 embedding, 3 x 6 output + bias (42
    parameters)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 3)
        self.out = nn.Linear(3, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(torch.tanh(self.emb(ids)))


def ce(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(ids)
    logits = out if isinstance(out, Tensor) else out.logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(), ids[:, 1:].reshape(-1))


def domain_tokens(seed: int, n: int, T: int, vocab: int, skew: int) -> Tensor:
    """Token blocks of one 'domain': a skewed unigram distribution (different per domain)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.ones(vocab)
    probs[skew % vocab] += 4.0
    probs[(skew + 1) % vocab] += 2.0
    return torch.multinomial(probs / probs.sum(), n * T, replacement=True, generator=g).view(n, T)


def dense_parts(model: nn.Module, parts: list[list[Tensor]]):
    """Dense float64 gradients (parts 0 and 2) and Hessians (part 1) per domain (tests/references.py)."""
    g0 = [dense_grad(model, p[0]).numpy() for p in parts]
    H = [dense_hess(model, p[1]).numpy() for p in parts]
    g2 = [dense_grad(model, p[2]).numpy() for p in parts]
    return np.array(g0), np.array(H), np.array(g2)


def numpy_krylov(S: list[np.ndarray], start: np.ndarray, wbar: np.ndarray, m: int) -> np.ndarray:
    """Block Krylov basis of sum_k wbar_k S_k from the rows of ``start`` (numpy QR, separately written)."""
    Sbar = sum(w * s for w, s in zip(wbar, S, strict=True))
    blocks = [start.T]
    cur = start.T
    while sum(b.shape[1] for b in blocks) < m:
        cur = Sbar @ cur
        blocks.append(cur)
    Kry = np.concatenate(blocks, axis=1)[:, :m]
    Qm, _ = np.linalg.qr(Kry)
    return Qm.T


def _parts(K: int, T: int = 6, per: int = 3, vocab: int = VOCAB) -> list[list[Tensor]]:
    return [[domain_tokens(10 * k + p, per, T, vocab, skew=2 * k) for p in range(3)] for k in range(K)]


def project(model: nn.Module, parts: list[list[Tensor]], coefs: np.ndarray, D: np.ndarray, **kw: Any):
    """``project_block`` on one block of ``parts`` (per domain: free, unit and target parts), micro-batch 2,
    cross-entropy loss; ``kw``: ``m``, ``tol``."""
    return R.project_block(
        model,
        [p[0] for p in parts],
        [p[1] for p in parts],
        [p[2] for p in parts],
        wbar=WBAR,
        target_coefs=coefs,
        D=torch.tensor(D),
        micro_batch=2,
        loss_fn=ce,
        **kw,
    )


def test_full_space_projection_equals_dense_exact_flow_on_a_real_model() -> None:
    model = BigramLM().double().eval()
    parts = _parts(2)
    n = sum(p.numel() for p in model.parameters())
    rng = np.random.default_rng(0)
    D = rng.uniform(0.5, 3.0, n)
    coefs = np.array([[0.0, 1.0], [0.8, 0.2]])
    proj = project(model, parts, coefs, D, m=n, tol=1e-9)
    assert proj.asym < 1e-10
    g0, H, g2 = dense_parts(model, parts)
    s = np.sqrt(D)
    Sk = [s[:, None] * h * s[None, :] for h in H]
    for t in range(2):
        u = s * (coefs[t] @ g2)
        for dt in (0.01, 3.0, 30.0):  # spectrum of S_bar: -0.31 .. 0.65, so dt x |S_bar| up to ~20
            ref_T = np.array(Sk)
            ref = rm.intervention(ref_T, g0 * s, u, WBAR, DSHIFT, dt)
            got = rm.intervention(proj.T, proj.c, proj.e[t], WBAR, DSHIFT, dt)
            # the Krylov space may be smaller than n; it is invariant under S_bar and holds b_k and u
            assert got.el12 == pytest.approx(ref.el12, rel=1e-7, abs=1e-14)
            assert got.el21 == pytest.approx(ref.el21, rel=1e-7, abs=1e-14)
            np.testing.assert_allclose(
                rm.bracket_el(proj.T, proj.c, proj.e[t], WBAR, DSHIFT, dt),
                rm.bracket_el(ref_T, g0 * s, u, WBAR, DSHIFT, dt),
                rtol=1e-9,
            )
    np.testing.assert_allclose(proj.norms, np.linalg.norm(g0 * s, axis=1), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(proj.c, axis=1), proj.norms, rtol=1e-10)


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1,
        n_embd=8,
        n_head=2,
        vocab_size=16,
        n_positions=8,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPT2LMHeadModel(config)
    return model.eval().double()


def test_hvp_projection_equals_dense_reference_on_tiny_gpt2() -> None:
    """Truncated basis (m = 10 of ~1.3k parameters): the projection is basis-independent, so the engine's
    predictions must equal those from a numpy Krylov basis of the dense float64 Hessians."""
    model = tiny_gpt2()
    from commute_cli.engine.curvature import param_list

    parts = _parts(2, T=6, per=2, vocab=16)
    names = [n for n, _ in param_list(model)]
    assert names == [n for n, _ in model.named_parameters()]  # tied lm_head appears once in both
    n = sum(p.numel() for _, p in param_list(model))
    rng = np.random.default_rng(1)
    D = rng.uniform(0.5, 2.0, n)
    coefs = np.array([[0.0, 1.0]])
    m = 10
    proj = project(model, parts, coefs, D, m=m)
    assert proj.m == m and proj.hvps == 2 * m
    g0, H, g2 = dense_parts(model, parts)
    s = np.sqrt(D)
    Sk = [s[:, None] * h * s[None, :] for h in H]
    b, u = g0 * s, s * (coefs[0] @ g2)
    V = numpy_krylov(Sk, np.vstack([b, u]), WBAR, m)
    T = np.array([V @ S @ V.T for S in Sk])
    np.testing.assert_allclose(proj.c @ proj.c.T, (V @ b.T).T @ (V @ b.T), rtol=1e-9)
    for dt in (1e-3, 0.05):  # indefinite Hessian at init (eigenvalues ~ +-260): dt 0.05 grows e^13-fold
        ref = rm.intervention(T, b @ V.T, u @ V.T, WBAR, DSHIFT, dt)
        got = rm.intervention(proj.T, proj.c, proj.e[0], WBAR, DSHIFT, dt)
        assert got.el12 == pytest.approx(ref.el12, rel=1e-7)
        assert got.el21 == pytest.approx(ref.el21, rel=1e-7)
    # the bracket is exact on the projection (u and b_k start the basis): equal to the dense formula
    Sbar, Sd = WBAR[0] * Sk[0] + WBAR[1] * Sk[1], DSHIFT[0] * Sk[0] + DSHIFT[1] * Sk[1]
    dense_bracket = float(u @ (Sbar @ (DSHIFT @ b) - Sd @ (WBAR @ b)))
    assert rm.bracket_el(proj.T, proj.c, proj.e[0], WBAR, DSHIFT, 1.0) == pytest.approx(
        dense_bracket, rel=1e-9
    )


def test_predict_summarizes_blocks_and_reduces_to_the_bracket() -> None:
    model = BigramLM().double().eval()
    parts = [
        [[domain_tokens(100 * k + 10 * b + p, 3, 6, VOCAB, skew=2 * k) for p in range(3)] for b in range(3)]
        for k in range(2)
    ]
    stats = R.estimate_resummed(
        model, parts, wbar=WBAR, target_coefs=np.array([[0.0, 1.0]]), m=8, micro_batch=3
    )
    assert len(stats.blocks) == 3
    small = R.predict(stats, 0, DSHIFT, 1e-4)
    np.testing.assert_allclose(small.el12, small.bracket12, rtol=1e-2)
    s = small.summary()
    assert np.isfinite(s["el12_se"]) and s["saturation"] < 1e-2


def test_progress_rate_slope_and_time_factor() -> None:
    rng = np.random.default_rng(9)
    c, e = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    w = np.array([0.8, 0.2])
    assert rm.progress_rate(c, e, w) == pytest.approx(float((w @ c) @ (w @ e)))
    t = np.linspace(0.0, 0.2, 21)
    slope, se = rm.loss_slope(t, 5.0 - 0.7 * t + 1e-3 * np.sin(40 * t))
    assert slope == pytest.approx(-0.7, abs=0.02) and 0.0 < se < 0.05
    assert np.isnan(rm.loss_slope([0.0, 1.0], [1.0, 0.0])[0])  # two points: no SE, refused
    assert rm.time_factor(-0.7, 0.35) == pytest.approx(2.0)
    assert np.isnan(rm.time_factor(0.1, 0.35)) and np.isnan(rm.time_factor(-0.1, -1.0))


def test_size_record_notes_and_optimizer_families() -> None:
    small = ks.SizeRecord("adam", "euclid", 8, 8, 0.3, 0.15, 0.8, "test")
    assert "~3.3x larger than printed" in small.note()
    half = ks.SizeRecord("adam", "euclid", 6, 3, 0.07, -0.8, 0.8, "t")
    assert "not calibrated" in half.note()  # half the signs wrong
    big = ks.SizeRecord("adam", "adam", 8, 8, 150.0, 60.0, 400.0, "test")
    assert "~1.5e+02x smaller than printed" in big.note()
    # a factor only where every sign was right and the ratios lie within a decade
    assert "not calibrated" in ks.SizeRecord("adam", "adam", 8, 7, 150.0, -50.0, 400.0, "t").note()
    spread = ks.SizeRecord("adam", "euclid", 8, 8, 0.3, 0.02, 0.8, "t").note()
    assert "not calibrated" in spread and "median 0.3" in spread
    assert "not calibrated" in ks.SizeRecord("adam", "euclid", 2, 2, 0.3, 0.2, 0.4, "t").note()  # 2 cases
    assert "not calibrated" in ks.SizeRecord("sgd", "euclid", 0, 0, float("nan"), 0.0, 0.0, "test").note()
    assert ks.optimizer_family("AdamW") == "adam" and ks.optimizer_family("adamw") == "adam"
    assert ks.optimizer_family("SGD") == "sgd" and ks.optimizer_family("Lion") is None
    assert ks.known_size_error("Lion") is None and ks.known_size_error(None) is None


def test_known_sizes_are_the_committed_measurements() -> None:
    """Every record the product prints comes from benchmarks/results/adamw_sizes.json, number for number."""
    import json
    from pathlib import Path

    file = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "adamw_sizes.json"
    summary = json.loads(file.read_text())["summary"]
    assert ks.KNOWN_SIZES, "no measured sizes recorded"
    for (family, method), rec in ks.KNOWN_SIZES.items():
        s = summary[f"{'adamw' if family == 'adam' else family}/bracket-{method}"]
        assert (rec.cases, rec.sign_agree) == (s["significant_cases"], s["sign_agree"])
        assert rec.median == pytest.approx(s["median_pred_over_obs"], rel=1e-2)
        assert (rec.low, rec.high) == (pytest.approx(s["min"], rel=1e-2), pytest.approx(s["max"], rel=1e-2))
