"""Every command the product prints or the README shows runs exactly as printed (issue 21), through the real
console script and a POSIX shell, in a clone-like folder: the repository's ``sample_checkpoints/`` (linked)
and nothing else, so what the commands write lands there, not in the checkout.

- the README tour, line by line, in its order; the tour's analysis prints the bottom line the README shows,
  and its numbers are results.csv's;
- the command analyze's bottom line prints ("to act on it: commute recommend ..."), on a tiny run that
  ``commute train`` made, run as printed to the end.

The ``--help`` examples are run by tests/test_cli.py (test_every_help_example_runs_as_written), train's
resume command by tests/test_train.py, recommend's "apply with" line by tests/test_advice.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from commute_cli.core.bottom_line import bottom_line
from commute_cli.render.bottom_line import bottom_line_lines

from tiny_run import sample_shards

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LONG = "commute recommend --target mix"
"""The one tour line that trains for about an hour (it says so): it is started exactly as printed and
stopped once its continuations run; the same code path runs to the end on a tiny run below."""


def shell_env() -> dict[str, str]:
    return dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `commute` as after activating .venv
        PYTHONPATH=str(REPO),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        COLUMNS="100",
    )


def sh(line: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", line], cwd=cwd, env=shell_env(), capture_output=True, text=True, timeout=timeout
    )


def readme_block(heading: str, fence: str = "```text") -> list[str]:
    """The lines of the first fenced block after the README heading that starts with ``heading``."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(fence, text.index(heading)) + len(fence)
    return text[start : text.index("```", start)].strip("\n").splitlines()


def tour() -> list[str]:
    """The tour's commands, without their comments."""
    lines = readme_block("## A tour on the shipped run")
    return [re.sub(r"\s+#.*$", "", ln).strip() for ln in lines if ln.strip()]


def bottom_block(stdout: str) -> list[str]:
    lines = stdout.rstrip("\n").splitlines()
    return lines[next(k for k, t in enumerate(lines) if t.startswith("bottom line:")) :]


def start_and_stop(line: str, cwd: Path, until: str, timeout: float = 600) -> str:
    """Run ``line`` until its stderr shows ``until`` (it started its real work without an error), then stop
    it and the processes it started (its own process group). Returns the stderr read so far."""
    proc = subprocess.Popen(
        ["bash", "-c", line], cwd=cwd, env=shell_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen, t0 = "", time.monotonic()
    try:
        while time.monotonic() - t0 < timeout:
            out = proc.stderr.readline()
            if not out and proc.poll() is not None:
                break
            seen += out
            if until in seen:
                return seen
        raise AssertionError(f"{line!r} did not reach {until!r} (exit {proc.poll()}):\n{seen[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_the_tour_is_the_readme_block():
    lines = tour()
    assert lines[0] == "commute analyze sample_checkpoints/" and LONG in lines
    assert all(ln.startswith("commute ") for ln in lines), lines


@pytest.mark.slow
def test_the_readme_tour_runs_as_written(tmp_path):
    """Each tour line through bash from a clone-like folder, exit code 0; the first one's bottom line is the
    README's, and results.csv's numbers make it."""
    (tmp_path / "sample_checkpoints").symlink_to(REPO / "sample_checkpoints", target_is_directory=True)
    for line in tour():
        if line == LONG:
            seen = start_and_stop(line, tmp_path, "verifying")
            assert "error" not in seen.lower(), seen
            continue
        res = sh(line, tmp_path)
        assert res.returncode == 0, (line, res.stderr[-3000:])
        assert "Traceback" not in res.stderr
        if line == "commute analyze sample_checkpoints/":
            shown = bottom_block(res.stdout)
            results = pd.read_csv(tmp_path / "commute_out" / "results.csv")
            run = json.loads((tmp_path / "commute_out" / "run.json").read_text())
            assert shown == bottom_line_lines(bottom_line(results.to_dict("records"), run["optimizer"]))
            assert shown == readme_bottom_line(), "the README's bottom line is not what analyze prints"
    assert (tmp_path / "results.csv").stat().st_size > 0 and (tmp_path / "criterion.png").is_file()
    assert (tmp_path / "runs" / "mine" / "commute.json").is_file()


def readme_bottom_line() -> list[str]:
    """The bottom line in the README's excerpt of analyze's output."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("bottom line:", text.index("What the main command prints"))
    return text[start : text.index("```", start)].rstrip("\n").splitlines()


def test_the_readme_bottom_line_is_the_shipped_results_csv():
    """Independent of a run: the README's bottom line names the row that its table excerpt marks as the
    largest usable suboptimal row, with that row's interval."""
    shown = readme_bottom_line()
    assert 2 <= len(shown) <= 6 and shown[-1].lstrip().startswith("to act on it: commute recommend --target")
    table = readme_block("What the main command prints")
    rows = [ln.split() for ln in table if re.match(r"^\s*\d+\s", ln)]
    usable = [r for r in rows if "suboptimal" in r and r[-1] not in ("outside", "saturated")]
    best = max(usable, key=lambda r: abs(float(r[3])))
    assert f"around step {best[0]}" in shown[0]
    assert f"ru {best[3]} ± {best[5]} mnat" in shown[1]


@pytest.mark.slow
def test_the_bottom_lines_command_runs_as_printed(tmp_path):
    """A tiny run made by ``commute train``; its analysis's bottom line names a command, which runs, as
    printed, to the end (real continuations) and writes what recommend writes."""
    run = tmp_path / "run"
    sample_shards(run / "data", 12_000, 3_000, 2000)
    (tmp_path / "tiny.json").write_text(json.dumps({"n_layer": 1, "n_embd": 16, "n_head": 2}))
    d = "run/data"
    res = sh(
        f"commute train run --domains en={d}/en/train.jsonl ru={d}/ru/train.jsonl "
        f"--eval-domains en={d}/en/validation.jsonl ru={d}/ru/validation.jsonl "
        f"--tokenizer {shlex.quote(str(REPO / 'sample_checkpoints' / 'tokenizer'))} "
        "--weights en=0.75 ru=0.25 --steps 24 --save-every 8 --batch-size 4 --seq-len 32 --lr 3e-3 "
        "--init tiny.json --threads 1 -q",
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    res = sh("commute analyze run --samples 12 --blocks 2 --seq-len 32 --out an -q", tmp_path)
    assert res.returncode == 0, res.stderr
    act = next(ln for ln in bottom_block(res.stdout) if "commute recommend" in ln)
    command = act.split(": ", 1)[1].split("  (")[0]
    assert command.startswith("commute recommend --target ") and command.endswith("--from an"), command
    res = sh(command, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads((tmp_path / "an" / "recommend.json").read_text())
    assert rec["verified"] and rec["target"] == shlex.split(command)[3]
