"""How many samples would resolve an effect, and what a run costs: pure arithmetic (numpy/scipy only).

Two questions a user asks before and after ``commute analyze`` (docs/MATH.md "Estimator": "What more
samples buy" and "Cost and memory"):

- *An effect came out "insufficient signal": how many more samples would resolve it?*
  :func:`samples_factor` answers for an effect of the estimated size, from the estimate, its standard error,
  the number of design blocks and the confidence, using how the estimator's standard error scales with
  the number of sequences per part at a fixed number of blocks: ``SE(f)^2 = SE^2 (phi / f + (1 - phi) / f^2)``
  for ``f`` times the samples, where ``phi`` is the share of the variance from terms with one noisy factor
  (``1/f``) and ``1 - phi`` the share from products of two noisy factors (``1/f^2``). ``phi = 1`` (the
  default) is the conservative law ``SE ~ 1/sqrt(f)``: it never asks for fewer samples than needed when the
  other terms shrink faster. Measured on the shipped run (benchmarks/bench_estimator.py, ``--samples`` 96 to
  384): ``phi`` 0.70-0.86 for the cross estimator, so the default over-asks by at most ~1.3x there.
- *What will the run cost?* :func:`analysis_cost` counts the gradient and HVP passes (in sequences) of a
  given ``--samples``, ``--blocks``, number of domains, targets and HVP plan, and :func:`estimated_seconds`
  turns them into time from one measured (or assumed) gradient time per sequence.

No torch, no files: the module can be used for a preview before anything is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

#: "nice" multiples of ``--samples`` offered in advice (the smallest one at least the required factor)
NICE_FACTORS = (1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0, 128.0)


def t_critical(n_blocks: int, confidence: float) -> float:
    """Two-sided Student-t critical value with ``n_blocks - 1`` degrees of freedom (the analysis' test).

    Raises:
        ValueError: ``n_blocks < 2`` or ``confidence`` outside (0, 1).
    """
    if n_blocks < 2:
        raise ValueError(f"need at least 2 blocks, got {n_blocks}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(stats.t.ppf(0.5 + confidence / 2.0, n_blocks - 1))


def samples_factor(
    estimate: float,
    se: float,
    n_blocks: int,
    confidence: float = 0.95,
    power: float = 0.8,
    first_order_share: float = 1.0,
) -> float:
    """How many times the current samples (same number of blocks) resolve an effect of size ``|estimate|``.

    "Resolve": the analysis' two-sided t test at ``confidence`` (``t_{B-1}`` critical value ``t_c``) flags
    an effect whose true size equals the estimate with probability ``power``: ``|estimate| / SE(f) =
    t_c + z_power`` (``z_power`` the standard normal quantile; 0 for ``power = 0.5``). With the scaling law
    ``SE(f)^2 = se^2 (phi / f + (1 - phi) / f^2)`` (``phi = first_order_share``) this is the positive root of
    ``q f^2 - phi f - (1 - phi) = 0`` with ``q = (|estimate| / ((t_c + z_power) se))^2``:
    ``f = (phi + sqrt(phi^2 + 4 q (1 - phi))) / (2 q)``; for ``phi = 1``, ``f = ((t_c + z_power) se /
    |estimate|)^2``.

    Args:
        estimate: the point estimate (any unit; only its ratio to ``se`` matters).
        se: its standard error (same unit), ``> 0``.
        n_blocks: design blocks ``B`` (the test has ``B - 1`` degrees of freedom).
        confidence: the confidence of the test, e.g. 0.95.
        power: the probability of flagging an effect of this size, in [0.5, 1).
        first_order_share: ``phi`` in [0, 1]; 1 is the conservative ``SE ~ 1/sqrt(samples)``.

    Returns:
        The factor ``f`` (``< 1`` when fewer samples would do; ``inf`` when ``estimate == 0``).

    Raises:
        ValueError: an argument outside its range.
    """
    if not se > 0.0 or not math.isfinite(se):
        raise ValueError(f"se must be positive and finite, got {se}")
    if not 0.5 <= power < 1.0:
        raise ValueError(f"power must be in [0.5, 1), got {power}")
    if not 0.0 <= first_order_share <= 1.0:
        raise ValueError(f"first_order_share must be in [0, 1], got {first_order_share}")
    if estimate == 0.0:
        return math.inf
    need = t_critical(n_blocks, confidence) + float(stats.norm.ppf(power))
    q = (abs(estimate) / (need * se)) ** 2
    phi = first_order_share
    return (phi + math.sqrt(phi * phi + 4.0 * q * (1.0 - phi))) / (2.0 * q)


def nice_factor(factor: float) -> float | None:
    """The smallest of :data:`NICE_FACTORS` ``>= factor``; ``None`` when ``factor <= 1`` (nothing needed) or
    beyond the largest (more than 128x: not a practical advice)."""
    if factor <= 1.0:
        return None
    for f in NICE_FACTORS:
        if f >= factor:
            return f
    return None


MAX_ADVICE_FACTOR = NICE_FACTORS[-1]
"""Above this many times ``--samples`` the advice only says ``>128x`` (not a practical run any more)."""


def shown_factor(factor: float) -> float | None:
    """How a ``samples_needed`` factor is shown: rounded *up* to two significant digits (34.08 -> 35,
    2.02 -> 2.1, 127.3 -> 130), so the advice is never below the computed factor and never more than 10%
    above it; ``None`` when ``factor <= 1`` (nothing needed) or not finite."""
    if not math.isfinite(factor) or factor <= 1.0:
        return None
    scale = 10.0 ** (math.floor(math.log10(factor)) - 1)
    return round(math.ceil(factor / scale * (1.0 - 1e-12)) * scale, 10)


def advice(
    estimate: float,
    se: float,
    n_blocks: int,
    confidence: float = 0.95,
    power: float = 0.8,
    first_order_share: float = 1.0,
) -> str:
    """One short phrase for an insufficient-signal row: ``"needs ~4.2x --samples"`` (the factor of
    :func:`samples_factor` as :func:`shown_factor` rounds it), ``"needs >128x --samples"``, or ``""`` when the
    current samples already suffice."""
    f = samples_factor(estimate, se, n_blocks, confidence, power, first_order_share)
    shown = shown_factor(f)
    if shown is None:
        return ""
    if f > MAX_ADVICE_FACTOR:
        return f"needs >{MAX_ADVICE_FACTOR:g}x --samples"
    return f"needs ~{shown:g}x --samples"


@dataclass(frozen=True)
class Cost:
    """Work of one analysis, counted in sequences (each ``seq_len`` tokens).

    Attributes:
        samples_used: sequences per domain actually used (``--samples`` rounded down to ``3 B m``).
        seqs_per_part: ``m``, sequences per part and domain.
        gradient_sequences: sequences through a gradient pass, all domains and checkpoints.
        hvp_sequences: sequences through an HVP pass, all domains and checkpoints.
        vectors_per_hvp: vectors sharing each HVP pass (``K - 1`` pair, ``T`` target).
        gradient_equivalents: total in units of one gradient pass over one sequence, counting an HVP pass
            with ``v`` vectors as ``1 + 2 v`` gradients (an exact reverse-on-reverse HVP: the forward and
            backward once, then ``2`` per vector; the FLOP count measured by tests/test_curvature.py).
        dot_products: float64 inner products of two parameter-sized vectors, all checkpoints: every entry of
            the estimator's ``B x B`` tables, ``B^2 K^2 (v + 1)`` per checkpoint (``v`` vectors per HVP; the
            ``+ 1`` is ``first``), whatever ``m`` (engine.estimator; docs/MATH.md "Cost and memory").
    """

    samples_used: int
    seqs_per_part: int
    gradient_sequences: int
    hvp_sequences: int
    vectors_per_hvp: int
    gradient_equivalents: float
    dot_products: int


def analysis_cost(
    samples: int, blocks: int, n_domains: int, plan: str, n_targets: int = 1, checkpoints: int = 1
) -> Cost:
    """Gradient and HVP passes of ``commute analyze`` (both estimators: the same passes).

    Per checkpoint and domain, ``n = 3 B m`` sequences (``m = samples // (3 B)``): gradients over parts 0
    and 2 (``2 B m``), HVPs over part 1 (``B m``) with ``K - 1`` (pair) or ``T`` (target) vectors each.

    Raises:
        ValueError: ``samples < 3 * blocks``, fewer than 2 blocks or domains, or an unknown plan.
    """
    if blocks < 2 or n_domains < 2 or n_targets < 1 or checkpoints < 1:
        raise ValueError("need blocks >= 2, n_domains >= 2, n_targets >= 1, checkpoints >= 1")
    if samples < 3 * blocks:
        raise ValueError(f"--samples {samples} is below 3 x --blocks = {3 * blocks}")
    if plan not in ("pair", "target"):
        raise ValueError(f"unknown plan {plan!r}")
    m = samples // (3 * blocks)
    K = n_domains
    vectors = K - 1 if plan == "pair" else n_targets
    grad = 2 * blocks * m * K * checkpoints
    hvp = blocks * m * K * checkpoints
    return Cost(
        samples_used=3 * blocks * m,
        seqs_per_part=m,
        gradient_sequences=grad,
        hvp_sequences=hvp,
        vectors_per_hvp=vectors,
        gradient_equivalents=float(grad + hvp * (1 + 2 * vectors)),
        dot_products=blocks * blocks * K * K * (vectors + 1) * checkpoints,
    )


def dot_product_share(cost: Cost, seq_len: int) -> float:
    """The dot products' FLOPs as a fraction of the passes': ``2 n`` per product against ``6 n seq_len`` per
    gradient-sequence equivalent (a gradient pass's matrix-multiply FLOPs per token and parameter), i.e.
    ``dot_products / (3 seq_len gradient_equivalents)``. They run in float64, at about half the float32
    rate of the passes on a CPU (benchmarks/bench_scaling.py measures the time).

    Raises:
        ValueError: ``seq_len < 1``.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    return cost.dot_products / (3.0 * seq_len * cost.gradient_equivalents)


def estimated_seconds(cost: Cost, seconds_per_gradient_sequence: float) -> float:
    """Predicted compute time: ``gradient_equivalents x seconds_per_gradient_sequence`` (loading, tokenizing
    and the dot products are extra; how close an HVP pass comes to its FLOP count on a given machine is
    measured by benchmarks/bench_hvp.py)."""
    if not seconds_per_gradient_sequence > 0.0:
        raise ValueError("seconds_per_gradient_sequence must be positive")
    return cost.gradient_equivalents * seconds_per_gradient_sequence


def samples_for_budget(
    budget_seconds: float,
    seconds_per_gradient_sequence: float,
    blocks: int,
    n_domains: int,
    plan: str,
    n_targets: int = 1,
    checkpoints: int = 1,
) -> int:
    """The largest ``--samples`` (a multiple of ``3 x blocks``) whose estimated compute time
    (:func:`estimated_seconds` of :func:`analysis_cost`) fits in ``budget_seconds``.

    The time is linear in the sequences per part ``m``, so ``m = floor(budget / time of m = 1)``. The sample
    size is fixed before any estimate is made, so the verdicts' test keeps its error rate (no optional
    stopping).

    Raises:
        ValueError: a non-positive budget or per-sequence time, or a budget below one sequence per part.
    """
    if not budget_seconds > 0.0 or not seconds_per_gradient_sequence > 0.0:
        raise ValueError("the budget and the time per gradient sequence must be positive")
    unit = estimated_seconds(
        analysis_cost(3 * blocks, blocks, n_domains, plan, n_targets, checkpoints),
        seconds_per_gradient_sequence,
    )
    m = int(budget_seconds // unit)
    if m < 1:
        raise ValueError(
            f"a budget of {budget_seconds:g} s is below the {unit:.3g} s of one sequence per part"
        )
    return 3 * blocks * m
