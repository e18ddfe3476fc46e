"""What the output says about the size of its predictions (issues 13 and 15), through the real CLI.

- ``saturation``: dt x the other domains' curvature along each domain's gradient. It is linear in dt, so two
  runs that differ only in ``--horizon`` (the same cached statistics) must give saturations in the ratio of
  their horizons, and a row whose saturation is above 1 is marked ``saturated`` (not in the local regime).
- ``samples_needed``: for a row that is not significant, the factor :func:`core.power.samples_factor` gives
  for its own estimate and SE; empty for significant rows; shown in the table as ``~Nx samples``.
- the size note: which optimizer family the run used (manifest, else the saved optimizer state) and what real
  interventions measured about the bracket's sizes on that family.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from commute_cli.core import power
from commute_cli.core.resummed_math import SATURATION_LIMIT
from commute_cli.io import checkpoints
from commute_cli.io.saved_optimizer import optimizer_name

from cli_runner import cli
from tiny_run import make_run

FAST = ["--samples", "24", "--blocks", "4", "--quiet"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("sizes") / "run", steps=(0, 10, 20))


def test_saturation_is_linear_in_dt_and_marks_saturated_rows(run_dir, tmp_path, capsys):
    frames = {}
    for horizon in (1, 20):
        out = tmp_path / f"h{horizon}"
        code, _, err = cli(["analyze", run_dir, "--horizon", str(horizon), "--out", out, *FAST], capsys)
        assert code == 0, err
        frames[horizon] = pd.read_csv(out / "results.csv")
    short, long = frames[1], frames[20]
    assert np.allclose(long["saturation"], 20.0 * short["saturation"], rtol=1e-10, atol=0.0)
    assert (short["saturation"] < SATURATION_LIMIT).all() and (long["saturation"] > SATURATION_LIMIT).all()
    assert (long["regime"] == "saturated").all() and not long["in_regime"].any()
    assert "saturated" not in set(short["regime"])


def test_samples_needed_follows_the_power_law_of_each_row(run_dir, tmp_path, capsys):
    out = tmp_path / "o"
    code, stdout, err = cli(["analyze", run_dir, "--out", out, "--samples", "24", "--blocks", "4"], capsys)
    assert code == 0, err
    res = pd.read_csv(out / "results.csv")
    for r in res.itertuples(index=False):
        if r.significant or r.verdict == "negligible":
            assert math.isnan(r.samples_needed)
        else:
            expected = power.samples_factor(r.el_ij, r.el_se, int(r.n_blocks), 0.95)
            assert r.samples_needed == pytest.approx(expected, rel=1e-12)
    needs = res[res["samples_needed"] > 1]
    assert len(needs) > 0, "the tiny run has rows that are not significant at 24 samples"
    flat = " ".join(stdout.split())
    assert "x samples" in flat and "about N times --samples would flag an effect" in flat


def test_the_output_states_the_known_size_error_of_the_run_optimizer(run_dir, tmp_path, capsys):
    # SGD: the measured record comes from saturated windows, so it is quoted only when rows are saturated
    out = tmp_path / "inside"
    code, _, err = cli(["analyze", run_dir, "--out", out, "--horizon", "1", *FAST[:-1]], capsys)
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["size_note"] is None and "note: " not in err
    out = tmp_path / "o"
    code, _, err = cli(["analyze", run_dir, "--out", out, "--horizon", "20", *FAST[:-1]], capsys)
    assert code == 0, err
    run = json.loads((out / "run.json").read_text())
    assert run["optimizer"] == "sgd"  # the manifest's optimizer
    assert (
        run["size_note"].startswith("on sgd runs, --metric euclid predicted")
        or "sgd runs" in run["size_note"]
    )
    assert "note: " + run["size_note"] in " ".join(err.split()) or run["size_note"] in err.replace("\n", " ")


def test_optimizer_family_from_the_saved_state():
    """Without a manifest the saved optimizer state says which family ran: the shipped run is AdamW."""
    refs = checkpoints.discover(ROOT / "sample_checkpoints")
    assert optimizer_name(refs[0], None) in ("adam", "adamw")
    assert optimizer_name(refs[0], {"name": "SGD"}) == "sgd"


def test_budget_sets_the_samples_before_the_run(run_dir, tmp_path, capsys):
    """--budget picks --samples from one timed gradient (as --dry-run) before any estimate is made."""
    code, out, err = cli(["analyze", run_dir, "--budget", "1", "--blocks", "4", "--dry-run"], capsys)
    chosen = int(err.split("--samples ")[1].split()[0])
    assert chosen >= 12 and chosen % 12 == 0
    if code == 0:
        assert f"{chosen} sequences of" in out
    else:  # a fast machine: more sequences than the tiny run's data holds; the dry run draws the sample
        assert code == 2 and f"fewer than the {chosen} blocks the sample needs" in err, err
    code, _, err = cli(["analyze", run_dir, "--budget", "3", "--samples", "24"], capsys)
    assert code == 2 and "either --samples or --budget" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(["analyze", run_dir, "--budget", "-1"], capsys)
    assert code == 2 and "--budget must be a positive" in err
