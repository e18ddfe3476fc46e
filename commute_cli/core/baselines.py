"""First-order baselines beside the bracket: gradient cosine and gradient alignment, unbiased, with SEs.

Data-mixing methods steer by first-order signals: the alignment ``< g_i, D g_L >`` of a domain's gradient
with the target's (the first-order decrease rate of ``L`` when training on ``i``; DoGE-style reweighting),
and the cosine of two domains' gradients (PCGrad-style conflict). Both come from the first-order table the
estimator already has, ``first[b, k, l]``: per-block values of ``< g_k, D g_l >`` with ``g_k`` measured on
part 0 and ``g_l`` on part 2 of each design block, so every entry -- the squared norms ``k = l`` included --
multiplies two means over disjoint sequences and is unbiased (a same-sample ``|g_hat|^2`` is biased up by
``tr(Cov)/n``, which would shrink every cosine towards 0). The table is symmetrised,
``S = (first + first^T) / 2``, still unbiased and linear in the products.

- alignment ``a_i(L) = sum_k c_k S[i, k]`` and the pair difference ``a_i - a_j`` are linear in ``S``: their
  per-block values are exact, their SE the estimator's (jackknife for the cross estimator).
- cosine ``cos_ij = S_ij / sqrt(S_ii S_jj)`` is a ratio: it is formed from the three unbiased means (plug-in;
  consistent, with a bias of order ``SE^2`` from the curvature of the ratio, against the ``O(1)``
  attenuation of same-sample norms), and its SE is the delta method applied to the per-block values
  (linearised values ``cos + d cos / d S . (S_b - S_mean)``, whose ``sd / sqrt(B)`` is the infinitesimal
  jackknife). When a squared-norm estimate is not positive (a gradient lost in noise) the cosine is NaN.

Comparison with the second order: a first-order greedy rule gives more weight *now* to the domain whose
gradient aligns better with the target (``a_i > a_j``: ``i`` first), which is the same intervention as the
bracket's "``i`` earlier, ``j`` later" (same total data). :func:`compare_orders` says where the two agree,
disagree, or only one of them is significant -- where the bracket adds information.

Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from commute_cli.core.criterion import summarize_blocks
from commute_cli.core.decomposition import pair_label


def symmetric_gram(first: np.ndarray) -> np.ndarray:
    """``[B, K, K]`` per-block unbiased estimates of ``< g_k, D g_l >``, symmetrised: ``(F + F^T) / 2``."""
    F = np.asarray(first, dtype=np.float64)
    if F.ndim != 3 or F.shape[1] != F.shape[2]:
        raise ValueError(f"first must be [B, K, K], got {F.shape}")
    return 0.5 * (F + F.transpose(0, 2, 1))


def alignment_values(first: np.ndarray, coefs: Sequence[float] | np.ndarray) -> np.ndarray:
    """``[B, K]`` per-block values of ``a_k = < g_k, D g_L >`` for the target ``L = sum_k c_k L_k``."""
    return np.einsum("bkl,l->bk", symmetric_gram(first), np.asarray(coefs, dtype=np.float64))


def cosine_values(first: np.ndarray, i: int, j: int) -> tuple[float, np.ndarray]:
    """Cosine of ``g_i`` and ``g_j`` (in the metric ``D``) and its ``[B]`` linearised per-block values.

    Returns ``(cos, values)``: ``cos = mean(S_ij) / sqrt(mean(S_ii) mean(S_jj))`` and
    ``values_b = cos + (dS_ij)/r - cos/2 (dS_ii/mean(S_ii) + dS_jj/mean(S_jj))`` with ``dS = S_b - mean(S)``
    and ``r = sqrt(mean(S_ii) mean(S_jj))`` (the delta method on the per-block values: their mean is ``cos``,
    their ``sd / sqrt(B)`` its standard error). ``(nan, nan...)`` when a squared-norm estimate is <= 0.
    """
    S = symmetric_gram(first)
    nij, nii, njj = S[:, i, j], S[:, i, i], S[:, j, j]
    mij, mii, mjj = float(nij.mean()), float(nii.mean()), float(njj.mean())
    if not (mii > 0.0 and mjj > 0.0):
        return math.nan, np.full(S.shape[0], math.nan)
    r = math.sqrt(mii * mjj)
    cos = mij / r
    values = cos + (nij - mij) / r - 0.5 * cos * ((nii - mii) / mii + (njj - mjj) / mjj)
    return cos, values


def _summary(values: np.ndarray, confidence: float) -> tuple[float, float, float, bool]:
    if not np.all(np.isfinite(values)):
        return math.nan, math.nan, math.nan, False
    s = summarize_blocks(values, confidence)
    return s.mean, s.se, s.t, s.significant


def baseline_rows(
    first: np.ndarray,
    *,
    step: int | None,
    names: Sequence[str],
    targets: Sequence[tuple[str, np.ndarray]],
    confidence: float = 0.95,
) -> list[dict[str, Any]]:
    """Rows of ``baselines.csv`` for one checkpoint: one per (target, unordered pair ``i < j``).

    Args:
        first: ``[B, K, K]`` per-block values of ``< g_k, D g_l >`` (``CheckpointStats.first``).
        step: the checkpoint's step.
        names: the ``K`` domain names.
        targets: ``(name, coefs [K])`` of each target (the mixture's coefficients at this checkpoint).
        confidence: two-sided level of the t tests.

    Returns:
        dicts with ``step, target, pair, domain_i, domain_j``; ``cosine, cosine_se`` (the pair's gradient
        cosine, target-independent); ``align_i, align_i_se, align_j, align_j_se`` (``< g_i, D g_L >``, in
        loss per unit parameter-time: the target's first-order decrease rate under training on ``i`` alone);
        ``align_diff, align_diff_se, align_diff_significant`` (``a_i - a_j``: the first-order gain of moving
        weight from ``j`` to ``i``); ``first_order_favours`` (``i`` or ``j`` when the difference is
        significant, else empty).
    """
    S = symmetric_gram(first)
    K = len(names)
    if S.shape[1] != K:
        raise ValueError(f"first has {S.shape[1]} domains, names {K}")
    cosines = {}
    for i in range(K):
        for j in range(i + 1, K):
            cos, vals = cosine_values(first, i, j)
            cosines[i, j] = (cos, _summary(vals, confidence)[1])
    rows: list[dict[str, Any]] = []
    for tname, coefs in targets:
        A = np.einsum("bkl,l->bk", S, np.asarray(coefs, dtype=np.float64))
        for i in range(K):
            for j in range(i + 1, K):
                ai, ai_se, _, _ = _summary(A[:, i], confidence)
                aj, aj_se, _, _ = _summary(A[:, j], confidence)
                diff, diff_se, _, diff_sig = _summary(A[:, i] - A[:, j], confidence)
                favours = (names[i] if diff > 0 else names[j]) if diff_sig else ""
                rows.append(
                    {
                        "step": step,
                        "target": tname,
                        "pair": pair_label(names[i], names[j]),
                        "domain_i": names[i],
                        "domain_j": names[j],
                        "cosine": cosines[i, j][0],
                        "cosine_se": cosines[i, j][1],
                        "align_i": ai,
                        "align_i_se": ai_se,
                        "align_j": aj,
                        "align_j_se": aj_se,
                        "align_diff": diff,
                        "align_diff_se": diff_se,
                        "align_diff_significant": diff_sig,
                        "first_order_favours": favours,
                    }
                )
    return rows


#: values of the ``orders`` column of ``baselines.csv``
AGREEMENT = ("agree", "disagree", "second order only", "first order only", "neither")


def compare_orders(first_favours: str, el_ij: float, significant: bool, name_i: str, name_j: str) -> str:
    """Does the first-order signal favour the same domain "first" as the significant second-order verdict?

    ``first_favours``: the domain the first-order alignment favours (empty when not significant).
    ``el_ij``/``significant``: the predicted change of ``i`` earlier/``j`` later and its test
    (``results.csv``); ``el_ij < 0`` favours ``i`` first. Returns one of :data:`AGREEMENT`.
    """
    second = (name_i if el_ij < 0.0 else name_j) if significant and el_ij != 0.0 else ""
    if first_favours and second:
        return "agree" if first_favours == second else "disagree"
    if second:
        return "second order only"
    if first_favours:
        return "first order only"
    return "neither"


def attach_second_order(
    baselines: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Baseline rows with the second-order verdict beside them: ``second_order_favours``, ``el_ij``,
    ``el_significant`` and ``orders`` (:func:`compare_orders`), matched on (step, target, domain_i,
    domain_j) with the rows of ``results.csv``. A baseline row without a matching result keeps empty
    second-order columns and ``orders`` from the first order alone."""
    index = {(r["step"], r["target"], r["domain_i"], r["domain_j"]): r for r in results}
    out = []
    for row in baselines:
        res = index.get((row["step"], row["target"], row["domain_i"], row["domain_j"]))
        new = dict(row)
        if res is None:
            new.update({"el_ij": math.nan, "el_significant": False, "second_order_favours": ""})
            new["orders"] = compare_orders(row["first_order_favours"], 0.0, False, "", "")
        else:
            el, sig = float(res["el_ij"]), bool(res["significant"])
            new["el_ij"] = el
            new["el_significant"] = sig
            new["second_order_favours"] = (
                (row["domain_i"] if el < 0.0 else row["domain_j"]) if sig and el != 0.0 else ""
            )
            new["orders"] = compare_orders(
                row["first_order_favours"], el, sig, row["domain_i"], row["domain_j"]
            )
        out.append(new)
    return out
