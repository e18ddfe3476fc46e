"""io/store.py's analysis files read back as written: identifiers and names stay text.

``run_id`` is 8 hex digits; when they are all decimal ("12345678") or look like a float ("1e123456"), a plain
``pd.read_csv`` turns them into numbers, and domain names such as "2024" or "NA" into an int or a missing
value. Every CSV commute writes and reads back goes through :func:`store.read_table`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from commute_cli.core.schedule import Schedule
from commute_cli.io import store

from cli_runner import cli

NAMES = ("2024", "NA")
"""Domain names that a number-guessing or NA-guessing reader would change."""

LOCAL = ["recommend", "--kind", "local"]
"""recommend's local swaps (the default kind, phases, trains continuations)."""


def results_rows(run_id: str) -> list[dict]:
    rows = []
    for step in (100, 200):
        for target, el in (("2024", -0.02), ("NA", 0.03), ("mix", 0.005)):
            rows.append(
                {
                    "run_id": run_id,
                    "step": step,
                    "target": target,
                    "domain_i": NAMES[0],
                    "domain_j": NAMES[1],
                    "w_i": 0.6,
                    "w_j": 0.4,
                    "target_loss": 4.0,
                    "el_ij": el,
                    "el_se": 0.002,
                    "t": el / 0.002,
                    "t_crit": 2.36,
                    "significant": True,
                    "dw": 0.1,
                    "horizon": 50,
                    "lr": 1e-3,
                    "dt": 0.05,
                    "first_order": 0.5,
                    "regime_ratio": 0.01,
                    "in_regime": True,
                    "verdict": "suboptimal",
                    "direction": "",
                    "n_blocks": 8,
                }
            )
    return rows


def write_run(folder: Path, run_id: str) -> store.AnalysisRun:
    schedule = Schedule.constant({NAMES[0]: 0.6, NAMES[1]: 0.4})
    losses = [{"step": s, "domain": d, "loss": 4.0, "loss_se": 0.05} for s in (100, 200) for d in NAMES]
    run = {
        "command": "analyze",
        "format": store.ANALYSIS_FORMAT,
        "run_id": run_id + "0" * (store.KEY_LENGTH - len(run_id)),
        "schedule": schedule.to_records(),
        "checkpoints": [{"name": f"checkpoint-{s}", "step": s} for s in (100, 200)],
        "options": {"ckpt_dir": str(folder / "no-such-run")},
    }
    written = store.AnalysisRun(folder, pd.DataFrame(results_rows(run_id)), pd.DataFrame(losses), run)
    folder.mkdir(parents=True, exist_ok=True)
    written.write()
    return written


@pytest.mark.parametrize("run_id", ["12345678", "1e123456", "00000042", "a1b2c3d4"])
def test_identifiers_and_names_read_back_as_text(tmp_path, run_id):
    written = write_run(tmp_path, run_id)
    loaded = store.load_analysis(tmp_path)
    assert loaded.results["run_id"].tolist() == [run_id] * len(written.results)
    for col in ("target", "domain_i", "domain_j", "verdict"):
        assert loaded.results[col].tolist() == written.results[col].tolist(), col
    assert loaded.run_id == written.run["run_id"] and f"run {run_id} " in loaded.label()
    assert loaded.losses["domain"].tolist() == list(NAMES) * 2
    assert store.load_losses(tmp_path)["domain"].tolist() == list(NAMES) * 2
    # numbers stay numbers
    assert loaded.results["step"].tolist() == [100] * 3 + [200] * 3
    assert loaded.results["el_ij"].dtype.kind == "f" and loaded.losses["loss"].dtype.kind == "f"
    assert loaded.results["in_regime"].all()


def test_every_written_table_reads_names_as_text(tmp_path):
    """validate.csv, baselines.csv and decomposition.csv (read by ``commute plot``) through the one reader."""
    table = pd.DataFrame(
        {
            "step": [100, 100],
            "target": list(NAMES),
            "pair": ["2024|NA"] * 2,
            "domain_1": [NAMES[0]] * 2,
            "domain_2": [NAMES[1]] * 2,
            "group": ["1", "NA"],
            "orders": ["agree", "neither"],
            "value": [0.5, float("nan")],
        }
    )
    table.to_csv(tmp_path / "t.csv", index=False)
    back = store.read_table(tmp_path / "t.csv")
    for col in ("target", "pair", "domain_1", "domain_2", "group", "orders"):
        assert back[col].tolist() == table[col].tolist(), col
    assert back["step"].tolist() == [100, 100] and back["value"].isna().tolist() == [False, True]


def test_recommend_and_plot_match_the_run_whatever_its_id(tmp_path, capsys):
    """recommend and plot read the run whose id and domain names look like numbers, and name it."""
    folder = tmp_path / "res"
    write_run(folder, "12345678")
    code, out, err = cli([*LOCAL, "--target", "2024", "--from", folder, "--format", "json"], capsys)
    assert code == 0, err
    assert "run 12345678 " in err
    shifts = json.loads(out)["shifts"]
    assert shifts and {s["earlier"] for s in shifts} <= set(NAMES)
    code, _, err = cli(["plot", "--from", folder, "-o", tmp_path / "fig.png", "--kind", "pairs"], capsys)
    assert code == 0, err
    assert "run 12345678 " in err
