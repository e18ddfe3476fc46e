"""One checkpoint's statistics as the rows of the output tables: ``results.csv`` (per target and domain
pair: bracket, predicted loss change with its standard error, regime, verdict), ``losses.csv``, and the
"why" tables ``baselines.csv`` (first-order baselines) and ``decomposition.csv`` (per parameter group).
Every number comes from the tested criterion functions (``core.regime.predict_pair``, ``core.baselines``,
``core.decomposition``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from commute_cli.core import baselines as first_order_baselines
from commute_cli.core import criterion, power
from commute_cli.core.checkpoint_stats import CheckpointStats
from commute_cli.core.decomposition import decomposition_rows
from commute_cli.core.regime import MIN_EFFECT, Regime, Target, pair_list, predict_pair
from commute_cli.core.resummed_math import SATURATION_LIMIT, saturation_from_stats


def summarize_checkpoint(
    stats: CheckpointStats,
    *,
    step: int | None,
    names: Sequence[str],
    wbar: np.ndarray,
    targets: Sequence[Target],
    lr: float,
    horizon: int,
    dw: float | None,
    confidence: float,
    min_effect: float = MIN_EFFECT,
    horizon_reason: str = "",
) -> list[dict[str, Any]]:
    """Rows of ``results.csv`` for one checkpoint: one per (target, unordered domain pair ``i < j``).

    For each pair the intervention is ``d = +dw`` on i, ``-dw`` on j around ``wbar`` for ``horizon`` steps
    each way (``dt = lr x horizon``, docs/MATH.md "Notation"); ``el_ij`` is the predicted ``EL^{ij}`` in nats
    (negative: moving i earlier and j later lowers the target), ``bracket`` the (preconditioned) bracket
    ``< D g_L, H_j D g_i - H_i D g_j >``. All numbers come from :func:`core.regime.predict_pair` (the tested
    criterion functions over the ``[B, K, K]`` per-block matrices). Regime: ``regime`` is inside / outside /
    uncertain on the interval ``[regime_ratio_lo, regime_ratio_hi]``; ``in_regime`` is ``regime != outside``
    (not shown to be outside: the column's meaning before intervals, without flagging noise).
    ``min_effect`` is the negligible threshold in nats.
    """
    rows: list[dict[str, Any]] = []
    for target in targets:
        c = target.coefs_at(wbar)
        for i, j, pair_dw in pair_list(wbar, dw):
            p = predict_pair(
                stats, wbar=wbar, coefs=c, i=i, j=j, dw=pair_dw, dt=lr * horizon,
                confidence=confidence, min_effect=min_effect,
            )  # fmt: skip
            el = p.el
            regime = str(p.regime.regime)
            saturation = float("nan")  # needs the pair plan's Q (docs/MATH.md "Resummed prediction")
            if stats.Q is not None:
                saturation = float(np.mean(saturation_from_stats(stats.Q, stats.first, wbar, p.dt)))
                if saturation > SATURATION_LIMIT and regime != str(Regime.OUTSIDE):
                    regime = str(Regime.SATURATED)
            needed = float("nan")  # how many times --samples would resolve an effect of this size
            if not el.significant and el.se > 0 and str(p.verdict) != "negligible":
                needed = power.samples_factor(el.mean, el.se, stats.n_blocks, confidence)
            rows.append(
                {
                    "step": step,
                    "target": target.name,
                    "domain_i": names[i],
                    "domain_j": names[j],
                    "w_i": float(wbar[i]),
                    "w_j": float(wbar[j]),
                    "target_loss": p.target_loss,
                    "bracket": p.bracket.mean,
                    "bracket_se": p.bracket.se,
                    "el_ij": el.mean,
                    "el_se": el.se,
                    "t": el.t,
                    "t_crit": el.t_crit,
                    "significant": el.significant,
                    "dw": pair_dw,
                    "horizon": horizon,
                    "lr": lr,
                    "dt": p.dt,
                    "first_order": p.regime.progress,
                    "regime_ratio": p.regime.ratio,
                    "in_regime": regime not in (Regime.OUTSIDE, Regime.SATURATED),
                    "verdict": str(p.verdict),
                    "direction": criterion.direction_words(el.mean, names[i], names[j])
                    if el.significant
                    else "",
                    "n_blocks": stats.n_blocks,
                    "regime": regime,
                    "regime_ratio_lo": p.regime.ratio_lo,
                    "regime_ratio_hi": p.regime.ratio_hi,
                    "min_effect": p.min_effect,
                    "horizon_reason": horizon_reason,
                    "saturation": saturation,
                    "samples_needed": needed,
                }
            )
    return rows


def loss_rows(
    stats: CheckpointStats, step: int | None, names: Sequence[str], confidence: float
) -> list[dict[str, Any]]:
    """Rows of ``losses.csv``: per domain, the mean loss over blocks (nats) and its SE."""
    rows = []
    for k, name in enumerate(names):
        s = criterion.summarize_blocks(stats.losses[:, k], confidence)
        rows.append({"step": step, "domain": name, "loss": s.mean, "loss_se": s.se})
    return rows


def why_rows(
    stats: CheckpointStats,
    step: int | None,
    names: Sequence[str],
    wbar: np.ndarray,
    targets: Sequence[Target],
    confidence: float,
    decompose: bool,
    *,
    dw: float | None = None,
    dt: float | None = None,
) -> tuple[list[dict], list[dict]]:
    """First-order baseline rows (core.baselines; always) and per-group bracket rows (core.decomposition;
    with ``--decompose``) of one checkpoint, from the same per-block statistics as ``results.csv``. With
    ``dt`` (``lr x horizon``) the groups' parts of results.csv's ``EL^{ij}`` too (its ``--dw`` or the
    default shift, as :func:`summarize_checkpoint`)."""
    named = [(t.name, t.coefs_at(wbar)) for t in targets]
    base = first_order_baselines.baseline_rows(
        stats.first, step=step, names=names, targets=named, confidence=confidence
    )
    parts: list[dict] = []
    if decompose and stats.groups is not None and stats.group_labels is not None:
        shifts = {(i, j): pair_dw for i, j, pair_dw in pair_list(wbar, dw)}
        for tname, c in named:
            parts += decomposition_rows(
                stats.group_interaction(c),
                step=step,
                target=tname,
                names=names,
                labels=stats.group_labels,
                confidence=confidence,
                wbar=wbar if dt is not None else None,
                shifts=shifts,
                dt=dt,
            )
    return base, parts
