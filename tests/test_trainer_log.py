"""The schedule a run realised, read from a Hugging Face Trainer's ``trainer_state.json``: ``log_history``
entries with ``commute/weight/<domain>`` keys (the contract with the ``commute watch`` callback), so that
``analyze`` needs no ``--weights`` for such a run.

- The log's rules (``io.trainer_log``) on hand-written histories against hand-built schedules: the first
  logged weights count from step 0, a step logged twice keeps its later entry, unchanged weights add no
  entry, rounded logs are divided by their sum, a log for other domains or without steps is refused.
- The precedence on real files: ``--weights`` > the manifest > the trainer's log > nothing.
- ``commute analyze`` on a Trainer-like folder (checkpoints with ``trainer_state.json``, no commute.json):
  the rows of results.csv carry the logged weights of their step, run.json names where they came from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from commute_cli.core.schedule import Schedule
from commute_cli.errors import CommuteError
from commute_cli.io.run_inputs import resolve_run_inputs
from commute_cli.io.trainer_log import read_logged_schedule, schedule_from_log

from cli_runner import cli
from tiny_run import make_run


def weights(step: int, en: float, xx: float, **extra: float) -> dict:
    return {"step": step, "commute/weight/en": en, "commute/weight/xx": xx, **extra}


LOG = [
    {"step": 5, "loss": 4.1, "learning_rate": 0.05},
    weights(5, 0.7, 0.3),
    weights(8, 0.7, 0.3),  # unchanged: no new entry
    {"step": 10, "eval_loss": 3.9},
    weights(12, 0.6, 0.4),
    weights(12, 0.5, 0.5),  # the same step logged again (a resumed run): the later entry wins
    weights(16, 0.3333, 0.6666),  # rounded in the log: divided by its sum
]


def test_the_logged_weights_make_a_piecewise_schedule():
    sched, first, last = schedule_from_log(LOG, ["en", "xx"], "log")
    assert (first, last) == (5, 16)
    expected = Schedule.from_entries(
        [(0, {"en": 0.7, "xx": 0.3}), (12, {"en": 0.5, "xx": 0.5}), (16, {"en": 1 / 3, "xx": 2 / 3})]
    )
    assert sched.steps == expected.steps
    for got, want in zip(sched.values, expected.values, strict=True):
        assert got == pytest.approx(want, abs=1e-12)
    assert schedule_from_log([{"step": 3, "loss": 1.0}], ["en", "xx"]) is None


def test_a_log_that_does_not_fit_is_refused():
    with pytest.raises(CommuteError, match="unknown domain ru"):
        schedule_from_log([{"step": 0, "commute/weight/en": 0.5, "commute/weight/ru": 0.5}], ["en", "xx"])
    with pytest.raises(CommuteError, match="no weight for domain xx"):
        schedule_from_log([{"step": 0, "commute/weight/en": 1.0}], ["en", "xx"])
    with pytest.raises(CommuteError, match="has domain weights but no step"):
        schedule_from_log([{"commute/weight/en": 0.5, "commute/weight/xx": 0.5}], ["en", "xx"])
    with pytest.raises(CommuteError, match=r"weights sum to 0\.9"):
        schedule_from_log([weights(0, 0.6, 0.3)], ["en", "xx"])


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory) -> Path:
    """A Trainer-like folder: checkpoint-{0,10,20} (SGD on en 0.7, xx 0.3 by tiny_run), no commute.json;
    the last checkpoint's trainer_state.json logs the weights, changed to 0.5/0.5 at step 12 (the log, not
    the training, is what analyze reads: the test checks which weights it evaluates at). The file is written
    by transformers' own ``TrainerState.save_to_json``, as the Trainer saves it."""
    from transformers import TrainerState

    run = make_run(tmp_path_factory.mktemp("hf") / "run", steps=(0, 10, 20))
    (run / "commute.json").unlink()
    state_file = run / "checkpoint-20" / "trainer_state.json"
    state = TrainerState.load_from_json(str(state_file))
    state.log_history = [weights(5, 0.7, 0.3), weights(12, 0.5, 0.5), *state.log_history]
    state.save_to_json(str(state_file))
    return run


def test_precedence_weights_then_manifest_then_the_trainer_log(hf_run, tmp_path):
    logs = [hf_run, hf_run / "checkpoint-20"]
    doms = {"en": str(hf_run / "data" / "en.jsonl"), "xx": str(hf_run / "data" / "xx.jsonl")}
    notes: list[str] = []
    got = resolve_run_inputs(hf_run / "checkpoint-0", domains=doms, trainer_logs=logs, note=notes.append)
    assert got.schedule_logged and got.schedule is not None and got.schedule.steps == (0, 12)
    assert got.schedule_from.startswith(str(hf_run / "checkpoint-20" / "trainer_state.json"))
    assert any("first at step 5; they are taken as the weights from step 0" in n for n in notes)
    flag = resolve_run_inputs(
        hf_run / "checkpoint-0", domains=doms, trainer_logs=logs, weights="en=0.9 xx=0.1"
    )
    assert flag.schedule_from == "--weights" and flag.schedule == Schedule.constant({"en": 0.9, "xx": 0.1})
    # a manifest beside the checkpoints wins over the log
    other = tmp_path / "with-manifest"
    shutil.copytree(hf_run, other)
    manifest = {"format": "commute-manifest/1", "domains": {"en": "data/en.jsonl", "xx": "data/xx.jsonl"}}
    manifest["schedule"] = [{"step": 0, "weights": {"en": 0.8, "xx": 0.2}}]
    (other / "commute.json").write_text(json.dumps(manifest))
    got = resolve_run_inputs(other / "checkpoint-0", trainer_logs=[other, other / "checkpoint-20"])
    assert got.schedule == Schedule.constant({"en": 0.8, "xx": 0.2}) and not got.schedule_logged
    assert got.schedule_from == str(other / "commute.json")
    # none of them: no schedule (analyze then asks for --weights)
    bare = resolve_run_inputs(hf_run / "checkpoint-0", domains=doms, trainer_logs=[hf_run / "checkpoint-10"])
    assert bare.schedule is None and bare.schedule_from == "none"
    # of two logs the one that reaches further wins
    assert read_logged_schedule(logs[::-1], ["en", "xx"]).last_logged == 12


def test_analyze_reads_the_trainers_log_and_says_so(hf_run, tmp_path, capsys):
    d = hf_run / "data"
    argv = ["analyze", hf_run, "--domains", f"en={d}/en.jsonl", f"xx={d}/xx.jsonl"]
    argv += ["--tokenizer", hf_run / "tokenizer", "--steps", "10,20", "--out", tmp_path / "a"]
    code, _, err = cli([*argv, "--samples", "24", "--blocks", "4", "--quiet"], capsys)
    assert code == 0, err
    log_file = hf_run / "checkpoint-20" / "trainer_state.json"
    assert (
        f"the run's schedule (en=0.7 xx=0.3 from step 0, en=0.5 xx=0.5 from step 12) read from {log_file}"
        in err
    )
    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["schedule_from"].startswith(str(log_file))
    assert Schedule.from_records(run["schedule"]).steps == (0, 12)
    rows = pd.read_csv(tmp_path / "a" / "results.csv")
    w_en = {int(s): float(w) for s, w in rows[rows.domain_i == "en"][["step", "w_i"]].itertuples(index=False)}
    assert w_en == {10: pytest.approx(0.7), 20: pytest.approx(0.5)}


def test_without_any_schedule_analyze_says_how_to_give_one(hf_run, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(hf_run, bare)
    state_file = bare / "checkpoint-20" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"] = [h for h in state["log_history"] if not any(k.startswith("commute/") for k in h)]
    state_file.write_text(json.dumps(state))
    d = bare / "data"
    argv = [
        "analyze",
        bare,
        "--domains",
        f"en={d}/en.jsonl",
        f"xx={d}/xx.jsonl",
        "--tokenizer",
        bare / "tokenizer",
    ]
    code, _, err = cli([*argv, "--dry-run"], capsys)
    assert code == 2 and err.startswith("error: no weight schedule") and len(err.strip().splitlines()) == 1
    assert "--weights en=0.5 xx=0.5" in err and "commute/weight/<domain>" in err
