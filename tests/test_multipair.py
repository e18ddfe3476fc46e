"""Several disjoint pairs in one window (``core/multipair.py``, MATH.md "Several pairs in one window").

- Exact flows on a K = 4 quadratic: two disjoint pair shifts in one window change the target by the sum of
  their second-order predictions; the cross term is O(dt^3) (it shrinks 8x when dt halves).
- The total's SE from per-block sums equals an independent covariance computation and differs from the
  independent-sum SE when the pairs are correlated; coverage of its 95% interval over many synthetic
  correlated data sets is ~95%, the independent-sum interval's is not.
- The search returns the best disjoint set (against a brute force written here).
- End to end: a real K = 4 analysis (tiny GPT-2), `commute recommend` through the console entry point.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

from commute_cli.core import criterion, multipair

from cli_runner import cli
from quadratic_cases import Quad
from tiny_run import make_run

# ---------------------------------------------------------------------------------------------- exact flows

LOCAL = ["recommend", "--kind", "local"]
"""recommend's local swaps (the default kind, phases, trains continuations)."""


def test_disjoint_pairs_add_at_second_order_on_exact_flows():
    q = Quad(K=4, n=10, seed=3)
    wbar = np.array([0.4, 0.3, 0.2, 0.1])
    c = np.array([0.1, 0.5, 0.2, 0.2])
    x = q.flow(q.x0, wbar, 0.4)
    d1 = np.array([0.05, 0.0, 0.0, -0.05])  # domain 0 earlier, 3 later
    d2 = np.array([0.0, -0.1, 0.1, 0.0])  # domain 2 earlier, 1 later
    M = q.M(x, c)
    cross = []
    for dt in (4e-3, 2e-3, 1e-3):
        both = q.intervention(x, wbar, d1 + d2, dt, c)
        one, two = q.intervention(x, wbar, d1, dt, c), q.intervention(x, wbar, d2, dt, c)
        p1 = float(criterion.two_domain_excess(M, wbar, 0, 3, 0.05, dt))
        p2 = -float(criterion.two_domain_excess(M, wbar, 1, 2, 0.1, dt))  # EL^{21} = -EL^{12}
        # the pairs' predictions add to the prediction of the combined shift (linear in d, no cross term)
        assert p1 + p2 == pytest.approx(float(criterion.predicted_change(M, wbar, d1 + d2, dt)), rel=1e-10)
        assert abs(both / (p1 + p2) - 1) < 0.02
        cross.append((both - one - two) / dt**2)
    # exact cross term over dt^2 -> 0 linearly in dt: it is O(dt^3), the expansion's remainder order
    assert cross[0] / cross[1] == pytest.approx(2.0, rel=0.1) and cross[1] / cross[2] == pytest.approx(
        2.0, rel=0.1
    )
    assert abs(cross[2]) < 0.01 * abs(p1 + p2) / 1e-3**2


# ---------------------------------------------------------------------------------------------- SE of sums


def correlated_blocks(rng, n_sets: int, B: int, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    return rng.multivariate_normal(mean, cov, size=(n_sets, B))


def test_total_se_from_blocks_includes_covariance():
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.8, 0.6], [0.8, 1.0, 0.7], [0.6, 0.7, 1.5]]) * 1e-4
    x = correlated_blocks(rng, 1, 8, np.array([-0.01, -0.02, -0.005]), cov)[0]
    change, se = multipair.block_total(x)
    S = np.cov(x, rowvar=False, ddof=1)  # independent: the covariance matrix of the columns
    assert change == pytest.approx(x.mean(axis=0).sum(), rel=1e-12)
    assert se == pytest.approx(math.sqrt(S.sum() / 8), rel=1e-12)
    naive = multipair.independent_se(x)
    assert naive == pytest.approx(math.sqrt(np.trace(S) / 8), rel=1e-12)
    assert se / naive > 1.3  # positively correlated: adding variances understates the error


@pytest.mark.parametrize("rho", [0.8, -0.45])
def test_coverage_of_the_per_block_interval(rho):
    """4000 synthetic data sets of B = 8 blocks, 3 pairs with correlation ``rho``: the per-block interval
    covers the true total ~95%; the independent-sum one under-covers (rho > 0) or over-covers (rho < 0)."""
    rng = np.random.default_rng(1)
    B, n = 8, 4000
    sd = np.array([1.0, 2.0, 1.5])
    cov = rho * np.outer(sd, sd)
    np.fill_diagonal(cov, sd**2)
    mean = np.array([-1.0, -0.5, -2.0])
    x = correlated_blocks(rng, n, B, mean, cov)
    t = scipy.stats.t.ppf(0.975, B - 1)
    truth = mean.sum()
    block = np.array([multipair.block_total(xi) for xi in x])
    naive = np.array([multipair.independent_se(xi) for xi in x])
    cover = np.mean(np.abs(block[:, 0] - truth) <= t * block[:, 1])
    cover_naive = np.mean(np.abs(block[:, 0] - truth) <= t * naive)
    # expected independent-sum coverage from the variance ratio
    ratio = math.sqrt(cov.sum() / np.trace(cov))
    print(
        f"rho {rho}: coverage per-block {cover:.3f}, independent-sum {cover_naive:.3f}, SE ratio {ratio:.2f}"
    )
    assert abs(cover - 0.95) < 0.015  # 4000 draws: SD of a coverage 0.0034
    if rho > 0:
        assert cover_naive < 0.90
    else:
        assert cover_naive > 0.98


# ---------------------------------------------------------------------------------------------- the search


def brute_force(pairs, unit, limits, rates, max_ratio, t, min_pairs):
    """Every subset of candidate pairs, disjointness by counting domains; the common window and the lower
    bound written out here."""
    best = None
    for r in range(min_pairs, len(pairs) + 1):
        for sub in itertools.combinations(range(len(pairs)), r):
            doms = [d for p in sub for d in pairs[p]]
            if len(doms) != len(set(doms)):
                continue
            h = min(limits[p] for p in sub)
            total_rate = sum(rates[p] for p in sub)
            if total_rate > 0:
                h = min(h, math.floor(max_ratio / total_rate * (1 + 1e-12)))
            if h < 1:
                continue
            tot = unit[:, list(sub)].sum(axis=1) * h**2
            lo = -tot.mean() - t * tot.std(ddof=1) / math.sqrt(len(tot))
            if best is None or lo > best[0]:
                best = (lo, sub, h)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_search_finds_the_best_disjoint_set(seed):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(4, 8))
    allp = list(itertools.combinations(range(K), 2))
    pairs = [
        allp[k]
        for k in sorted(
            rng.choice(len(allp), size=int(rng.integers(3, min(len(allp), 12) + 1)), replace=False)
        )
    ]
    P = len(pairs)
    A = rng.standard_normal((P, P)) * 0.5
    unit = rng.multivariate_normal(-rng.uniform(0.1, 1.0, P), A @ A.T + 0.1 * np.eye(P), size=8) * 1e-4
    limits = rng.integers(1, 30, P)
    rates = rng.uniform(0, 0.02, P)
    for min_pairs in (1, 2):
        got = multipair.best_pair_set(pairs, unit, limits, rates, 0.25, 2.36, min_pairs=min_pairs)
        ref = brute_force(pairs, unit, limits, rates, 0.25, 2.36, min_pairs)
        if ref is None:
            assert got is None
            continue
        assert got is not None and got.chosen == ref[1] and got.window == ref[2]
        assert got.gain_lo == pytest.approx(ref[0], rel=1e-10)


def test_disjoint_sets_count_matchings():
    # matchings of the complete graph K_n (telephone numbers 10, 26, 76, 232), less the empty one
    for K, n in ((4, 9), (5, 25), (6, 75), (7, 231)):
        assert sum(1 for _ in multipair.disjoint_sets(list(itertools.combinations(range(K), 2)))) == n


def test_greedy_for_many_domains_is_disjoint_and_no_worse_than_one_pair():
    rng = np.random.default_rng(5)
    K = 12
    pairs = list(itertools.combinations(range(K), 2))
    unit = rng.normal(-1.0, 0.3, (8, len(pairs))) * 1e-4
    limits, rates = [10] * len(pairs), [0.0] * len(pairs)
    got = multipair.best_pair_set(pairs, unit, limits, rates, 0.25, 2.36)
    assert got is not None and len(got.chosen) >= 2
    doms = [d for p in got.chosen for d in pairs[p]]
    assert len(doms) == len(set(doms))
    singles = [multipair.evaluate_set((p,), unit, limits, rates, 0.25, 2.36) for p in range(len(pairs))]
    assert got.gain_lo >= max(s.gain_lo for s in singles if s is not None)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def k4(tmp_path_factory) -> Path:
    """A real K = 4 analysis of a tiny GPT-2 run (checkpoints 20 and 40, horizon 10)."""
    root = tmp_path_factory.mktemp("k4")
    run = make_run(
        root / "run", steps=(20, 40), n_docs=100, seed=1, weights={"en": 0.4, "xx": 0.3, "yy": 0.2, "zz": 0.1}
    )
    out = root / "out"
    code = cli_quiet(["analyze", run, "--out", out, "--samples", "48", "--target", "en", "--target", "mix",
                      "--device", "cpu", "-q"])  # fmt: skip
    assert code == 0
    return out


def cli_quiet(argv) -> int:
    from commute_cli.cli import main

    try:
        main([str(a) for a in argv])
    except SystemExit as ex:
        return int(ex.code or 0)
    return 0


def test_k4_recommend_moves_disjoint_pairs_with_a_per_block_error_bar(k4, tmp_path, capsys):
    from commute_cli.core.regime import parse_targets
    from commute_cli.io import store

    code, out, err = cli([*LOCAL, "--target", "en", "--from", k4, "--out", tmp_path / "a", "--format",
                          "json"], capsys)  # fmt: skip
    assert code == 0, err
    rec = json.loads(out)
    analysis = store.load_analysis(k4)
    names = analysis.schedule.domains
    (entry,) = [c for c in analysis.run["checkpoints"] if c["step"] == 20]
    stats, _ = store.load_stats(k4 / "cache" / entry["cache"])
    wbar = np.array([analysis.schedule.weights_at(20)[n] for n in names])
    (target,) = parse_targets(["en"], names)
    M = stats.interaction(target.coefs_at(wbar))
    res = analysis.results
    assert rec["pair_sets"], "this run has disjoint suboptimal pairs at step 20 (en: xx, yy, zz rows)"
    ps = rec["pair_sets"][0]
    pairs = ps["pairs"]
    assert len(pairs) >= 2 and len({d for p in pairs for d in (p["earlier"], p["later"])}) == 2 * len(pairs)
    # independent: each pair's per-block EL from the cache through the criterion, rescaled by hand
    cols = []
    for p in pairs:
        i, j = sorted((names.index(p["earlier"]), names.index(p["later"])))
        row = res[
            (res.step == 20) & (res.target == "en") & (res.domain_i == names[i]) & (res.domain_j == names[j])
        ]
        row = row.iloc[0]
        el = criterion.two_domain_excess(M, wbar, i, j, row["dw"], row["dt"])
        assert el.mean() == pytest.approx(row.el_ij, rel=1e-9)  # the cache reproduces results.csv
        assert el.std(ddof=1) / math.sqrt(len(el)) == pytest.approx(row.el_se, rel=1e-9)
        sign = 1.0 if p["earlier"] == names[i] else -1.0
        cols.append(sign * el * (p["shift"] / row["dw"]) * (ps["window"] / row["horizon"]) ** 2)
    x = np.stack(cols, axis=1)
    tot = x.sum(axis=1)
    se = tot.std(ddof=1) / math.sqrt(len(tot))
    naive = math.sqrt(sum(c.var(ddof=1) for c in cols) / len(tot))
    print(
        f"K=4 tiny: total {tot.mean():.4g}, per-block SE {se:.3g}, independent-sum SE {naive:.3g}, "
        f"ratio {se / naive:.2f}"
    )
    assert ps["change"] == pytest.approx(tot.mean(), rel=1e-9) and ps["se"] == pytest.approx(se, rel=1e-9)
    assert ps["independent_se"] == pytest.approx(naive, rel=1e-9) and abs(se / naive - 1) > 0.05
    t = scipy.stats.t.ppf(0.975, len(tot) - 1)
    assert ps["half_width"] == pytest.approx(t * se, rel=1e-6)
    assert ps["gain_lower_bound"] > ps["single_pair"]["gain_lower_bound"]
    assert rec["total_predicted_change"]["en"]["se_method"] == "per-block"
    moved = [s for s in rec["shifts"] if s["step"] == 20]
    assert {(s["earlier"], s["later"]) for s in moved} == {(p["earlier"], p["later"]) for p in pairs}
    assert len({(s["start"], s["end"]) for s in moved}) == 1

    # the table says which pairs move together and labels the interval; --single-pair turns it off
    code, out, err = cli([*LOCAL, "--target", "en", "--from", k4, "--out", tmp_path / "b"], capsys)
    assert code == 0, err
    assert "disjoint pairs moved together" in out and "95% interval" in out
    argv = [*LOCAL, "--target", "en", "--from", k4, "--out", tmp_path / "c", "--single-pair"]
    code, out, err = cli([*argv, "--format", "json"], capsys)
    assert code == 0, err
    single = json.loads(out)
    assert not single["pair_sets"] and len([s for s in single["shifts"] if s["step"] == 20]) == 1
