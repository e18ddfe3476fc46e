"""`commute analyze` end to end through the real CLI entry point on a tiny real training run.

Numbers themselves are pinned elsewhere (test_criterion: exact flows; test_estimator: unbiasedness and
coverage against dense Hessians; test_intervention: real interventions). Here: the command's contract —
files, determinism, cache/resume, formats, and one-line errors with exit code 2.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_runner import cli
from tiny_run import make_run, write_jsonl

FAST = ["--samples", "24", "--blocks", "4", "--quiet"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run", steps=(0, 10, 20))


def test_analyze_manifest_table_files_and_determinism(run_dir, tmp_path, capsys):
    out1, out2 = tmp_path / "a", tmp_path / "b"
    code, stdout, stderr = cli(["analyze", run_dir, "--out", out1, *FAST], capsys)
    assert code == 0, stderr
    assert "target: en" in stdout and "target: xx" in stdout and "target: mix" in stdout
    assert "en↔xx" in stdout
    for name in ("results.csv", "losses.csv", "run.json"):
        assert (out1 / name).is_file()
    res = pd.read_csv(out1 / "results.csv")
    # 3 checkpoints x 3 targets x 1 pair
    assert len(res) == 9
    assert set(res["verdict"]) <= {"suboptimal", "consistent", "insufficient signal"}
    assert (res["el_se"] > 0).all() and res["el_ij"].notna().all()
    # dt = lr x horizon with the lr from trainer_state.json (0.05) and a horizon <= half the spacing (5)
    assert ((res["dt"] - 0.05 * res["horizon"]).abs() < 1e-12).all()
    assert (res["horizon"] <= 5).all()
    run = json.loads((out1 / "run.json").read_text())
    assert run["plan"] == "pair" and run["hvps_per_block"] == 2
    assert run["samples_per_domain"] == 24
    # the same command twice (no shared cache) gives bit-identical numbers
    code, _, stderr = cli(["analyze", run_dir, "--out", out2, *FAST], capsys)
    assert code == 0, stderr
    assert (out1 / "results.csv").read_bytes() == (out2 / "results.csv").read_bytes()
    assert (out1 / "losses.csv").read_bytes() == (out2 / "losses.csv").read_bytes()


def test_losses_decrease_along_training(run_dir, tmp_path, capsys):
    code, _, stderr = cli(["analyze", run_dir, "--out", tmp_path, *FAST], capsys)
    assert code == 0, stderr
    losses = pd.read_csv(tmp_path / "losses.csv")
    en = losses[losses.domain == "en"].sort_values("step")["loss"].to_numpy()
    assert en[0] > en[1] > en[2]


def test_csv_format_pipes_only_data(run_dir, tmp_path, capsys):
    code, stdout, stderr = cli(
        ["analyze", run_dir, "--out", tmp_path, "--format", "csv", "--target", "xx", *FAST], capsys
    )
    assert code == 0, stderr
    df = pd.read_csv(io.StringIO(stdout))
    assert list(df["target"].unique()) == ["xx"]
    assert len(df) == 3


def test_resume_uses_cache_and_gives_same_numbers(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    # an interrupted run: only the first two checkpoints finished
    code, _, err = cli(["analyze", run_dir, "--out", out, "--steps", "0,10", *FAST], capsys)
    assert code == 0, err
    subset = (out / "results.csv").read_bytes()
    code, _, err = cli(["analyze", run_dir, "--out", out, *FAST], capsys)
    assert code == 0, err
    # all checkpoints is another analysis than a subset of them: it goes to its own folder, the subset stays
    assert "holds the analysis of another run" in err and (out / "results.csv").read_bytes() == subset
    (full,) = list(out.glob("run-*"))
    run = json.loads((full / "run.json").read_text())
    computed = [c["step"] for c in run["checkpoints"] if not c["cached"]]
    assert computed == [20], "finished checkpoints must come from the cache (shared under --out)"
    assert all(c["seconds"] > 0 for c in run["checkpoints"])  # cached ones keep their real compute time
    fresh = tmp_path / "fresh"
    code, _, err = cli(["analyze", run_dir, "--out", fresh, *FAST], capsys)
    assert code == 0, err
    assert (full / "results.csv").read_bytes() == (fresh / "results.csv").read_bytes()
    # and selecting checkpoints does not change the question asked at them (the horizon uses every checkpoint)
    a = pd.read_csv(fresh / "results.csv").drop(columns="run_id")
    b = pd.read_csv(out / "results.csv").drop(columns="run_id")
    pd.testing.assert_frame_equal(a[a["step"].isin([0, 10])].reset_index(drop=True), b)


def test_cached_rerun_keeps_the_real_time_and_memory(run_dir, tmp_path, capsys):
    """Issue 14: a fully cached rerun does not overwrite run.json's time and memory; it adds its own."""
    out = tmp_path / "out"
    assert cli(["analyze", run_dir, "--out", out, *FAST], capsys)[0] == 0
    first = json.loads((out / "run.json").read_text())
    assert cli(["analyze", run_dir, "--out", out, *FAST], capsys)[0] == 0
    again = json.loads((out / "run.json").read_text())
    assert all(c["cached"] for c in again["checkpoints"])
    for key in ("elapsed_seconds", "peak_rss_mb", "finished_at"):
        assert again[key] == first[key]
    (rerun,) = again["reruns"]
    assert rerun["elapsed_seconds"] > 0 and rerun["elapsed_seconds"] != first["elapsed_seconds"]


def test_another_schedule_does_not_replace_a_run(run_dir, tmp_path, capsys):
    """Issue 14: --weights en=0.9 after the manifest's run goes to its own folder and says so; the first
    run's files are untouched; every row names its run; --name chooses the folder."""
    out = tmp_path / "out"
    assert cli(["analyze", run_dir, "--out", out, *FAST], capsys)[0] == 0
    before = {f: (out / f).read_bytes() for f in ("results.csv", "losses.csv", "run.json")}
    code, _, err = cli(["analyze", run_dir, "--out", out, "--weights", "en=0.9", "xx=0.1", *FAST], capsys)
    assert code == 0, err
    assert {f: (out / f).read_bytes() for f in before} == before
    (other,) = [p for p in out.iterdir() if p.name.startswith("run-")]
    assert "holds the analysis of another run" in err and str(other) in err
    first, second = pd.read_csv(out / "results.csv"), pd.read_csv(other / "results.csv")
    assert first["run_id"].nunique() == second["run_id"].nunique() == 1
    assert first["run_id"].iloc[0] != second["run_id"].iloc[0]
    assert json.loads((other / "run.json").read_text())["schedule"][0]["weights"] == {"en": 0.9, "xx": 0.1}
    # the same second command again refines its own folder; --name puts a run where the user says
    code, _, err = cli(["analyze", run_dir, "--out", out, "--weights", "en=0.9", "xx=0.1", *FAST], capsys)
    assert code == 0 and len([p for p in out.iterdir() if p.name.startswith("run-")]) == 1
    code, _, err = cli(
        ["analyze", run_dir, "--out", out, "--name", "en90", "--weights", "en=0.9", "xx=0.1", *FAST], capsys
    )
    assert code == 0, err
    assert (out / "en90" / "results.csv").is_file()
    # a name that holds another run is refused in one line
    code, _, err = cli(["analyze", run_dir, "--out", out, "--name", "en90", *FAST], capsys)
    assert code == 2 and "holds the results of another run" in err and len(err.strip().splitlines()) == 1


def test_explicit_domains_weights_and_target_plan(run_dir, tmp_path, capsys):
    code, _, err = cli(
        [
            "analyze",
            run_dir,
            "--domains",
            f"en={run_dir}/data/en.jsonl",
            f"xx={run_dir}/data/xx.jsonl",
            "--weights",
            "en=0.7",
            "xx=0.3",
            "--target",
            "xx",
            "--plan",
            "target",
            "--out",
            tmp_path / "t",
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err
    code, _, err = cli(
        ["analyze", run_dir, "--target", "xx", "--plan", "pair", "--out", tmp_path / "p", *FAST], capsys
    )
    assert code == 0, err
    t = pd.read_csv(tmp_path / "t" / "results.csv")
    p = pd.read_csv(tmp_path / "p" / "results.csv")
    # the two HVP plans compute the same per-block products (tests/test_estimator.py pins that exactly); the
    # cross estimator pairs a different factor across blocks in each plan (docs/MATH.md "Estimator"), so
    # the plans agree within their error bars, not to rounding: closely where there is a signal, and within
    # a few (correlated) SEs where there is none (the random initialization, step 0)
    diff = (t["el_ij"] - p["el_ij"]).abs()
    assert (diff <= 3.0 * np.hypot(t["el_se"], p["el_se"])).all()
    strong = (p["el_ij"].abs() / p["el_se"]) > 3.0
    assert strong.any() and (diff[strong] <= 0.25 * p["el_se"][strong]).all()
    assert (t["el_se"] / p["el_se"]).between(0.5, 2.0).all()  # SEs from a few blocks: +-30 %
    # a verdict may differ only for a borderline row: |t| within a factor 1.6 of t_crit in both plans
    differ = t["verdict"] != p["verdict"]
    for frame in (t, p):
        assert (frame["t"][differ].abs() / frame["t_crit"][differ]).between(0.6, 1.6).all()


def test_plot_is_written(run_dir, tmp_path, capsys):
    png = tmp_path / "crit.png"
    code, _, err = cli(["analyze", run_dir, "--out", tmp_path, "--plot", png, *FAST], capsys)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------- bad input


def _assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    assert fragment.lower() in lines[0].lower(), lines[0]


def test_error_missing_folder(tmp_path, capsys):
    code, _, err = cli(["analyze", tmp_path / "nope", *FAST], capsys)
    _assert_one_line_error(code, err, "does not exist")


def test_error_no_checkpoints(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = cli(["analyze", tmp_path / "empty", *FAST], capsys)
    _assert_one_line_error(code, err, "checkpoint")


def test_error_malformed_domains(run_dir, tmp_path, capsys):
    code, _, err = cli(["analyze", run_dir, "--domains", "en", "--out", tmp_path, *FAST], capsys)
    _assert_one_line_error(code, err, "=")


def test_error_unknown_target(run_dir, tmp_path, capsys):
    code, _, err = cli(["analyze", run_dir, "--target", "zz", "--out", tmp_path, *FAST], capsys)
    _assert_one_line_error(code, err, "unknown target")


def test_error_weights_unknown_domain(run_dir, tmp_path, capsys):
    code, _, err = cli(
        ["analyze", run_dir, "--weights", "en=0.5", "zz=0.5", "--out", tmp_path, *FAST], capsys
    )
    _assert_one_line_error(code, err, "zz")


def test_error_empty_data(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = cli(
        [
            "analyze",
            run_dir,
            "--domains",
            f"en={empty}",
            f"xx={run_dir}/data/xx.jsonl",
            "--out",
            tmp_path / "o",
            *FAST,
        ],
        capsys,
    )
    _assert_one_line_error(code, err, "empty")


def test_error_too_short_data(run_dir, tmp_path, capsys):
    short = write_jsonl(tmp_path / "short.jsonl", ["the of and"] * 3)
    code, _, err = cli(
        [
            "analyze",
            run_dir,
            "--domains",
            f"en={short}",
            f"xx={run_dir}/data/xx.jsonl",
            "--out",
            tmp_path / "o",
            *FAST,
        ],
        capsys,
    )
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_error_architectures_differ(run_dir, tmp_path, capsys):
    mixed = tmp_path / "mixed"
    shutil.copytree(run_dir, mixed)
    config = json.loads((mixed / "checkpoint-20" / "config.json").read_text())
    config["n_layer"] = 2
    (mixed / "checkpoint-20" / "config.json").write_text(json.dumps(config))
    code, _, err = cli(["analyze", mixed, "--out", tmp_path / "o", *FAST], capsys)
    _assert_one_line_error(code, err, "differs")


def test_error_nan_weights_give_nan_losses(run_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    f = broken / "checkpoint-10" / "model.safetensors"
    tensors = load_file(str(f))
    name = next(k for k in tensors if "wte" in k)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(f), metadata={"format": "pt"})
    code, _, err = cli(["analyze", broken, "--out", tmp_path / "o", *FAST], capsys)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "nan" in err.lower() or "finite" in err.lower()


def test_error_bad_numbers(run_dir, tmp_path, capsys):
    code, _, err = cli(["analyze", run_dir, "--samples", "5", "--out", tmp_path], capsys)
    _assert_one_line_error(code, err, "--samples")
    code, _, err = cli(["analyze", run_dir, "--dw", "0.9", "--out", tmp_path, *FAST], capsys)
    _assert_one_line_error(code, err, "--dw")


def test_help_reads_well(capsys):
    code, out, _ = cli(["analyze", "--help"], capsys)
    assert code == 0
    for option in ("--domains", "--target", "--metric", "--hvp", "--samples", "--format", "--plot"):
        assert option in out


# More bad inputs, each caught before any long work: (extra args, fragment expected in the one-line error).
def _bad_cases(run_dir: Path, tmp: Path) -> list[tuple[list[str], str]]:
    en, xx = f"{run_dir}/data/en.jsonl", f"{run_dir}/data/xx.jsonl"
    latin1 = tmp / "latin1.txt"
    latin1.write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 200)
    notjson = tmp / "bad.jsonl"
    notjson.write_text("{not json\n")
    notext = tmp / "notext.jsonl"
    notext.write_text('{"body": "hello"}\n')
    unsorted = tmp / "unsorted.csv"
    unsorted.write_text("step,en,xx\n0,0.7,0.3\n20,0.5,0.5\n10,0.6,0.4\n")
    dup = tmp / "dup.csv"
    dup.write_text("step,en,xx\n0,0.7,0.3\n0,0.5,0.5\n")
    return [
        (["--domains", f"en={en}", f"en={xx}"], "twice"),
        (["--weights", "en=-0.2", "xx=1.2"], "negative"),
        (["--weights", "en=0.5", "xx=0.6"], "sum"),
        (["--weights", "en=nan", "xx=0.5"], "nan"),
        (["--schedule", unsorted], "increasing"),
        (["--schedule", dup], "twice"),
        (["--schedule", tmp / "missing.csv"], "missing.csv"),
        (["--domains", f"en={latin1}", f"xx={xx}"], "utf-8"),
        (["--domains", f"en={notjson}", f"xx={xx}"], "json"),
        (["--domains", f"en={notext}", f"xx={xx}"], "text"),
        (["--domains", f"en={tmp / 'nope.jsonl'}", f"xx={xx}"], "nope.jsonl"),
        (["--domains", "en=c4", f"xx={xx}"], "hub"),
        (["--domains", f"en={en}"], "two domains"),
        (["--seq-len", "1"], "--seq-len"),
        (["--batch-size", "0"], "--batch-size"),
        (["--steps", "5"], "5"),
        (["--metric", "fisher"], "--metric"),
        (["--hvp", "xx"], "--hvp"),
        (["--confidence", "1.5"], "--confidence"),
        (["--lr", "-1"], "--lr"),
        (["--device", "tpu"], "device"),
        (["--format", "xml"], "--format"),
        (["--blocks", "1"], "--blocks"),
        (["--horizon", "0"], "--horizon"),
        (["--offload", "maybe"], "--offload"),
    ]


@pytest.mark.parametrize("case", range(25))
def test_bad_input_one_line_exit_2(run_dir, tmp_path, capsys, case):
    args, fragment = _bad_cases(run_dir, tmp_path)[case]
    code, _, err = cli(["analyze", run_dir, "--out", tmp_path / "o", *FAST, *args], capsys)
    _assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o" / "results.csv").exists()


def test_error_truncated_safetensors(run_dir, tmp_path, capsys):
    broken = tmp_path / "trunc"
    shutil.copytree(run_dir, broken)
    f = broken / "checkpoint-10" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    code, _, err = cli(["analyze", broken, "--out", tmp_path / "o", *FAST], capsys)
    _assert_one_line_error(code, err, "model.safetensors")


def test_error_tokenizer_larger_than_model_vocab(run_dir, tmp_path, capsys):
    from tiny_run import make_tokenizer

    big = tmp_path / "bigtok"
    make_tokenizer([f"w{i} x{i} y{i}" for i in range(3000)], big, vocab_size=2000)
    code, _, err = cli(["analyze", run_dir, "--tokenizer", big, "--out", tmp_path / "o", *FAST], capsys)
    _assert_one_line_error(code, err, "vocab")


def test_adam_metric_on_the_shipped_adamw_run_warns_and_records_its_safeguard(tmp_path, capsys):
    samples = Path(__file__).resolve().parent.parent / "sample_checkpoints"
    args = ["analyze", samples, "--steps", "500", "--metric", "adam", "--target", "ru", "--out", tmp_path]
    code, _, err = cli([*args, *FAST], capsys)
    assert code == 0, err
    assert "warning: --metric adam is experimental" in err
    run = json.loads((tmp_path / "run.json").read_text())
    extra = run["checkpoints"][0]
    assert extra["adam_step"] == 500 and extra["clip_cap"] > 0 and 0 <= extra["clipped_fraction"] < 1
    res = pd.read_csv(tmp_path / "results.csv")
    assert len(res) == 1 and np.isfinite(res["el_ij"]).all()


def test_offload_on_cpu_same_numbers_and_recorded(run_dir, tmp_path, capsys):
    """``--offload on`` runs the host-memory code path (here the model is on the CPU too, so only the path,
    not the transfer, is exercised; tests/test_cuda.py covers the GPU) and changes no number; run.json says
    which checkpoints were offloaded, and ``auto`` never offloads on a CPU."""
    base = [*FAST, "--steps", "10", "--device", "cpu"]
    code, _, stderr = cli(["analyze", run_dir, "--out", tmp_path / "on", *base, "--offload", "on"], capsys)
    assert code == 0, stderr
    code, _, stderr = cli(["analyze", run_dir, "--out", tmp_path / "auto", *base], capsys)
    assert code == 0, stderr
    on, auto = (pd.read_csv(tmp_path / d / "results.csv") for d in ("on", "auto"))
    pd.testing.assert_frame_equal(on, auto)
    for folder, expected in (("on", True), ("auto", False)):
        run = json.loads((tmp_path / folder / "run.json").read_text())
        assert [c["offload"] for c in run["checkpoints"]] == [expected]


def _console_script(*args, **env_extra: str) -> subprocess.Popen:
    """The INSTALLED `commute` console script with stdout and stderr to pipes (not a terminal)."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env_extra)
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "commute"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_progress_lines_when_stderr_is_not_a_terminal(run_dir, tmp_path):
    """stderr piped to a file: no bars, but plain progress lines (step, checkpoints and blocks done of their
    totals, elapsed, ETA) while it runs, at each checkpoint and at least every COMMUTE_PROGRESS_INTERVAL
    seconds (a minute by default; shortened here), not nothing until the end."""
    proc = _console_script(
        "analyze", run_dir, "--out", tmp_path / "out", "--samples", "24", "--blocks", "4",
        COMMUTE_PROGRESS_INTERVAL="0.05",
    )  # fmt: skip
    assert proc.stderr is not None
    first = proc.stderr.readline()
    running = proc.poll() is None
    out, rest = proc.communicate(timeout=600)
    err = first + rest
    assert proc.returncode == 0, err
    assert first.startswith("analyze: step 0 (checkpoint-0), checkpoint 1/3, sample blocks 0/4"), first
    assert running  # printed while the analysis runs, not at its end
    lines = [ln for ln in err.splitlines() if ln.startswith("analyze: step")]
    for k, step in enumerate((0, 10, 20)):
        assert any(
            ln.startswith(f"analyze: step {step} (checkpoint-{step}), checkpoint {k + 1}/3") for ln in lines
        )
    assert len(lines) > 3  # the timer's lines between checkpoints
    assert all(re.search(r"\d+:\d\d elapsed, ETA", ln) for ln in lines)
    assert re.search(r"ETA ≤? ?\d+:\d\d", "\n".join(lines))
    assert "━" not in err and "\r" not in err  # no bar drawn into the file
    assert err.index("analyze: step") < err.index("results in") and "target: en" in out


def test_a_cached_rerun_says_so(run_dir, tmp_path, capsys):
    """A rerun whose checkpoints all come from the cache says, in one line, how many did and from where;
    the first run, which computed them, does not."""
    out = tmp_path / "out"
    args = ["analyze", run_dir, "--out", out, "--samples", "24", "--blocks", "4"]
    code, _, err = cli(args, capsys)
    assert code == 0, err
    assert "from the cache" not in err and "read from" not in err
    code, _, err = cli(args, capsys)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("cache:")]
    assert lines == [
        f"cache: 3 of 3 checkpoints read from {out / 'cache'} (nothing was computed; --no-cache recomputes)"
    ]
    code, _, err = cli([*args, "--quiet"], capsys)
    assert code == 0 and "cache:" not in err
