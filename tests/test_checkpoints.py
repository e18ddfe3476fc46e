"""checkpoints.py on real checkpoints: a real HF Trainer run, save_pretrained layouts, real optimizers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints as ck

VOCAB = 300


def tiny_config(**overrides) -> GPT2Config:
    kw = dict(
        n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    kw.update(overrides)
    return GPT2Config(**kw)


def tiny_model(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_config(**overrides))


def save_ckpt(model, folder: Path, step: int | None = None, lrs: dict[int, float] | None = None) -> Path:
    model.save_pretrained(folder)
    if step is not None:
        log = [{"step": s, "learning_rate": lr, "loss": 1.0} for s, lr in sorted((lrs or {}).items())]
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": log}))
    return folder


def step_adam(model, opt, n: int = 2) -> None:
    """A couple of real AdamW steps on the LM loss so every exp_avg_sq is non-trivial and distinct."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (4, 12), generator=gen)
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def trainer_groups(model, decay: set[str]) -> list[dict]:
    """The two param groups exactly as transformers' Trainer.create_optimizer builds them."""
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n in decay and p.requires_grad], "weight_decay": 0.1},
        {"params": [p for n, p in named if n not in decay and p.requires_grad], "weight_decay": 0.0},
    ]


class Evil:
    """A pickle payload that creates a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


# --------------------------------------------------------------------------------- a real Trainer run


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    """Four steps of the real HF Trainer (AdamW, weight decay, linear schedule with warmup), saved every 2."""
    from transformers import Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("run")
    model = tiny_model(0)
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(16):
        ids = torch.randint(0, VOCAB, (16,), generator=gen)
        data.append({"input_ids": ids, "labels": ids.clone()})
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=4,
        save_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        weight_decay=0.1,
        warmup_steps=1,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return out, trainer


def _live_state(trainer) -> dict[str, torch.Tensor]:
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    return {n: opt.state[p]["exp_avg_sq"] for n, p in trainer.model.named_parameters()}


def _linear_schedule_lrs(base: float, warmup: int, total: int, steps: int) -> list[float]:
    """The rate of each update 1..steps under transformers' own linear schedule, stepped like the Trainer."""
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = get_linear_schedule_with_warmup(opt, warmup, total)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return [*out, opt.param_groups[0]["lr"]]  # the last entry: the rate of the update after `steps`


def test_trainer_run_discovered_with_steps_and_learning_rates(trainer_run):
    from commute_cli.io.learning_rate import find_learning_rate

    out, _ = trainer_run
    refs = ck.discover(out)
    assert [(r.step, r.name) for r in refs] == [(2, "checkpoint-2"), (4, "checkpoint-4")]
    used = _linear_schedule_lrs(1e-2, warmup=1, total=4, steps=4)  # used[k]: rate of update k+1
    at2, at4 = find_learning_rate(refs[0]), find_learning_rate(refs[1])
    # the rate of the update that starts from the saved weights (update 3 after checkpoint-2)
    assert at2.value == pytest.approx(used[2], rel=1e-12) and at2.source == "scheduler.pt _last_lr"
    assert at2.step == 2 and ck.learning_rate(refs[0]) == at2.value
    assert at4.value == 0.0 and at4.is_zero  # end of the decay: no update follows checkpoint-4
    # without scheduler.pt: the Trainer's own log entry at that step, then optimizer.pt
    log = {e["step"]: e["learning_rate"] for e in trainer_state_log(out / "checkpoint-2")}
    for name in ("scheduler.pt",):
        (out / "checkpoint-2" / name).rename(out / f"{name}.bak")
    try:
        logged = find_learning_rate(refs[0])
        assert logged.source == "trainer_state.json log_history" and logged.value == pytest.approx(log[2])
        state = (out / "checkpoint-2" / "trainer_state.json").read_text()
        (out / "checkpoint-2" / "trainer_state.json").write_text(
            json.dumps({**json.loads(state), "log_history": []})
        )
        try:
            from_opt = find_learning_rate(refs[0])
            assert from_opt.source == "optimizer.pt param_groups"
            assert from_opt.value == pytest.approx(used[2], rel=1e-12)
        finally:
            (out / "checkpoint-2" / "trainer_state.json").write_text(state)
    finally:
        (out / "scheduler.pt.bak").rename(out / "checkpoint-2" / "scheduler.pt")


def trainer_state_log(folder: Path) -> list[dict]:
    log = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [e for e in log if "learning_rate" in e]


def test_trainer_optimizer_mapped_to_parameter_names(trainer_run):
    out, trainer = trainer_run
    ref = ck.discover(out)[-1]
    model = ck.load_model(ref)
    state = ck.load_adam_state(ref, model)
    assert state is not None and state.layout == "trainer"
    live = _live_state(trainer)
    names = ck.param_names(model)
    assert list(state.exp_avg_sq) == names == list(live)
    for name in names:
        torch.testing.assert_close(state.exp_avg_sq[name], live[name].float(), rtol=0, atol=0)
        assert float(state.exp_avg_sq[name].abs().sum()) > 0
    assert state.step == 4 and state.betas == (0.9, 0.999) and state.eps == 1e-8 and not state.missing
    flat = ck.flat_exp_avg_sq(state, names)
    assert flat.shape == (sum(p.numel() for p in model.parameters()),)
    # The test discriminates: reading positions in named_parameters() order would misassign tensors.
    saved = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)
    naive = [saved["state"][i]["exp_avg_sq"] for i in range(len(names))]
    assert any(
        a.shape != live[n].shape or not torch.equal(a, live[n]) for a, n in zip(naive, names, strict=True)
    )


def test_decay_rule_matches_installed_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    llama = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=VOCAB,
        )
    )
    for model in (tiny_model(), llama):
        # get_decay_parameter_names does not use the Trainer instance; it also lists tied aliases
        # (lm_head.weight), which the Trainer's named_parameters() never yields
        want = set(Trainer.get_decay_parameter_names(None, model)) & set(ck.param_names(model))
        assert ck.decay_parameter_names(model) == want
        assert 0 < len(want) < len(list(model.parameters()))


# --------------------------------------------------------------------------------- optimizer layouts


def test_hand_built_trainer_groups_and_single_group(tmp_path):
    model = tiny_model(1)
    folder = save_ckpt(model, tmp_path / "step-2", step=2)
    opt = torch.optim.AdamW(
        trainer_groups(model, ck.decay_parameter_names(model)), lr=1e-2, betas=(0.8, 0.99)
    )
    step_adam(model, opt)
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    state = ck.load_adam_state(ck.discover(tmp_path)[0], model)
    assert state.layout == "trainer" and state.betas == (0.8, 0.99) and state.step == 2
    for name, p in model.named_parameters():
        assert torch.equal(state.exp_avg_sq[name], opt.state[p]["exp_avg_sq"])

    single = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step_adam(model, single, n=3)
    torch.save(single.state_dict(), folder / "optimizer.pt")
    state = ck.load_adam_state(folder, model)
    assert state.layout == "single-group" and state.step == 3
    for name, p in model.named_parameters():
        assert torch.equal(state.exp_avg_sq[name], single.state[p]["exp_avg_sq"])


def test_named_parameters_layout_and_missing_state(tmp_path):
    model = tiny_model(2)
    folder = save_ckpt(model, tmp_path / "m")
    model.transformer.wpe.weight.requires_grad_(False)  # never gets a gradient, so no state entry
    opt = torch.optim.AdamW(list(model.named_parameters()), lr=1e-2)
    step_adam(model, opt)
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    model.transformer.wpe.weight.requires_grad_(True)
    state = ck.load_adam_state(folder, model)
    assert state.layout == "param_names"
    assert state.missing == ("transformer.wpe.weight",)
    assert float(state.exp_avg_sq["transformer.wpe.weight"].abs().sum()) == 0
    assert torch.equal(
        state.exp_avg_sq["transformer.wte.weight"], opt.state[model.transformer.wte.weight]["exp_avg_sq"]
    )


def test_layout_mismatch_is_refused(tmp_path):
    model = tiny_model(3)
    folder = save_ckpt(model, tmp_path / "m")
    named = list(model.named_parameters())
    custom = [
        {"params": [p for _, p in named[:3]]},
        {"params": [p for _, p in named[3:]]},
    ]  # unknown grouping
    opt = torch.optim.AdamW(custom, lr=1e-2)
    step_adam(model, opt)
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    with pytest.raises(CommuteError, match="cannot map"):
        ck.load_adam_state(folder, model)

    other = tiny_model(3, n_embd=32)  # same parameter count and grouping, other shapes
    opt = torch.optim.AdamW(trainer_groups(other, ck.decay_parameter_names(other)), lr=1e-2)
    step_adam(other, opt)
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    with pytest.raises(CommuteError, match="shape"):
        ck.load_adam_state(folder, model)


def test_no_optimizer_file_gives_none(tmp_path):
    model = tiny_model()
    assert ck.load_adam_state(save_ckpt(model, tmp_path / "m"), model) is None


def test_code_executing_optimizer_pickle_is_refused(tmp_path):
    model = tiny_model()
    folder = save_ckpt(model, tmp_path / "m")
    marker = tmp_path / "pwned"
    torch.save({"state": {0: {"x": Evil(marker)}}, "param_groups": []}, folder / "optimizer.pt")
    with pytest.raises(CommuteError, match="weights_only"):
        ck.load_adam_state(folder, model)
    assert not marker.exists()
    # control: the payload is live, so the refusal above is what kept the marker away
    control = tmp_path / "control"
    torch.save(Evil(control), tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()


def test_safetensors_optimizer_round_trip(tmp_path):
    model = tiny_model(4)
    folder = save_ckpt(model, tmp_path / "m")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step_adam(model, opt)
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    state = ck.load_adam_state(folder, model)
    ck.save_adam_state(state, folder / "optimizer.safetensors")
    again = ck.load_adam_state(folder, model)  # the safetensors file is preferred
    assert again.layout == "safetensors" and again.step == state.step and again.lr == pytest.approx(3e-3)
    names = ck.param_names(model)
    assert torch.equal(ck.flat_exp_avg_sq(again, names), ck.flat_exp_avg_sq(state, names))


# --------------------------------------------------------------------------------- discovery


@pytest.mark.parametrize("name", ["step-100", "step_100", "iter-100", "iter_100", "global_step100"])
def test_discover_plain_folders(tmp_path, name):
    model = tiny_model()
    save_ckpt(model, tmp_path / name)
    save_ckpt(model, tmp_path / name.replace("100", "20"))
    refs = ck.discover(tmp_path)
    assert [r.step for r in refs] == [20, 100]
    assert refs[1].path == tmp_path / name


def test_discover_trainer_state_single_folder_and_errors(tmp_path):
    model = tiny_model()
    save_ckpt(model, tmp_path / "run" / "late", step=50)  # step only in trainer_state.json
    save_ckpt(model, tmp_path / "run" / "checkpoint-10")
    save_ckpt(model, tmp_path / "run" / "best")  # no step: ignored in a run
    save_ckpt(model, tmp_path / "run")  # Trainer's final save_model at the top: ignored in a run
    assert [(r.step, r.name) for r in ck.discover(tmp_path / "run")] == [(10, "checkpoint-10"), (50, "late")]

    assert ck.discover(tmp_path / "run" / "best") == [
        ck.CheckpointRef(tmp_path / "run" / "best", None, "best")
    ]
    assert ck.discover(tmp_path / "run" / "late")[0].step == 50
    assert ck.discover(tmp_path / "run" / "checkpoint-10")[0].step == 10

    (tmp_path / "empty").mkdir()
    with pytest.raises(CommuteError, match="no checkpoints"):
        ck.discover(tmp_path / "empty")
    with pytest.raises(CommuteError, match="does not exist"):
        ck.discover(tmp_path / "nope")
    save_ckpt(model, tmp_path / "dup" / "step-5")
    save_ckpt(model, tmp_path / "dup" / "checkpoint-5")  # a byte-identical copy: the same checkpoint
    assert [r.name for r in ck.discover(tmp_path / "dup")] == ["checkpoint-5"]
    save_ckpt(tiny_model(9), tmp_path / "dup" / "step-5")  # now different weights for one step
    with pytest.raises(CommuteError, match="two different checkpoints for step 5"):
        ck.discover(tmp_path / "dup")
    (tmp_path / "noweights" / "step-1").mkdir(parents=True)
    tiny_config().save_pretrained(tmp_path / "noweights" / "step-1")
    with pytest.raises(CommuteError, match=r"config\.json"):
        ck.discover(tmp_path / "noweights")


def test_select():
    refs = [ck.CheckpointRef(Path(f"s{s}"), s, f"step-{s}") for s in (0, 500, 1000, 1500, 2000)]
    assert [r.step for r in ck.select(refs)] == [0, 500, 1000, 1500, 2000]
    assert [r.step for r in ck.select(refs, steps=[2000, 500, 500])] == [500, 2000]
    assert [r.step for r in ck.select(refs, every=1000)] == [0, 1000, 2000]
    with pytest.raises(CommuteError) as err:
        ck.select(refs, steps=[700])
    assert "700" in err.value.one_line() and "0, 500, 1000, 1500, 2000" in err.value.one_line()
    with pytest.raises(CommuteError):
        ck.select(refs, every=0)
    assert ck.select(refs, every=333) == refs[:1]  # step 0 is a multiple of everything
    with pytest.raises(CommuteError, match="multiple of 333"):
        ck.select(refs[1:], every=333)
    with pytest.raises(CommuteError, match="both given"):
        ck.select(refs, steps=[0], every=500)


# --------------------------------------------------------------------------------- loading


def test_load_model_upcasts_and_uses_eager_attention(tmp_path):
    model = tiny_model(5)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    loaded = ck.load_model(ck.CheckpointRef(tmp_path / "bf16", None, "bf16"))
    assert not loaded.training
    assert loaded.config._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    want = model.transformer.h[0].attn.c_attn.weight.float()
    assert torch.equal(loaded.transformer.h[0].attn.c_attn.weight, want)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_pytorch_model_bin_loads_and_malicious_bin_is_refused(tmp_path):
    model = tiny_model(6)
    good = tmp_path / "bin"
    good.mkdir()
    model.config.save_pretrained(good)
    torch.save(model.state_dict(), good / "pytorch_model.bin")
    loaded = ck.load_model(good)
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)

    bad = tmp_path / "evil"
    bad.mkdir()
    model.config.save_pretrained(bad)
    marker = tmp_path / "pwned"
    state = dict(model.state_dict())
    state["payload"] = Evil(marker)
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(CommuteError, match=r"pytorch_model\.bin"):
        ck.load_model(bad)
    assert not marker.exists()


def test_truncated_and_incomplete_safetensors(tmp_path):
    model = tiny_model()
    folder = save_ckpt(model, tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(CommuteError, match=r"model\.safetensors") as err:
        ck.load_model(folder)
    assert "truncated" in err.value.one_line()
    weights.write_bytes(b"\x00" * 5)
    with pytest.raises(CommuteError, match=r"model\.safetensors"):
        ck.load_model(folder)

    from safetensors.torch import load_file, save_file

    folder2 = save_ckpt(model, tmp_path / "m2")
    tensors = load_file(folder2 / "model.safetensors")
    tensors.pop("transformer.h.0.attn.c_attn.weight")
    save_file(tensors, folder2 / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CommuteError, match="missing weights"):
        ck.load_model(folder2)


def test_sharded_safetensors(tmp_path):
    model = tiny_model(7)
    folder = tmp_path / "step-3"
    model.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    (ref,) = ck.discover(tmp_path)
    loaded = ck.load_model(ref)
    assert torch.equal(loaded.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_fc.weight)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CommuteError, match="missing") as err:
        ck.load_model(ref)
    assert shard.name in err.value.one_line()


def test_check_compatible(tmp_path):
    a = save_ckpt(tiny_model(), tmp_path / "step-1")
    b = save_ckpt(tiny_model(1), tmp_path / "step-2")
    c = save_ckpt(tiny_model(n_layer=2), tmp_path / "step-3")
    refs = ck.discover(tmp_path)
    ck.check_compatible(refs[:2])
    with pytest.raises(CommuteError, match="num_hidden_layers") as err:
        ck.check_compatible(refs)
    assert "step-3" in err.value.one_line()
    del a, b, c


def test_learning_rate_lookup(tmp_path):
    model = tiny_model()
    save_ckpt(model, tmp_path / "step-30", step=30, lrs={10: 1.0, 20: 2.0, 40: 4.0})
    save_ckpt(model, tmp_path / "step-5", step=5, lrs={10: 1.0, 20: 2.0})
    save_ckpt(model, tmp_path / "step-7")
    refs = {r.step: r for r in ck.discover(tmp_path)}
    assert ck.learning_rate(refs[30]) == 2.0  # largest logged step <= 30
    assert ck.learning_rate(refs[5]) == 1.0  # nothing before: the closest entry
    assert ck.learning_rate(refs[7]) is None  # no trainer_state.json


# --------------------------------------------------------------------------------- manifest, tokenizer


def _manifest(folder: Path, **fields) -> None:
    raw = {"format": "commute-manifest/1", **fields}
    (folder / "commute.json").write_text(json.dumps(raw))


def test_read_manifest(tmp_path):
    run = tmp_path / "run"
    (run / "data" / "en").mkdir(parents=True)
    (run / "tokenizer").mkdir()
    save_ckpt(tiny_model(), run / "checkpoint-1")
    _manifest(
        run,
        domains={"en": "data/en", "web": "c4"},
        eval_domains={"en": "data/en/validation.jsonl"},
        schedule=[{"step": 0, "weights": {"en": 0.5, "web": 0.5}}],
        tokenizer="tokenizer",
        seq_len=32,
        seed=3,
    )
    for where in (run, run / "checkpoint-1"):  # the parent of a single checkpoint is searched too
        man = ck.read_manifest(where)
        assert man is not None and man.path == run / "commute.json"
        assert man.domains == {"en": str((run / "data" / "en").resolve()), "web": "c4"}
        assert man.eval_domains["en"] == str((run / "data" / "en" / "validation.jsonl").resolve())
        assert man.tokenizer == (run / "tokenizer").resolve() and man.seq_len == 32 and man.seed == 3
        assert man.schedule[0]["weights"]["en"] == 0.5
    assert ck.read_manifest(tmp_path / "run" / "data" / "en") is None


@pytest.mark.parametrize(
    "fields",
    [
        {"domains": {"en": "../outside.jsonl"}},
        {"domains": {"en": "/etc/passwd"}},
        {"tokenizer": "../tok"},
        {"format": "commute-manifest/99"},
        {"seq_len": "long"},
    ],
)
def test_bad_manifest_refused(tmp_path, fields):
    run = tmp_path / "run"
    run.mkdir()
    _manifest(run, **fields)
    with pytest.raises(CommuteError):
        ck.read_manifest(run)


def test_manifest_symlink_escape_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "secret.jsonl").write_text('{"text": "x"}\n')
    os.symlink(tmp_path / "secret.jsonl", run / "link.jsonl")
    _manifest(run, domains={"en": "link.jsonl"})
    with pytest.raises(CommuteError, match="outside"):
        ck.read_manifest(run)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    folder = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


def test_load_and_check_tokenizer(tokenizer_dir, tmp_path):
    tok = ck.load_tokenizer(tokenizer_dir)
    assert tok.eos_token_id is not None and len(tok) <= VOCAB
    ck.check_tokenizer(tok, tiny_config())
    ck.check_tokenizer(tok, {"vocab_size": VOCAB})
    with pytest.raises(CommuteError, match="vocabulary"):
        ck.check_tokenizer(tok, tiny_config(vocab_size=200))
    bare = ck.load_tokenizer(tokenizer_dir / "tokenizer.json")
    assert bare("quick fox")["input_ids"] == tok("quick fox")["input_ids"]
    with pytest.raises(CommuteError, match="does not exist"):
        ck.load_tokenizer(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text("{not json")
    with pytest.raises(CommuteError, match="tokenizer"):
        ck.load_tokenizer(tmp_path / "junk")
    shutil.rmtree(tmp_path / "junk")
