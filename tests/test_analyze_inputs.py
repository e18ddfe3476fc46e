"""What `commute analyze` does with inputs that cannot be taken as given, through the real CLI.

- an explicit ``--dw`` above the smaller weight of a reported pair at a selected checkpoint is refused
  (both halves of the intervention take dw from a domain of the pair); the bound is per checkpoint;
- a pair with a zero weight has no intervention: its rows are left out with a note, and a run where no pair
  is left is refused (never a row at a made-up dw);
- every option that changes the numbers of results.csv is part of the run's identity, so a rerun with
  another ``--dw`` or ``--horizon`` goes to its own folder and says why;
- ``--samples`` rounded down to whole design blocks says so (also under ``--dry-run``);
- the table's ``~Nx samples`` is results.csv's ``samples_needed`` rounded up to two significant digits;
- a missing data file is named before the count of domains is checked;
- a closed stdout (``| head``) ends quietly with exit 141 (the console script, a real pipe).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from commute_cli.render.tables import samples_advice

from cli_runner import cli
from tiny_run import make_run

REPO = Path(__file__).resolve().parent.parent
FAST = ["--samples", "24", "--blocks", "4", "--quiet"]
COMMUTE = Path(sys.executable).parent / "commute"  # the installed console script (as tests/test_cli.py)
ENV = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run", steps=(0, 10, 20))  # en 0.7, xx 0.3, lr 0.05


def one_line_error(code: int, err: str) -> str:
    """The error is one line (notes said before it, e.g. that --weights replaces the run's schedule, are
    separate lines of their own)."""
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not ln.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------ 1. --dw bound


def test_a_dw_above_a_weight_is_refused_before_any_work(run_dir, tmp_path, capsys):
    for extra in ([], ["--dry-run"]):
        code, out, err = cli(["analyze", run_dir, "--out", tmp_path, "--dw", "0.5", *FAST, *extra], capsys)
        line = one_line_error(code, err)
        assert "--dw 0.5 exceeds xx's weight 0.3 at step 0" in line
        assert "(hint: at most 0.3 " in line
        assert out == ""
    assert not (tmp_path / "results.csv").exists()


def test_a_dw_equal_to_the_smaller_weight_is_allowed(run_dir, tmp_path, capsys):
    code, out, err = cli(["analyze", run_dir, "--out", tmp_path, "--dw", "0.3", *FAST], capsys)
    assert code == 0, err
    res = pd.read_csv(tmp_path / "results.csv")
    assert (res["dw"] == 0.3).all() and len(res) == 9
    assert "(dw = 0.3)" in out


def write_schedule(path: Path, rows: list[tuple[int, float, float]]) -> Path:
    path.write_text("step,en,xx\n" + "".join(f"{s},{a},{b}\n" for s, a, b in rows))
    return path


def test_zero_weight_pairs_are_left_out_and_the_dw_bound_is_per_checkpoint(run_dir, tmp_path, capsys):
    """xx has weight 0 until step 10, then 0.3: at step 0 no xx data can move (no row, a note); the --dw
    bound comes from the checkpoints where the pair is reported (0.3 at steps 10 and 20)."""
    sched = write_schedule(tmp_path / "s.csv", [(0, 1.0, 0.0), (10, 0.7, 0.3)])
    out = tmp_path / "out"
    args = ["analyze", run_dir, "--out", out, "--schedule", sched, *FAST]
    code, stdout, err = cli(args, capsys)
    assert code == 0, err
    assert "note: pairs with xx are left out at step 0: its weight is 0 there" in err
    res = pd.read_csv(out / "results.csv")
    assert sorted(set(res["step"])) == [10, 20] and len(res) == 6
    assert (res["dw"] == 0.15).all()  # half the smaller weight, never half the other one
    assert "(dw = 0.15)" in stdout and "dw = 0.5" not in stdout
    line = one_line_error(*cli([*args, "--dw", "0.35"], capsys)[::2])
    assert "--dw 0.35 exceeds xx's weight 0.3 at step 10" in line
    code, _, err = cli([*args, "--dw", "0.3"], capsys)
    assert code == 0, err


def test_a_dw_bound_from_a_piecewise_schedule_depends_on_the_selected_steps(run_dir, tmp_path, capsys):
    sched = write_schedule(tmp_path / "s.csv", [(0, 0.9, 0.1), (10, 0.7, 0.3)])
    args = ["analyze", run_dir, "--out", tmp_path / "o", "--schedule", sched, "--dw", "0.2", *FAST]
    line = one_line_error(*cli(args, capsys)[::2])
    assert "--dw 0.2 exceeds xx's weight 0.1 at step 0" in line and "at most 0.1" in line
    code, _, err = cli([*args, "--steps", "10,20"], capsys)
    assert code == 0, err
    res = pd.read_csv(tmp_path / "o" / "results.csv")
    assert (res["dw"] == 0.2).all() and (res["w_j"] == 0.3).all()


def test_a_zero_weight_everywhere_is_refused_in_one_line(run_dir, tmp_path, capsys):
    for extra in ([], ["--dry-run"]):
        args = ["analyze", run_dir, "--out", tmp_path, "--weights", "en=1.0", "xx=0.0", *FAST, *extra]
        line = one_line_error(*cli(args, capsys)[::2])
        assert "nothing to predict: the weight of xx is 0" in line and "no xx data can move" in line
    assert not (tmp_path / "results.csv").exists()


# ------------------------------------------------------------------------------- 2. identity of a run


def test_a_rerun_with_another_dw_or_horizon_gets_its_own_folder(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli(["analyze", run_dir, "--out", out, *FAST], capsys)
    assert code == 0, err
    first = (out / "results.csv").read_bytes()
    first_id = json.loads((out / "run.json").read_text())["run_id"]

    code, _, err = cli(["analyze", run_dir, "--out", out, "--dw", "0.1", *FAST], capsys)
    assert code == 0, err
    assert (out / "results.csv").read_bytes() == first  # the earlier results are untouched
    (folder,) = [p for p in out.iterdir() if p.name.startswith("run-")]
    assert f"this one is in {folder}/" in err and "--dw 0.1 here, default there" in err
    second = pd.read_csv(folder / "results.csv")
    assert (second["dw"] == 0.1).all()
    assert (pd.read_csv(out / "results.csv")["dw"] == 0.15).all()

    code, _, err = cli(["analyze", run_dir, "--out", out, "--horizon", "3", *FAST], capsys)
    assert code == 0, err
    assert "--horizon 3 here, default there" in err
    assert len([p for p in out.iterdir() if p.name.startswith("run-")]) == 2
    assert (out / "results.csv").read_bytes() == first

    # the same question again refines its own folder; more samples refine the same analysis (same id)
    code, _, err = cli(["analyze", run_dir, "--out", out, "--samples", "36", "--blocks", "4", "-q"], capsys)
    assert code == 0, err
    assert "another run" not in err and json.loads((out / "run.json").read_text())["run_id"] == first_id
    assert len([p for p in out.iterdir() if p.name.startswith("run-")]) == 2


# ----------------------------------------------------------------------------- 3. --samples rounding


def test_rounded_samples_say_so(run_dir, tmp_path, capsys):
    note = "note: --samples 25 is rounded down to 24: every domain's sample is 4 blocks x 3 parts"
    args = ["analyze", run_dir, "--out", tmp_path, "--samples", "25", "--blocks", "4", "-q"]
    code, out, err = cli(args, capsys)
    assert code == 0, err
    assert note in err and "a multiple of 12 (2 per part; --samples 36 for the next size up)" in err
    assert json.loads((tmp_path / "run.json").read_text())["samples_per_domain"] == 24
    code, out, err = cli(["analyze", run_dir, "--samples", "25", "--blocks", "4", "--dry-run"], capsys)
    assert code == 0, err
    assert note in err and "24 sequences of" in out
    code, _, err = cli(["analyze", run_dir, "--samples", "24", "--blocks", "4", "--dry-run"], capsys)
    assert code == 0 and "rounded" not in err


def test_weights_that_replace_the_recorded_schedule_say_so(run_dir, capsys):
    """--weights other than the schedule the run recorded (en 0.7, xx 0.3) is noted; the same ones are not."""
    code, _, err = cli(["analyze", run_dir, "--weights", "en=0.5", "xx=0.5", "--dry-run"], capsys)
    assert code == 0, err
    assert (
        "note: the schedule given (en 0.5, xx 0.5) replaces the one the run recorded (en 0.7, xx 0.3" in err
    )
    code, _, err = cli(["analyze", run_dir, "--weights", "en=0.7", "xx=0.3", "--dry-run"], capsys)
    assert code == 0 and "replaces" not in err


# -------------------------------------------------------------------------------- 4. ~Nx samples


def two_digits_up(x: float) -> str:
    d = Decimal(repr(x))
    exp = d.adjusted() - 1
    return f"{float(d.scaleb(-exp).to_integral_value(ROUND_CEILING).scaleb(exp)):g}"


@pytest.mark.parametrize(
    ("needed", "shown"),
    [(34.08, "~35x samples"), (2.02, "~2.1x samples"), (3.0, "~3x samples"), (127.3, "~130x samples"),
     (150.0, ">128x samples"), (1.0, ""), (float("nan"), "")],
)  # fmt: skip
def test_samples_advice_rounds_up_to_two_significant_digits(needed, shown):
    assert samples_advice(SimpleNamespace(samples_needed=needed)) == shown


def test_the_table_shows_what_results_csv_says(run_dir, tmp_path, capsys):
    code, out, err = cli(["analyze", run_dir, "--out", tmp_path, *FAST], capsys)
    assert code == 0, err
    res = pd.read_csv(tmp_path / "results.csv")
    needs = res["samples_needed"][res["samples_needed"] > 1]
    assert len(needs) > 0, "the tiny run has rows that are not significant at 24 samples"
    for x in needs:
        expected = f"~{two_digits_up(x)}x samples" if x <= 128 else ">128x samples"
        assert expected in out, (x, expected)
        assert float(expected[1:].split("x")[0]) >= x or x > 128
    assert "rounded up to two significant digits" in " ".join(out.split())


# -------------------------------------------------------------------------------- 5. missing data file


@pytest.mark.parametrize("specs", [["en=nope.jsonl"], ["en=nope.jsonl", "xx=nope2.jsonl"]])
def test_a_missing_data_file_is_named_first(run_dir, tmp_path, capsys, specs):
    for extra in ([], ["--dry-run"]):
        args = ["analyze", run_dir, "--out", tmp_path, "--domains", *specs, *FAST, *extra]
        line = one_line_error(*cli(args, capsys)[::2])
        assert "data source 'nope.jsonl' (domain en) does not exist" in line
        assert "at least two domains" not in line


def test_one_existing_domain_is_still_too_few(run_dir, tmp_path, capsys):
    args = ["analyze", run_dir, "--domains", f"en={run_dir / 'data' / 'en.jsonl'}", "--dry-run"]
    line = one_line_error(*cli(args, capsys)[::2])
    assert "need at least two domains" in line


# ------------------------------------------------------------------------------------ 6. closed stdout


def console(args: list[str], *, stderr_too: bool, tmp: Path) -> tuple[int, str]:
    """The installed console script with stdout (and stderr) on a pipe whose reader has already gone."""
    read, write = os.pipe()
    os.close(read)
    err_file = tmp / "stderr.txt"
    with err_file.open("w") as err:
        proc = subprocess.run(
            [str(COMMUTE), *args],
            stdout=write, stderr=write if stderr_too else err, env=ENV, cwd=REPO, timeout=300,
        )  # fmt: skip
    os.close(write)
    return proc.returncode, err_file.read_text()


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_a_closed_stdout_ends_quietly_with_141(run_dir, tmp_path, fmt):
    out = tmp_path / "out"
    code, err = console(
        ["analyze", str(run_dir), "--out", str(out), "--format", fmt, *FAST], stderr_too=False, tmp=tmp_path
    )
    assert code == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "error" not in err.lower(), err
    assert len(pd.read_csv(out / "results.csv")) == 9  # the results were written before the output
    code, _ = console(["analyze", str(run_dir), "--out", str(out), *FAST], stderr_too=True, tmp=tmp_path)
    assert code == 141


def test_a_pipe_to_head_exits_like_head(run_dir, tmp_path):
    """The shell pipeline of the report: ``commute analyze ... 2>&1 | head -1``; head's status, no noise."""
    cmd = f"'{COMMUTE}' analyze '{run_dir}' --out '{tmp_path}' {' '.join(FAST)} 2>&1"
    proc = subprocess.run(
        ["bash", "-c", f"{cmd} | head -1; echo \"status ${{PIPESTATUS[0]}} ${{PIPESTATUS[1]}}\""],
        capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and len(lines) == 2, proc.stdout + proc.stderr
    assert lines[1] in ("status 0 0", "status 141 0"), lines  # 0 when everything fit before head left
    assert "Traceback" not in proc.stdout + proc.stderr
