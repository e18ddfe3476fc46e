"""``commute train --watch N``: the criterion every N steps on the live model of commute's own trainer.

Checked against independent references: the weights equal an unwatched run's bit for bit; the rows equal
``commute analyze`` on the checkpoints the run saved at the same steps (same held-out data, sample and
options); the values in the checkpoint's ``log_history`` equal ``results.csv``; ``recommend`` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from commute_cli.cli import main
from commute_cli.io import store

from cli_runner import cli
from tiny_run import sample_shards

TOKENIZER = Path(__file__).resolve().parent.parent / "sample_checkpoints" / "tokenizer"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = sample_shards(tmp_path_factory.mktemp("data"), 20_000, 12_000, 3000)
    (root / "tiny.json").write_text(json.dumps({"n_layer": 1, "n_embd": 16, "n_head": 2}))
    pytest.MonkeyPatch().setenv("OMP_NUM_THREADS", "1")
    return {"data": root}


def _train(data: Path, out: Path, *extra: str) -> None:
    argv = [
        "train", out, "--domains", f"en={data}/en/train.jsonl", f"ru={data}/ru/train.jsonl",
        "--eval-domains", f"en={data}/en/validation.jsonl", f"ru={data}/ru/validation.jsonl",
        "--tokenizer", TOKENIZER, "--weights", "en=0.75", "ru=0.25", "--steps", 8, "--save-every", 4,
        "--batch-size", 8, "--seq-len", 32, "--lr", 3e-3, "--init", data / "tiny.json", "-q", *extra,
    ]  # fmt: skip
    main([str(a) for a in argv])  # SystemExit on an error: the fixture fails with its message


@pytest.fixture(scope="module")
def trained(runs: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run twice, unwatched (plain/) and with --watch 4 (watched/)."""
    root = tmp_path_factory.mktemp("train")
    for name, extra in (("plain", ()), ("watched", ("--watch", "4"))):
        _train(runs["data"], root / name, *extra)
    return root


def test_watching_changes_no_weight(trained: Path) -> None:
    a = load_file(str(trained / "plain" / "checkpoint-8" / "model.safetensors"))
    b = load_file(str(trained / "watched" / "checkpoint-8" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_trainers_log_has_the_rows_and_weights(trained: Path) -> None:
    watched = store.load_analysis(trained / "watched" / "watch")
    assert sorted(set(watched.results["step"])) == [0, 4, 8]
    assert watched.run["command"] == "watch" and watched.run["watch"]["every"] == 4
    history = json.loads((trained / "watched" / "checkpoint-8" / "trainer_state.json").read_text())
    logged = {h["step"]: h for h in history["log_history"] if "commute/weight/en" in h}
    assert sorted(logged) == [0, 4, 8]
    for _, row in watched.results.iterrows():
        entry = logged[int(row["step"])]
        assert entry[f"commute/{row['target']}/{row['domain_i']}-{row['domain_j']}/el"] == row["el_ij"]
        assert entry["commute/weight/en"] == 0.75 and entry["commute/weight/ru"] == 0.25


def test_rows_equal_analyze_on_the_saved_checkpoints(trained: Path, tmp_path: Path, capsys) -> None:
    """analyze with its defaults on the run folder (the manifest's held-out domains): the same rows."""
    code, _, err = cli(["analyze", trained / "watched", "--out", tmp_path / "analysed", "-q"], capsys)
    assert code == 0, err
    keys = ["step", "target", "domain_i", "domain_j"]
    analysed = store.load_analysis(tmp_path / "analysed").results.set_index(keys)
    watched = store.load_analysis(trained / "watched" / "watch").results
    live = watched[watched["step"] > 0].set_index(keys)
    assert sorted(analysed.index) == sorted(live.index)
    for column in ("el_ij", "el_se", "bracket", "horizon", "first_order"):
        want = analysed.loc[live.index, column].to_numpy(float)
        np.testing.assert_allclose(live[column].to_numpy(float), want, rtol=1e-6, atol=1e-12, err_msg=column)


def test_recommend_reads_the_watch_folder(trained: Path, tmp_path: Path, capsys) -> None:
    folder = trained / "watched" / "watch"
    argv = ["recommend", "--from", folder, "--target", "mix", "--kind", "local", "--out", tmp_path / "advice"]
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    assert f"run {store.load_analysis(folder).run_id[:8]}" in out + err


def test_train_refuses_a_zero_interval(runs: dict, tmp_path: Path, capsys) -> None:
    argv = ["train", tmp_path / "out", "--domains", "a=x.jsonl", "b=y.jsonl", "--watch", 0]
    code, _, err = cli(argv, capsys)
    assert code == 2 and "--watch must be at least 1" in err
