"""Analysis folders written directly (``results.csv``, ``run.json``) for the tests of ``recommend`` and its
exports: rows with chosen numbers, so the schedule arithmetic is checked without an analysis run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from commute_cli.core.schedule import Schedule

REGIME = {"max_ratio": 0.25, "max_progress_fraction": 0.5}

LOCAL = ["recommend", "--kind", "local"]
"""recommend's local swaps (the default kind, phases, trains continuations)."""


def make_row(step: int, target: str, i: str, j: str, w: dict, **kw) -> dict:
    row = {
        "step": step,
        "target": target,
        "domain_i": i,
        "domain_j": j,
        "w_i": w[i],
        "w_j": w[j],
        "target_loss": 4.0,
        "bracket": 1.0,
        "bracket_se": 0.1,
        "el_ij": -0.01,
        "el_se": 0.002,
        "t": -5.0,
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
    row.update(kw)
    return row


def write_analysis(folder: Path, rows: list[dict], schedule: Schedule, steps: list[int]) -> Path:
    """A minimal ``analyze --out`` folder: results.csv, losses.csv and run.json."""
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "results.csv", index=False)
    losses = [
        {"step": s, "domain": d, "loss": 4.0 - 0.001 * s, "loss_se": 0.05}
        for s in steps
        for d in schedule.domains
    ]
    pd.DataFrame(losses).to_csv(folder / "losses.csv", index=False)
    run = {
        "command": "analyze",
        "schedule": schedule.to_records(),
        "checkpoints": [{"name": f"checkpoint-{s}", "step": s} for s in steps],
        "options": {"ckpt_dir": str(folder / "no-such-run")},
        "regime": REGIME,
    }
    (folder / "run.json").write_text(json.dumps(run))
    return folder


def synthetic_results(folder: Path, verdict: str = "suboptimal") -> Path:
    w = {"en": 0.7, "xx": 0.3}
    rows = [
        make_row(s, t, "en", "xx", w, el_ij=e, verdict=verdict, significant=verdict != "insufficient signal")
        for s in (100, 200, 300)
        for t, e in (("en", 0.02), ("xx", -0.03), ("mix", 0.005))
    ]
    return write_analysis(folder, rows, Schedule.constant(w), [100, 200, 300])
