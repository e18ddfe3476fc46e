"""Reliability and security of `commute analyze` through real processes: a SIGKILL mid-run resumes to the
same numbers, a code-executing pickle is refused without running, run.json can reproduce a run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_runner import terminal_sigint
from tiny_run import make_run

FAST = ["--samples", "24", "--blocks", "4", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("rel") / "run", steps=(0, 10, 20, 30))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _commute(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "commute_cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        **kw,
    )


def test_sigkill_then_resume_gives_the_same_results(run_dir, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "commute_cli", "analyze", str(run_dir), "--out", str(out), *FAST],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if len(list((out / "cache").glob("stats-*.safetensors"))) >= 1 or proc.poll() is not None:
                break
            time.sleep(0.05)
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed, "the analysis finished before it could be killed; the test needs a longer run"
    # nothing half-written: no final files yet, no temporary leftovers counted as results
    assert not (out / "results.csv").exists()
    cached_before = {p.name for p in (out / "cache").glob("stats-*.safetensors")}
    assert 1 <= len(cached_before) < 4
    resumed = _commute("analyze", run_dir, "--out", out, *FAST)
    assert resumed.returncode == 0, resumed.stderr
    run = json.loads((out / "run.json").read_text())
    recomputed = [c["cache"] for c in run["checkpoints"] if not c["cached"]]
    assert not set(recomputed) & cached_before, "finished checkpoints must not be recomputed"
    fresh = tmp_path / "fresh"
    full = _commute("analyze", run_dir, "--out", fresh, *FAST)
    assert full.returncode == 0, full.stderr
    assert (out / "results.csv").read_bytes() == (fresh / "results.csv").read_bytes()
    assert (out / "losses.csv").read_bytes() == (fresh / "losses.csv").read_bytes()


class _Payload:
    """Unpickling this would run `touch MARKER` (a code-executing optimizer.pt)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_in_optimizer_is_refused_and_never_runs(run_dir, tmp_path):
    import torch

    evil = tmp_path / "evil"
    shutil.copytree(run_dir, evil)
    marker = tmp_path / "PWNED"
    for ckpt in evil.glob("checkpoint-*"):
        torch.save(
            {"state": {0: {"exp_avg_sq": _Payload(marker)}}, "param_groups": []}, ckpt / "optimizer.pt"
        )
    res = _commute("analyze", evil, "--metric", "adam", "--out", tmp_path / "o", *FAST)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "optimizer" in lines[0]
    assert not marker.exists(), "the payload ran"


def test_run_json_records_what_reproduces_the_run(run_dir, tmp_path):
    out = tmp_path / "o"
    res = _commute("analyze", run_dir, "--out", out, "--seed", "3", *FAST)
    assert res.returncode == 0, res.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["options"]["seed"] == 3 and run["options"]["samples"] == 24
    assert set(run["data_sha256"]) == {"en", "xx"}
    assert all(len(c["weights_sha256"]) == 64 for c in run["checkpoints"])
    assert {"torch", "transformers", "python"} <= set(run["versions"])
    assert run["sample_digest"] and run["plan"] in ("pair", "target")
    # rerunning with the recorded options into a new folder gives identical numbers
    again = _commute("analyze", run_dir, "--out", tmp_path / "again", "--seed", "3", *FAST)
    assert again.returncode == 0, again.stderr
    assert (out / "results.csv").read_bytes() == (tmp_path / "again" / "results.csv").read_bytes()


def test_unwritable_output_folder(run_dir, tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits: use a path under a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("x")
        target = blocker / "out"
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
    res = _commute("analyze", run_dir, "--out", target, *FAST)
    assert res.returncode == 2, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "not writable" in res.stderr


def test_ctrl_c_says_where_the_results_are_and_how_to_resume(run_dir, tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "commute_cli", "analyze", str(run_dir), "--out", str(out), *FAST],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        preexec_fn=terminal_sigint,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if list((out / "cache").glob("stats-*.safetensors")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the analysis finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert str(out) in err and "resume" in err
    assert not (out / "results.csv").exists()
