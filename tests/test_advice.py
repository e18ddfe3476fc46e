"""The measured advice end to end on a real (tiny) run made by ``commute train``: continuations reproduce the
run, ``commute recommend`` (kind phases) measures its candidates on them, and the command it prints runs as
printed and realises exactly the change it measured."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from commute_cli.commands import continuations
from commute_cli.core.schedule import Schedule

from tiny_run import sample_shards

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_checkpoints"
COMMUTE = str(Path(sys.executable).parent / "commute")
TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2}


def commute(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [COMMUTE, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=900, check=False
    )


def final_losses(run: Path, step: int) -> dict[str, float]:
    """The held-out losses ``commute train`` logged at its last save (``trainer_state.json``)."""
    log = json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]
    entry = [h for h in log if "eval_en_loss" in h][-1]
    return {"en": entry["eval_en_loss"], "ru": entry["eval_ru_loss"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """24 steps of a 1-layer GPT-2 on the first documents of the shipped shards, saved every 8 steps."""
    root = tmp_path_factory.mktemp("advice")
    run = root / "run"
    sample_shards(run / "data", 12_000, 3_000, 2000)
    (root / "tiny.json").write_text(json.dumps(TINY))
    d = run / "data"
    res = commute(
        *["train", run, "--domains", f"en={d}/en/train.jsonl", f"ru={d}/ru/train.jsonl"],
        *["--eval-domains", f"en={d}/en/validation.jsonl", f"ru={d}/ru/validation.jsonl"],
        *["--tokenizer", SAMPLES / "tokenizer", "--weights", "en=0.75", "ru=0.25", "--steps", "24"],
        *["--save-every", "8", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3"],
        *["--init", root / "tiny.json", "--threads", "1", "-q"],
        cwd=root,
    )
    assert res.returncode == 0, res.stderr
    return run


def test_a_continuation_of_the_run_schedule_reproduces_the_run(run):
    """Forked from checkpoint-8 at the run's own seed with the run's schedule, 16 steps later the held-out
    losses are the ones ``commute train`` logged at step 24 (it evaluates the same blocks)."""
    start = continuations.load_start(run / "checkpoint-8", 24, lambda _m: None)
    original = Schedule.constant({"en": 0.75, "ru": 0.25})
    losses = continuations.continue_run(start, original, seed=0)
    assert losses == pytest.approx(final_losses(run, 24), abs=2e-6)
    other = continuations.continue_run(start, original, seed=5)  # another stream order: another model
    assert other["ru"] != pytest.approx(losses["ru"], abs=1e-5)


def test_a_retrain_from_scratch_of_the_run_schedule_reproduces_the_run(run):
    """From step 0 (the model built from checkpoint-8's config and the run's seed, a fresh optimizer with the
    manifest's settings, the streams at their beginnings), 24 steps reproduce the losses ``commute train``
    logged at step 24; a schedule that differs from step 0 gives another model."""
    start = continuations.load_start(run / "checkpoint-8", 24, lambda _m: None, scratch=True)
    assert (start.setup.step, start.steps, start.label) == (0, 24, "scratch")
    original = Schedule.constant({"en": 0.75, "ru": 0.25})
    losses = continuations.continue_run(start, original, seed=0)
    assert losses == pytest.approx(final_losses(run, 24), abs=2e-6)
    late = Schedule.from_entries([(0, {"en": 0.875, "ru": 0.125}), (12, {"en": 0.625, "ru": 0.375})])
    assert continuations.continue_run(start, late, seed=0)["ru"] != pytest.approx(
        final_losses(run, 24)["ru"], abs=1e-5
    )


@pytest.mark.slow
def test_recommend_measures_its_candidates_and_its_printed_command_realises_them(run, tmp_path):
    analysis = tmp_path / "a"
    res = commute(
        *["analyze", run, "--samples", "12", "--blocks", "2", "--seq-len", "32", "-q", "--out", analysis],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    res = commute("recommend", "--target", "ru", "--from", analysis, "--seeds", "3", "--finalists", "1",
                  "-q", cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    rec = json.loads((analysis / "recommend.json").read_text())
    n = len(rec["candidates"])
    assert f"verifying {n} candidate schedules on real continuations" in res.stderr
    assert rec["kind"] == "phases" and rec["start"] == 8 and rec["last_step"] == 24
    assert {c["late"] for c in rec["candidates"]} == {"en", "ru"}
    measured = [c for c in rec["candidates"] if c["measured"]]
    assert len(measured) == n and sum(len(c["seeds"]) == 3 for c in rec["candidates"]) == 1
    # every measured change is final loss minus the run's at the same seed: recompute one independently
    start = continuations.load_start(run / "checkpoint-8", 24, lambda _m: None)
    cand = measured[0]
    before = [e for e in rec["original_schedule"] if e["step"] < cand["start"]]
    sched = Schedule.from_records(
        [*before, *cand["early_weights"], {"step": cand["switch"], "weights": cand["late_weights"]}]
    )
    mine = continuations.continue_run(start, sched, seed=0)
    base = final_losses(run, 24)
    assert cand["measured"]["ru"]["mean"] * cand["measured"]["ru"]["n"] == pytest.approx(
        sum(
            continuations.continue_run(start, sched, seed=s)["ru"]
            - continuations.continue_run(start, Schedule.constant({"en": 0.75, "ru": 0.25}), seed=s)["ru"]
            for s in cand["seeds"]
        ),
        abs=1e-5,
    )
    # the cost is what was trained: n + 1 screen runs + (1 finalist + the run's schedule) x 2 seeds, 16 steps
    assert rec["cost"]["steps_trained"] == (n + 1 + 2 * 2) * 16
    assert rec["cost"]["fraction_of_run"] == pytest.approx((n + 1 + 2 * 2) * 16 / 24)
    # a rerun trains nothing: every continuation comes from the cache
    res = commute("recommend", "--target", "ru", "--from", analysis, "--seeds", "3", "--finalists", "1",
                  cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0 and "0 training steps" in res.stdout and "reused from the cache" in res.stdout
    if not rec["proposed"]:
        assert "no late-phase schedule from checkpoint 8 beats the run's" in rec["summary"]
        assert not (analysis / "schedule.json").exists()
        return
    # the printed command, run exactly as printed, realises the seed-0 change it measured
    line = next(x for x in res.stderr.splitlines() if x.startswith("apply with"))
    cmd = shlex.split(line.split(": ", 1)[1])
    assert cmd[:2] == ["commute", "train"] and "--init" in cmd
    done = subprocess.run([COMMUTE, *cmd[1:]], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    got = final_losses(tmp_path / cmd[2], 24)
    chosen = Schedule.from_records(json.loads((analysis / "schedule.json").read_text()))
    assert got == pytest.approx(continuations.continue_run(start, chosen, seed=0), abs=2e-6)
    assert mine  # the independent recomputation above ran
    assert got["ru"] - base["ru"] == pytest.approx(
        continuations.continue_run(start, chosen, seed=0)["ru"] - base["ru"], abs=2e-6
    )


@pytest.mark.slow
def test_recommend_from_scratch_prints_a_train_command_that_retrains_the_run_with_its_schedule(run, tmp_path):
    """``--start 0``: the candidates are retrains; the printed command (the run's model config and seed, no
    checkpoint) trains exactly the retrain that the continuations measure."""
    analysis = tmp_path / "a"
    res = commute(
        *["analyze", run, "--samples", "12", "--blocks", "2", "--seq-len", "32", "-q", "--out", analysis],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    lines = {}
    for target in ("ru", "en", "mix"):
        res = commute("recommend", "--target", target, "--from", analysis, "--start", "0", "--no-verify",
                      "--out", tmp_path / target, cwd=tmp_path)  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert "from scratch" in res.stdout
        found = [x for x in res.stderr.splitlines() if x.startswith("apply with")]
        if found:
            lines[target] = found[0]
    assert lines, "no target had a candidate the bracket favours"
    target, line = next(iter(lines.items()))
    assert "trains from scratch with the run's model config and seed" in line
    cmd = shlex.split(line.split(": ", 1)[1])
    assert "--init" in cmd and cmd[cmd.index("--init") + 1].endswith("config.json")
    done = subprocess.run([COMMUTE, *cmd[1:]], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    start = continuations.load_start(run / "checkpoint-8", 24, lambda _m: None, scratch=True)
    chosen = Schedule.from_records(json.loads((tmp_path / target / "schedule.json").read_text()))
    assert final_losses(tmp_path / cmd[2], 24) == pytest.approx(
        continuations.continue_run(start, chosen, seed=0), abs=2e-6
    )


def test_worker_processes_measure_the_same_arms_as_this_process(run):
    """``run_many`` in two spawned workers (each loads the start itself) gives exactly the in-process
    results, for a checkpoint start and for a retrain from scratch (the workers retrain too)."""
    late = Schedule.from_entries([(0, {"en": 0.75, "ru": 0.25}), (16, {"en": 0.5, "ru": 0.5})])
    original = Schedule.constant({"en": 0.75, "ru": 0.25})
    for scratch in (False, True):
        start = continuations.load_start(run / "checkpoint-8", 24, lambda _m: None, scratch=scratch)
        jobs = [(original, 0), (late, 1)]
        here = [continuations.continue_run(start, s, seed) for s, seed in jobs]
        assert continuations.run_many(start, jobs, workers=2) == here
    assert here[0] == pytest.approx(final_losses(run, 24), abs=2e-6)  # the scratch arm is a retrain
