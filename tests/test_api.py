"""The Python API (``commute_cli.api``): the README's example runs as written, and ``measure`` + ``answer``
give the rows ``commute analyze`` writes for the same sample, plan and question."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pandas as pd
import pytest

from commute_cli import api
from commute_cli.errors import CommuteError

from cli_runner import cli

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The first ```python block of the README's "Python API" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


@pytest.fixture(scope="module")
def measurement() -> api.Measurement:
    model = api.load_model(REPO / "sample_checkpoints" / "checkpoint-1000")
    return api.measure(model, api.sample_run(REPO / "sample_checkpoints", sequences=24), blocks=4)


def test_readme_example_runs_as_written_and_one_measurement_answers_two_horizons(monkeypatch):
    """Run from the repository root as a user would; the bracket's prediction grows as dt^2 (docs/MATH.md
    "Notation": EL = dw dt^2 x bracket to leading order), so doubling the horizon multiplies el_ij by 4."""
    monkeypatch.chdir(REPO)
    out, namespace = io.StringIO(), {}
    with contextlib.redirect_stdout(out):
        exec(compile(readme_example(), "README.md", "exec"), namespace)
    assert "horizon 125:" in out.getvalue() and "horizon 250:" in out.getvalue()
    m = namespace["m"]
    el = {
        h: api.answer(m, weights={"en": 0.8, "ru": 0.2}, lr=1e-3, horizon=h, targets=["ru"])["el_ij"].iloc[0]
        for h in (125, 250)
    }
    assert f"{el[250]:.6g}"[:5] in out.getvalue()  # the printed number is this one
    assert el[250] == pytest.approx(4 * el[125], rel=1e-9)


def test_measure_and_answer_equal_analyze_on_the_same_sample(measurement, tmp_path, capsys):
    code, _, err = cli(
        ["analyze", REPO / "sample_checkpoints", "--steps", "1000", "--samples", "24", "--blocks", "4",
         "--target", "ru", "--target", "mix", "--plan", "pair", "--horizon", "250", "--out", tmp_path, "-q"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    ref = pd.read_csv(tmp_path / "results.csv")
    got = api.answer(
        measurement, weights={"en": 0.8, "ru": 0.2}, lr=1e-3, horizon=250, targets=["ru", "mix"], step=1000
    )
    assert len(got) == len(ref) == 2
    for col in ("el_ij", "el_se", "t", "bracket", "first_order", "regime_ratio"):
        assert got[col].to_numpy() == pytest.approx(ref[col].to_numpy(), rel=1e-6, abs=1e-12), col
    assert list(got["verdict"]) == list(ref["verdict"])
    assert measurement.sequences == 24 and measurement.names == ("en", "ru")


def test_answer_refuses_weights_that_miss_a_domain(measurement):
    with pytest.raises(CommuteError, match="weights name no ru"):
        api.answer(measurement, weights={"en": 1.0}, lr=1e-3, horizon=10)


def test_measure_refuses_too_few_sequences():
    model = api.load_model(REPO / "sample_checkpoints" / "checkpoint-1000")
    samples = api.sample_run(REPO / "sample_checkpoints", sequences=6)
    with pytest.raises(CommuteError, match="fewer than 3 x 4 blocks"):
        api.measure(model, samples, blocks=4)
