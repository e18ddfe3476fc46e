"""``commute watch`` on a real Hugging Face ``Trainer`` run: a tiny GPT-2 (dropout on, sdpa attention) on two
generated domains, watched every 8 steps with the Trainer's own TensorBoard integration.

Checked against independent references:
- the watched run's weights are bit-identical (``torch.equal``) to an unwatched run's with the same seed;
- the ``commute/...`` scalars read back from the TensorBoard event file (EventAccumulator) equal the rows of
  ``results.csv`` (float32, as TensorBoard stores them), and the weights are in ``log_history``;
- the rows equal what ``commute analyze`` computes on the checkpoints the Trainer saved at the same steps
  (same sample, options and learning rate; the live model vs its saved copy);
- ``commute recommend`` reads the watched folder.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from commute_cli.commands.options import AnalyzeOptions
from commute_cli.commands.watch import CALIBRATION_STEPS, interval_for_cost, planned_steps
from commute_cli.io import store

from cli_runner import cli
from tiny_run import WORDS, make_texts, make_tokenizer, write_jsonl

WEIGHTS = {"en": 0.7, "xx": 0.3}
SEQ = 16
STEPS, EVERY = 24, 8


class Mixture(torch.utils.data.Dataset):
    """Packed blocks of both domains in the proportions of WEIGHTS (the Trainer shuffles them)."""

    def __init__(self, blocks: dict[str, torch.Tensor], n: int = 400) -> None:
        rows = [blocks[d][: round(n * w)] for d, w in WEIGHTS.items()]
        self.rows = torch.cat(rows)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from commute_cli.io.sampling import pack_blocks

    root = tmp_path_factory.mktemp("watch")
    texts = {d: make_texts(WORDS[d], 300, seed=k) for k, d in enumerate(WEIGHTS)}
    data = {d: str(write_jsonl(root / "data" / f"{d}.jsonl", t)) for d, t in texts.items()}
    tok = make_tokenizer([t for ts in texts.values() for t in ts], root / "tokenizer")
    blocks = {d: pack_blocks(t, tok, SEQ) for d, t in texts.items()}
    return {"root": root, "data": data, "tok": tok, "dataset": Mixture(blocks)}


def _train(setting: dict, out: Path, watch: bool) -> tuple[object, object | None]:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, default_data_collator

    from commute_cli.commands.watch_callback import CommuteCallback

    tok = setting["tok"]
    torch.manual_seed(0)
    # default GPT-2 dropout (0.1) and sdpa attention: the watcher must switch both off and back exactly
    config = GPT2Config(
        vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=5e-3,
        lr_scheduler_type="constant", logging_steps=4, save_strategy="steps", save_steps=EVERY,
        report_to=["tensorboard"] if watch else "none", use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=setting["dataset"], processing_class=tok,
        data_collator=default_data_collator,
    )  # fmt: skip
    callback = None
    if watch:
        opts = AnalyzeOptions(ckpt_dir=out, samples=12, blocks=2, batch_size=4)
        callback = CommuteCallback(
            setting["data"], tok, WEIGHTS, seq_len=SEQ, out=out / "watch", every=EVERY, options=opts
        ).attach(trainer)
    trainer.train()
    return trainer, callback


@pytest.fixture(scope="module")
def runs(setting: dict) -> dict:
    root = setting["root"]
    plain, _ = _train(setting, root / "plain", watch=False)
    watched, callback = _train(setting, root / "watched", watch=True)
    return {"plain": plain, "watched": watched, "callback": callback, "out": root / "watched"}


def test_watching_changes_no_weight(runs: dict) -> None:
    a = runs["plain"].model.state_dict()
    b = runs["watched"].model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs["watched"].model.config._attn_implementation == "sdpa"  # restored after every measurement
    moved = runs["plain"].state.log_history[0]["loss"] != runs["plain"].state.log_history[-2].get("loss")
    assert moved  # the run really trained


def test_scalars_in_tensorboard_equal_results_csv(runs: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = runs["callback"].folder
    analysis = store.load_analysis(folder)
    assert analysis.run["command"] == "watch"
    assert sorted(set(analysis.results["step"])) == [0, 8, 16, 24]
    assert analysis.results["run_id"].nunique() == 1
    events = list(runs["out"].rglob("events.out.tfevents*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    compared = 0
    for _, row in analysis.results.iterrows():
        if row["step"] == 0:  # the Trainer logs nothing at step 0: results.csv only
            continue
        key = f"commute/{row['target']}/{row['domain_i']}-{row['domain_j']}"
        for suffix, column in (("el", "el_ij"), ("el_se", "el_se"), ("t", "t")):
            tag = f"train/{key}/{suffix}"  # the Trainer's reporters prefix training logs with train/
            assert tag in tags
            by_step = {e.step: e.value for e in acc.Scalars(tag)}
            assert by_step[int(row["step"])] == np.float32(row[column])
            compared += 1
    assert compared == 3 * 3 * 3  # targets en, xx, mix x steps 8, 16, 24 x three columns
    losses = analysis.losses
    for step in (8, 16, 24):
        entry = next(h for h in runs["watched"].state.log_history if h.get("step") == step and "loss" in h)
        for d, w in WEIGHTS.items():
            assert entry[f"commute/weight/{d}"] == w
            want = losses[(losses["step"] == step) & (losses["domain"] == d)]["loss"].item()
            assert math.isclose(entry[f"commute/loss/{d}"], want, rel_tol=1e-12)


def test_rows_equal_analyze_on_the_saved_checkpoints(runs: dict, setting: dict, capsys) -> None:
    out = runs["out"]
    data = setting["data"]
    code, _, err = cli(
        ["analyze", out, "--domains", f"en={data['en']}", f"xx={data['xx']}", "--weights", "en=0.7", "xx=0.3",
         "--samples", 12, "--blocks", 2, "--batch-size", 4, "--seq-len", SEQ, "--tokenizer",
         setting["root"] / "tokenizer", "--out", setting["root"] / "analysed", "-q"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    analysed = store.load_analysis(setting["root"] / "analysed").results.set_index(
        ["step", "target", "domain_i", "domain_j"]
    )
    watched = store.load_analysis(runs["callback"].folder).results
    watched = watched[watched["step"] > 0].set_index(["step", "target", "domain_i", "domain_j"])
    assert sorted(analysed.index) == sorted(watched.index)
    for column in ("el_ij", "el_se", "bracket", "horizon", "first_order"):
        a, w = analysed.loc[watched.index, column].to_numpy(float), watched[column].to_numpy(float)
        np.testing.assert_allclose(w, a, rtol=1e-6, atol=1e-12, err_msg=column)
    assert list(watched["verdict"]) == list(analysed.loc[watched.index, "verdict"])


def test_recommend_and_plot_read_the_watched_folder(runs: dict, capsys, tmp_path: Path) -> None:
    folder = runs["callback"].folder
    run_id = store.load_analysis(folder).run_id[:8]
    for target in ("en", "mix"):
        argv = [
            "recommend",
            "--from",
            folder,
            "--target",
            target,
            "--kind",
            "local",
            "--out",
            tmp_path / target,
        ]
        code, out, err = cli(argv, capsys)
        assert code == 0, err
        assert f"run {run_id}" in out + err
    argv = ["recommend", "--from", folder, "--target", "en", "--no-verify", "--out", tmp_path / "phases"]
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    assert (tmp_path / "phases" / "recommend.json").is_file()  # ranked from the watched rows
    code, _, err = cli(["plot", "--from", folder, "-o", tmp_path / "watched.png"], capsys)
    assert code == 0, err
    assert (tmp_path / "watched.png").stat().st_size > 10_000
    assert "checkpoint 8" in out + err  # the Trainer's checkpoint-8/ (run.json's checkpoint folder)


def test_default_interval_from_the_cost_target(setting: dict, tmp_path: Path, capsys) -> None:
    """No ``every``: step 0 is measured and timed, then the first training steps, and the interval follows
    from the cost target (0.5 here, so that it falls inside a short run); the step-0 rows wait for it."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, default_data_collator

    from commute_cli.commands.watch_callback import CommuteCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(setting["tok"]), n_positions=32, n_embd=16, n_layer=1,
                                       n_head=2, bos_token_id=0, eos_token_id=0))  # fmt: skip
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=5e-3,
        lr_scheduler_type="constant", logging_steps=100, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=setting["dataset"], data_collator=default_data_collator
    )
    opts = AnalyzeOptions(ckpt_dir=tmp_path / "run", samples=12, blocks=2, batch_size=4)
    cb = CommuteCallback(setting["data"], setting["tok"], WEIGHTS, seq_len=SEQ, out=tmp_path / "w", cost=0.5,
                         options=opts).attach(trainer)  # fmt: skip
    trainer.train()
    w = cb.watcher
    assert w.every == interval_for_cost(cb._first_measure_s or 0.0, w.step_seconds or 1.0, 0.5)
    assert "measuring every" in capsys.readouterr().err
    results = store.load_analysis(cb.folder).results
    measured = sorted(set(results["step"]))
    calibrated = CALIBRATION_STEPS + 1  # the first step warms up, the next ones are timed
    assert measured == [s for s in planned_steps(w.every, STEPS) if s == 0 or s >= calibrated]
    assert set(results[results["step"] == 0]["horizon"]) == {max(1, w.every // 2)}
    assert 0 < cb.seconds < trainer.state.log_history[-1]["train_runtime"]


def test_warmup_from_zero_times_a_real_measurement(setting: dict, tmp_path: Path) -> None:
    """With a warmup the rate at step 0 is 0: no row there (as analyze skips it), and the interval is set
    from a measurement that ran (at the end of the calibration steps), not from the skip."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, default_data_collator

    from commute_cli.commands.watch_callback import CommuteCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(setting["tok"]), n_positions=32, n_embd=16, n_layer=1,
                                       n_head=2, bos_token_id=0, eos_token_id=0))  # fmt: skip
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=8, learning_rate=5e-3,
        warmup_steps=4, logging_steps=100, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        disable_tqdm=True,
    )  # fmt: skip
    data, collate = setting["dataset"], default_data_collator
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    opts = AnalyzeOptions(ckpt_dir=tmp_path / "run", samples=12, blocks=2, batch_size=4)
    cb = CommuteCallback(setting["data"], setting["tok"], WEIGHTS, seq_len=SEQ, out=tmp_path / "w", cost=0.01,
                         options=opts).attach(trainer)  # fmt: skip
    trainer.train()
    w = cb.watcher
    assert cb._first_measure_s is not None and cb._first_measure_s > 0.01  # a measurement, not a skip
    assert w.every == interval_for_cost(cb._first_measure_s, w.step_seconds or 1.0, 0.01)
    analysis = store.load_analysis(cb.folder)
    assert 0 not in set(analysis.results["step"])
    assert CALIBRATION_STEPS + 1 in set(analysis.results["step"])  # the timed measurement has its rows
    assert [c["step"] for c in analysis.run["skipped_checkpoints"]] == [0]


def test_a_resumed_trainer_keeps_the_earlier_rows(runs: dict, setting: dict, tmp_path: Path) -> None:
    """Resume the watched run from its checkpoint-16 with the folder it left: rows of steps 0 and 8 are
    kept, 16 and 24 measured again, and all equal the uninterrupted run's."""
    import shutil

    from transformers import GPT2LMHeadModel, Trainer, TrainingArguments, default_data_collator

    from commute_cli.commands.watch_callback import CommuteCallback

    full = store.load_analysis(runs["callback"].folder)
    shutil.copytree(runs["callback"].folder, tmp_path / "watch")
    shutil.copytree(runs["out"] / "checkpoint-16", tmp_path / "checkpoint-16")
    model = GPT2LMHeadModel.from_pretrained(str(tmp_path / "checkpoint-16"))
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=5e-3,
        lr_scheduler_type="constant", logging_steps=4, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, disable_tqdm=True,
    )  # fmt: skip
    data, collate = setting["dataset"], default_data_collator
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    opts = AnalyzeOptions(ckpt_dir=runs["out"], samples=12, blocks=2, batch_size=4)
    cb = CommuteCallback(setting["data"], setting["tok"], WEIGHTS, seq_len=SEQ, out=tmp_path / "watch",
                         every=EVERY, options=opts).attach(trainer)  # fmt: skip
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-16"))
    resumed = store.load_analysis(cb.folder)
    assert cb.folder == tmp_path / "watch"  # the same run: the same folder
    assert [c["step"] for c in resumed.run["checkpoints"]] == [0, 8, 16, 24]
    keys = ["step", "target", "domain_i", "domain_j"]
    a, b = resumed.results.set_index(keys).sort_index(), full.results.set_index(keys).sort_index()
    assert list(a.index) == list(b.index)
    np.testing.assert_array_equal(a["el_ij"].to_numpy(float), b["el_ij"].to_numpy(float))


def test_interval_from_cost() -> None:
    # one measurement = 30 steps: at 1% every 3000 steps; above 100 steps two significant digits, rounded up
    assert interval_for_cost(3.0, 0.1, 0.01) == 3000
    assert interval_for_cost(2.378, 0.1, 0.01) == 2400
    assert interval_for_cost(0.372, 0.1, 0.01) == 380
    assert interval_for_cost(0.0372, 0.1, 0.01) == 38
    assert interval_for_cost(0.001, 1.0, 0.01) == 1
    assert interval_for_cost(1.0, 1.0, 0.5) == 2
    for measure, step in ((0.7, 0.013), (5.0, 0.27), (0.05, 0.05)):
        every = interval_for_cost(measure, step, 0.01)
        assert measure / (every * step) <= 0.01 + 1e-12  # at or under the target
        assert measure / (every * step) > 0.01 * 0.9 or every <= 100  # and not far under it
    with pytest.raises(ValueError):
        interval_for_cost(1.0, 0.0)
    assert planned_steps(8, 24) == [0, 8, 16, 24]
    assert planned_steps(8, 30, start=10) == [16, 24]
