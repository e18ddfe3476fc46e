"""One shared statistics cache: ``commute validate``'s prediction is analyze's row, read from the cache.

A tiny real run (``tiny_run.make_run``) is analysed with ``--dw``, ``--horizon`` and ``--lr`` equal to
validate's ``--dw``, ``--steps`` and ``--lr``; validate's prediction for the same checkpoint must then be
the very same numbers (the same ``core.regime.predict_pair`` on the same cached statistics), taken from the
cache without computing any Hessian-vector product again. Also: analyze's defaults (dw, horizon) do not
depend on the number of samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from commute_cli.commands import validate as V
from commute_cli.commands.analyze import AnalyzeOptions, run_analysis
from commute_cli.io import store

from tiny_run import make_run

LR = 0.01
N = 10
DW = 0.2


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("prun"), steps=(0, 30), lr=0.05, seed=1, n_docs=100)


def _stats_files(folder: Path) -> set[str]:
    return {p.name for p in (folder / "cache").glob("stats-*.safetensors")}


def test_validate_prediction_equals_the_analyze_row_from_the_cache(run, tmp_path):
    out = tmp_path / "out"
    analysed = run_analysis(
        AnalyzeOptions(ckpt_dir=run, dw=DW, horizon=N, lr=LR, out=out, steps=[30], device="cpu")
    ).results
    before = _stats_files(out)
    assert len(before) == 1

    vopts = V.ValidateOptions(checkpoint=run / "checkpoint-30", dw=DW, steps=N, lr=LR, out=out)
    setup = V.resolve_setup(vopts, lambda _t: None)
    predicted, source = V.predict(setup, vopts, DW, lambda _t: None)
    assert source.startswith("read from the statistics cache"), source
    assert _stats_files(out) == before  # nothing recomputed, nothing new cached

    for target in ("en", "xx"):
        row = analysed[(analysed["target"] == target)].iloc[0]
        assert (row["domain_i"], row["domain_j"]) == ("en", "xx")
        p = predicted[target]
        # the same function on the same statistics (validate's lr is the mean over the window's steps,
        # which can differ from --lr in the last bit)
        assert p["pred_el12"] == pytest.approx(row["el_ij"], rel=1e-12)
        assert p["pred_el12_se"] == pytest.approx(row["el_se"], rel=1e-12)
        assert p["pred_bracket"] == row["bracket"]  # no dt in it: bit for bit
        assert p["dt"] == pytest.approx(row["dt"], rel=1e-12) and row["dt"] == pytest.approx(LR * N)
        assert p["regime"] == row["regime"] and p["pred_verdict"] == row["verdict"]
        # validate's table draws analyze's interval (t_crit x SE) and its test's word
        assert p["pred_t_crit"] == row["t_crit"] and p["pred_significant"] == row["significant"]

    # the reversed pair is the same prediction with the sign flipped (EL^21 = -EL^12)
    rev = V.ValidateOptions(checkpoint=run / "checkpoint-30", dw=DW, steps=N, lr=LR, out=out, pair="xx,en")
    flipped, _ = V.predict(V.resolve_setup(rev, lambda _t: None), rev, DW, lambda _t: None)
    for target in ("en", "xx"):
        assert flipped[target]["pred_el12"] == pytest.approx(-predicted[target]["pred_el12"], rel=1e-12)


def test_validate_reads_the_cache_of_another_folder_with_from(run, tmp_path):
    """--from: the statistics of an analysis elsewhere (its cache) are used; validate's own OUT gets none."""
    src = tmp_path / "analysis"
    run_analysis(AnalyzeOptions(ckpt_dir=run, out=src, steps=[30], device="cpu"))
    vopts = V.ValidateOptions(
        checkpoint=run / "checkpoint-30", dw=DW, steps=N, lr=LR, out=tmp_path / "v", from_dir=src
    )
    notes: list[str] = []
    _, source = V.predict(V.resolve_setup(vopts, notes.append), vopts, DW, notes.append)
    assert source.startswith("read from the statistics cache") and str(src) in source
    assert not _stats_files(tmp_path / "v")


def test_default_intervention_does_not_depend_on_the_number_of_samples(run, tmp_path):
    """Issue 13: the same command with more samples predicts the same (dw, horizon), only more precisely."""
    rows = []
    for samples in (48, 96):
        res = run_analysis(
            AnalyzeOptions(ckpt_dir=run, samples=samples, out=tmp_path / str(samples), device="cpu")
        ).results
        rows.append(res)
    a, b = rows
    assert a["dw"].tolist() == b["dw"].tolist() == pytest.approx([0.15] * len(a))  # half the smaller weight
    assert a["horizon"].tolist() == b["horizon"].tolist() == [15] * len(a)  # half the 30-step spacing
    assert set(a["horizon_reason"]) == {
        "half the 30-step spacing to the next checkpoint",
        "half the 30-step spacing to the previous checkpoint",
    }
    assert not (a["el_ij"] == b["el_ij"]).all()  # the estimates did change with the sample
    # and got more precise on the whole (one row's SE from 8 blocks is itself uncertain by ~30%)
    assert float(np.median(b["el_se"] / a["el_se"])) < 1.0


def test_analysis_run_round_trip(run, tmp_path):
    """store.AnalysisRun: what analyze writes is what recommend and plot read."""
    result = run_analysis(AnalyzeOptions(ckpt_dir=run, out=tmp_path, steps=[30], device="cpu"))
    loaded = store.load_analysis(tmp_path)
    assert loaded.run["format"] == store.ANALYSIS_FORMAT and loaded.run_id == result.run["run_id"]
    assert loaded.results["el_ij"].tolist() == result.results["el_ij"].tolist()
    assert loaded.results["run_id"].iloc[0] == result.run["run_id"][:8]
    assert loaded.checkpoint_steps == [30]
    assert loaded.schedule.weights_at(30) == {"en": 0.7, "xx": 0.3}
    assert "schedule en=0.7 xx=0.3" in loaded.label()
