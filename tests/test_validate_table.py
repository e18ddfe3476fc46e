"""``commute validate``'s table: one fixed-point precision for every number in nats, counted nouns agree."""

from __future__ import annotations

import re

import pandas as pd
from rich.console import Console

from commute_cli.render.validate_table import nat_decimals, validate_table


def row(target: str, obs12: float, se: float, pred: float) -> dict:
    return {
        "target": target,
        "dw": 0.15,
        "horizon": 20,
        "dt": 0.003,
        "metric": "euclid",
        "repeats": 1,
        "loss_ckpt": 5.1234,
        "obs_el12": obs12,
        "obs_el12_se": se,
        "obs_el12_significant": True,
        "obs_el21": -obs12,
        "obs_el21_se": se,
        "obs_el21_significant": False,
        "obs_sym": 0.0,
        "obs_sym_se": se,
        "pred_el12": pred,
        "pred_el12_se": se / 2,
        "pred_el21": -pred,
        "pred_significant": False,
        "sign_agree_12": True,
        "sign_agree_21": None,
        "ratio_obs_pred": obs12 / pred,
        "regime_ratio": 0.1,
        "in_regime": True,
    }


RUN = {
    "pair": ["en", "ru"],
    "checkpoint": "ckpt/checkpoint-1000",
    "step": 1000,
    "eval_held_out": True,
    "options": {"confidence": 0.95},
    "batch_size": 10,
    "optimizer": "AdamW",
    "lr_mean": 1e-3,
    "lr_source": "optimizer.pt",
    "prediction": "euclid",
}


def render(df: pd.DataFrame) -> str:
    console = Console(width=400, record=True, color_system=None)
    console.print(validate_table(df, RUN))
    return console.export_text()


def test_nat_decimals_shows_two_significant_digits_of_the_smallest_value():
    assert nat_decimals([0.0123, 0.004]) == 4  # the default precision already shows 0.0040
    assert nat_decimals([0.0123, 4.5e-5]) == 6  # 0.000045
    assert nat_decimals([0.2, 3.3e-7]) == 8  # capped
    assert nat_decimals([0.0, float("nan")]) == 4


def test_one_precision_for_every_nat_column_and_no_scientific_notation():
    df = pd.DataFrame([row("en", 0.0123, 4.5e-5, 0.002), row("ru", -0.0012, 2.1e-4, -3.0e-4)])
    text = render(df)
    numbers = re.findall(r"-?\d+\.\d+(?:e-?\d+)?±-?\d+\.\d+(?:e-?\d+)?", text)
    assert len(numbers) == 10  # 5 columns x 2 targets
    assert not any("e" in n for n in numbers)
    decimals = {len(part.split(".")[1]) for n in numbers for part in n.split("±")}
    assert decimals == {6}
    assert "0.012300±0.000045" in text and "-0.000300±0.000105" in text


def test_counted_nouns():
    one = render(pd.DataFrame([row("en", 0.01, 0.001, 0.002)]))
    assert re.search(r"\b1 repeat\b", one) and "1 repeats" not in one
    assert "3 repeats" in render(pd.DataFrame([row("en", 0.01, 0.001, 0.002) | {"repeats": 3}]))
