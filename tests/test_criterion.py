"""criterion.py against exact gradient flows of random quadratics (MATH.md "Special cases to test").

The reference flows here are written independently of the package (scipy.linalg.expm of the augmented
affine system, numpy), and the expected values are dense-matrix formulas typed from MATH.md, so a sign
or constant error in criterion.py cannot cancel against the same error in the reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from commute_cli.core import criterion
from commute_cli.engine import metric
from commute_cli.errors import CommuteError

from quadratic_cases import Quad

# --------------------------------------------------------------------------------------------------
# independent reference: quadratic domains and exact flows in numpy


@pytest.fixture(scope="module")
def quad2() -> Quad:
    q = Quad(K=2, n=12, seed=0)
    q.x = q.flow(q.x0, [0.5, 0.5], 0.3)  # a point on the (1/2, 1/2) trajectory, as in section 4.1
    return q


# --------------------------------------------------------------------------------------------------
# full swap (section 4.1 with MATH.md's 1/2)

TARGETS = {"L1": (1.0, 0.0), "L2": (0.0, 1.0), "mixture": (0.5, 0.5)}


@pytest.mark.parametrize("target", list(TARGETS))
def test_full_swap_matches_half_dt2_P(quad2: Quad, target: str) -> None:
    c = TARGETS[target]
    x, dt = quad2.x, 1e-3
    P = quad2.P(x, 0, 1, c)
    obs12 = quad2.intervention(x, [0.5, 0.5], [0.5, -0.5], dt, c)  # L1 first, then L2
    obs21 = quad2.intervention(x, [0.5, 0.5], [-0.5, 0.5], dt, c)
    expected = 0.5 * dt**2 * P
    assert abs(obs12 / expected - 1) < 0.02
    assert abs(obs21 / -expected - 1) < 0.02
    # criterion.py reproduces the same constant and sign through the interaction matrix
    M = quad2.M(x, c)
    assert float(criterion.bracket_value(M, 0, 1)) == pytest.approx(P, rel=1e-10)
    pred12 = float(criterion.predicted_change(M, [0.5, 0.5], [0.5, -0.5], dt))
    pred21 = float(criterion.predicted_change(M, [0.5, 0.5], [-0.5, 0.5], dt))
    assert pred12 == pytest.approx(expected, rel=1e-10)
    assert pred21 == pytest.approx(-expected, rel=1e-10)
    assert abs(obs12 / pred12 - 1) < 0.02


# --------------------------------------------------------------------------------------------------
# general intervention, K = 3, with and without a diagonal preconditioner


@pytest.mark.parametrize("use_D", [False, True], ids=["D=I", "D=diag"])
@pytest.mark.parametrize("plan", ["pair", "target"])
def test_general_intervention_K3(use_D: bool, plan: str) -> None:
    q = Quad(K=3, n=10, seed=1)
    D = np.random.default_rng(5).uniform(0.5, 2.0, q.n) if use_D else None
    wbar = np.array([0.5, 0.3, 0.2])
    d = np.array([0.1, -0.15, 0.05])
    c = np.array([0.2, 0.5, 0.3])
    x = q.flow(q.x0, wbar, 0.5, D)
    dt = 1e-3
    observed = q.intervention(x, wbar, d, dt, c, D)

    # dense MATH.md formula: dt^2 <g_L, D (Hbar D g_d - H_d D gbar)>
    g = q.grads(x)
    Dm = np.diag(np.ones(q.n) if D is None else D)
    Hbar = np.einsum("k,kij->ij", wbar, q.A)
    Hd = np.einsum("k,kij->ij", d, q.A)
    dense = dt**2 * (c @ g) @ Dm @ (Hbar @ Dm @ (d @ g) - Hd @ Dm @ (wbar @ g))

    predicted = float(criterion.predicted_change(q.M(x, c, D, plan), wbar, d, dt))
    assert predicted == pytest.approx(dense, rel=1e-10)
    assert abs(observed / predicted - 1) < 0.02


def test_D_identity_is_P_of_Ld_Lbar() -> None:
    """For D = I the change is dt^2 P(L_d, Lbar; L) (MATH.md), by bilinearity of P."""
    q = Quad(K=3, n=8, seed=2)
    wbar, d, c = np.array([0.6, 0.3, 0.1]), np.array([-0.1, 0.25, -0.15]), np.array([0.0, 0.0, 1.0])
    x, dt = q.x0, 0.01
    g = q.grads(x)
    g_d, gbar = d @ g, wbar @ g
    H_d, Hbar = np.einsum("k,kij->ij", d, q.A), np.einsum("k,kij->ij", wbar, q.A)
    P = (c @ g) @ (Hbar @ g_d - H_d @ gbar)  # P(L_d, Lbar; L) = <g_L, Hbar g_d - H_d gbar>
    assert float(criterion.predicted_change(q.M(x, c), wbar, d, dt)) == pytest.approx(dt**2 * P, rel=1e-10)


# --------------------------------------------------------------------------------------------------
# two domains around an imbalanced schedule


@pytest.mark.parametrize("use_D", [False, True], ids=["D=I", "D=diag"])
def test_two_domain_excess(use_D: bool) -> None:
    q = Quad(K=2, n=12, seed=3)
    D = np.random.default_rng(6).uniform(0.5, 2.0, q.n) if use_D else None
    wbar, dw, dt = np.array([0.8, 0.2]), 0.15, 1e-3
    x = q.flow(q.x0, wbar, 1.0, D)
    for c in [(1.0, 0.0), (0.0, 1.0), (0.8, 0.2)]:
        M = q.M(x, c, D)
        el12 = float(criterion.two_domain_excess(M, wbar, 0, 1, dw, dt))
        el21 = float(criterion.two_domain_excess(M, wbar, 1, 0, dw, dt))
        assert el21 == pytest.approx(-el12, rel=1e-12)
        obs12 = q.intervention(x, wbar, [dw, -dw], dt, c, D)
        obs21 = q.intervention(x, wbar, [-dw, dw], dt, c, D)
        assert abs(obs12 / el12 - 1) < 0.02
        assert abs(obs21 / el21 - 1) < 0.02
        assert abs(obs21 + obs12) < 0.02 * abs(obs12)  # EL^21 = -EL^12 to leading order
        if D is None:  # K = 2: EL^12 = dt^2 dw P(L_1, L_2; L)
            assert el12 == pytest.approx(dt**2 * dw * q.P(x, 0, 1, c), rel=1e-10)


# --------------------------------------------------------------------------------------------------
# the remainder is O(dt^3): |ratio - 1| is linear in dt


def test_ratio_converges_linearly(quad2: Quad) -> None:
    c = (0.5, 0.5)
    M = quad2.M(quad2.x, c)
    dts = np.array([3e-2, 1e-2, 3e-3, 1e-3, 3e-4])
    err = []
    for dt in dts:
        obs = quad2.intervention(quad2.x, [0.5, 0.5], [0.5, -0.5], dt, c)
        pred = float(criterion.predicted_change(M, [0.5, 0.5], [0.5, -0.5], dt))
        err.append(abs(obs / pred - 1))
    slope = np.polyfit(np.log(dts), np.log(err), 1)[0]
    assert 0.85 < slope < 1.15, (slope, err)
    assert err[-1] < 1e-3


# --------------------------------------------------------------------------------------------------
# bracket sign (Theorem 3.1 with MATH.md's sign)


def test_bracket_sign_against_exact_flows() -> None:
    q = Quad(K=3, n=10, seed=4)
    x = q.x0
    g = torch.from_numpy(q.grads(x))
    A = torch.from_numpy(q.A)
    for i, j in [(0, 1), (1, 0), (2, 0)]:
        R = criterion.bracket(A[j] @ g[i], A[i] @ g[j])  # R(L_i, L_j) = H_j g_i - H_i g_j
        errs = []
        for dt in (1e-2, 1e-3):
            e_i, e_j = np.eye(3)[i], np.eye(3)[j]
            x_ij = q.flow(q.flow(x, e_i, dt), e_j, dt)  # train on i, then on j
            x_ji = q.flow(q.flow(x, e_j, dt), e_i, dt)
            diff = (x_ij - x_ji) / dt**2
            errs.append(np.linalg.norm(diff - R) / np.linalg.norm(R))
        assert errs[1] < 0.01
        assert errs[1] < 0.2 * errs[0]  # o(dt^2), shrinking ~10x per decade


# --------------------------------------------------------------------------------------------------
# the two HVP plans


@pytest.mark.parametrize("K", [2, 3, 5])
def test_pair_and_target_plans_agree(K: int) -> None:
    n = 15
    gen = torch.Generator().manual_seed(K)
    H = torch.randn(K, n, n, generator=gen, dtype=torch.float64)
    H = H + H.transpose(1, 2)  # symmetric, indefinite
    g = torch.randn(K, n, generator=gen, dtype=torch.float64)
    D = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    c = torch.rand(K, generator=gen, dtype=torch.float64)
    Dg = metric.apply_preconditioner(D, g)
    u = metric.apply_preconditioner(D, c @ g)
    M_pair = criterion.interaction_pair_plan(
        u, {(a, b): H[a] @ Dg[b] for a, b in criterion.ordered_pairs(K)}, K
    )
    M_target = criterion.interaction_target_plan(torch.stack([H[a] @ u for a in range(K)]), Dg)
    dense = torch.einsum("i,aij,bj->ab", u, H, Dg).numpy()
    np.fill_diagonal(dense, 0.0)
    np.testing.assert_allclose(M_pair, M_target, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(M_pair, dense, rtol=1e-12, atol=1e-12)
    assert M_pair.dtype == np.float64
    assert np.all(np.diagonal(M_pair) == 0)
    # list inputs and float32 vectors work too (accumulated in float64)
    M32 = criterion.interaction_target_plan([H[a].float() @ u.float() for a in range(K)], list(Dg.float()))
    assert M32.dtype == np.float64
    np.testing.assert_allclose(M32, M_target, rtol=1e-4, atol=1e-3)


def test_pair_plan_missing_pair_raises() -> None:
    u = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="missing"):
        criterion.interaction_pair_plan(u, {(0, 1): u}, 2)


def test_pair_coefficients_antisymmetric() -> None:
    C = criterion.pair_coefficients([0.5, 0.3, 0.2], [0.1, -0.15, 0.05])
    np.testing.assert_allclose(C, -C.T)
    assert C[0, 1] == pytest.approx(0.5 * -0.15 - 0.1 * 0.3)


def test_predicted_change_requires_d_sums_to_zero() -> None:
    M = np.zeros((2, 2))
    with pytest.raises(ValueError, match="sum to 0"):
        criterion.predicted_change(M, [0.5, 0.5], [0.1, 0.1], 0.01)


# --------------------------------------------------------------------------------------------------
# plan choice, statistics, wording, Adam metric


def test_choose_plan() -> None:
    assert criterion.choose_plan(2, 3) == "pair"  # 2 vs 6
    assert criterion.choose_plan(2, 1) == "pair"  # tie 2 vs 2 -> pair
    assert criterion.choose_plan(8, 1) == "target"  # 56 vs 8
    assert criterion.choose_plan(3, 2) == "pair"  # tie 6 vs 6
    assert criterion.choose_plan(3, 1) == "target"  # 6 vs 3


def test_summarize_blocks_by_hand_and_scipy() -> None:
    s = criterion.summarize_blocks([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3)  # ddof = 1
    assert s.mean == pytest.approx(2.5)
    assert s.se == pytest.approx(sd / 2.0)
    assert s.t == pytest.approx(2.5 / (sd / 2.0))
    assert s.t_crit == pytest.approx(3.182446305284263)  # t_{0.975, 3}
    assert s.significant and s.n_blocks == 4

    x = np.random.default_rng(0).normal(0.3, 1.0, size=8)
    s = criterion.summarize_blocks(torch.from_numpy(x), confidence=0.9)
    ref = scipy.stats.ttest_1samp(x, 0.0)
    assert s.t == pytest.approx(ref.statistic)
    assert s.se == pytest.approx(scipy.stats.sem(x))
    assert s.significant == bool(ref.pvalue < 0.1)
    assert s.t_crit == pytest.approx(scipy.stats.t.ppf(0.95, 7))

    assert not criterion.summarize_blocks([-0.1, 0.1, 0.05, -0.05]).significant
    assert criterion.summarize_blocks([2.0, 2.0, 2.0]).significant  # zero spread, nonzero mean
    with pytest.raises(CommuteError):
        criterion.summarize_blocks([1.0])
    with pytest.raises(CommuteError):
        criterion.summarize_blocks([1.0, float("nan")])


def test_verdict() -> None:
    assert criterion.verdict(True, 0.8, 0.2) == "suboptimal"
    assert criterion.verdict(True, 1.0, 0.0) == "consistent"
    assert criterion.verdict(True, 0.0, 0.3) == "consistent"
    assert criterion.verdict(False, 0.5, 0.5) == "insufficient signal"
    assert criterion.verdict(False, 1.0, 0.0) == "insufficient signal"


def test_direction_words_sign() -> None:
    assert criterion.direction_words(-0.01, "ru", "en") == "move ru earlier, en later"
    assert criterion.direction_words(0.01, "ru", "en") == "move en earlier, ru later"
    assert "no preferred order" in criterion.direction_words(0.0, "ru", "en")


def test_direction_words_agree_with_flows() -> None:
    """Negative EL^{12} means moving 1 earlier lowers L: check it on the exact flows."""
    q = Quad(K=2, n=12, seed=7)
    wbar, dw, dt, c = np.array([0.8, 0.2]), 0.15, 1e-2, (1.0, 0.0)
    x = q.flow(q.x0, wbar, 0.3)
    el12 = float(criterion.two_domain_excess(q.M(x, c), wbar, 0, 1, dw, dt))
    obs_first_up = q.intervention(x, wbar, [dw, -dw], dt, c)  # domain 1 earlier, domain 2 later
    words = criterion.direction_words(el12, "one", "two")
    if obs_first_up < 0:
        assert words == "move one earlier, two later"
    else:
        assert words == "move two earlier, one later"


def test_adam_preconditioner() -> None:
    v = torch.tensor([1e-4, 4e-2, 0.0], dtype=torch.float64)
    D = metric.adam_preconditioner(v, step=10, beta2=0.999, eps=1e-8)
    v_hat = v / (1 - 0.999**10)
    torch.testing.assert_close(D, 1.0 / (torch.sqrt(v_hat) + 1e-8))
    assert D[2] == pytest.approx(1e8)
    assert metric.adam_preconditioner(v.half(), 10, 0.999, 1e-8).dtype == torch.float32
    with pytest.raises(CommuteError):
        metric.adam_preconditioner(v, 0, 0.999, 1e-8)
