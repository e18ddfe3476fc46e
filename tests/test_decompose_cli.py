"""`commute analyze --decompose` end to end on a tiny real training run: the files, their agreement with
results.csv, an unchanged results.csv, and one-line errors for a bad grouping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cli_runner import cli
from tiny_run import make_run

FAST = ["--samples", "24", "--blocks", "4", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run", steps=(0, 10))


def test_decompose_writes_parts_that_add_up_and_baselines(run_dir, tmp_path, capsys):
    plain, dec = tmp_path / "plain", tmp_path / "dec"
    code, _, err = cli(["analyze", run_dir, "--out", plain, *FAST], capsys)
    assert code == 0, err
    assert (plain / "baselines.csv").is_file() and not (plain / "decomposition.csv").exists()
    code, _, err = cli(["analyze", run_dir, "--out", dec, "--decompose", "module", *FAST], capsys)
    assert code == 0, err
    # the totals are the same numbers with or without the decomposition (to float64 rounding)
    res = pd.read_csv(dec / "results.csv")
    ref = pd.read_csv(plain / "results.csv")
    pd.testing.assert_frame_equal(res, ref, check_exact=False, rtol=1e-10)
    parts = pd.read_csv(dec / "decomposition.csv")
    assert list(parts.columns[:6]) == ["step", "target", "pair", "domain_i", "domain_j", "group"]
    assert {"value", "se", "share"} <= set(parts.columns)
    assert set(parts["group"]) >= {"embeddings", "layer.0.attention", "layer.0.mlp", "layer.0.norms"}
    sums = parts.groupby(["step", "target"], as_index=False)["value"].sum().merge(res, on=["step", "target"])
    assert len(sums) == len(res)
    np.testing.assert_allclose(
        sums["value"], sums["bracket"], rtol=1e-9, atol=1e-12 * res["bracket"].abs().max()
    )
    base = pd.read_csv(dec / "baselines.csv")
    assert len(base) == len(res)
    assert {"cosine", "cosine_se", "align_i", "align_diff", "orders"} <= set(base.columns)
    assert set(base["orders"]) <= {"agree", "disagree", "second order only", "first order only", "neither"}
    assert ((base["cosine"].abs() <= 1.5) | base["cosine"].isna()).all()
    # a resumed run reads the per-group tables back from the cache
    code, _, err = cli(["analyze", run_dir, "--out", dec, "--decompose", "module", *FAST], capsys)
    assert code == 0, err
    again = pd.read_csv(dec / "decomposition.csv")
    pd.testing.assert_frame_equal(parts, again)


@pytest.mark.parametrize("bad", ["kinds", "x=("])
def test_bad_grouping_is_a_one_line_error(run_dir, tmp_path, capsys, bad):
    code, _, err = cli(["analyze", run_dir, "--out", tmp_path, "--decompose", bad, *FAST], capsys)
    assert code == 2
    assert "--decompose" in err and "Traceback" not in err


def test_every_column_of_every_written_csv_is_documented(run_dir, tmp_path, capsys):
    """``commute help columns`` covers each CSV a real analysis with ``--decompose kind`` writes, and the
    schedule.csv that recommend writes (its header: step, then one column per domain)."""
    from commute_cli.core.schedule import parse_schedule_csv
    from commute_cli.render import columns

    out = tmp_path / "out"
    code, _, err = cli(["analyze", run_dir, "--out", out, "--decompose", "kind", *FAST], capsys)
    assert code == 0, err
    written = {p.name: pd.read_csv(p) for p in out.glob("*.csv")}
    assert {"results.csv", "losses.csv", "baselines.csv", "decomposition.csv"} <= set(written)
    for name, frame in written.items():
        assert name in columns.COLUMNS, name
        assert columns.undocumented(name, frame.columns) == [], name
    schedule = parse_schedule_csv("step,en,ru\n0,0.8,0.2\n100,0.9,0.1\n").to_csv()
    assert columns.undocumented("schedule.csv", schedule.splitlines()[0].split(",")) == []
    code, text, err = cli(["help", "columns"], capsys)
    assert code == 0, err
    for name in [*written, "schedule.csv"]:
        assert f"{name}: " in text
    assert "95% test" not in text and "--confidence" in text
