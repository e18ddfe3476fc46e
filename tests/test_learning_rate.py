"""The learning rate of a checkpoint from every place a trainer records it, against the rate actually used.

A real torch AdamW is driven by transformers' own cosine-with-warmup schedule; the rate of every update is
recorded as it happens (``param_groups[0]["lr"]`` just before ``optimizer.step()``). The rate a checkpoint
after update ``s`` must report is the one update ``s + 1`` used.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import GPT2LMHeadModel, get_cosine_schedule_with_warmup

from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints as ck
from commute_cli.io.learning_rate import find_learning_rate

from cli_runner import cli
from tiny_run import make_run, tiny_config

SAVE = (3, 6, 12)


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory):
    """12 AdamW updates under warmup 4 + cosine to 0 at 12; checkpoint folders at SAVE, Trainer layout."""
    root = tmp_path_factory.mktemp("cosine")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config(50, n_positions=16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=4, num_training_steps=12)
    used: list[float] = []  # used[k] = the rate of update k + 1
    log = []
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    for step in range(1, 13):
        used.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        if step % 4 == 0:  # logging every 4 steps (transformers 4.x: the rate after the scheduler step)
            log.append({"step": step, "learning_rate": sched.get_last_lr()[0], "loss": 1.0})
        if step in SAVE:
            folder = root / f"checkpoint-{step}"
            model.save_pretrained(folder)
            torch.save(sched.state_dict(), folder / "scheduler.pt")
            torch.save(opt.state_dict(), folder / "optimizer.pt")
            state = {"global_step": step, "max_steps": 12, "log_history": list(log)}
            (folder / "trainer_state.json").write_text(json.dumps(state))
    used.append(opt.param_groups[0]["lr"])
    return root, used


def _without(folder: Path, *names: str, tmp: Path) -> Path:
    copy = tmp / folder.name
    shutil.copytree(folder, copy)
    for name in names:
        (copy / name).unlink()
    return copy


def test_each_source_gives_the_rate_of_the_next_update(cosine_run, tmp_path):
    root, used = cosine_run
    refs = {r.step: r for r in ck.discover(root)}
    assert sorted(refs) == list(SAVE)
    for s in SAVE:
        lr = find_learning_rate(refs[s])
        assert (lr.source, lr.step) == ("scheduler.pt _last_lr", s)
        assert lr.value == pytest.approx(used[s], rel=1e-12, abs=1e-18)
    assert used[3] > 0 and 0 < used[6] < used[4]  # warmup ended at 4, cosine decaying
    assert find_learning_rate(refs[12]).is_zero  # cosine to 0 at the last step

    # optimizer.pt alone (no scheduler.pt; checkpoint-6 has no log entry at its own step)
    folder = _without(root / "checkpoint-6", "scheduler.pt", tmp=tmp_path / "a")
    lr = find_learning_rate(ck.discover(folder)[0])
    assert lr.source == "optimizer.pt param_groups" and lr.value == pytest.approx(used[6], rel=1e-12)

    # the log alone: the nearest entry before the step, with the step it was logged at
    folder = _without(root / "checkpoint-6", "scheduler.pt", "optimizer.pt", tmp=tmp_path / "b")
    lr = find_learning_rate(ck.discover(folder)[0])
    assert (lr.source, lr.step) == ("trainer_state.json log_history", 4)
    assert lr.value == pytest.approx(used[4], rel=1e-12) and lr.value != pytest.approx(used[6])
    assert "step 4" in lr.describe()

    # a log entry at the checkpoint's own step beats optimizer.pt
    folder = _without(root / "checkpoint-12", "scheduler.pt", tmp=tmp_path / "c")
    lr = find_learning_rate(ck.discover(folder)[0])
    assert (lr.source, lr.step, lr.value) == ("trainer_state.json log_history", 12, 0.0)

    # --lr overrides every record; nothing recorded gives None
    assert find_learning_rate(refs[6], override=5e-4).as_dict() == {
        "value": 5e-4,
        "source": "--lr",
        "logged_at_step": None,
    }
    bare = _without(
        root / "checkpoint-3", "scheduler.pt", "optimizer.pt", "trainer_state.json", tmp=tmp_path / "d"
    )
    assert find_learning_rate(ck.CheckpointRef(bare, 3, bare.name)).value is None


def test_negative_recorded_rate_refused(tmp_path):
    folder = tmp_path / "checkpoint-4"
    GPT2LMHeadModel(tiny_config(20, n_positions=8)).save_pretrained(folder)
    (folder / "trainer_state.json").write_text(
        json.dumps({"global_step": 4, "log_history": [{"step": 4, "learning_rate": -1e-3}]})
    )
    with pytest.raises(CommuteError, match=r"-0\.001"):
        find_learning_rate(ck.discover(folder)[0])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run", steps=(0, 10), n_docs=120)


def _zero_scheduler(folder: Path) -> None:
    """scheduler.pt of a real linear decay to 0 at this checkpoint's step."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (10 - s) / 10))
    for _ in range(10):
        opt.step()
        sched.step()
    assert sched.get_last_lr() == [0.0]
    torch.save(sched.state_dict(), folder / "scheduler.pt")


FAST = ["--samples", "12", "--blocks", "2", "--target", "mix", "-q"]


def test_zero_lr_checkpoint_skipped_with_a_note(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    _zero_scheduler(run / "checkpoint-10")
    code, _, err = cli(["analyze", run, "--out", tmp_path / "out", *FAST], capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: skipping checkpoint-10")]
    assert len(notes) == 1 and "lr = 0" in notes[0] and "scheduler.pt" in notes[0]
    results = pd.read_csv(tmp_path / "out" / "results.csv")
    assert sorted(set(results["step"])) == [0] and (results["lr"] > 0).all()
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [s["name"] for s in run_json["skipped_checkpoints"]] == ["checkpoint-10"]
    assert run_json["checkpoints"][0]["lr_source"] == {
        "value": 0.05,
        "source": "trainer_state.json log_history",
        "logged_at_step": 0,
    }
    # --lr replaces the records: both checkpoints are rows again
    code, _, err = cli(["analyze", run, "--out", tmp_path / "o2", "--lr", "0.05", *FAST], capsys)
    assert code == 0, err
    assert sorted(set(pd.read_csv(tmp_path / "o2" / "results.csv")["step"])) == [0, 10]
    # every checkpoint at lr 0: nothing to predict, one line, exit 2
    code, _, err = cli(["analyze", run / "checkpoint-10", "--out", tmp_path / "o3", *FAST], capsys)
    assert (
        code == 2 and "learning rate is 0 at every checkpoint" in err and len(err.strip().splitlines()) == 1
    )


def test_scheduler_pickle_payload_never_runs(cosine_run, tmp_path):
    root, used = cosine_run
    folder = _without(root / "checkpoint-6", "scheduler.pt", tmp=tmp_path / "a")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    torch.save({"_last_lr": [1.0], "payload": Evil()}, folder / "scheduler.pt")
    lr = find_learning_rate(ck.discover(folder)[0])  # refused by weights_only: the next record is used
    assert lr.source == "optimizer.pt param_groups" and lr.value == pytest.approx(used[6], rel=1e-12)
    assert not marker.exists()
