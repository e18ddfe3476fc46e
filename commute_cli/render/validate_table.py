"""``commute validate``'s result table: the paper's Table 2 layout (observed beside predicted excess losses).

It gets ``validate``'s rows and run record and draws them; nothing here computes or reads inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Group, RenderableType
from rich.text import Text

from commute_cli.render.formats import make_table

__all__ = ["validate_table"]


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
"""The columns drawn in nats: one fixed-point precision for all of them, so a column never mixes 0.0012
with 4.5e-04."""


def nat_decimals(values: Sequence[float], least: int = 4, most: int = 8) -> int:
    """Decimals that show the smallest nonzero ``|value|`` with two significant digits, within [least, most].

    ``least`` = 4 (a tenth of a millinat) is enough for the usual sizes; tiny learning rates or short
    horizons give effects of 1e-5 nats, which then get 6 decimals instead of turning into 0.0000.
    """
    finite = [abs(float(v)) for v in values if math.isfinite(float(v)) and float(v) != 0.0]
    if not finite:
        return least
    need = 1 - math.floor(math.log10(min(finite)))
    return max(least, min(most, need))


def _num(x: float, decimals: int) -> str:
    return f"{x:.{decimals}f}" if math.isfinite(x) else str(x)


def _pm(mean: float, se: float, decimals: int, significant: bool | None = None) -> str:
    text = _num(mean, decimals)
    if math.isfinite(se):
        text += f"±{_num(se, decimals)}"
    return text + ("*" if significant else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def validate_table(table: pd.DataFrame, run: Mapping[str, Any]) -> RenderableType:
    """The paper's Table 2 layout: per target domain k, L_k at the checkpoint, observed and predicted
    EL_k^12 and EL_k^21, whether the signs agree, obs/pred and the prediction's regime.

    ``table`` and ``run`` are ``ValidateResult.table`` (one row per target, ``validate.csv``) and
    ``ValidateResult.run`` (``validate.json``'s ``run``).
    """
    df = table
    d = nat_decimals([v for c in NAT_COLUMNS if c in df for v in df[c]])
    yes_no = {True: "yes", False: "NO", None: "-"}
    rows = []
    for r in df.itertuples(index=False):
        agree12 = None if pd.isna(r.sign_agree_12) else bool(r.sign_agree_12)
        agree21 = None if pd.isna(r.sign_agree_21) else bool(r.sign_agree_21)
        regime = "in" if r.in_regime else "OUT"
        rows.append(
            [
                r.target,
                f"{r.loss_ckpt:.4f}",
                _pm(r.obs_el12, r.obs_el12_se, d, r.obs_el12_significant),
                _pm(r.pred_el12, r.pred_el12_se, d, r.pred_significant),
                yes_no[agree12],
                _pm(r.obs_el21, r.obs_el21_se, d, r.obs_el21_significant),
                _pm(r.pred_el21, r.pred_el12_se, d, r.pred_significant),
                yes_no[agree21],
                _pm(r.obs_sym, r.obs_sym_se, d),
                f"{r.ratio_obs_pred:.2g}" if math.isfinite(r.ratio_obs_pred) else "-",
                f"{regime} ({r.regime_ratio:.2g})",
            ]
        )
    one, two = run["pair"]
    first = df.iloc[0].to_dict()
    title = (
        f"validate {Path(run['checkpoint']).name} (step {run['step']}): '12' = {one} +{first['dw']:g} for "
        f"{int(first['horizon'])} steps then -{first['dw']:g}; '21' the reverse; dt = {first['dt']:g}, "
        f"metric {first['metric']}, {_count(int(first['repeats']), 'repeat')}"
    )
    columns = [
        "target k",
        "L_k (ckpt)",
        "EL_k^12 obs",
        "EL_k^12 pred",
        "sign",
        "EL_k^21 obs",
        "EL_k^21 pred",
        "sign",
        "obs (12+21)/2",
        "obs/pred",
        "regime",
    ]
    caption = (
        f"EL_k^12 = L_k(theta_12) - L_k(theta_base) in nats on "
        f"{'held-out blocks' if run['eval_held_out'] else 'TRAINING blocks (no held-out data given)'}; "
        "obs: mean ± SE over stream seeds; pred: the criterion at the checkpoint "
        "(docs/MATH.md; EL^21 = -EL^12), "
        f"± SE over sample blocks; * significant at {run['options']['confidence']:g}; "
        "(12+21)/2: the observed part that is even in dw, zero to second order (Adam's nonlinearity, "
        "higher orders, noise); "
        f"regime: the prediction's second-order/first-order ratio ('OUT': its nats are meaningless, the sign "
        f"is a weaker hint). Pair {one}/{two}, batch {run['batch_size']}, {run['optimizer']}, "
        f"lr {run['lr_mean']:g} ({run['lr_source']}); prediction: {run['prediction']}."
    )
    return Group(make_table(title, columns, rows), Text(caption, style="dim"))
