"""The predicted loss change agrees with a real intervention where the theory holds (MATH.md "What an
intervention does to the target", "Regime of validity").

Set-up: a tiny real training run (``tiny_run.make_run``: two synthetic languages, a BPE tokenizer, GPT-2 from
a config, 30 SGD steps on the 0.7/0.3 mixture), whose domain files packed exactly as ``commute analyze``
packs them (``documents.load_texts`` + ``sampling.pack_blocks`` with the run's tokenizer and ``seq_len``)
are two fixed pools. From the checkpoint (float64), deterministic FULL-BATCH gradient descent on the pools
with learning rate ``lr``:

- base: ``wbar = (0.7, 0.3)`` for ``2n`` steps;
- "12": ``wbar + d`` for ``n`` steps, then ``wbar - d`` for ``n`` steps, ``d = (+dw, -dw)``; "21" the reverse.

Observed ``EL = L_target(theta_12) - L_target(theta_base)`` on the pools, for the targets en, xx and the
mixture ``wbar``. Predicted: ``dt^2 sum C o M`` with ``dt = lr n`` (MATH.md), computed exactly on the full
pools, and the ``commute analyze`` pipeline's sampled estimate of the same number.

Numbers measured when this was written (run seed 1, checkpoint 30, n = 5, dw = 0.05): observed / exact
prediction at dt = 0.02, 0.01, 0.005 is 0.92-0.93, 0.96-0.97, 0.98-0.99 for en and xx, and 0.89-0.95,
0.93-0.98, 0.95-1.00 for the mixture (EL^12 and -EL^21); the analysis's sampled prediction over observed is
0.99 (en), 1.04 (xx), 0.82 (mix) with |t| = 38, 30, 6.3; regime ratios <= 1e-3 at dt = 0.005, and 1.7 (en),
10 (xx), 0.28 (mix) with first-order progress 16-51 nats at dt = 50.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from commute_cli.commands.analyze import AnalyzeOptions, prepare_samples, resolve_inputs, run_analysis
from commute_cli.core import criterion
from commute_cli.io import checkpoints, documents, sampling

from tiny_run import POOL_CHUNK, lm_loss, make_run, pool_grad, pool_loss

STEP = 30  # checkpoint reached by SGD (lr 0.05, 16 blocks per domain per step) from the random init
SEED = 1  # of the run's texts, init and SGD batches
N_DOCS = 100  # documents per domain: pools of ~580 (en) and ~350 (xx) blocks of 16 tokens
WBAR = np.array([0.7, 0.3])  # (en, xx): the run's schedule
DW = 0.05
N = 5  # steps per half of the intervention (the analysis's --horizon)
DTS = (0.02, 0.01, 0.005)  # dt = lr * N
TARGETS = {"en": np.array([1.0, 0.0]), "xx": np.array([0.0, 1.0]), "mix": WBAR}
CHUNK = POOL_CHUNK


# ---------------------------------------------------------------------------------------------- the run


def pool_hvps(model: nn.Module, pool: Tensor, vectors: list[list[Tensor]]) -> list[list[Tensor]]:
    """Exact ``H v`` of the pool-mean loss by double backward, for every vector in ``vectors``."""
    params = list(model.parameters())
    out = [[torch.zeros_like(p) for p in params] for _ in vectors]
    for x in pool.split(CHUNK):
        loss = lm_loss(model, x) * (x.shape[0] / pool.shape[0])
        g = torch.autograd.grad(loss, params, create_graph=True)
        for i, v in enumerate(vectors):
            dot = sum((gi * vi).sum() for gi, vi in zip(g, v, strict=True))
            hv = torch.autograd.grad(dot, params, retain_graph=i < len(vectors) - 1)
            for t, h in zip(out[i], hv, strict=True):
                t.add_(h.detach())
    return out


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def gradient_descent(model: nn.Module, pools: list[Tensor], segments, lr: float) -> nn.Module:
    """Full-batch GD on ``sum_k w_k L_k`` for each ``(w, steps)`` segment, from a copy of ``model``."""
    m = copy.deepcopy(model)
    params = list(m.parameters())
    for w, steps in segments:
        for _ in range(steps):
            grads = [pool_grad(m, pool) for pool in pools]
            with torch.no_grad():
                for i, p in enumerate(params):
                    p.sub_(lr * sum(wk * g[i] for wk, g in zip(w, grads, strict=True)))
    return m


@dataclass
class Setup:
    root: Path
    model: nn.Module  # float64 checkpoint
    pools: list[Tensor]
    M: dict[str, np.ndarray]  # full [K, K] M[a, l] = < g_L, H_a g_l > per target, diagonal included


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = make_run(tmp_path_factory.mktemp("intervention") / "run", steps=(STEP,), n_docs=N_DOCS, seed=SEED)
    ref = checkpoints.discover(root)[0]
    model = checkpoints.load_model(ref, dtype=torch.float64)
    tokenizer = checkpoints.load_tokenizer(root / "tokenizer")
    manifest = checkpoints.read_manifest(root)
    assert manifest is not None and list(manifest.domains) == ["en", "xx"]
    pools = [
        sampling.pack_blocks(documents.load_texts(manifest.domains[name], base_dir=root), tokenizer, 16)
        for name in ("en", "xx")
    ]
    G = [pool_grad(model, pool) for pool in pools]
    HG = [pool_hvps(model, pool, G) for pool in pools]  # HG[a][l] = H_a g_l
    gf = torch.stack([flat(g) for g in G])
    hgf = torch.stack([torch.stack([flat(h) for h in row]) for row in HG])  # [a, l, n]
    M = {name: np.einsum("k,kn,aln->al", c, gf.numpy(), hgf.numpy()) for name, c in TARGETS.items()}
    return Setup(root, model, pools, M)


def flow_prediction(M: np.ndarray, d: np.ndarray, dt: float) -> float:
    """The tool's prediction ``dt^2 sum C o M`` (MATH.md; gradient flow, the diagonal of M never enters)."""
    off = M.copy()
    np.fill_diagonal(off, 0.0)
    return float(criterion.predicted_change(torch.as_tensor(off), WBAR, d, dt))


def discrete_prediction(M: np.ndarray, d: np.ndarray, dt: float, n: int) -> float:
    """Second-order change for GD in ``n`` steps per half rather than the flow: ``n`` steps of a constant
    field ``g_A`` give ``-dt g_A + (dt^2/2)(1 - 1/n) H_A g_A``, so against the flow the intervention moves by
    an extra ``-(dt^2/n) H_d g_d``, and the target by ``-(dt^2/n) < g_L, H_d g_d >``. It vanishes as n grows
    (real horizons are hundreds of steps) but not as dt -> 0 at fixed n."""
    return flow_prediction(M, d, dt) - dt**2 / n * float(d @ M @ d)


@pytest.fixture(scope="module")
def observed(setup: Setup) -> dict[float, dict[str, tuple[float, float]]]:
    """``observed[dt][target] = (EL^12, EL^21)`` from real full-batch GD, for every dt in ``DTS``."""
    d = np.array([DW, -DW])
    out: dict[float, dict[str, tuple[float, float]]] = {}
    for dt in DTS:
        lr = dt / N
        runs = {
            "base": [(WBAR, 2 * N)],
            "12": [(WBAR + d, N), (WBAR - d, N)],
            "21": [(WBAR - d, N), (WBAR + d, N)],
        }
        loss = {
            key: np.array(
                [pool_loss(gradient_descent(setup.model, setup.pools, segs, lr), p) for p in setup.pools]
            )
            for key, segs in runs.items()
        }
        out[dt] = {
            name: (float(c @ (loss["12"] - loss["base"])), float(c @ (loss["21"] - loss["base"])))
            for name, c in TARGETS.items()
        }
    return out


# ---------------------------------------------------------------------------------------------- tests


def test_exact_prediction_matches_real_intervention(setup: Setup, observed) -> None:
    """MATH.md's formula against real gradient descent, for the targets en, xx and the mixture, both orders.

    - The tool's formula ``dt^2 sum C o M`` (exact on the pools, ``dt = lr n``) is within 6 % of the observed
      ``EL^{12}`` and ``-EL^{21}`` at ``dt = 0.005`` for every target (measured: at most 2.4 % for en and xx,
      4.6 % for the mixture's ``-EL^{21}``), and the sign is right for every target at every dt.
    - The ratio tends to 1 as ``lr n -> 0``, at the rate the theory says (remainder O(dt^3), so the relative
      error is O(dt)): against the exact second order of the *discrete* dynamics (the formula plus GD's
      ``-(dt^2/n) < g_L, H_d g_d >``), the relative error shrinks by a factor < 0.65 each time dt halves
      (measured 0.51-0.57), and the Richardson extrapolation ``2 r(dt/2) - r(dt)``, which removes the O(dt)
      term, is within 1 % of 1 for every target (measured: within 0.3 %).
    """
    d = np.array([DW, -DW])
    ratio_flow: dict[tuple[str, str, float], float] = {}
    ratio_disc: dict[tuple[str, str, float], float] = {}
    for dt in DTS:
        for name in TARGETS:
            el12, el21 = observed[dt][name]
            flow = flow_prediction(setup.M[name], d, dt)
            assert np.sign(el12) == np.sign(flow) and np.sign(el21) == -np.sign(flow), (dt, name)
            ratio_flow[name, "12", dt] = el12 / flow
            ratio_flow[name, "21", dt] = el21 / -flow
            ratio_disc[name, "12", dt] = el12 / discrete_prediction(setup.M[name], d, dt, N)
            ratio_disc[name, "21", dt] = el21 / discrete_prediction(setup.M[name], -d, dt, N)
    small = min(DTS)
    for name in TARGETS:
        for order in ("12", "21"):
            assert abs(ratio_flow[name, order, small] - 1.0) < 0.06, (name, order, ratio_flow)
    for name in TARGETS:
        for order in ("12", "21"):
            errors = [abs(ratio_disc[name, order, dt] - 1.0) for dt in sorted(DTS, reverse=True)]
            for big, half in itertools.pairwise(errors):
                assert half < 0.65 * big, (name, order, errors)
            richardson = 2 * ratio_disc[name, order, small] - ratio_disc[name, order, 2 * small]
            assert abs(richardson - 1.0) < 0.01, (name, order, richardson)


@pytest.fixture(scope="module")
def analysis_small(setup: Setup, tmp_path_factory):
    """``commute analyze`` at the small-lr setting of the agreement test (dt = lr * horizon = 0.005)."""
    out = tmp_path_factory.mktemp("analysis")
    xx_blocks = min(p.shape[0] for p in setup.pools)
    samples = (xx_blocks // 24) * 24  # (almost) the whole smaller pool, 8 blocks x 3 parts
    opts = AnalyzeOptions(
        ckpt_dir=setup.root, samples=samples, horizon=N, dw=DW, lr=min(DTS) / N, out=out, device="cpu"
    )
    return opts, run_analysis(opts)


def test_analysis_pipeline_predicts_real_intervention(setup: Setup, observed, analysis_small) -> None:
    """End to end: checkpoint folder + manifest -> ``run_analysis`` -> ``results`` rows. Where the sampled
    prediction ``el_ij`` is significant it has the sign of the observed ``EL^{12}`` and its size within a
    factor 2 (ratio in [0.5, 2]); all three targets must be significant here (so no check is vacuous: the run
    seed was chosen so that the mixture's effect, which nearly cancels between its domains in some runs, is
    at |t| = 6), and ``el_ij`` is consistent with the exact full-pool value within 4 of its standard errors.

    The pools are the very blocks the analysis sampled (its tokenized-data cache holds the same tensors), so
    observed and predicted refer to one objective."""
    opts, result = analysis_small
    # the sample the analysis drew (the same bounded, seeded draw it used) consists of rows of the pools
    parts, _, _ = prepare_samples(resolve_inputs(opts), opts)
    for domain_parts, pool in zip(parts, setup.pools, strict=True):
        rows = {tuple(r.tolist()) for r in pool}
        drawn = [tuple(r.tolist()) for blk in domain_parts for part in blk for r in part]
        assert len(drawn) == opts.samples and all(r in rows for r in drawn)

    res = result.results
    assert len(res) == 3 and set(res["target"]) == set(TARGETS)
    d = np.array([DW, -DW])
    small = min(DTS)
    for _, row in res.iterrows():
        assert (row["domain_i"], row["domain_j"]) == ("en", "xx")
        assert row["dt"] == pytest.approx(small) and row["dw"] == DW
        exact = flow_prediction(setup.M[row["target"]], d, small)
        assert abs(row["el_ij"] - exact) < 4 * row["el_se"], (
            row["target"],
            row["el_ij"],
            exact,
            row["el_se"],
        )
        obs12 = observed[small][row["target"]][0]
        assert row["significant"], row["target"]
        assert np.sign(row["el_ij"]) == np.sign(obs12), row["target"]
        assert 0.5 <= row["el_ij"] / obs12 <= 2.0, (row["target"], row["el_ij"], obs12)


def test_regime_check_flags_large_steps(analysis_small) -> None:
    """MATH.md "Regime of validity": with the small-lr setting of the agreement tests every row is
    ``in_regime``; with plain SGD at lr 0.5 over 100 steps (dt = 50, MATH.md's failed experiment), where
    ``lr n x curvature >> 1`` (the exact formula is already 5-11 % off at dt = 0.02 here), every row is
    flagged. The second analysis reuses the cached per-block statistics (lr and horizon are
    post-processing)."""
    opts, small = analysis_small
    assert small.results["in_regime"].all(), small.results[["target", "regime_ratio", "first_order"]]
    assert (small.results["regime_ratio"] < 0.05).all()
    big = run_analysis(replace(opts, lr=0.5, horizon=100)).results
    assert np.allclose(big["dt"], 50.0)
    assert not big["in_regime"].any(), big[["target", "regime_ratio", "first_order", "target_loss"]]
    # the numbers behind the flag: second-order effect far above first-order progress, or progress > loss / 2
    assert ((big["regime_ratio"] > 0.25) | (big["first_order"].abs() > 0.5 * big["target_loss"])).all()


def test_stats_cache_is_keyed_by_the_block_design(analysis_small) -> None:
    """Regression (found while writing these tests): the per-checkpoint statistics cache ignored
    ``--blocks``, so the same ``--samples`` split into another number of blocks (here 312 sequences as 8 or 4
    blocks x 3 parts: the same sample, the same digest) silently reused the old design's statistics. A
    different design must be recomputed; the same one must be read back unchanged."""
    opts, small = analysis_small
    four = run_analysis(replace(opts, blocks=4)).results
    assert (four["n_blocks"] == 4).all()
    again = run_analysis(opts).results
    assert (again["n_blocks"] == 8).all()
    assert again["el_ij"].tolist() == small.results["el_ij"].tolist()
