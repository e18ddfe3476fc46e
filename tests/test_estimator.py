"""The design's estimators are unbiased and their error bars are honest (docs/MATH.md "Estimator").

Reference values come from a population whose criterion is computable exactly: two "domains", each a fixed
pool of ``P`` short token sequences drawn from its own random Markov chain, and a tiny causal LM in float64.
The population quantities are dense: ``g_k`` is the pool-mean gradient and ``H_k`` the dense Hessian of the
pool-mean loss, both from ``torch.autograd.functional`` over a loss of the flat parameter vector built with
``torch.func.functional_call`` -- no code of ``commute_cli.engine.curvature`` is involved. Then:

- ``M[a, l] = < D g_L, H_a D g_l >``, ``EL^{12} = dt^2 sum C o M`` (``criterion.predicted_change``, checked
  against the direct formula ``dt^2 < D g_L, Hbar D g_d - H_d D gbar >``) and ``< g_L, D gbar >`` are exact;
- :func:`estimate_products` is run on many independent samples (each draws ``B * 3 * m`` sequences per
  domain from the pool without replacement, ``B = 8``), and the mean of the per-run estimates is compared with
  the exact value in units of its standard error, and the per-run 95 % t-intervals are counted for coverage;
  each run is reduced by both estimators (cross, the default, and block), so they are compared on the same
  draws at the same compute.

Why a small hand-written LM rather than GPT-2 for the many-seed tests: the statistics do not depend on the
architecture, and a GPT-2 call costs ~3x more in Python overhead, which the ~60 s budget of a test file on one
core cannot pay for a few hundred runs. The tiny GPT-2 (tied embeddings, eager attention) is used where a
single run suffices: the products against dense Hessians, the jackknife against its definition.

Finite pool: sampling without replacement makes two disjoint parts' means correlated by ``-Var/(P-1)``, a
bias of relative size ``m/P`` times the naive estimator's bias. Here ``P = 20000`` against at most
``3 * m = 24`` sequences per block (``B * 3 * m = 192`` per run), so the effect is ~4e-4 of the naive bias:
far below the standard errors below. The pools repeat sequences (a low-entropy chain), so the exact Hessian
is a count-weighted sum over the few hundred distinct ones.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from commute_cli.core import criterion
from commute_cli.core.regime import Target
from commute_cli.core.rows import summarize_checkpoint
from commute_cli.engine import curvature as C
from commute_cli.engine.estimator import (
    HVP,
    PAIR,
    VEC,
    CheckpointStats,
    Products,
    estimate_checkpoint,
    estimate_products,
    jackknife_values,
)

from references import dense_grad, dense_hess, functional_loss

V, T = 8, 5  # vocabulary, sequence length
P = 20_000  # sequences per domain pool
B = 8  # design blocks
WBAR = np.array([0.7, 0.3])
DW = 0.2
NAMES = ["one", "two"]
TARGETS = [
    Target("one", "domain", np.array([1.0, 0.0])),
    Target("two", "domain", np.array([0.0, 1.0])),
    Target("mix", "mix"),
]
TARGET_COEFS = np.stack([t.coefs_at(WBAR) for t in TARGETS])
Z_MAX = 3.5  # |mean - exact| / SE allowed for each of the ~12 quantities checked per configuration


# ---------------------------------------------------------------------------------------------- population


class TinyLM(nn.Module):
    """A causal LM in a few hundred parameters: token + position embeddings, a causal running mean of the
    embeddings (the 'attention'), one tanh layer, logits. Returns the logits tensor ``[b, T, V]``."""

    def __init__(self, d: int = 4, hidden: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, d)
        self.pos = nn.Parameter(torch.randn(T, d))
        self.fc = nn.Linear(2 * d, hidden)
        self.out = nn.Linear(hidden, V)

    def forward(self, ids: Tensor) -> Tensor:
        e = self.emb(ids) + self.pos[: ids.shape[1]]
        count = torch.arange(1, ids.shape[1] + 1, dtype=e.dtype, device=e.device).view(1, -1, 1)
        mix = e.cumsum(1) / count
        return self.out(torch.tanh(self.fc(torch.cat([e, mix], dim=-1))))


def markov_pool(seed: int, n: int = P, concentration: float = 0.1) -> Tensor:
    """``n`` sequences of a random Markov chain (sparse Dirichlet rows: predictable, so the mean gradient
    stands out of the per-sequence noise and a handful of sequences per part gives a usable estimate)."""
    rng = np.random.default_rng(seed)
    trans = torch.tensor(rng.dirichlet(np.full(V, concentration), size=V))
    init = torch.tensor(rng.dirichlet(np.full(V, concentration)))
    gen = torch.Generator().manual_seed(seed)
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.multinomial(init, n, replacement=True, generator=gen)
    for t in range(1, T):
        x[:, t] = torch.multinomial(trans[x[:, t - 1]], 1, generator=gen).squeeze(1)
    return x


@dataclass
class Population:
    model: nn.Module
    pools: list[Tensor]
    G: Tensor  # [K, n] pool-mean gradients
    H: Tensor  # [K, n, n] dense pool-mean Hessians

    def M(self, c: np.ndarray, D: Tensor | None) -> np.ndarray:
        """Exact interaction matrix ``M[a, l] = < D g_L, H_a D g_l >`` (diagonal 0, as the estimator's)."""
        K = self.G.shape[0]
        DG = self.G if D is None else D * self.G
        u = torch.as_tensor(c, dtype=torch.float64) @ DG
        out = torch.stack([self.H[a] @ u for a in range(K)]) @ DG.T
        out.fill_diagonal_(0.0)
        return out.numpy()

    def el(self, c: np.ndarray, D: Tensor | None, dw: float = DW) -> float:
        """Exact ``EL^{12}`` at ``dt = 1`` for ``d = (+dw, -dw)`` around ``WBAR``."""
        return float(criterion.predicted_change(torch.as_tensor(self.M(c, D)), WBAR, [dw, -dw], 1.0))

    def first(self, c: np.ndarray, D: Tensor | None) -> float:
        """Exact ``< g_L, D gbar >``."""
        c_, w = torch.as_tensor(c, dtype=torch.float64), torch.as_tensor(WBAR)
        gbar = w @ self.G
        return float((c_ @ self.G) @ (gbar if D is None else D * gbar))


@pytest.fixture(scope="module")
def population() -> Population:
    return make_population()


def make_population(seeds: tuple[int, int] = (10, 11)) -> Population:
    """The two-domain population (equal seeds: both domains are the same pool, so every bracket is 0)."""
    torch.manual_seed(0)
    model = TinyLM().double().eval()
    with torch.no_grad():  # larger weights than the default init: a curved, far-from-trivial point
        for p in model.parameters():
            p.mul_(2.0)
    pools = [markov_pool(seeds[0]), markov_pool(seeds[1])]
    G, H = [], []
    for pool in pools:
        distinct, counts = torch.unique(pool, dim=0, return_counts=True)
        weights = counts.double() / counts.sum()
        G.append(dense_grad(model, distinct, weights))
        H.append(dense_hess(model, distinct, weights))
    return Population(model, pools, torch.stack(G), torch.stack(H))


def random_diag(n: int, seed: int = 7) -> Tensor:
    """A random positive diagonal preconditioner spanning ~1.5 decades."""
    gen = torch.Generator().manual_seed(seed)
    return torch.exp(0.7 * torch.randn(n, generator=gen, dtype=torch.float64))


def draw_parts(pools: list[Tensor], seed: int, m: int) -> list[list[list[Tensor]]]:
    """``parts[k][b][p]``: ``B * 3 * m`` sequences per domain drawn without replacement, split in order."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for pool in pools:
        x = pool[torch.randperm(pool.shape[0], generator=gen)[: B * 3 * m]]
        parts.append([[x[(3 * b + p) * m : (3 * b + p + 1) * m] for p in range(3)] for b in range(B)])
    return parts


def naive_parts(parts: list[list[list[Tensor]]]) -> list[list[list[Tensor]]]:
    """The same sequences with every factor of a block computed on all of them (no disjoint parts)."""
    return [[[torch.cat(list(blk))] * 3 for blk in pk] for pk in parts]


def products(model: nn.Module, parts, plan: str, D: Tensor | None) -> Products:
    coefs = TARGET_COEFS if plan == "target" else None
    return estimate_products(model, parts, plan=plan, target_coefs=coefs, D=D, micro_batch=64)


def estimate(
    pop: Population, parts, plan: str, D: Tensor | None, estimator: str = "cross"
) -> CheckpointStats:
    coefs = TARGET_COEFS if plan == "target" else None
    return estimate_checkpoint(
        pop.model, parts, plan=plan, target_coefs=coefs, D=D, micro_batch=64, estimator=estimator
    )


# ---------------------------------------------------------------------------------------------- quantities


def quantities(stats: CheckpointStats) -> dict[str, np.ndarray]:
    """Per-block estimates ``[B]`` of every checked quantity, by name."""
    out: dict[str, np.ndarray] = {}
    for t, c in zip(TARGETS, TARGET_COEFS, strict=True):
        Mb = stats.interaction(c)
        out[f"M01[{t.name}]"] = Mb[:, 0, 1]
        out[f"M10[{t.name}]"] = Mb[:, 1, 0]
        Cm = criterion.pair_coefficients(WBAR, [DW, -DW])
        out[f"EL12[{t.name}]"] = np.einsum("al,bal->b", Cm, Mb)
        out[f"first[{t.name}]"] = stats.first_order(c, WBAR)
    return out


def exact_quantities(pop: Population, D: Tensor | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for t, c in zip(TARGETS, TARGET_COEFS, strict=True):
        M = pop.M(c, D)
        out[f"M01[{t.name}]"] = float(M[0, 1])
        out[f"M10[{t.name}]"] = float(M[1, 0])
        out[f"EL12[{t.name}]"] = pop.el(c, D)
        out[f"first[{t.name}]"] = pop.first(c, D)
    return out


def z_scores(runs: list[dict[str, np.ndarray]], exact: dict[str, float]) -> dict[str, float]:
    """``(mean over runs of the per-run estimate - exact) / SE of that mean``, per quantity."""
    out = {}
    for key, value in exact.items():
        per_run = np.array([r[key].mean() for r in runs])
        se = per_run.std(ddof=1) / math.sqrt(len(per_run))
        out[key] = float((per_run.mean() - value) / se)
    return out


# ---------------------------------------------------------------------------------------------- exactness


def test_exact_reference_formulas_agree(population: Population) -> None:
    """The exact ``EL^{12}`` from ``criterion.predicted_change`` equals MATH.md's direct formula
    ``dt^2 < D g_L, Hbar D g_d - H_d D gbar >`` computed from the dense matrices (so the reference values of
    the statistical tests do not rest on the code path they judge), with and without a preconditioner."""
    pop = population
    d = torch.tensor([DW, -DW], dtype=torch.float64)
    w = torch.as_tensor(WBAR)
    for D in (None, random_diag(pop.G.shape[1])):
        Dv = torch.ones(pop.G.shape[1], dtype=torch.float64) if D is None else D
        for c in TARGET_COEFS:
            gL = torch.as_tensor(c) @ pop.G
            Hbar = torch.einsum("k,kij->ij", w, pop.H)
            Hd = torch.einsum("k,kij->ij", d, pop.H)
            direct = float(Dv * gL @ (Hbar @ (Dv * (d @ pop.G)) - Hd @ (Dv * (w @ pop.G))))
            assert pop.el(c, D) == pytest.approx(direct, rel=1e-12, abs=1e-15)
            dt = 0.3
            assert float(
                criterion.predicted_change(torch.as_tensor(pop.M(c, D)), WBAR, d, dt)
            ) == pytest.approx(dt**2 * direct, rel=1e-12)


def tiny_gpt2(seed: int = 0, n_layer: int = 1, scale: float = 10.0) -> nn.Module:
    """GPT-2 with tied embeddings, eager attention, float64, weights scaled by ``scale``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layer,
        n_embd=4,
        n_head=2,
        vocab_size=16,
        n_positions=8,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GPT2LMHeadModel(config)
    with torch.no_grad():  # away from the near-uniform init, so every term is sizeable
        for p in model.parameters():
            p.mul_(scale)
    return model.eval().double()


@pytest.mark.parametrize("offload", [False, True])
def test_products_match_dense_reference_gpt2(offload: bool) -> None:
    """Every product of every (free block, unit block) combination is the documented product of three
    disjoint parts, on a real GPT-2 (tied weights), K = 3 domains, B = 3 blocks, a random diagonal D, both
    plans, with ``g`` and ``H`` from dense float64 autograd:

    - pair: ``W[d, c, k, a, l] = < D g_k(part 2 of d), H_a(part 1 of c) D g_l(part 0 of c) >``;
    - target: ``W[e, c, t, a, l] = sum_k c_tk < D g_k(part 2 of c), H_a(part 1 of c) D g_l(part 0 of e) >``;
    - ``first[e, d, k, l] = < g_k(part 0 of e), D g_l(part 2 of d) >`` (both plans); losses the mean over the
      three parts of each block.

    This pins which part plays which role (unbiasedness needs the three factors of every product on three
    different parts). Then the reductions: the block estimator is the diagonal, and the cross estimator's
    values have the mean of all ``B^2`` entries as mean and, as ``sd / sqrt(B)``, the delete-one-block
    jackknife SE computed here by brute force (deleting block ``b`` from every role and re-averaging).
    ``offload``: the free stack in host memory (here the model's own device; tests/test_cuda.py runs the
    model on a GPU)."""
    check_block_values_dense(torch.device("cpu"), offload)


def brute_force_jackknife(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of all entries and delete-one-block jackknife SE of a ``[B, B, ...]`` table, by definition."""
    Bn = W.shape[0]
    est = W.mean(axis=(0, 1))
    loo = np.stack([np.delete(np.delete(W, b, axis=0), b, axis=1).mean(axis=(0, 1)) for b in range(Bn)])
    se = np.sqrt((Bn - 1) / Bn * ((loo - loo.mean(axis=0)) ** 2).sum(axis=0))
    return est, se


def check_block_values_dense(device: torch.device, offload: bool) -> None:
    """The dense-reference check above with the model on ``device`` (references always on the CPU)."""
    model = tiny_gpt2()
    K, Bb, m = 3, 3, 2
    gen = torch.Generator().manual_seed(3)
    parts = [
        [[torch.randint(0, 16, (m, 8), generator=gen) for _ in range(3)] for _ in range(Bb)] for _ in range(K)
    ]
    n = C.num_params(model)
    D = random_diag(n, seed=4)
    coefs = np.array([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [0.0, 0.0, 1.0]])
    on_device = copy.deepcopy(model).to(device)
    pair = estimate_products(on_device, parts, plan="pair", D=D, micro_batch=1, offload=offload)
    target = estimate_products(
        on_device, parts, plan="target", target_coefs=coefs, D=D, micro_batch=2, offload=offload
    )
    g0 = [torch.stack([dense_grad(model, parts[k][b][VEC]) for k in range(K)]) for b in range(Bb)]
    g2 = [torch.stack([dense_grad(model, parts[k][b][PAIR]) for k in range(K)]) for b in range(Bb)]
    H1 = [[dense_hess(model, parts[k][b][HVP]) for k in range(K)] for b in range(Bb)]
    Wp = np.zeros((Bb, Bb, K, K, K))
    Wt = np.zeros((Bb, Bb, len(coefs), K, K))
    first = np.zeros((Bb, Bb, K, K))
    for d in range(Bb):
        for c in range(Bb):
            first[d, c] = (g0[d] @ (D * g2[c]).T).numpy()
            for a in range(K):
                for ell in range(K):
                    if a != ell:
                        # pair: free = part 2 of d; unit = part 1 and part 0 of c
                        Wp[d, c, :, a, ell] = ((D * g2[d]) @ (H1[c][a] @ (D * g0[c][ell]))).numpy()
                        # target: free = part 0 of d; unit = part 1 and part 2 of c
                        per_k = ((D * g2[c]) @ (H1[c][a] @ (D * g0[d][ell]))).numpy()
                        Wt[d, c, :, a, ell] = coefs @ per_k
    for got, want in ((pair.W, Wp), (target.W, Wt), (pair.first, first), (target.first, first)):
        assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max()
    with torch.no_grad():
        loss = [
            [
                np.mean(
                    [float(functional_loss(model, parts[k][b][p])(C.flat_params(model))) for p in range(3)]
                )
                for k in range(K)
            ]
            for b in range(Bb)
        ]
    np.testing.assert_allclose(pair.losses, loss, rtol=1e-12)
    np.testing.assert_allclose(target.losses, loss, rtol=1e-12)

    for prod, table in ((pair, Wp), (target, Wt)):
        block, cross = prod.stats("block"), prod.stats("cross")
        got_block = block.Q if prod.plan == "pair" else block.M
        got_cross = cross.Q if prod.plan == "pair" else cross.M
        assert got_block is not None and got_cross is not None
        np.testing.assert_allclose(got_block, np.einsum("bb...->b...", table), rtol=1e-10, atol=1e-14)
        est, se = brute_force_jackknife(table)
        scale = np.abs(table).max()
        assert np.abs(got_cross.mean(axis=0) - est).max() <= 1e-10 * scale
        assert np.abs(got_cross.std(axis=0, ddof=1) / math.sqrt(Bb) - se).max() <= 1e-10 * scale
        est, se = brute_force_jackknife(first)
        assert np.abs(cross.first.mean(axis=0) - est).max() <= 1e-10 * np.abs(first).max()
        assert (
            np.abs(cross.first.std(axis=0, ddof=1) / math.sqrt(Bb) - se).max() <= 1e-10 * np.abs(first).max()
        )


def test_jackknife_values_are_linear_and_exact_on_rank_one_tables() -> None:
    """The pseudo-values are linear in the table (so a target, an intervention or a bracket formed from them
    downstream is the pseudo-values of that combination) and, for an additive table
    ``W[d, c] = r_d + s_c`` (no interaction), they are ``r_b + s_b`` exactly: the jackknife of a sum of two
    independent sample means is the classical two-sample one."""
    rng = np.random.default_rng(0)
    W1, W2 = rng.normal(size=(6, 6, 3)), rng.normal(size=(6, 6, 3))
    np.testing.assert_allclose(
        jackknife_values(2.0 * W1 - 0.5 * W2), 2.0 * jackknife_values(W1) - 0.5 * jackknife_values(W2)
    )
    r, s = rng.normal(size=6), rng.normal(size=6)
    np.testing.assert_allclose(jackknife_values(r[:, None] + s[None, :]), r + s, rtol=1e-12)
    with pytest.raises(ValueError):
        jackknife_values(np.zeros((3, 4)))


def test_plans_agree_on_the_block_estimator_and_first_order_terms(population: Population) -> None:
    """MATH.md "Cost": the two HVP plans compute the same per-block products (symmetry of ``H_a``): on the
    same samples (float64) the block estimator's interaction matrices agree to rounding for every target,
    with and without D, and so do the first-order tables and losses of both estimators. (The cross
    estimator pairs a different factor across blocks in each plan -- the target's gradient in the pair plan,
    the differentiated gradient in the target plan -- so its values differ between plans within their error
    bars; both are unbiased: see the statistical tests, which run one plan each.)"""
    parts = draw_parts(population.pools, seed=999, m=3)
    for D in (None, random_diag(C.num_params(population.model))):
        pair = products(population.model, parts, "pair", D)
        target = products(population.model, parts, "target", D)
        for c in TARGET_COEFS:
            a, b = pair.stats("block").interaction(c), target.stats("block").interaction(c)
            assert np.abs(a - b).max() <= 1e-12 * np.abs(a).max()
        np.testing.assert_allclose(pair.first, target.first, rtol=1e-12)
        np.testing.assert_allclose(pair.losses, target.losses, rtol=1e-13)


# ---------------------------------------------------------------------------------------------- statistics


def run_many(pop: Population, plan: str, D: Tensor | None, R: int, m: int, seed0: int):
    """``R`` independent samples; per estimator, the checked quantities and the rows analyze would print."""
    runs: dict[str, list] = {"cross": [], "block": []}
    rows: dict[str, list] = {"cross": [], "block": []}
    for r in range(R):
        prod = products(pop.model, draw_parts(pop.pools, seed=seed0 + r, m=m), plan, D)
        for est in runs:
            stats = prod.stats(est)
            runs[est].append(quantities(stats))
            rows[est] += summarize_checkpoint(
                stats,
                step=r,
                names=NAMES,
                wbar=WBAR,
                targets=TARGETS,
                lr=1.0,
                horizon=1,
                dw=DW,
                confidence=0.95,
            )
    return runs, rows


@pytest.mark.parametrize(("plan", "precondition"), [("pair", False), ("target", True)])
def test_unbiased_with_honest_error_bars(population: Population, plan: str, precondition: bool) -> None:
    """The cross estimator (the default), over 100 independent samples (m = 8 sequences per part, B = 8):

    (a) the mean of the per-run estimates matches the exact value within ``Z_MAX`` standard errors for every
        interaction entry ``M[0, 1]``, ``M[1, 0]``, every ``EL^{12}`` and every first-order rate
        ``< g_L, D gbar >``, for the targets domain 1, domain 2 and the mixture (no bias from shared samples,
        although every part-2 block meets every HVP block);
    (b) the 95 % t-intervals of ``EL^{12}`` that ``summarize_checkpoint`` reports (``el_ij +- t_crit el_se``,
        with the jackknife SE) cover the exact value in about 95 % of runs, and the SE is the right size: its
        RMS over runs matches the actual spread of the per-run means.

    The pair plan runs with D = I, the target plan with a random positive diagonal D. The same checks hold
    for the block estimator on the same draws (checked too, as the reference the new one must not lose to).
    Measured (cross): max |z| 2.5 (pair) and 2.4 (target, D); coverage 0.96-0.97 (pair) and 0.95-0.97
    (target); RMS SE / spread 1.09-1.12 (pair) and 0.95-1.03 (target). Block: max |z| 2.6 and 2.4, coverage
    0.95-0.97, RMS SE / spread 0.93-1.15.
    """
    pop = population
    D = random_diag(C.num_params(pop.model)) if precondition else None
    R, m = 100, 8
    exact = exact_quantities(pop, D)
    runs, rows = run_many(pop, plan, D, R, m, seed0=1000 * precondition + 616)
    for est in ("cross", "block"):
        z = z_scores(runs[est], exact)
        assert max(abs(v) for v in z.values()) < Z_MAX, (est, z)
        for t in TARGETS:
            mine = [row for row in rows[est] if row["target"] == t.name]
            assert len(mine) == R
            el = np.array([row["el_ij"] for row in mine])
            se = np.array([row["el_se"] for row in mine])
            t_crit = np.array([row["t_crit"] for row in mine])
            np.testing.assert_allclose(el, [q[f"EL12[{t.name}]"].mean() for q in runs[est]], rtol=1e-12)
            covered = np.abs(el - exact[f"EL12[{t.name}]"]) <= t_crit * se
            assert covered.mean() >= 0.88, (est, t.name, covered.mean())
            # honest size: RMS of the reported SE versus the spread of the estimates across runs
            assert 0.75 <= math.sqrt(np.mean(se**2)) / el.std(ddof=1) <= 1.33, (est, t.name)


def test_cross_estimator_has_smaller_variance_than_block_on_same_draws(population: Population) -> None:
    """At equal compute (the same gradients and HVPs: one :func:`estimate_products` per run, reduced both
    ways), the cross estimator's spread over 100 independent runs is clearly below the block estimator's, in
    the noisy regime its design targets (m = 1 sequence per part, where the noise-only parts of the triple
    products dominate). Measured spread ratios cross/block: ``EL^{12}`` 0.71 / 0.49 / 0.64 (targets one,
    two, mix), interaction entries 0.58-0.82, first-order rates 0.75-0.87. Both stay unbiased (within
    ``Z_MAX`` SE of the exact values), and the cross estimator's intervals still cover: the jackknife is
    conservative here (RMS SE / spread 1.34-1.41, coverage 0.99-1.0), the price of an SE that is linear in
    the products (docs/MATH.md "Estimator"). With m = 8 the ratios are 0.85-1.0: less noise, less to gain."""
    pop = population
    R, m = 100, 1
    exact = exact_quantities(pop, None)
    runs, rows = run_many(pop, "pair", None, R, m, seed0=77)
    for est in ("cross", "block"):
        z = z_scores(runs[est], exact)
        assert max(abs(v) for v in z.values()) < Z_MAX, (est, z)
    for t in TARGETS:
        key = f"EL12[{t.name}]"
        sd = {est: np.std([q[key].mean() for q in runs[est]], ddof=1) for est in runs}
        assert sd["cross"] / sd["block"] < 0.85, (key, sd)
        mine = [row for row in rows["cross"] if row["target"] == t.name]
        covered = [abs(row["el_ij"] - exact[key]) <= row["t_crit"] * row["el_se"] for row in mine]
        assert np.mean(covered) >= 0.9, (key, np.mean(covered))
    for t in TARGETS:
        key = f"first[{t.name}]"
        sd = {est: np.std([q[key].mean() for q in runs[est]], ddof=1) for est in runs}
        assert sd["cross"] / sd["block"] < 0.95, (key, sd)


def test_false_positive_rate_on_data_with_no_effect() -> None:
    """No effect, so no flag beyond the stated rate: both "domains" are independent samples of the *same*
    pool, hence ``g_1 = g_2`` and ``H_1 = H_2`` and every ``EL^{12}`` and bracket is exactly 0 for every
    target. Over 300 independent samples (m = 2 per part, B = 8, pair plan) the fraction of rows that
    ``summarize_checkpoint`` flags significant at 95 % confidence stays at or below 5 % plus two binomial
    standard errors (8.8 %), for every target and both estimators. Measured: cross 2.0-2.7 %, block 3.0-4.0 %
    (the jackknife's conservativeness shows here as a false-positive rate below the nominal one)."""
    torch.manual_seed(0)
    model = TinyLM().double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    pool = markov_pool(10)
    R, m = 300, 2
    flagged: dict[tuple[str, str], list[bool]] = {}
    for r in range(R):
        prod = products(model, draw_parts([pool, pool], seed=20_000 + r, m=m), "pair", None)
        for est in ("cross", "block"):
            for row in summarize_checkpoint(
                prod.stats(est),
                step=r,
                names=NAMES,
                wbar=WBAR,
                targets=TARGETS,
                lr=1.0,
                horizon=1,
                dw=DW,
                confidence=0.95,
            ):
                flagged.setdefault((est, row["target"]), []).append(bool(row["significant"]))
    bound = 0.05 + 2.0 * math.sqrt(0.05 * 0.95 / R)
    rates = {key: float(np.mean(v)) for key, v in flagged.items()}
    assert all(len(v) == R for v in flagged.values())
    assert max(rates.values()) <= bound, rates


def test_naive_same_sample_estimator_is_biased(population: Population) -> None:
    """Why the design exists: computing every factor of a product on the same sequences is biased by
    ``tr(H Cov)/n`` (MATH.md "Noise"). Same data for both estimators (1 sequence per part, 3 per block, where
    that bias is largest), 60 runs: the design's cross estimate stays within ``Z_MAX`` SE of the exact value
    for every quantity, while the naive per-block mean (every factor of a block on all of its sequences)
    misses by many SE (measured: 15-19 SE on the first-order rates, whose naive bias is ``+tr(D Cov)/n``;
    7.5-9.6 SE on the interaction entries that pair a gradient with itself or with the Hessian of its own
    samples; 4.3 SE on ``EL^{12}`` of domain 2). In ``EL^{12}`` the antisymmetric combination ``sum C o M``
    partly cancels the entries' biases, so there the size depends on the target."""
    pop = population
    R, m = 60, 1
    exact = exact_quantities(pop, None)
    design, naive = [], []
    for r in range(R):
        parts = draw_parts(pop.pools, seed=5000 + r, m=m)
        design.append(quantities(estimate(pop, parts, "pair", None)))
        naive.append(quantities(estimate(pop, naive_parts(parts), "pair", None, estimator="block")))
    z_design = z_scores(design, exact)
    z_naive = z_scores(naive, exact)
    assert max(abs(v) for v in z_design.values()) < Z_MAX, z_design
    for key in ("first[one]", "first[two]", "first[mix]"):
        assert z_naive[key] > 10.0, (key, z_naive[key])
    for key in ("M01[two]", "M10[two]", "M01[mix]", "M10[mix]"):
        assert z_naive[key] > 6.0, (key, z_naive[key])
    assert z_naive["EL12[two]"] > 3.0, z_naive["EL12[two]"]
