"""``commute validate``'s table: one SI prefix and precision for every number in nats, ± the labelled 95%
interval of analyze's table, the antisymmetric obs/pred, weaker sign agreement without significance, counted
nouns agree."""

from __future__ import annotations

import re

import pandas as pd
from rich.console import Console

from commute_cli.render.validate_table import sign_word, validate_table


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
        "ratio_antisym_pred": obs12 / pred,
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


def test_one_prefix_and_precision_for_every_nat_column_and_no_scientific_notation():
    three = {"repeats": 3}  # with one repeat the observations have no interval
    df = pd.DataFrame([row("en", 0.0123, 4.5e-5, 0.002) | three, row("ru", -0.0012, 2.1e-4, -3.0e-4) | three])
    text = render(df)
    numbers = re.findall(r"-?\d+\.\d+(?:e-?\d+)? ± -?\d+\.\d+(?:e-?\d+)?", text)
    assert len(numbers) == 10  # 5 columns x 2 targets
    assert not any("e" in n for n in numbers)
    decimals = {len(part.split(".")[1]) for n in numbers for part in n.split(" ± ")}
    assert decimals == {3}  # mnat from the largest value; 0.053 mnat keeps two significant digits
    assert "12.300 ± 0.194" in text and "-0.300 ± 0.248" in text  # ± t_crit x SE (t_2, t_7)
    assert "mnat (95%)" in text and "µnat" not in text
    assert "95% confidence interval" in text and "SE" not in text.split("EL_k^12 =")[0]


def test_a_tiny_effect_gets_its_own_prefix_not_zeros():
    text = render(pd.DataFrame([row("en", 4.1e-5, 3.0e-6, 2.2e-5)]))
    assert "22.0 ± 3.5" in text and "µnat (95%)" in text


def test_the_ratio_is_the_antisymmetric_part_over_the_prediction():
    r = row("en", 0.006, 0.001, 0.004) | {"obs_el21": -0.002}
    del r["ratio_antisym_pred"]  # an older validate.csv: computed from the observed columns
    text = render(pd.DataFrame([r]))
    assert "obs/pred" in text and "(antisym.)" in text
    assert re.search(r"\b1\.0\b", text)  # ((6 + 2) / 2) / 4, two significant digits
    assert "1.5" not in text  # not obs_el12 / pred_el12


def test_two_significant_digits_for_ratio_and_regime():
    text = render(pd.DataFrame([row("en", 0.0123, 0.001, 0.007) | {"regime_ratio": 0.14628}]))
    assert "inside (0.15)" in text and re.search(r"\b1\.8\b", text)


def test_regime_is_named_as_analyze_names_it():
    """An 'uncertain' row (ratio above the limit, interval straddling it) says so; it is not shown as 'in'.
    An older validate.csv without the regime column falls back to in_regime."""
    text = render(
        pd.DataFrame([row("en", 0.01, 0.001, 0.002) | {"regime": "uncertain", "regime_ratio": 0.296}])
    )
    assert "uncertain (0.30)" in text and "inside" not in text.split("regime:")[0]
    assert "limit 0.25" in " ".join(text.split())
    old = render(pd.DataFrame([row("en", 0.01, 0.001, 0.002) | {"in_regime": False, "regime_ratio": 0.9}]))
    assert "outside (0.90)" in old


def test_agreement_without_significance_is_weaker_and_one_repeat_has_no_se():
    assert sign_word(True, True) == "yes" and sign_word(False, True) == "NO"
    assert sign_word(True, False) == "yes (n.s.)" and sign_word(False, False) == "no (n.s.)"
    assert sign_word(None, True) == "-"
    one = row("en", 0.01, float("nan"), 0.002) | {"obs_el12_significant": False}
    text = render(pd.DataFrame([one]))
    assert "yes (n.s.)" in text and "one stream seed, no SE" in text
    assert "mean ± 1 SE over" not in text and "mean ± SE over stream seeds" not in text
    three = render(pd.DataFrame([row("en", 0.01, 0.001, 0.002) | {"repeats": 3}]))
    assert "mean ± its 95% confidence interval over 3 stream seeds" in " ".join(three.split())


def test_counted_nouns():
    one = render(pd.DataFrame([row("en", 0.01, 0.001, 0.002)]))
    assert re.search(r"\b1 repeat\b", one) and "1 repeats" not in one
    assert "3 repeats" in render(pd.DataFrame([row("en", 0.01, 0.001, 0.002) | {"repeats": 3}]))


def test_intervals_are_analyzes_confidence_intervals_not_one_se():
    """The same effect reads the same as in analyze's table: ± t_crit x SE at the run's confidence (95%),
    labelled, so a prediction of 2.0 mnat with an SE of 1.0 over 8 blocks shows ± 2.4 (includes 0, not
    significant), not ± 1.0 (which would look significant); the observed ± uses the repeats' t quantile."""
    r = row("en", 0.01, 0.001, 0.002) | {"pred_el12_se": 0.001, "repeats": 3}
    text = render(pd.DataFrame([r | {"pred_t_crit": 2.3646, "obs_t_crit": 4.3027}]))
    flat = " ".join(text.split())
    assert "2.0 ± 2.4" in text and "2.0 ± 1.0" not in text
    assert "10.0 ± 4.3*" in text  # obs: t_2 = 4.303 x 1 mnat
    assert "mnat (95%)" in text and "± SE" not in text and "1 SE" not in flat
    assert "95% confidence interval over 8 sample blocks" in flat
    # an older validate.csv without the t_crit columns: the quantiles from the run's options
    old = render(pd.DataFrame([r]))
    assert "2.0 ± 2.4" in old and "10.0 ± 4.3*" in old


def test_piped_table_keeps_cells_and_caption_whole():
    """Printed to a file or a pipe (not a terminal): no cell wrapped ('yes (n.s.)', 'uncertain (0.30)'
    on one line) and the caption on one line, however wide."""
    import io

    from commute_cli.render.formats import print_renderable

    r = row("en", 0.0123, 4.5e-5, 0.002) | {"regime": "uncertain", "regime_ratio": 0.296, "repeats": 3}
    r["obs_el12_significant"] = False
    buf = io.StringIO()
    print_renderable(validate_table(pd.DataFrame([r, r | {"target": "ru"}]), RUN), buf)
    lines = buf.getvalue().splitlines()
    assert [ln for ln in lines if "yes (n.s.)" in ln and "uncertain (0.30)" in ln]
    caption = [ln for ln in lines if ln.startswith("EL_k^12 =")]
    assert len(caption) == 1 and caption[0].rstrip().endswith("prediction: euclid.")
