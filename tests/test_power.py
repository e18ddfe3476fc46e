"""Advice on samples and the cost model (commute_cli/power.py) against closed forms and the real estimator.

The statistical check runs the real estimator (:func:`commute_cli.engine.estimator.estimate_products`, cross
estimator) on the exact two-domain population of tests/estimator_population.py: the factor that
:func:`samples_factor` predicts from the reported standard error at a small sample must, when the run is
repeated with that many more samples, flag the true effect at least as often as the requested power (the
default law ``SE ~ 1/sqrt(samples)`` is conservative when products of two noise terms still matter).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from commute_cli.core import power
from commute_cli.core.rows import summarize_checkpoint
from commute_cli.engine.estimator import HVP, estimate_products

import estimator_population as te  # the exact population and its helpers


def test_t_critical_and_closed_forms() -> None:
    """``phi = 1``: ``f = ((t_c + z) se / |est|)^2``; ``phi = 0``: ``f = (t_c + z) se / |est|`` (SE ~ 1/f);
    ``f = 1`` exactly at the threshold; symmetric in the sign of the estimate; infinite for a zero one."""
    tc = power.t_critical(8, 0.95)
    assert tc == pytest.approx(2.364624, rel=1e-6)  # Student t, 7 df, 97.5 %
    z80 = 0.8416212335729143
    est, se = 0.3, 0.2
    need = (tc + z80) * se / est
    assert power.samples_factor(est, se, 8) == pytest.approx(need**2, rel=1e-12)
    assert power.samples_factor(-est, se, 8) == pytest.approx(need**2, rel=1e-12)
    assert power.samples_factor(est, se, 8, first_order_share=0.0) == pytest.approx(need, rel=1e-12)
    assert power.samples_factor(tc * se, se, 8, power=0.5) == pytest.approx(1.0, rel=1e-12)
    mixed = power.samples_factor(est, se, 8, first_order_share=0.5)
    assert need < mixed < need**2
    # the law it inverts: SE(f)^2 = se^2 (phi/f + (1-phi)/f^2) reaches |est| / (t_c + z) at f
    f = mixed
    assert se * math.sqrt(0.5 / f + 0.5 / f**2) == pytest.approx(est / (tc + z80), rel=1e-12)
    assert power.samples_factor(0.0, se, 8) == math.inf
    for bad in (
        dict(estimate=1.0, se=0.0, n_blocks=8),
        dict(estimate=1.0, se=1.0, n_blocks=1),
        dict(estimate=1.0, se=1.0, n_blocks=8, power=0.3),
        dict(estimate=1.0, se=1.0, n_blocks=8, first_order_share=1.5),
        dict(estimate=1.0, se=1.0, n_blocks=8, confidence=1.0),
    ):
        with pytest.raises(ValueError):
            power.samples_factor(**bad)


def test_advice_words() -> None:
    tc = power.t_critical(8, 0.95)
    assert power.advice(10.0, 1.0, 8) == ""  # already resolved
    assert power.advice(1.0, 1.0, 8) == "needs ~11x --samples"  # (2.36 + 0.84)^2 = 10.3, rounded up
    assert power.advice(tc / 2.0, 1.0, 8, power=0.5) == "needs ~4x --samples"
    assert power.advice(0.01, 1.0, 8) == "needs >128x --samples"
    assert power.nice_factor(0.9) is None and power.nice_factor(2.5) == 3.0
    # what a table shows of samples_needed: rounded up to two significant digits, never below it
    shown = [power.shown_factor(x) for x in (34.08, 2.02, 2.0, 10.3, 127.3, 1.0)]
    assert shown == [35, 2.1, 2, 11, 130, None]


def test_cost_counts_the_estimators_passes() -> None:
    """:func:`analysis_cost` counts what the estimator really runs: a loss hook records every sequence that
    goes through a forward pass, and whether it belongs to a part that is used for HVPs (part 1), for
    K = 3 domains, 2 blocks, ``--samples 20`` (rounded down to 18: 3 per part), both plans."""
    torch.manual_seed(0)
    model = te.TinyLM().double().eval()
    K, B, samples = 3, 2, 20
    m = samples // (3 * B)
    gen = torch.Generator().manual_seed(0)
    parts = [
        [[torch.randint(0, te.V, (m, te.T), generator=gen) for _ in range(3)] for _ in range(B)]
        for _ in range(K)
    ]
    hvp_ids = {tuple(row.tolist()) for dom in parts for blk in dom for row in blk[HVP]}
    grad_ids = {tuple(row.tolist()) for dom in parts for blk in dom for p in (0, 2) for row in blk[p]}
    assert not hvp_ids & grad_ids  # random 5-token sequences over 8 symbols: distinct here

    for plan, T in (("pair", 1), ("target", 2)):
        seen = {"grad": 0, "hvp": 0}

        def loss_fn(model, ids, seen=seen):
            for row in ids:
                seen["hvp" if tuple(row.tolist()) in hvp_ids else "grad"] += 1
            logits = model(ids)
            return torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            )

        coefs = np.eye(K)[:T] if plan == "target" else None
        prod = estimate_products(model, parts, plan=plan, target_coefs=coefs, micro_batch=2, loss_fn=loss_fn)
        cost = power.analysis_cost(samples, B, K, plan, n_targets=T)
        # every entry of the tables is one float64 product, but the pair plan's a == l (never formed)
        assert cost.dot_products == prod.first.size + prod.W.size - (B * B * K * K if plan == "pair" else 0)
        assert cost.samples_used == 18 and cost.seqs_per_part == 3
        assert seen == {"grad": cost.gradient_sequences, "hvp": cost.hvp_sequences}, (plan, seen)
        assert cost.vectors_per_hvp == (K - 1 if plan == "pair" else T)
        assert cost.gradient_equivalents == cost.gradient_sequences + cost.hvp_sequences * (
            1 + 2 * cost.vectors_per_hvp
        )
    assert power.analysis_cost(96, 8, 2, "pair", checkpoints=5).gradient_equivalents == 5 * (2 * 64 + 64 * 3)
    assert power.estimated_seconds(power.analysis_cost(24, 4, 2, "pair"), 0.5) == 0.5 * (32 + 16 * 3)
    # the issue-24 configuration (B = 8, one sequence per part, one target, 256 tokens): products' FLOPs
    # 2 n B^2 K^2 (T + 1) against the passes' 6 n 256 (2 B K + 3 B K), i.e. K / 240
    for K in (2, 8, 32):
        share = power.dot_product_share(power.analysis_cost(24, 8, K, "target"), 256)
        assert share == pytest.approx(2 * 64 * K * K * 2 / (6 * 256 * 5 * 8 * K)) and share == pytest.approx(
            K / 240
        )
    with pytest.raises(ValueError):
        power.dot_product_share(power.analysis_cost(24, 8, 2, "target"), 0)
    with pytest.raises(ValueError):
        power.analysis_cost(10, 4, 2, "pair")


def test_predicted_factor_resolves_the_effect_on_the_real_estimator() -> None:
    """At m0 = 2 sequences per part (B = 8, pair plan) the mixture target's ``EL^{12}`` is rarely flagged.
    :func:`samples_factor` with the true effect and the RMS of the reported SE at m0 predicts how many
    times more samples flag it with 80 % power; 60 fresh runs at that many sequences per part flag it at
    least that often (within two binomial SE). Measured: f = 4.4 (m = 9), flag rate 0.90 at m = 9 versus
    0.3 at m0."""
    pop = te.make_population()
    exact = te.exact_quantities(pop, None)["EL12[mix]"]
    R, m0 = 60, 2

    def run(m: int, seed0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        est, se, flag = [], [], []
        for r in range(R):
            prod = estimate_products(
                pop.model, te.draw_parts(pop.pools, seed=seed0 + r, m=m), plan="pair", micro_batch=64
            )
            (row,) = [
                row
                for row in summarize_checkpoint(
                    prod.stats("cross"),
                    step=r,
                    names=te.NAMES,
                    wbar=te.WBAR,
                    targets=te.TARGETS,
                    lr=1.0,
                    horizon=1,
                    dw=te.DW,
                    confidence=0.95,
                )
                if row["target"] == "mix"
            ]
            est.append(row["el_ij"])
            se.append(row["el_se"])
            flag.append(row["significant"])
        return np.array(est), np.array(se), np.array(flag)

    _, se0, flag0 = run(m0, 40_000)
    f = power.samples_factor(exact, math.sqrt(np.mean(se0**2)), te.B, 0.95, power=0.8)
    m1 = math.ceil(m0 * f)
    assert m1 > m0
    _, _, flag1 = run(m1, 50_000)
    assert flag0.mean() < 0.5, flag0.mean()
    print(f"f = {f:.2f}, m1 = {m1}, flag rate {flag0.mean():.2f} -> {flag1.mean():.2f}")
    assert flag1.mean() >= 0.8 - 2.0 * math.sqrt(0.8 * 0.2 / R), (f, m1, flag1.mean())


def test_dry_run_prints_the_cost_and_writes_nothing(tmp_path, capsys) -> None:
    """``commute analyze sample_checkpoints/ --dry-run``: the inputs are resolved and checked, the printed
    pass counts are :func:`analysis_cost`'s for the shipped run (5 checkpoints, 2 domains, 3 targets, pair
    plan, ``--samples 96``, 8 blocks), a time estimate is printed, and nothing is written."""
    from pathlib import Path

    from cli_runner import cli

    run = Path(__file__).resolve().parent.parent / "sample_checkpoints"
    out = tmp_path / "out"
    code, stdout, err = cli(["analyze", run, "--dry-run", "--out", out], capsys)
    assert code == 0, err
    cost = power.analysis_cost(96, 8, 2, "pair", n_targets=3, checkpoints=5)
    assert f"gradient passes: {cost.gradient_sequences} sequences" in stdout
    assert f"HVP passes: {cost.hvp_sequences} sequences, 1 vector(s) each" in stdout
    assert f"total: {cost.gradient_equivalents:.0f} gradient-sequence equivalents" in stdout
    assert f"dot products: {cost.dot_products} of parameter-sized vectors in float64" in stdout
    assert "estimated time:" in stdout and "cache: none of the 5 checkpoint(s)" in stdout
    assert not out.exists()
    code, _, err = cli(["analyze", run, "--dry-run", "--samples", "10", "--out", out], capsys)
    assert code == 2 and "--samples 10" in err  # the same input checks as a real run


@pytest.mark.parametrize(("plan", "K", "T"), [("pair", 2, 3), ("target", 8, 1)])
def test_samples_for_budget_is_the_largest_that_fits(plan, K, T):
    per_seq, blocks = 0.013, 8
    for budget in (30.0, 60.0, 900.0):
        n = power.samples_for_budget(budget, per_seq, blocks, K, plan, T, checkpoints=5)
        assert n % (3 * blocks) == 0
        fits = power.estimated_seconds(power.analysis_cost(n, blocks, K, plan, T, 5), per_seq)
        more = power.estimated_seconds(power.analysis_cost(n + 3 * blocks, blocks, K, plan, T, 5), per_seq)
        assert fits <= budget < more
    with pytest.raises(ValueError, match="below"):
        power.samples_for_budget(0.01, per_seq, blocks, K, plan, T, checkpoints=5)
