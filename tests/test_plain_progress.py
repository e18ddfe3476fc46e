"""train and validate with stderr piped (issue 21): no bars, but plain progress lines while they run, one
at the start and at least every COMMUTE_PROGRESS_INTERVAL seconds (a minute by default; shortened here)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from commute_cli.render.progress import PLAIN_INTERVAL, StepProgress, plain_interval

from tiny_run import sample_shards

REPO = Path(__file__).resolve().parents[1]
COMMUTE = str(Path(sys.executable).parent / "commute")
LINE = re.compile(r"^(train|validate: branches): step (\d+)/(\d+)(, .*)?, \d+:\d\d elapsed, ETA")


def test_step_progress_writes_lines_off_a_terminal():
    """A console that is not a terminal: a line at start, then the timer's lines while steps go on (the
    step count and ETA of the moment), nothing drawn as a bar."""
    buf = io.StringIO()
    with StepProgress("train", console=Console(file=buf), interval=0.05, fields=("losses",)) as bar:
        bar.start(20)
        for k in range(6):
            time.sleep(0.06)
            bar.step(losses=f"loss {k}")
    lines = buf.getvalue().splitlines()
    assert re.match(r"train: step 0/20, 0:0\d elapsed, ETA estimating", lines[0]), lines[0]
    assert len(lines) >= 3 and all(LINE.match(ln) for ln in lines), lines
    assert any(re.search(r"step [2-6]/20, loss \d, \d:\d\d elapsed, ETA \d+:\d\d", ln) for ln in lines)
    assert "━" not in buf.getvalue()
    quiet = io.StringIO()
    with StepProgress("train", False, console=Console(file=quiet), interval=0.01) as bar:
        bar.start(5)
        time.sleep(0.05)
    assert quiet.getvalue() == ""  # disabled (-q): neither bars nor lines


def test_the_interval_is_a_minute_unless_set(monkeypatch):
    monkeypatch.delenv("COMMUTE_PROGRESS_INTERVAL", raising=False)
    assert plain_interval() == PLAIN_INTERVAL == 60.0
    monkeypatch.setenv("COMMUTE_PROGRESS_INTERVAL", "0.5")
    assert plain_interval() == 0.5


def _piped(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COMMUTE_PROGRESS_INTERVAL="0.2", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [COMMUTE, *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=600, check=False
    )


@pytest.mark.slow
def test_train_and_validate_print_lines_when_piped(tmp_path):
    """The real console script with stderr to a pipe: train (a 1-layer GPT-2, 40 steps) and validate (its
    checkpoint, horizon 4) print progress lines, and train's count up to its last step."""
    run = tmp_path / "run"
    sample_shards(run / "data", 12_000, 3_000, 2000)
    (tmp_path / "tiny.json").write_text(json.dumps({"n_layer": 1, "n_embd": 16, "n_head": 2}))
    d = run / "data"
    res = _piped(
        *["train", run, "--domains", f"en={d}/en/train.jsonl", f"ru={d}/ru/train.jsonl"],
        *["--eval-domains", f"en={d}/en/validation.jsonl", f"ru={d}/ru/validation.jsonl"],
        *["--tokenizer", REPO / "sample_checkpoints" / "tokenizer", "--weights", "en=0.75", "ru=0.25"],
        *["--steps", "40", "--save-every", "20", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3"],
        *["--init", tmp_path / "tiny.json", "--threads", "1"],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("train: step")]
    assert lines and lines[0].startswith("train: step 0/40") and all(LINE.match(ln) for ln in lines), lines
    assert "━" not in res.stderr
    res = _piped("validate", run / "checkpoint-20", "--quick", "--horizon", "4", "--samples", "24",
                 "--out", tmp_path / "v", "--threads", "1", cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("validate: branches: step")]
    assert lines and lines[0].startswith("validate: branches: step 0/24"), res.stderr
    assert all(LINE.match(ln) for ln in lines) and "━" not in res.stderr
    assert res.stderr.index("validate: branches: step") < res.stderr.index("results in")
    # the cost line announces the whole command: set-up so far + training + the prediction's analysis
    cost = r"one step measured \S+ s \(median of 3\).*about \d+ s when not cached\): about \d+\.\d min in all"
    assert re.search(cost, res.stderr), res.stderr
