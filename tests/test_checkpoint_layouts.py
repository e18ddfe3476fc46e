"""Checkpoint folders as trainers leave them: links and extra entries, foreign JSON, DeepSpeed/ZeRO-3,
LoRA adapters, torch.compile prefixes, Megatron-LM, and checkpoints without a tokenizer."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints as ck

from cli_runner import cli
from tiny_run import make_run

FAST = ["--samples", "12", "--blocks", "2", "--target", "mix", "-q"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run", steps=(0, 10), n_docs=120)


def _flags(run: Path) -> list:
    return [
        "--domains", f"en={run / 'data' / 'en.jsonl'}", f"xx={run / 'data' / 'xx.jsonl'}",
        "--weights", "en=0.7", "xx=0.3", "--tokenizer", run / "tokenizer",
    ]  # fmt: skip


def _one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_links_aliases_and_copies_are_one_checkpoint(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, symlinks=True)
    (run / "best").symlink_to("checkpoint-10", target_is_directory=True)  # Trainer-style extra entries
    (run / "last").symlink_to(run / "checkpoint-10", target_is_directory=True)
    (run / "latest").write_text("global_step10")  # DeepSpeed's pointer file
    torch.save({"x": torch.zeros(1)}, run / "model_3.pt")  # a stray .pt beside a Trainer run: not read
    shutil.copytree(run / "checkpoint-0", run / "copy-of-first")  # a copy: same step, no step in its name
    elsewhere = tmp_path / "moved" / "final"
    shutil.copytree(run / "checkpoint-10", elsewhere)
    shutil.rmtree(run / "checkpoint-10")
    (run / "checkpoint-10").symlink_to(elsewhere, target_is_directory=True)  # the checkpoint itself a link
    refs = ck.discover(run)
    assert [(r.step, r.name) for r in refs] == [(0, "checkpoint-0"), (10, "checkpoint-10")]
    code, _, err = cli(["analyze", run, "--out", tmp_path / "out", *FAST], capsys)
    assert code == 0, err
    assert sorted(set(pd.read_csv(tmp_path / "out" / "results.csv")["step"])) == [0, 10]


def test_foreign_json_beside_the_checkpoints_does_not_stop_explicit_flags(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "commute.json").write_text(json.dumps({"project": "other tool", "lr": [1, 2]}))
    (run / "all_results.json").write_text("[1, 2, 3]")
    assert ck.read_manifest(run) is None
    code, _, err = cli(["analyze", run, "--out", tmp_path / "out", *_flags(run), *FAST], capsys)
    assert code == 0, err
    (run / "commute.json").write_text("not json at all {")
    assert ck.read_manifest(run) is None
    (run / "commute.json").write_text(json.dumps({"format": "commute-manifest/9"}))
    with pytest.raises(CommuteError, match="commute-manifest/9"):
        ck.read_manifest(run)  # ours, but from another version: refused, not ignored


def _zero3(folder: Path) -> None:
    names = list(load_file(folder / "model.safetensors"))
    placeholders = {k: torch.empty(0, dtype=torch.bfloat16) for k in names}
    save_file(placeholders, folder / "model.safetensors", metadata={"format": "pt"})
    step = folder.name.split("-")[1]
    (folder / f"global_step{step}").mkdir()
    torch.save(
        {"module": {k: torch.empty(0) for k in names}},
        folder / f"global_step{step}" / "mp_rank_00_model_states.pt",
    )


def test_zero3_placeholders_refused_in_the_preflight(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    _zero3(run / "checkpoint-10")
    (run / "data" / "en.jsonl").write_text('{"content": "no text field: tokenizing would fail"}\n')
    code, _, err = cli(["analyze", run, "--out", tmp_path / "out", *FAST], capsys)
    line = _one_line_error(code, err)
    assert "checkpoint-10/model.safetensors" in line and "0-element" in line
    assert "transformer.h.0.attn.c_attn" in line and "zero_to_fp32.py" in line
    assert not (tmp_path / "out" / "cache").exists()  # refused before any data was read


def test_deepspeed_folders_without_weights_refused(tmp_path):
    run = tmp_path / "ds"
    (run / "global_step20").mkdir(parents=True)
    torch.save({"module": {}}, run / "global_step20" / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    (run / "latest").write_text("global_step20")
    with pytest.raises(CommuteError, match=r"zero_to_fp32\.py") as err:
        ck.discover(run)
    assert "global_step20" in err.value.one_line()


def test_lora_adapter_refused_with_the_merge_step(tmp_path):
    for step in (5, 10):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        config = {
            "peft_type": "LORA",
            "base_model_name_or_path": "gpt2",
            "r": 4,
            "target_modules": ["c_attn"],
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
        save_file({key: torch.zeros(4, 16)}, folder / "adapter_model.safetensors")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoint-5"):
        with pytest.raises(CommuteError, match="merge_and_unload") as err:
            ck.discover(path)
        assert "LoRA/PEFT adapter" in err.value.one_line() and "gpt2" in err.value.one_line()


def test_torch_compile_prefixes_stripped(run_dir, tmp_path):
    src = run_dir / "checkpoint-10"
    folder = tmp_path / "compiled" / "step-10"
    shutil.copytree(src, folder)
    tensors = load_file(src / "model.safetensors")
    save_file(
        {f"_orig_mod.{k}": v for k, v in tensors.items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    want = ck.load_model(src)(input_ids=ids).logits
    got_model = ck.load_model(ck.discover(folder.parent)[0])
    assert torch.equal(got_model(input_ids=ids).logits, want)
    assert got_model.lm_head.weight is got_model.transformer.wte.weight and not got_model.training


def test_megatron_checkpoint_read_safely_and_incomplete_args_refused(tmp_path):
    """The Namespace that plain weights_only refuses is read through the allowlist (tests/test_megatron.py
    has the full layouts); args that lack what GPT-2 needs are one line naming the field."""
    file = tmp_path / "megatron" / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt"
    file.parent.mkdir(parents=True)
    args = argparse.Namespace(
        num_layers=1, hidden_size=16, num_attention_heads=2, tokenizer_type="GPT2BPETokenizer"
    )
    word = torch.zeros(64, 16)
    model = {"language_model": {"embedding": {"word_embeddings": {"weight": word}}, "encoder": {}}}
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 100, "model": model}, file)
    (tmp_path / "megatron" / "latest_checkpointed_iteration.txt").write_text("100")
    with pytest.raises(Exception, match="Namespace"):  # why a plain weights_only read is not possible
        torch.load(file, weights_only=True)
    for path in (tmp_path / "megatron", tmp_path / "megatron" / "iter_0000100"):
        (ref,) = ck.discover(path)
        assert (ref.step, ref.name) == (100, "iter_0000100")
        with pytest.raises(CommuteError, match="max_position_embeddings") as err:
            ck.load_model(ref)
        assert len(err.value.one_line().splitlines()) == 1


def test_checkpoint_without_tokenizer_refused(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "commute.json").unlink()
    for folder in run.glob("checkpoint-*"):
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
    flags = [a for a in _flags(run) if a not in ("--tokenizer", run / "tokenizer")]
    code, _, err = cli(["analyze", run, "--out", tmp_path / "out", *flags, *FAST], capsys)
    line = _one_line_error(code, err)
    assert "checkpoint-0 has no tokenizer files" in line and "--tokenizer" in line
    code, _, err = cli(["analyze", run, "--out", tmp_path / "out", *_flags(run), *FAST], capsys)
    assert code == 0, err  # the same run with --tokenizer


def test_empty_tokenizer_refused(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    empty = Tokenizer(models.BPE(vocab={"<|endoftext|>": 0}, merges=[]))
    PreTrainedTokenizerFast(tokenizer_object=empty, eos_token="<|endoftext|>").save_pretrained(
        tmp_path / "tok"
    )
    with pytest.raises(CommuteError, match="maps text to no ordinary tokens"):
        ck.load_tokenizer(tmp_path / "tok")
    with pytest.raises(CommuteError, match="neither a local path nor in the local Hugging Face cache"):
        ck.load_tokenizer("surely-not-cached-tokenizer-xyz")


def test_a_few_empty_tensors_are_a_damaged_file_not_zero3(tmp_path):
    """One emptied tensor among many, with no DeepSpeed shards beside it: the file is damaged; the ZeRO-3
    diagnosis (and its zero_to_fp32.py hint) is kept for saves whose tensors are (mostly) placeholders."""
    from safetensors.torch import load_file, save_file

    src = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "checkpoint-500"
    ckpt = tmp_path / "checkpoint-500"
    shutil.copytree(src, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = torch.empty(0, dtype=tensors[name].dtype)
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CommuteError, match="incomplete or damaged") as err:
        ck.validate_weights(ckpt)
    assert "zero_to_fp32" not in err.value.one_line() and name in err.value.one_line()
