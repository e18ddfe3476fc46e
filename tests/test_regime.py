"""``core.regime`` and the store: the rules that turn per-block statistics into a row.

- the pipeline's per-block path (``predict_pair`` on ``[B, K, K]`` statistics) is the tested math: on exact
  quadratics it equals ``criterion.two_domain_excess`` of the exact interaction matrix and the exact flow;
- the regime is judged on intervals (inside / outside / uncertain);
- the negligible verdict (practical significance), with its threshold relative to the window's progress;
- the default intervention depends only on deterministic inputs;
- the one rescaling law, and the store's cache round trip.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from commute_cli.core import criterion, regime
from commute_cli.core.checkpoint_stats import CheckpointStats
from commute_cli.core.criterion import BlockSummary, Verdict
from commute_cli.core.regime import Regime
from commute_cli.io import store

from references import Quadratics

# ----------------------------------------------------------------------------------------------- helpers


def summary(mean: float, se: float, B: int = 8) -> BlockSummary:
    """A BlockSummary built by the production function from B values with this mean and SE."""
    z = np.array([1.0, -1.0] * (B // 2))
    x = mean + z * se * math.sqrt(B) * math.sqrt((B - 1) / B)
    s = criterion.summarize_blocks(x)
    assert s.mean == pytest.approx(mean) and s.se == pytest.approx(se)
    return s


class Quad(Quadratics):
    """The reference quadratics (tests/references.py) with their exact per-block statistics."""

    def stats(self, x, B: int = 4, noise: float = 0.0, seed: int = 0) -> CheckpointStats:
        """Per-block statistics in the estimator's layout (``Q[b, k, a, l] = <g_k, H_a g_l>``), exact plus
        optional zero-mean noise per block."""
        g = self.grads(x)
        Q = np.einsum("ki,aij,lj->kal", g, self.A, g)
        for a in range(self.K):
            Q[:, a, a] = 0.0
        first = g @ g.T
        rng = np.random.default_rng(seed)
        Qb = Q[None] + noise * rng.standard_normal((B, *Q.shape)) * np.abs(Q).max()
        return CheckpointStats("pair", np.tile(self.losses(x), (B, 1)), np.tile(first, (B, 1, 1)), Q=Qb)


# ----------------------------------------------------------------------------------------------- the math


def test_predict_pair_is_the_exact_flow_through_the_tested_functions():
    """``predict_pair`` on exact per-block statistics == two_domain_excess on the exact M == the flow."""
    q = Quad(K=3, n=10, seed=3)
    wbar, dw, dt = np.array([0.5, 0.3, 0.2]), 0.1, 1e-2
    x = q.flow(q.x0, wbar, 0.3)
    st = q.stats(x)
    for c in (np.array([1.0, 0, 0]), np.array([0, 0, 1.0]), wbar):
        p = regime.predict_pair(st, wbar=wbar, coefs=c, i=0, j=2, dw=dw, dt=dt, confidence=0.95)
        M = np.einsum("k,kal->al", c, st.Q[0])
        assert p.el.mean == pytest.approx(
            float(criterion.two_domain_excess(M, wbar, 0, 2, dw, dt)), rel=1e-12
        )
        d = np.array([dw, 0.0, -dw])
        x_int = q.flow(q.flow(x, wbar + d, dt), wbar - d, dt)
        x_base = q.flow(x, wbar, 2 * dt)
        observed = float(c @ (q.losses(x_int) - q.losses(x_base)))
        assert observed / p.el.mean == pytest.approx(1.0, abs=0.05)
        assert p.bracket.mean == pytest.approx(float(criterion.bracket_value(M, 0, 2)), rel=1e-12)
        assert p.regime.progress == pytest.approx(2 * dt * wbar @ st.first[0] @ wbar, rel=1e-12)


def test_broadcast_over_blocks_equals_one_matrix_at_a_time():
    rng = np.random.default_rng(0)
    Mb = rng.standard_normal((5, 3, 3))
    wbar, d = np.array([0.6, 0.3, 0.1]), np.array([0.05, 0.05, -0.1])
    batched = criterion.predicted_change(Mb, wbar, d, 0.3)
    assert batched.shape == (5,)
    for b in range(5):
        assert batched[b] == pytest.approx(float(criterion.predicted_change(Mb[b], wbar, d, 0.3)), rel=1e-14)
    np.testing.assert_allclose(criterion.bracket_value(Mb, 0, 2), Mb[:, 2, 0] - Mb[:, 0, 2])
    np.testing.assert_allclose(
        criterion.two_domain_excess(Mb, wbar, 1, 0, 0.1, 0.3),
        -criterion.two_domain_excess(Mb, wbar, 0, 1, 0.1, 0.3),
    )
    assert criterion.pair_coefficients(np.tile(wbar, (5, 1)), np.tile(d, (5, 1))).shape == (5, 3, 3)


def test_the_one_rescaling_law_is_exact_at_second_order():
    """EL(dw', dt') = EL(dw, dt) x el_scale(dw, dt, dw', dt'), computed by the criterion itself."""
    M = np.random.default_rng(1).standard_normal((2, 2))
    a = float(criterion.two_domain_excess(M, [0.8, 0.2], 0, 1, 0.1, 0.25))
    b = float(criterion.two_domain_excess(M, [0.8, 0.2], 0, 1, 0.05, 0.1))
    assert b == pytest.approx(a * regime.el_scale(0.1, 0.25, 0.05, 0.1), rel=1e-12)


# ----------------------------------------------------------------------------------------------- regime


@pytest.mark.parametrize(
    ("el", "el_se", "expected"),
    [
        (0.010, 0.001, Regime.INSIDE),  # ratio 0.1, interval ~[0.076, 0.124]
        (0.040, 0.001, Regime.OUTSIDE),  # ratio 0.4, interval ~[0.376, 0.424]
        (0.0279, 0.010, Regime.UNCERTAIN),  # the 0.279 +- noise against 0.25: not 'outside'
        (0.0, 0.02, Regime.UNCERTAIN),  # no signal, wide interval: cannot tell
        (0.0, 0.0005, Regime.INSIDE),  # no effect, tight interval: surely inside
    ],
)
def test_regime_is_judged_on_the_interval(el, el_se, expected):
    progress = summary(0.1, 1e-4)
    check = regime.regime_check(summary(el, el_se), progress, mix_loss=5.0)
    assert check.regime == expected
    assert check.ratio == pytest.approx(abs(el) / 0.1)
    assert check.ratio_lo <= check.ratio <= check.ratio_hi


def test_regime_outside_without_progress_or_with_too_much():
    assert regime.regime_check(summary(0.01, 0.001), summary(-0.01, 1e-4), 5.0).regime == Regime.OUTSIDE
    huge = regime.regime_check(summary(0.01, 0.001), summary(3.0, 0.01), mix_loss=5.0)  # 3 > 0.5 x 5
    assert huge.regime == Regime.OUTSIDE


# ----------------------------------------------------------------------------------------------- negligible


def test_negligible_threshold_scales_with_the_window_and_has_a_floor():
    assert regime.negligible_threshold(0.2) == pytest.approx(0.002)  # 1% of the window's progress
    assert regime.negligible_threshold(0.2, min_effect=0.05) == pytest.approx(0.01)
    assert regime.negligible_threshold(0.0) == regime.MIN_EFFECT_FLOOR
    assert regime.negligible_threshold(1e-9) == regime.MIN_EFFECT_FLOOR


def test_negligible_verdict_even_when_significant():
    """Issue 14: a 4e-8-nat effect at a 1-step horizon is 'negligible', not 'suboptimal'."""
    tiny = summary(4e-8, 1e-9)
    assert tiny.significant
    threshold = regime.negligible_threshold(progress=2e-3)  # 2 steps of a small model: 2e-5 nats
    assert regime.is_negligible(tiny, threshold)
    assert criterion.verdict(tiny.significant, 0.8, 0.2, negligible=True) == Verdict.NEGLIGIBLE
    # a real effect is not: 0.03 nats against a 0.1-nat window
    real = summary(-0.03, 0.005)
    assert not regime.is_negligible(real, regime.negligible_threshold(0.1))
    # not significant: negligible only when the whole interval is below the threshold
    assert regime.is_negligible(summary(1e-5, 1e-5), 1e-3)
    assert not regime.is_negligible(summary(1e-5, 1e-3), 1e-3)  # could be large: insufficient signal
    assert str(Verdict.INSUFFICIENT) == "insufficient signal"


def test_predict_pair_says_negligible_through_min_effect():
    q = Quad(K=2, n=8, seed=5)
    wbar = np.array([0.7, 0.3])
    st = q.stats(q.flow(q.x0, wbar, 0.3), B=8, noise=0.01, seed=2)
    kw = {"wbar": wbar, "coefs": wbar, "i": 0, "j": 1, "dw": 0.15, "dt": 0.1, "confidence": 0.95}
    p0 = regime.predict_pair(st, **kw, min_effect=0.0)
    p1 = regime.predict_pair(st, **kw, min_effect=0.9)
    assert p0.el.significant and p0.verdict == Verdict.SUBOPTIMAL
    assert p1.verdict == Verdict.NEGLIGIBLE and p1.min_effect == pytest.approx(0.9 * p1.regime.progress)


# ----------------------------------------------------------------------------------------------- intervention


def test_horizon_comes_from_the_checkpoint_spacing_only():
    steps = [500, 1000, 1500, 2500]
    assert regime.choose_horizon(steps, 0) == (250, "half the 500-step spacing to the next checkpoint")
    assert regime.choose_horizon(steps, 2) == (500, "half the 1000-step spacing to the next checkpoint")
    assert regime.choose_horizon(steps, 3) == (500, "half the 1000-step spacing to the previous checkpoint")
    assert regime.choose_horizon(steps, 1, given=7) == (7, "--horizon")
    assert regime.choose_horizon([None], 0)[0] == 1 and "--horizon" in regime.choose_horizon([None], 0)[1]
    assert regime.pair_list(np.array([0.8, 0.2]), None) == [(0, 1, pytest.approx(0.1))]
    # a zero weight: no data of that domain can move, so the pair has no intervention (and no row)
    assert regime.pair_list(np.array([1.0, 0.0]), None) == []
    assert regime.pair_list(np.array([0.6, 0.0, 0.4]), None) == [(0, 2, pytest.approx(0.2))]
    assert regime.pair_list(np.array([0.6, 0.0, 0.4]), 0.3) == [(0, 2, 0.3)]


# ----------------------------------------------------------------------------------------------- store


def test_stats_cache_round_trip_and_damage(tmp_path):
    q = Quad(K=2, n=6, seed=0)
    st = q.stats(q.x0, B=3, noise=0.1)
    file = store.stats_file(tmp_path, "checkpoint-5", store.content_key(["x", 1]))
    store.save_stats(file, st, {"checkpoint": "c", "info": '{"seconds": 1.5}'})
    back, meta = store.load_stats(file)
    for name, arr in st.to_arrays().items():
        np.testing.assert_array_equal(back.to_arrays()[name], arr)
    assert meta["format"] == store.CACHE_FORMAT and meta["info"] == '{"seconds": 1.5}'
    assert len(store.content_key({"b": 1, "a": [2]})) == store.KEY_LENGTH
    assert store.content_key({"b": 1, "a": 2}) == store.content_key({"a": 2, "b": 1})
    file.write_bytes(file.read_bytes()[:40])  # damaged: recomputed, never trusted
    assert store.load_stats(file) is None


def test_core_and_the_store_import_no_torch():
    """core is numpy-only, and recommend/plot read analyses without paying for torch."""
    import subprocess
    import sys

    code = (
        "import sys; import commute_cli.core.criterion, commute_cli.core.regime, commute_cli.core.shifts, "
        "commute_cli.io.store; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_core_imports_nothing_of_the_package_but_core_and_errors():
    """The layering rule for core/ (read from the source, so a lazy import inside a function counts too).

    core/schedule.py is left out until its load/save (file IO) moves to io/: it imports io.atomic.
    """
    import ast
    from pathlib import Path

    import commute_cli.core

    for file in Path(commute_cli.core.__file__).parent.glob("*.py"):
        if file.name == "schedule.py":
            continue
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                assert name.split(".")[0] != "torch", (file.name, name)
                if name.startswith("commute_cli"):
                    assert name.startswith(("commute_cli.core", "commute_cli.errors")), (file.name, name)
