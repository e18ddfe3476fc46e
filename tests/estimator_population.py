"""The exact population of the estimator tests, and the tiny models they measure: shared by
``tests/test_estimator.py`` (its statistics), ``tests/test_decomposition.py``, ``tests/test_power.py`` and
``tests/test_cuda.py`` (a test module is never imported as a library).

Two "domains", each a fixed pool of ``P`` short token sequences drawn from its own random Markov chain, and a
tiny causal LM in float64; the population quantities are dense (``g_k`` the pool-mean gradient, ``H_k`` the
dense Hessian of the pool-mean loss, from ``torch.autograd.functional``: no code of
``commute_cli.engine.curvature``). ``tests/test_estimator.py``'s docstring gives the design.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from commute_cli.core import criterion
from commute_cli.core.regime import Target
from commute_cli.engine import curvature as C
from commute_cli.engine.estimator import (
    HVP,
    PAIR,
    VEC,
    CheckpointStats,
    Products,
    estimate_checkpoint,
    estimate_products,
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
