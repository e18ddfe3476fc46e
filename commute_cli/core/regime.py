"""From per-block statistics to one row's numbers: the intervention, its regime and its verdict.

Pure numpy (the package's dependency rule). ``core.checkpoint_stats.CheckpointStats`` is its input (the
engine -> math contract); :class:`Target` and :func:`parse_targets` say which loss a row
is about. Used by ``commute analyze`` (every row of ``results.csv``),
``commute validate`` (its prediction) and ``commute recommend`` (rescaled effects and windows), so the three
can never disagree. docs/MATH.md "Regime of validity" and "Negligible effects" give the rules;
docs/DECISIONS.md says why the defaults are what they are.

- **The intervention** (``dw``, ``horizon``) is chosen from deterministic inputs only -- the weights and
  the checkpoint spacing -- never from the noisy estimates of the same run, so the same command with more
  samples predicts the same intervention, only more precisely (:func:`pair_list`, :func:`choose_horizon`).
- **The rescaling law** ``EL ∝ dw dt^2`` (:func:`el_scale`): ``EL = dt^2 sum C o M`` with ``C`` linear in
  ``d`` and ``dt = lr x steps``; the regime ratio scales as ``dw dt`` and the first-order progress as ``dt``.
- **The regime** (:func:`regime_check`): ``ratio = |EL| / (2 dt <gbar, D gbar>)`` against
  :data:`REGIME_MAX_RATIO`, judged on the confidence interval: inside / outside / uncertain.
- **Practical significance** (:func:`negligible_threshold`): an effect below a fraction of the loss
  decrease that training itself makes over the same window (or below float32 resolution) is "negligible".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from commute_cli.core.checkpoint_stats import CheckpointStats
from commute_cli.core.criterion import (
    BlockSummary,
    Verdict,
    bracket_value,
    summarize_blocks,
    two_domain_excess,
    verdict,
)
from commute_cli.core.schedule import Schedule, parse_weights
from commute_cli.errors import CommuteError

REGIME_MAX_RATIO = 0.25
"""Largest ``|EL| / first-order progress`` for which the second-order prediction is trusted in nats."""
REGIME_MAX_PROGRESS = 0.5
"""Largest first-order progress over the window, as a fraction of the mixture loss."""
MIN_EFFECT = 0.01
"""Default ``--min-effect``: smallest ``|EL|`` worth reporting, as a fraction of the window's first-order
progress ``2 dt <gbar, D gbar>`` (the loss decrease training itself makes over the same steps)."""
MIN_EFFECT_FLOOR = 1e-6
"""Absolute floor (nats) of the minimum effect: below float32 resolution of a loss of a few nats."""


class Regime(StrEnum):
    """Is the prediction inside the local (second-order) regime, judged on its confidence interval?"""

    INSIDE = "inside"
    OUTSIDE = "outside"
    UNCERTAIN = "uncertain"
    #: dt x curvature along the directions involved is above 1 (core.resummed_math.SATURATION_LIMIT): those
    #: directions settle within the window, so the second-order prediction's size is not to be trusted
    SATURATED = "saturated"


@dataclass
class Target:
    """A target loss ``sum_k c_k L_k``: a domain, the schedule's mixture ("mix"), or custom weights."""

    name: str
    kind: str  # "domain" | "mix" | "custom"
    coefs: np.ndarray | None = None  # fixed weights (None for "mix": the schedule's weights at each step)

    def coefs_at(self, wbar: np.ndarray) -> np.ndarray:
        """``[K]`` weights of the target at a point of the schedule with weights ``wbar``."""
        return wbar if self.coefs is None else self.coefs


def parse_targets(specs: Sequence[str], names: Sequence[str]) -> list[Target]:
    """``--target`` values: a domain name, ``mix``, or custom weights ``en=0.3,ru=0.7``.

    Default (no ``--target``): every domain and ``mix``.
    """
    if not specs:
        specs = [*names, "mix"]
    out: list[Target] = []
    seen: set[str] = set()
    for raw in specs:
        spec = raw.strip()
        if spec in seen:
            continue
        seen.add(spec)
        if spec == "mix":
            out.append(Target("mix", "mix"))
        elif spec in names:
            c = np.zeros(len(names))
            c[list(names).index(spec)] = 1.0
            out.append(Target(spec, "domain", c))
        elif "=" in spec:
            w = parse_weights(spec, list(names), joiner=",")
            c = np.array([w.get(n, 0.0) for n in names], dtype=np.float64)
            out.append(Target(spec, "custom", c))
        else:
            raise CommuteError(
                f"unknown target {spec!r}",
                hint=f"use a domain name ({', '.join(names)}), mix, or weights like {names[0]}=0.5,...",
            )
    return out


# --------------------------------------------------------------------------------------------------
# the intervention: deterministic inputs only


def pair_list(wbar: np.ndarray, dw: float | None) -> list[tuple[int, int, float]]:
    """Unordered pairs ``i < j`` that can be reordered at ``wbar``, with their shift: ``--dw``, or half the
    smaller weight (the proof of Corollary 3.2(b)).

    The intervention takes ``dw`` from j in its first half and from i in its second, so it needs
    ``w_i >= dw`` and ``w_j >= dw`` (:func:`check_shifts` refuses a larger ``--dw`` before any work). A pair
    with a zero weight is left out: no data of that domain can move, so there is no intervention to predict
    (docs/DECISIONS.md "A zero weight: no intervention, no row")."""
    out = []
    K = len(wbar)
    for i in range(K):
        for j in range(i + 1, K):
            smaller = float(min(wbar[i], wbar[j]))
            if smaller <= 0.0:
                continue
            out.append((i, j, float(dw) if dw is not None else 0.5 * smaller))
    return out


def _steps_words(steps: Sequence[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:6])
    return f"step {shown}" if len(steps) == 1 else f"steps {shown}" + (", ..." if len(steps) > 6 else "")


def check_shifts(
    schedule: Schedule, names: Sequence[str], steps: Sequence[int], dw: float | None
) -> list[str]:
    """Check the intervention against the schedule at every selected checkpoint (before any long work).

    Both halves of the intervention on (i, j) take ``dw`` from a domain of the pair, so an explicit ``--dw``
    above the smaller weight of a reported pair at a selected checkpoint is refused (the bound is per
    checkpoint: piecewise schedules change it). Pairs with a zero weight are left out (:func:`pair_list`);
    when that leaves no pair at any checkpoint the run is refused. Returns the notes to print: which pairs
    are left out, and where.
    """
    zero_at: dict[str, list[int]] = {}
    evaluable = False
    worst: tuple[float, int, str] | None = None  # (weight, step, domain) of the tightest reported pair
    for step in steps:
        w = schedule.weights_at(step)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                smaller = min((w[a], a), (w[b], b))
                if smaller[0] <= 0.0:
                    continue
                evaluable = True
                if worst is None or smaller[0] < worst[0]:
                    worst = (smaller[0], step, smaller[1])
        for n in names:
            if w[n] <= 0.0:
                zero_at.setdefault(n, []).append(step)
    if not evaluable:
        zero = ", ".join(sorted(zero_at))
        weight_is = f"the weights of {zero} are" if len(zero_at) > 1 else f"the weight of {zero} is"
        raise CommuteError(
            f"nothing to predict: {weight_is} 0 at the selected checkpoints, so no {zero} data "
            "can move earlier or later (a reordering needs both weights of a pair > 0)",
            hint="pass the weights the run trained with (--weights or --schedule), or choose checkpoints "
            "where they are positive (--steps)",
        )
    if dw is not None and worst is not None and dw > worst[0] * (1.0 + 1e-12):
        weight, step, domain = worst
        raise CommuteError(
            f"--dw {dw:g} exceeds {domain}'s weight {weight:g} at step {step}: each half of the intervention "
            "takes dw from one domain of the pair, and a weight cannot go below 0",
            hint=f"at most {weight:g} at the selected checkpoints (the smallest weight of a reported pair), "
            "or leave --dw out for half the smaller weight of each pair",
        )
    return [
        f"note: pairs with {n} are left out at {_steps_words(at)}: its weight is 0 there, so no {n} data can "
        "move (no intervention to predict)"
        for n, at in zero_at.items()
    ]


def choose_horizon(steps: Sequence[int | None], index: int, given: int | None = None) -> tuple[int, str]:
    """Steps of each half of the intervention at checkpoint ``index``, and why (the ``horizon_reason``).

    ``--horizon`` when given; else half the spacing to the next checkpoint (to the previous one for the
    last), so the windows ``[s - h, s + h)`` of neighbouring checkpoints never overlap and every stretch of
    training is analysed once; 1 step when no spacing is known (a single checkpoint: pass ``--horizon``).
    Never depends on the estimates (docs/DECISIONS.md "Stable defaults").
    """
    if given is not None:
        return int(given), "--horizon"
    known = [s for s in steps if s is not None]
    s = steps[index]
    if len(known) < 2 or s is None:
        return 1, "no checkpoint spacing known: pass --horizon"
    nxt = [t for t in known if t > s]
    prv = [t for t in known if t < s]
    if nxt:
        spacing, which = min(nxt) - s, "next"
    else:
        spacing, which = s - max(prv), "previous"
    return max(1, spacing // 2), f"half the {spacing}-step spacing to the {which} checkpoint"


def default_horizon(steps: Sequence[int | None], index: int) -> int:
    """The default horizon of :func:`choose_horizon` (without ``--horizon``)."""
    return choose_horizon(steps, index)[0]


def el_scale(dw_from: float, dt_from: float, dw_to: float, dt_to: float) -> float:
    """The one rescaling law: a prediction (or its SE) made for ``(dw_from, dt_from)`` times this factor is
    the prediction for ``(dw_to, dt_to)``: ``EL ∝ dw dt^2`` (docs/MATH.md "Rescaling"). Exact at second
    order, since ``C`` is linear in ``d`` and the expansion's leading term is ``dt^2``."""
    return (dw_to / dw_from) * (dt_to / dt_from) ** 2


# --------------------------------------------------------------------------------------------------
# regime and practical significance


@dataclass(frozen=True)
class RegimeCheck:
    """Regime of one prediction (docs/MATH.md "Regime of validity").

    Attributes:
        ratio: ``|EL| / progress`` at the point estimates (``inf`` when progress <= 0).
        ratio_lo, ratio_hi: the ratio's interval from the intervals of ``EL`` and of the progress.
        progress: the training mixture's first-order progress over the window, ``2 dt <gbar, D gbar>``
            (nats).
        regime: inside (``ratio_hi <= max_ratio`` and progress small), outside (``ratio_lo > max_ratio`` or
            progress surely large, or no progress), uncertain otherwise.
    """

    ratio: float
    ratio_lo: float
    ratio_hi: float
    progress: float
    regime: Regime


def _abs_interval(s: BlockSummary) -> tuple[float, float]:
    lo, hi = s.lo, s.hi
    if lo <= 0.0 <= hi:
        return 0.0, max(-lo, hi)
    return min(abs(lo), abs(hi)), max(abs(lo), abs(hi))


def regime_check(
    el: BlockSummary,
    progress: BlockSummary,
    mix_loss: float,
    max_ratio: float = REGIME_MAX_RATIO,
    max_progress: float = REGIME_MAX_PROGRESS,
) -> RegimeCheck:
    """Inside / outside / uncertain, judged on the confidence intervals of ``EL`` and of the progress.

    The prediction is the second-order term of an expansion in dt; against the first-order progress of
    training in the same window, ``ratio = |EL| / (2 dt <gbar, D gbar>)`` is ~ dt x (curvature along the
    directions involved): when it is not small, higher orders matter and the nats are meaningless. The
    denominator is the training mixture's own decrease rate, well estimated and positive while training
    makes progress. Also outside: a progress above ``max_progress`` of the mixture loss. A point estimate
    near the cut is not a verdict: ``0.279 +- 0.1`` against 0.25 is *uncertain*, not outside.
    """
    if progress.mean <= 0.0:
        return RegimeCheck(math.inf, math.inf, math.inf, progress.mean, Regime.OUTSIDE)
    abs_lo, abs_hi = _abs_interval(el)
    p_lo, p_hi = max(progress.lo, 0.0), max(progress.hi, 0.0)
    ratio = abs(el.mean) / progress.mean
    ratio_lo = abs_lo / p_hi if p_hi > 0.0 else math.inf
    ratio_hi = abs_hi / p_lo if p_lo > 0.0 else math.inf
    cap = max_progress * mix_loss
    if ratio_hi <= max_ratio and p_hi <= cap:
        regime = Regime.INSIDE
    elif ratio_lo > max_ratio or p_lo > cap:
        regime = Regime.OUTSIDE
    else:
        regime = Regime.UNCERTAIN
    return RegimeCheck(ratio, ratio_lo, ratio_hi, progress.mean, regime)


def negligible_threshold(progress: float, min_effect: float = MIN_EFFECT) -> float:
    """Smallest ``|EL|`` (nats) worth reporting: ``max(min_effect x progress, MIN_EFFECT_FLOOR)``.

    ``progress`` is the training mixture's first-order loss decrease over the same window (nats), so the
    threshold grows with the horizon like the progress does; a reordering worth less than ``min_effect``
    (default 1%) of what the window's training achieves anyway is not worth acting on.
    """
    return max(min_effect * max(progress, 0.0), MIN_EFFECT_FLOOR)


def is_negligible(el: BlockSummary, threshold: float) -> bool:
    """Significant but ``|mean| < threshold``, or not significant with the whole interval inside
    ``(-threshold, threshold)`` (surely small: more samples would not make it worth reporting)."""
    if el.significant:
        return abs(el.mean) < threshold
    return _abs_interval(el)[1] < threshold


# --------------------------------------------------------------------------------------------------
# one row


@dataclass(frozen=True)
class PairPrediction:
    """Everything about one (target, pair) intervention at one checkpoint.

    ``el`` is ``EL^{ij}`` (nats, per-block summary) for ``+dw`` on i and ``-dw`` on j, ``dt = lr x horizon``
    each way; ``bracket`` the (preconditioned) bracket ``< D g_L, H_j D g_i - H_i D g_j >``.
    """

    el: BlockSummary
    bracket: BlockSummary
    regime: RegimeCheck
    min_effect: float  # the negligible threshold in nats
    negligible: bool
    verdict: Verdict
    dt: float
    target_loss: float


def predict_pair(
    stats: CheckpointStats,
    *,
    wbar: np.ndarray,
    coefs: np.ndarray,
    i: int,
    j: int,
    dw: float,
    dt: float,
    confidence: float,
    min_effect: float = MIN_EFFECT,
) -> PairPrediction:
    """``EL^{ij}`` of target ``coefs`` through :func:`criterion.two_domain_excess` on the ``[B, K, K]``
    per-block interaction matrices (the tested math), with its regime and verdict."""
    Mb = stats.interaction(coefs)  # [B, K, K]
    el = summarize_blocks(two_domain_excess(Mb, wbar, i, j, dw, dt), confidence)
    br = summarize_blocks(bracket_value(Mb, i, j), confidence)
    progress = summarize_blocks(2.0 * dt * stats.first_order(wbar, wbar), confidence)
    mix_loss = float((stats.losses @ wbar).mean())
    check = regime_check(el, progress, mix_loss)
    threshold = negligible_threshold(check.progress, min_effect)
    small = is_negligible(el, threshold)
    word = verdict(el.significant, float(wbar[i]), float(wbar[j]), negligible=small)
    target_loss = float((stats.losses @ coefs).mean())
    return PairPrediction(el, br, check, threshold, small, word, dt, target_loss)
