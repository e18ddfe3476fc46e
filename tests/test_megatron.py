"""Megatron-LM iter_N/mp_rank_*/model_optim_rng.pt read as GPT2LMHeadModel; logits against Megatron's forward.

The writer below lays a model out the way Megatron-LM's ``save_checkpoint`` does (documented layout: the
legacy nested ``language_model`` dict and the ``megatron.core`` flat names, QKV rows per checkpoint version,
tensor-parallel shards split as Megatron's column/row-parallel layers split them, pipeline stages with
stage-local layer numbers, an ``argparse.Namespace`` of args and numpy RNG state). The reference forward is
Megatron's GPT written on the unsplit q/k/v weights with torch.nn.functional; it shares no code with the
loader.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from commute_cli.engine.curvature import param_list
from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints as ck
from commute_cli.io import megatron
from commute_cli.io.learning_rate import find_learning_rate
from commute_cli.io.saved_optimizer import optimizer_name

from cli_runner import cli
from tiny_run import (
    EN_WORDS,
    XX_WORDS,
    analyze_like_transformers_copy,
    make_texts,
    make_tokenizer,
    write_jsonl,
)

C, HEADS, LAYERS, T, VOCAB, FFN = 16, 4, 3, 24, 64, 48


def megatron_weights(seed: int, *, bias: bool = True, vocab: int = VOCAB, untied: bool = False) -> dict:
    """Unsplit weights of a Megatron GPT: Linear [out, in]; q, k, v apart (fused only when written)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    w = {"wte": r(vocab, C), "wpe": r(T, C), "lnf_w": 1 + r(C, scale=0.1), "lnf_b": r(C, scale=0.1)}
    if untied:
        w["head"] = r(vocab, C)
    for i in range(LAYERS):
        layer = {
            "ln1_w": 1 + r(C, scale=0.1), "ln1_b": r(C, scale=0.1), "ln2_w": 1 + r(C, scale=0.1),
            "ln2_b": r(C, scale=0.1), "q": r(C, C), "k": r(C, C), "v": r(C, C), "proj": r(C, C),
            "fc1": r(FFN, C), "fc2": r(C, FFN),
        }  # fmt: skip
        if bias:
            layer.update(bq=r(C, scale=0.1), bk=r(C, scale=0.1), bv=r(C, scale=0.1), bproj=r(C, scale=0.1))
            layer.update(bfc1=r(FFN, scale=0.1), bfc2=r(C, scale=0.1))
        w[i] = layer
    return w


def megatron_forward(w: dict, idx: torch.Tensor, tanh_gelu: bool) -> torch.Tensor:
    """Megatron's GPT forward (eval): pre-LN blocks, causal softmax(qk/sqrt(d)), logits = h @ wte^T."""
    B, L = idx.shape
    hd = C // HEADS
    x = w["wte"][idx] + w["wpe"][:L]
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    for i in range(LAYERS):
        p = w[i]
        h = F.layer_norm(x, (C,), p["ln1_w"], p["ln1_b"], 1e-5)
        q, k, v = (F.linear(h, p[n], p.get("b" + n)).view(B, L, HEADS, hd).transpose(1, 2) for n in "qkv")
        att = (q @ k.transpose(-2, -1) / math.sqrt(hd)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + F.linear((att @ v).transpose(1, 2).reshape(B, L, C), p["proj"], p.get("bproj"))
        h = F.linear(F.layer_norm(x, (C,), p["ln2_w"], p["ln2_b"], 1e-5), p["fc1"], p.get("bfc1"))
        # the tanh form is megatron.core.fusions.fused_bias_gelu, written out
        h = h * 0.5 * (1.0 + torch.tanh(0.79788456 * h * (1 + 0.044715 * h * h))) if tanh_gelu else F.gelu(h)
        x = x + F.linear(h, p["fc2"], p.get("bfc2"))
    x = F.layer_norm(x, (C,), w["lnf_w"], w["lnf_b"], 1e-5)
    return F.linear(x, w.get("head", w["wte"]))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, version: float) -> torch.Tensor:
    """One rank's query_key_value rows from its heads' q, k, v ([heads*hd, ...] each)."""
    heads = q.shape[0] // (C // HEADS)
    parts = [t.reshape(heads, C // HEADS, *t.shape[1:]) for t in (q, k, v)]
    if version >= 2:
        fused = torch.stack(parts, dim=1)  # [heads, 3, hd, ...]
    elif version == 1:
        fused = torch.stack(parts, dim=2)  # [heads, hd, 3, ...]
    else:
        fused = torch.stack(parts, dim=0)  # [3, heads, hd, ...]
    return fused.reshape(-1, *q.shape[1:])


def rank_state(
    w: dict, layers: range, tp: int, rank: int, *, layout: str, version: float, first: bool, last: bool
):
    """What ``state_dict_for_save_checkpoint`` of one (tensor rank, pipeline stage) holds."""

    def col(t):  # column-parallel: output rows split
        return t.chunk(tp, dim=0)[rank].clone()

    def row(t):  # row-parallel: input columns split
        return t.chunk(tp, dim=1)[rank].clone()

    core, te = (
        layout in ("core", "te"),
        layout == "te",
    )  # te: Transformer Engine fuses the norms into the linears
    names = {
        "ln1": "input_layernorm",
        "qkv": "self_attention.linear_qkv" if core else "self_attention.query_key_value",
        "proj": "self_attention.linear_proj" if core else "self_attention.dense",
        "ln2": "pre_mlp_layernorm" if core else "post_attention_layernorm",
        "fc1": "mlp.linear_fc1" if core else "mlp.dense_h_to_4h",
        "fc2": "mlp.linear_fc2" if core else "mlp.dense_4h_to_h",
    }  # fmt: skip
    if version == 0 and not core:
        names["qkv"] = "attention.query_key_value"
        names["proj"] = "attention.dense"
    layer_sd = {}
    for local, i in enumerate(layers):
        p, pre = w[i], f"layers.{local}."
        ln1 = pre + (names["qkv"] + ".layer_norm_" if te else names["ln1"] + ".")
        ln2 = pre + (names["fc1"] + ".layer_norm_" if te else names["ln2"] + ".")
        layer_sd[ln1 + "weight"] = p["ln1_w"].clone()
        layer_sd[ln1 + "bias"] = p["ln1_b"].clone()
        layer_sd[pre + names["qkv"] + ".weight"] = fuse_qkv(col(p["q"]), col(p["k"]), col(p["v"]), version)
        layer_sd[pre + names["proj"] + ".weight"] = row(p["proj"])
        layer_sd[ln2 + "weight"] = p["ln2_w"].clone()
        layer_sd[ln2 + "bias"] = p["ln2_b"].clone()
        layer_sd[pre + names["fc1"] + ".weight"] = col(p["fc1"])
        layer_sd[pre + names["fc2"] + ".weight"] = row(p["fc2"])
        if "bq" in p:
            layer_sd[pre + names["qkv"] + ".bias"] = fuse_qkv(
                col(p["bq"]), col(p["bk"]), col(p["bv"]), version
            )
            layer_sd[pre + names["proj"] + ".bias"] = p["bproj"].clone()
            layer_sd[pre + names["fc1"] + ".bias"] = col(p["bfc1"])
            layer_sd[pre + names["fc2"] + ".bias"] = p["bfc2"].clone()
        if (
            core
        ):  # Megatron-core keeps extra state per linear layer (TE: a pickled io.BytesIO of its FP8 meta)
            for op in ("qkv", "proj", "fc1", "fc2"):
                layer_sd[pre + names[op] + "._extra_state"] = io.BytesIO(b"fp8-meta") if te else None
    if core:
        sd = {"decoder." + k: v for k, v in layer_sd.items()}
        if first:
            sd["embedding.word_embeddings.weight"] = col(w["wte"])
            sd["embedding.position_embeddings.weight"] = w["wpe"].clone()
        if last:
            sd["decoder.final_layernorm.weight"] = w["lnf_w"].clone()
            sd["decoder.final_layernorm.bias"] = w["lnf_b"].clone()
            sd["output_layer.weight"] = col(w.get("head", w["wte"]))  # tied: the last stage's copy
        return sd
    lm: dict = {}
    stack = "transformer" if version == 0 else "encoder"
    if first:
        lm["embedding"] = {
            "word_embeddings": {"weight": col(w["wte"])},
            "position_embeddings": {"weight": w["wpe"].clone()},
        }
    lm[stack] = layer_sd
    if last:
        lm[stack]["final_layernorm.weight"] = w["lnf_w"].clone()
        lm[stack]["final_layernorm.bias"] = w["lnf_b"].clone()
        if "head" in w:
            lm["output_layer"] = {"weight": col(w["head"])}
    sd = {"language_model": lm}
    if last and not first and "head" not in w:
        sd["word_embeddings_for_head"] = {"weight": col(w["wte"])}
    return sd


def megatron_args(tp: int, pp: int, **over) -> argparse.Namespace:
    args = dict(
        num_layers=LAYERS, hidden_size=C, ffn_hidden_size=FFN, num_attention_heads=HEADS,
        kv_channels=C // HEADS,
        max_position_embeddings=T, padded_vocab_size=VOCAB, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, layernorm_epsilon=1e-5,
        bias_gelu_fusion=True, openai_gelu=False, add_bias_linear=True,
        position_embedding_type="learned_absolute",
        normalization="LayerNorm", swiglu=False, untie_embeddings_and_output_weights=False,
        params_dtype=torch.float32, lr=3e-4, min_lr=3e-5, lr_decay_style="cosine", lr_warmup_init=0.0,
        tokenizer_type="GPT2BPETokenizer", save="/runs/gpt", ckpt_format="torch",
    )  # fmt: skip
    args.update(over)
    return argparse.Namespace(**args)


def write_megatron(
    run: Path,
    w: dict,
    iteration: int,
    *,
    tp: int = 1,
    pp: int = 1,
    layout: str = "legacy",
    version: float = 3.0,
    lr: float | None = 2.5e-4,
    scheduler: dict | None = None,
    args: argparse.Namespace | None = None,
    tracker: bool = True,
) -> Path:
    """``save_checkpoint``'s files for every rank, and the tracker file; returns the iter folder."""
    args = args or megatron_args(tp, pp)
    folder = run / f"iter_{iteration:07d}"
    per_stage = LAYERS // pp
    np.random.seed(iteration)
    for stage in range(pp):
        layers = range(stage * per_stage, LAYERS if stage == pp - 1 else (stage + 1) * per_stage)
        for rank in range(tp):
            sd = rank_state(
                w, layers, tp, rank, layout=layout, version=version, first=stage == 0, last=stage == pp - 1
            )
            params = [torch.nn.Parameter(t.clone()) for t in _tensors(sd)]
            opt = torch.optim.Adam(params, lr=1.0)
            for p in params:
                p.grad = torch.ones_like(p)
            opt.step()
            for group in opt.param_groups:
                group["lr"] = lr if lr is not None else 0.0
            ckpt = {
                "args": args,
                "checkpoint_version": version,
                "iteration": iteration,
                "model": sd,
                "rng_state": [
                    {
                        "random_rng_state": random.getstate(),
                        "np_rng_state": np.random.get_state(),
                        "torch_rng_state": torch.get_rng_state(),
                        "rng_tracker_states": {},
                    }
                ],
                "num_floating_point_operations_so_far": 1.5e12,
            }
            if lr is not None:  # mixed precision keeps the torch optimizer under "optimizer"
                ckpt["optimizer"] = {"optimizer": opt.state_dict(), "fp32_from_fp16_params": []}
            if scheduler is not None:
                ckpt["opt_param_scheduler"] = scheduler
            name = f"mp_rank_{rank:02d}" + (f"_{stage:03d}" if pp > 1 else "")
            (folder / name).mkdir(parents=True, exist_ok=True)
            torch.save(ckpt, folder / name / "model_optim_rng.pt")
    if tracker:
        (run / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return folder


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    return [tree] if isinstance(tree, torch.Tensor) else []


IDX = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    ("layout", "version", "tp", "pp"),
    [
        ("legacy", 3.0, 1, 1),
        ("legacy", 0, 1, 1),
        ("legacy", 1.0, 2, 1),
        ("legacy", 2.0, 2, 1),
        ("legacy", 3.0, 2, 3),
        ("core", 3.0, 2, 1),
        ("core", 3.0, 4, 2),
        ("te", 3.0, 2, 1),
    ],
)
def test_megatron_logits_equal_megatron_forward(tmp_path, layout, version, tp, pp):
    w = megatron_weights(seed=1)
    folder = write_megatron(tmp_path / "run", w, 100, tp=tp, pp=pp, layout=layout, version=version)
    (ref,) = ck.discover(tmp_path / "run")
    assert (ref.path, ref.step, ref.name) == (folder, 100, "iter_0000100")
    model = ck.load_model(ref)
    with torch.no_grad():
        got = model(input_ids=IDX).logits
    want = megatron_forward(w, IDX, tanh_gelu=True)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config.vocab_size == VOCAB and model.config.activation_function == "gelu_new"
    assert sum(p.numel() for _, p in param_list(model)) == sum(
        t.numel() for k, layer in w.items() for t in (layer.values() if isinstance(k, int) else [layer])
    )
    lr = find_learning_rate(ref)
    assert (lr.value, lr.source, lr.step) == (2.5e-4, "model_optim_rng.pt optimizer param_groups", 100)


def test_megatron_without_biases_untied_exact_gelu(tmp_path):
    """add_bias_linear=False: zero biases, frozen; untied output layer (TP-split); --no-bias-gelu-fusion."""
    w = megatron_weights(seed=2, bias=False, untied=True)
    args = megatron_args(2, 1, add_bias_linear=False, untie_embeddings_and_output_weights=True)
    args.bias_gelu_fusion = False
    write_megatron(tmp_path / "run", w, 50, tp=2, layout="core", args=args)
    model = ck.load_model(ck.discover(tmp_path / "run" / "iter_0000050")[0])
    with torch.no_grad():
        got = model(input_ids=IDX).logits
    want = megatron_forward(w, IDX, tanh_gelu=False)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert model.config.activation_function == "gelu" and not model.config.tie_word_embeddings
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        f"transformer.h.{i}.{m}.bias"
        for i in range(LAYERS)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }


def test_megatron_run_discovery_tracker_and_scheduler_lr(tmp_path):
    """Steps from iter_N; a save past the tracker is left out; lr from the scheduler through get_lr."""
    run = tmp_path / "run"
    w = megatron_weights(seed=3)
    # Megatron's OptimizerParamScheduler state (samples): warmup 100, cosine to 3e-5 at 1000
    sched = {"max_lr": 3e-4, "min_lr": 3e-5, "lr_warmup_steps": 100, "lr_decay_steps": 1000,
             "lr_decay_style": "cosine", "start_wd": 0.1, "end_wd": 0.1, "wd_incr_style": "constant",
             "wd_incr_steps": 1000}  # fmt: skip
    for it, samples in ((20, 40), (200, 400)):
        write_megatron(run, w, it, lr=None, scheduler=dict(sched, num_steps=samples))
    write_megatron(run, w, 300, tracker=False)  # being written: Megatron updates the tracker last
    refs = ck.discover(run)
    assert [(r.step, r.name) for r in refs] == [(20, "iter_0000020"), (200, "iter_0000200")]
    warm, cos = (find_learning_rate(r) for r in refs)
    assert warm.value == pytest.approx(3e-4 * 40 / 100, rel=1e-12)
    want = 3e-5 + 0.5 * (math.cos(math.pi * (400 - 100) / (1000 - 100)) + 1) * (3e-4 - 3e-5)
    assert cos.value == pytest.approx(want, rel=1e-12)
    assert cos.source == "model_optim_rng.pt opt_param_scheduler (Megatron get_lr)"
    # one rank's file passed directly is its iter folder
    assert (
        ck.discover(run / "iter_0000200" / "mp_rank_00" / "model_optim_rng.pt")[0].path
        == run / "iter_0000200"
    )


def test_megatron_refusals_are_one_line(tmp_path):
    w = megatron_weights(seed=4)
    rope = write_megatron(tmp_path / "rope", w, 10, args=megatron_args(1, 1, position_embedding_type="rope"))
    with pytest.raises(CommuteError, match="a Megatron model with rope positions") as err:
        ck.load_model(ck.discover(rope)[0])
    assert "Megatron-Bridge" in err.value.one_line()
    # a pickled object that is neither plain data nor Megatron's/numpy's: refused by name, never run
    folder = write_megatron(tmp_path / "evil", w, 10)
    file = folder / "mp_rank_00" / "model_optim_rng.pt"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').close()",))

    torch.save({"args": megatron_args(1, 1), "model": {}, "iteration": 10, "x": Evil()}, file)
    with pytest.raises(CommuteError, match="exec") as err:
        ck.discover(folder)
    assert "does not unpickle" in err.value.one_line() and not (tmp_path / "pwned").exists()
    # a torch_dist save (Megatron's default format) names the conversion to the torch format
    dist = tmp_path / "dist" / "iter_0000010"
    dist.mkdir(parents=True)
    for name in ("common.pt", "metadata.json", "__0_0.distcp"):
        (dist / name).write_bytes(b"")
    with pytest.raises(CommuteError, match="--ckpt-convert-format torch"):
        ck.discover(tmp_path / "dist")
    # a stage missing from a pipeline-parallel save
    part = write_megatron(tmp_path / "part", w, 10, tp=2, pp=3)
    (part / "mp_rank_01_002" / "model_optim_rng.pt").unlink()
    with pytest.raises(CommuteError, match="lacks mp_rank_01_002"):
        ck.load_model(part)


def test_megatron_run_analyzed_like_its_transformers_copy(tmp_path, capsys):
    """`commute analyze` on a Megatron run (TP=2) equals it on the same weights saved by save_pretrained."""
    en, xx = make_texts(EN_WORDS, 120, 0), make_texts(XX_WORDS, 120, 1)
    tok = make_tokenizer(en + xx, tmp_path / "tok", vocab_size=300)
    padded = (
        384  # Megatron pads the vocabulary to a multiple of 128 * TP; the padded rows stay in the softmax
    )
    assert len(tok) < padded
    write_jsonl(tmp_path / "en.jsonl", en)
    write_jsonl(tmp_path / "xx.jsonl", xx)
    saved = {}
    for it, seed in ((100, 5), (200, 6)):
        w, args = megatron_weights(seed, vocab=padded), megatron_args(2, 1, padded_vocab_size=padded)
        saved[it] = write_megatron(tmp_path / "meg", w, it, tp=2, layout="core", lr=3e-4, args=args)
    a, b, common = analyze_like_transformers_copy(tmp_path, capsys, tmp_path / "meg", saved, 3e-4)
    assert list(a["step"]) == [100, 200]
    pd.testing.assert_frame_equal(a, b, rtol=1e-4, atol=1e-9)
    run = json.loads((tmp_path / "o1" / "run.json").read_text())
    assert run["checkpoints"][0]["lr_source"]["source"] == "model_optim_rng.pt optimizer param_groups"
    assert optimizer_name(ck.discover(tmp_path / "meg")[0]) == "adam"  # the saved torch Adam's param groups
    # without --tokenizer (Megatron keeps none beside its weights): one line naming --tokenizer, exit 2
    no_tok = [a for i, a in enumerate(common) if i not in (6, 7)]
    code, _, err = cli(["analyze", tmp_path / "meg", "--out", tmp_path / "o3", *no_tok], capsys)
    assert code == 2 and "--tokenizer" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # two processes that import megatron-core: ~20 s of CPU, more on a loaded machine
def test_megatron_core_gptmodel_saved_by_megatron_core_logits_equal(tmp_path):
    """A GPTModel of megatron-core itself, tensor-parallel over two gloo processes on the CPU, saved as
    Megatron-LM saves it (tests/megatron_core_writer.py): commute's model gives Megatron's own logits."""
    if (
        importlib.util.find_spec("megatron") is None
    ):  # found, not imported: its enums stay out of this process
        pytest.skip("megatron-core is not installed")
    run = tmp_path / "run"
    env = {
        k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(Path(__file__).with_name("megatron_core_writer.py")), str(run)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(run / "logits.pt", weights_only=True)
    (ref,) = ck.discover(run)
    assert (ref.step, ref.name) == (7, "iter_0000007")
    model = ck.load_model(ref)
    with torch.no_grad():
        got = model(input_ids=saved["input_ids"]).logits
    assert got.shape == saved["logits"].shape
    assert torch.allclose(got, saved["logits"], atol=1e-5, rtol=0), (got - saved["logits"]).abs().max()
    assert find_learning_rate(ref).source == "model_optim_rng.pt args.lr (constant schedule)"


def write_megatron_deepspeed(run: Path, w: dict, iteration: int, *, tp: int, sched: dict, pipe: bool = False):
    """What Megatron-DeepSpeed's save_checkpoint writes with --deepspeed: DeepSpeed's engine files in
    global_stepN/ (the flat module state dict under "module", Megatron's state as client state), DeepSpeed's
    `latest`, and Megatron's tracker file."""
    folder = run / f"global_step{iteration}"
    folder.mkdir(parents=True)
    for rank in range(tp):
        nested = rank_state(w, range(LAYERS), tp, rank, layout="legacy", version=3.0, first=True, last=True)
        module = _flat(nested)
        state = {
            "module": None if pipe else module,
            "buffer_names": [],
            "optimizer": None,  # ZeRO keeps it in zero_pp_rank_*_optim_states.pt
            "param_shapes": [{k: v.shape for k, v in module.items()}],
            "lr_scheduler": sched,
            "sparse_tensor_module_names": set(),
            "skipped_steps": 0,
            "global_steps": iteration,
            "global_samples": iteration * 8,
            "dp_world_size": 1,
            "mp_world_size": tp,
            "ds_config": {
                "train_batch_size": 8,
                "zero_optimization": {"stage": 1},
                "bf16": {"enabled": True},
            },
            "ds_version": "0.16.0",
            "args": megatron_args(tp, 1, deepspeed=True),
            "checkpoint_version": 3.0,
            "iteration": iteration,
            "tokens": iteration * 8 * T,
            "rng_state": [{"np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state()}],
        }
        torch.save(state, folder / f"mp_rank_{rank:02d}_model_states.pt")
        torch.save(
            {"optimizer_state_dict": {}}, folder / f"zero_pp_rank_0_mp_rank_{rank:02d}_optim_states.pt"
        )
        if pipe:
            torch.save(module, folder / f"layer_01-model_{rank:02d}-model_states.pt")
    (run / "latest").write_text(f"global_step{iteration}")
    (run / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return folder


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_megatron_deepspeed_engine_checkpoint(tmp_path):
    """Megatron-DeepSpeed with --deepspeed (TP=2, ZeRO-1): logits equal; lr from DeepSpeed's lr_scheduler."""
    w = megatron_weights(seed=7)
    sched = {"max_lr": 3e-4, "min_lr": 3e-5, "lr_warmup_steps": 0, "num_steps": 300, "lr_decay_steps": 900,
             "lr_decay_style": "linear", "lr_warmup_tokens": None, "num_tokens": 0,
             "lr_decay_tokens": None}  # fmt: skip
    folder = write_megatron_deepspeed(tmp_path / "run", w, 100, tp=2, sched=sched)
    (ref,) = ck.discover(tmp_path / "run")
    assert (ref.path, ref.step, ref.name) == (folder, 100, "global_step100")
    with torch.no_grad():
        got = ck.load_model(ref)(input_ids=IDX).logits
    want = megatron_forward(w, IDX, tanh_gelu=True)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    lr = find_learning_rate(ref)
    assert lr.value == pytest.approx(3e-5 + (1 - 300 / 900) * (3e-4 - 3e-5), rel=1e-12)
    pipe = write_megatron_deepspeed(tmp_path / "pipe", w, 100, tp=1, sched=sched, pipe=True)
    with pytest.raises(CommuteError, match=r"deepspeed_to_megatron\.py --input_folder") as err:
        ck.load_model(ck.discover(pipe)[0])
    assert str(pipe) in err.value.one_line()


def test_megatron_enum_in_args_is_kept_inert(tmp_path, monkeypatch):
    """Newer Megatron-LM keeps enums in args (``attention_backend=AttnBackend.auto``): the pickle names
    ``megatron.core.transformer.enums.AttnBackend``; it is read as an inert record: no Megatron code runs."""
    import enum
    import types

    fake = types.ModuleType("megatron.core.transformer.enums")

    class AttnBackend(enum.Enum):  # pickled under Megatron's name, exactly as Megatron-LM pickles it
        auto = 5

    class PositionEmbeddingType(enum.Enum):  # Megatron-DeepSpeed's megatron/enums.py
        rotary = 1
        absolute = 2

    AttnBackend.__module__, AttnBackend.__qualname__ = fake.__name__, "AttnBackend"
    fake.AttnBackend = AttnBackend
    ds = types.ModuleType("megatron.enums")
    PositionEmbeddingType.__module__, PositionEmbeddingType.__qualname__ = (
        ds.__name__,
        "PositionEmbeddingType",
    )
    ds.PositionEmbeddingType = PositionEmbeddingType
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(sys.modules, ds.__name__, ds)
    w = megatron_weights(seed=8)
    args = megatron_args(
        1, 1, attention_backend=AttnBackend.auto, position_embedding_type=PositionEmbeddingType.absolute
    )
    write_megatron(tmp_path / "run", w, 30, args=args)
    args.position_embedding_type = PositionEmbeddingType.rotary
    write_megatron(tmp_path / "rotary", w, 30, args=args)
    monkeypatch.delitem(sys.modules, fake.__name__)  # commute must not need Megatron to read it
    monkeypatch.delitem(sys.modules, ds.__name__)
    with pytest.raises(CommuteError, match=r"megatron\.enums\.PositionEmbeddingType\(1,\) positions"):
        ck.load_model(tmp_path / "rotary" / "iter_0000030")
    ref = ck.discover(tmp_path / "run")[0]
    with torch.no_grad():
        got = ck.load_model(ref)(input_ids=IDX).logits
    assert torch.allclose(got, megatron_forward(w, IDX, tanh_gelu=True), atol=1e-5, rtol=0)
    saved = megatron.read_file(ref.path / "mp_rank_00" / "model_optim_rng.pt")
    backend = saved["args"].attention_backend
    assert (
        type(backend).__name__ == "AttnBackend"
        and backend.args == (5,)
        and not isinstance(backend, enum.Enum)
    )
    # a library that allowlists its own classes process-wide (megatron-core registers its enums when
    # imported) widens nothing: commute's loads build exactly commute's allowlist, and leave torch's as found
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    registered = torch.serialization.get_safe_globals()
    torch.serialization.add_safe_globals([AttnBackend])
    try:
        again = megatron.read_file(ref.path / "mp_rank_00" / "model_optim_rng.pt")["args"].attention_backend
        assert not isinstance(again, enum.Enum) and again.args == (5,)
        assert AttnBackend in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(registered)
