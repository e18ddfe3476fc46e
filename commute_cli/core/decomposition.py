"""Why, not only whether: the bracket of every (target, pair) split into parameter groups.

The bracket ``< D g_L, H_j D g_i - H_i D g_j >`` (MATH.md "The bracket") is an inner product over the flat
parameter vector, so it is exactly the sum of its restrictions to the groups of any partition of the
parameters (layers, kinds, modules; ``commute analyze --decompose``). The estimator computes the
restrictions from the same products as the totals (the per-group sums of the same elementwise products),
reduced by the same estimator to per-block values, so each group's part has a standard error from the same
block design, and the parts' per-block values add up to the totals' (float64 rounding).

Pure numpy: per-block arrays in, ``decomposition.csv`` rows out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from commute_cli.core.criterion import summarize_blocks, two_domain_excess


def pair_label(name_i: str, name_j: str) -> str:
    """The ``pair`` column of ``decomposition.csv`` and ``baselines.csv``: ``"i|j"`` (domain names)."""
    return f"{name_i}|{name_j}"


def group_brackets(Mg: np.ndarray, i: int, j: int) -> np.ndarray:
    """``[B, G]`` per-block values of each group's part of the bracket ``< D g_L, H_j D g_i - H_i D g_j >``.

    Args:
        Mg: ``[B, G, K, K]`` per-block interaction matrices restricted to each group,
            ``Mg[b, g, a, l] = < D g_L, H_a D g_l >`` summed over group ``g``'s parameters.
        i, j: the pair (domain indices).
    """
    Mg = np.asarray(Mg, dtype=np.float64)
    return Mg[:, :, j, i] - Mg[:, :, i, j]


def decomposition_rows(
    Mg: np.ndarray,
    *,
    step: int | None,
    target: str,
    names: Sequence[str],
    labels: Sequence[str],
    counts: Sequence[int] | None = None,
    confidence: float = 0.95,
    wbar: np.ndarray | None = None,
    shifts: Mapping[tuple[int, int], float] | None = None,
    dt: float | None = None,
) -> list[dict[str, Any]]:
    """Rows of ``decomposition.csv`` for one checkpoint and target: one per (unordered pair ``i < j``, group).

    Args:
        Mg: ``[B, G, K, K]`` per-block group interaction matrices (see :func:`group_brackets`).
        step: the checkpoint's step.
        target: the target's name.
        names: the ``K`` domain names.
        labels: the ``G`` group labels.
        counts: parameters per group (adds an ``n_params`` column).
        confidence: two-sided level of the per-group t test.
        wbar, shifts, dt: the intervention of results.csv's rows (the weights, ``{(i, j): dw}`` of the pairs
            that have one, ``dt = lr x horizon``); when given, each group's part of ``EL^{ij}`` is added
            (``el``, ``el_se``, ``el_significant``; NaN for a pair without an intervention).

    Returns:
        dicts with ``step, target, pair, domain_i, domain_j, group, value, se, t, significant, share``:
        ``value`` is the group's part of the bracket (same units as ``results.csv``'s ``bracket``), ``se``
        its standard error from the per-block values (Student t with ``B - 1`` degrees of freedom),
        ``share = value / total`` (the bracket summed over all groups; NaN when the total is 0). The
        ``value`` column of one (step, target, pair) sums to the total bracket, its ``el`` column to
        results.csv's ``el_ij`` (``EL^{ij}`` is linear in the per-block matrices, so it splits over groups
        as the bracket does; with two domains it is ``dt^2 dw`` times the bracket).
    """
    Mg = np.asarray(Mg, dtype=np.float64)
    if Mg.ndim != 4 or Mg.shape[1] != len(labels) or Mg.shape[2] != len(names):
        raise ValueError(f"Mg must be [B, {len(labels)}, {len(names)}, {len(names)}], got {Mg.shape}")
    rows: list[dict[str, Any]] = []
    K = len(names)
    for i in range(K):
        for j in range(i + 1, K):
            parts = group_brackets(Mg, i, j)  # [B, G]
            total = float(parts.sum(axis=1).mean())
            for g, label in enumerate(labels):
                s = summarize_blocks(parts[:, g], confidence)
                rows.append(
                    {
                        "step": step,
                        "target": target,
                        "pair": pair_label(names[i], names[j]),
                        "domain_i": names[i],
                        "domain_j": names[j],
                        "group": label,
                        "value": s.mean,
                        "se": s.se,
                        "t": s.t,
                        "significant": s.significant,
                        "share": s.mean / total if total != 0.0 else float("nan"),
                    }
                )
                if counts is not None:
                    rows[-1]["n_params"] = int(counts[g])
                if wbar is not None and shifts is not None and dt is not None:
                    rows[-1].update(_group_el(Mg[:, g], wbar, i, j, shifts.get((i, j)), dt, confidence))
    return rows


def _group_el(
    Mb: np.ndarray, wbar: np.ndarray, i: int, j: int, dw: float | None, dt: float, confidence: float
) -> dict[str, Any]:
    """One group's part of ``EL^{ij}`` (nats) from its ``[B, K, K]`` per-block matrices, with its SE and
    test; NaN when the pair has no intervention (a zero weight)."""
    if dw is None:
        return {"el": float("nan"), "el_se": float("nan"), "el_significant": False}
    s = summarize_blocks(two_domain_excess(Mb, wbar, i, j, dw, dt), confidence)
    return {"el": s.mean, "el_se": s.se, "el_significant": s.significant}
