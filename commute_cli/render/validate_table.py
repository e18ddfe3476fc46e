"""``commute validate``'s result table: the paper's Table 2 layout (observed beside predicted excess losses).

It gets ``validate``'s rows and run record and draws them; nothing here computes or reads inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Group, RenderableType
from rich.text import Text

from commute_cli.core.regime import REGIME_MAX_RATIO
from commute_cli.render.formats import make_table
from commute_cli.render.style import format_sig, format_sig_fixed, si_scale

__all__ = ["antisym_ratio", "sign_word", "validate_table"]


NAT_COLUMNS = ("obs_el12", "pred_el12", "obs_el21", "pred_el21", "obs_sym")
"""The columns drawn in nats (with their intervals): one SI prefix and one precision for all of them
(``render.style.si_scale``), so no column mixes mnat with µnat or 0.0012 with 4.5e-04."""


def _num(x: float, factor: float, decimals: int) -> str:
    if not math.isfinite(x):
        return "-" if math.isnan(x) else str(x)
    text = f"{x / factor:.{decimals}f}"
    return text.lstrip("-") if float(text) == 0.0 else text  # no "-0.00"


def _pm(mean: float, half: float, scale: tuple[float, int], significant: bool | None = None) -> str:
    text = _num(mean, *scale)
    if math.isfinite(half):
        text += f" ± {_num(half, *scale)}"
    return text + ("*" if significant else "")


def _t_quantile(confidence: float, dof: int) -> float:
    """Two-sided Student-t quantile (nan without degrees of freedom)."""
    if dof < 1:
        return math.nan
    from scipy import stats

    return float(stats.t.ppf(0.5 + confidence / 2.0, dof))


def _t_crit(row: Any, column: str, fallback: float) -> float:
    value = getattr(row, column, None)  # validate.csv files of earlier versions lack the column
    return float(value) if value is not None and not pd.isna(value) else fallback


def _half(row: Any, se_column: str, t_crit: float) -> float:
    """The interval's half-width ``t_crit x SE`` (nan without an SE)."""
    se = float(getattr(row, se_column))
    return t_crit * se if math.isfinite(se) else math.nan


def sign_word(agree: Any, observed_significant: Any) -> str:
    """The sign column: ``yes``/``NO`` when the observation is significant, ``yes (n.s.)``/``no (n.s.)``
    when it is not (one repeat, or noise as large as the effect), ``-`` when a value is 0."""
    if agree is None or pd.isna(agree):
        return "-"
    if observed_significant is not None and not pd.isna(observed_significant) and bool(observed_significant):
        return "yes" if bool(agree) else "NO"
    return "yes (n.s.)" if bool(agree) else "no (n.s.)"


def antisym_ratio(row: Any) -> float:
    """``((obs_el12 - obs_el21) / 2) / pred_el12``: the observed part that is odd in dw (what the bracket
    predicts) over the prediction; column ``ratio_antisym_pred`` when present."""
    value = getattr(row, "ratio_antisym_pred", None)
    if value is not None and not pd.isna(value):
        return float(value)
    pred = float(row.pred_el12)
    return (float(row.obs_el12) - float(row.obs_el21)) / 2.0 / pred if pred != 0.0 else math.nan


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def validate_table(table: pd.DataFrame, run: Mapping[str, Any]) -> RenderableType:
    """The paper's Table 2 layout: per target domain k, L_k at the checkpoint, observed and predicted
    EL_k^12 and EL_k^21 (one SI prefix for the table, each with its confidence interval ``± t_crit x SE``
    at the run's ``--confidence``, the convention of analyze's table), whether the signs agree (weaker when
    the observation is not significant), the observed antisymmetric part over the prediction and the
    prediction's regime.

    ``table`` and ``run`` are ``ValidateResult.table`` (one row per target, ``validate.csv``) and
    ``ValidateResult.run`` (``validate.json``'s ``run``).
    """
    df = table
    first = df.iloc[0].to_dict()
    n_rep = int(first["repeats"])
    options = run.get("options", {}) or {}
    conf = float(options.get("confidence", 0.95))
    n_blocks = int(options.get("blocks") or 8)
    pct = f"{100 * conf:.3g}%"
    intervals = []  # (row, mean column, half-width) for every number in nats
    for r in df.itertuples(index=False):
        t_pred = _t_crit(r, "pred_t_crit", _t_quantile(conf, n_blocks - 1))
        t_obs = _t_crit(r, "obs_t_crit", _t_quantile(conf, n_rep - 1))
        intervals.append(
            {
                "obs_el12": _half(r, "obs_el12_se", t_obs),
                "pred_el12": _half(r, "pred_el12_se", t_pred),
                "obs_el21": _half(r, "obs_el21_se", t_obs),
                "pred_el21": _half(r, "pred_el12_se", t_pred),
                "obs_sym": _half(r, "obs_sym_se", t_obs),
            }
        )
    values = [v for c in NAT_COLUMNS if c in df for v in df[c]]
    values += [h for half in intervals for h in half.values()]
    factor, prefix, decimals = si_scale(values)
    scale = (factor, decimals)
    rows = []
    for r, half in zip(df.itertuples(index=False), intervals, strict=True):
        ratio = antisym_ratio(r)
        label = getattr(r, "regime", None)  # validate.csv files of earlier versions have only in_regime
        regime = str(label) if isinstance(label, str) and label else ("inside" if r.in_regime else "outside")
        rows.append(
            [
                r.target,
                format_sig(r.loss_ckpt, 4),
                _pm(r.obs_el12, half["obs_el12"], scale, r.obs_el12_significant),
                _pm(r.pred_el12, half["pred_el12"], scale, r.pred_significant),
                sign_word(r.sign_agree_12, r.obs_el12_significant),
                _pm(r.obs_el21, half["obs_el21"], scale, r.obs_el21_significant),
                _pm(r.pred_el21, half["pred_el21"], scale, r.pred_significant),
                sign_word(r.sign_agree_21, r.obs_el21_significant),
                _pm(r.obs_sym, half["obs_sym"], scale),
                format_sig_fixed(ratio, 2) if math.isfinite(ratio) else "-",
                f"{regime} ({format_sig_fixed(r.regime_ratio, 2)})",
            ]
        )
    one, two = run["pair"]
    title = (
        f"validate {Path(run['checkpoint']).name} (step {run['step']}): '12' = {one} +{first['dw']:g} for "
        f"{int(first['horizon'])} steps then -{first['dw']:g}; '21' the reverse; dt = {first['dt']:g}, "
        f"metric {first['metric']}, {_count(n_rep, 'repeat')}"
    )
    unit = f"{prefix}nat"
    obs_unit = unit if n_rep < 2 else f"{unit} ({pct})"
    columns = [  # the unit and, where a ± follows, its interval on each header's second line
        "target k",
        "L_k\nnat",
        f"EL_k^12 obs\n{obs_unit}",
        f"EL_k^12 pred\n{unit} ({pct})",
        "sign",
        f"EL_k^21 obs\n{obs_unit}",
        f"EL_k^21 pred\n{unit} ({pct})",
        "sign",
        f"obs (12+21)/2\n{obs_unit}",
        "obs/pred\n(antisym.)",
        "regime",
    ]
    obs = (
        "obs: one stream seed, no SE, so no interval, no observation is significant and an agreeing sign "
        "reads 'yes (n.s.)'; "
        if n_rep < 2
        else f"obs: mean ± its {pct} confidence interval over {n_rep} stream seeds (Student t, {n_rep - 1} "
        "degrees of freedom; '(n.s.)': the interval includes 0); "
    )
    per = "" if not prefix else f" (1 {unit} = {factor:g} nat)"
    caption = (
        f"EL_k^12 = L_k(theta_12) - L_k(theta_base) in {unit}{per} on "
        f"{'held-out blocks' if run['eval_held_out'] else 'TRAINING blocks (no held-out data given)'}; "
        f"{obs}pred: the criterion at the checkpoint (docs/MATH.md; EL^21 = -EL^12), ± its {pct} confidence "
        f"interval over {n_blocks} sample blocks (Student t, as analyze's EL column and its verdict's test); "
        f"* significant at {conf:g} (the interval excludes 0); "
        "(12+21)/2: the observed part that is even in dw, zero to second order (Adam's nonlinearity, "
        "higher orders, noise); obs/pred (antisym.): ((obs 12 - obs 21)/2) / pred 12, the observed part odd "
        "in dw (what the bracket predicts) over the prediction; "
        f"regime: the prediction's second-order/first-order ratio against the limit {REGIME_MAX_RATIO:g}, "
        "as in analyze: inside, uncertain (the ratio's interval straddles the limit), outside (its nats are "
        "meaningless, the sign is a weaker hint) or saturated. "
        f"Pair {one}/{two}, batch {run['batch_size']}, {run['optimizer']}, "
        f"lr {run['lr_mean']:.4g} ({run['lr_source']}); prediction: {run['prediction']}."
    )
    return Group(make_table(title, columns, rows), Text(caption, style="dim"))
