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


NAT_COLUMNS = (
    "obs_el12",
    "obs_el12_se",
    "pred_el12",
    "pred_el12_se",
    "obs_el21",
    "obs_el21_se",
    "pred_el21",
    "obs_sym",
    "obs_sym_se",
)
"""The columns drawn in nats: one SI prefix and one precision for all of them (``render.style.si_scale``),
so no column mixes mnat with µnat or 0.0012 with 4.5e-04."""


def _num(x: float, factor: float, decimals: int) -> str:
    if not math.isfinite(x):
        return "-" if math.isnan(x) else str(x)
    text = f"{x / factor:.{decimals}f}"
    return text.lstrip("-") if float(text) == 0.0 else text  # no "-0.00"


def _pm(mean: float, se: float, scale: tuple[float, int], significant: bool | None = None) -> str:
    text = _num(mean, *scale)
    if math.isfinite(se):
        text += f" ± {_num(se, *scale)}"
    return text + ("*" if significant else "")


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
    EL_k^12 and EL_k^21 (one SI prefix for the table, ± 1 SE), whether the signs agree (weaker when the
    observation is not significant), the observed antisymmetric part over the prediction and the
    prediction's regime.

    ``table`` and ``run`` are ``ValidateResult.table`` (one row per target, ``validate.csv``) and
    ``ValidateResult.run`` (``validate.json``'s ``run``).
    """
    df = table
    factor, prefix, decimals = si_scale([v for c in NAT_COLUMNS if c in df for v in df[c]])
    scale = (factor, decimals)
    rows = []
    for r in df.itertuples(index=False):
        ratio = antisym_ratio(r)
        label = getattr(r, "regime", None)  # validate.csv files of earlier versions have only in_regime
        regime = str(label) if isinstance(label, str) and label else ("inside" if r.in_regime else "outside")
        rows.append(
            [
                r.target,
                format_sig(r.loss_ckpt, 4),
                _pm(r.obs_el12, r.obs_el12_se, scale, r.obs_el12_significant),
                _pm(r.pred_el12, r.pred_el12_se, scale, r.pred_significant),
                sign_word(r.sign_agree_12, r.obs_el12_significant),
                _pm(r.obs_el21, r.obs_el21_se, scale, r.obs_el21_significant),
                _pm(r.pred_el21, r.pred_el12_se, scale, r.pred_significant),
                sign_word(r.sign_agree_21, r.obs_el21_significant),
                _pm(r.obs_sym, r.obs_sym_se, scale),
                format_sig_fixed(ratio, 2) if math.isfinite(ratio) else "-",
                f"{regime} ({format_sig_fixed(r.regime_ratio, 2)})",
            ]
        )
    one, two = run["pair"]
    first = df.iloc[0].to_dict()
    title = (
        f"validate {Path(run['checkpoint']).name} (step {run['step']}): '12' = {one} +{first['dw']:g} for "
        f"{int(first['horizon'])} steps then -{first['dw']:g}; '21' the reverse; dt = {first['dt']:g}, "
        f"metric {first['metric']}, {_count(int(first['repeats']), 'repeat')}"
    )
    unit = f"{prefix}nat"
    se = "" if int(first["repeats"]) < 2 else " ± SE"
    columns = [  # the unit and what ± is on each header's second line
        "target k",
        "L_k\nnat",
        f"EL_k^12 obs\n{unit}{se}",
        f"EL_k^12 pred\n{unit} ± SE",
        "sign",
        f"EL_k^21 obs\n{unit}{se}",
        f"EL_k^21 pred\n{unit} ± SE",
        "sign",
        f"obs (12+21)/2\n{unit}{se}",
        "obs/pred\n(antisym.)",
        "regime",
    ]
    n_rep = int(first["repeats"])
    obs = (
        "obs: one stream seed, no SE, so no observation is significant and an agreeing sign reads "
        "'yes (n.s.)'; "
        if n_rep < 2
        else f"obs: mean ± 1 SE over {n_rep} stream seeds ('(n.s.)': the observation is not significant); "
    )
    conf = run["options"]["confidence"]
    per = "" if not prefix else f" (1 {unit} = {factor:g} nat)"
    caption = (
        f"EL_k^12 = L_k(theta_12) - L_k(theta_base) in {unit}{per} on "
        f"{'held-out blocks' if run['eval_held_out'] else 'TRAINING blocks (no held-out data given)'}; "
        f"{obs}pred: the criterion at the checkpoint (docs/MATH.md; EL^21 = -EL^12), ± 1 SE over sample "
        f"blocks (not a {100 * conf:.3g}% interval); * significant at {conf:g}; "
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
