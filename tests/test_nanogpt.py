"""nanoGPT ckpt.pt files: read with weights_only into GPT2LMHeadModel; logits against an independent forward.

The reference below is a minimal re-implementation of nanoGPT's ``GPT.forward`` (model.py of
karpathy/nanoGPT) written on the raw state dict with torch.nn.functional; it shares no code with the loader.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from commute_cli.engine.curvature import param_list
from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints as ck
from commute_cli.io.learning_rate import find_learning_rate

from cli_runner import cli
from tiny_run import (
    EN_WORDS,
    XX_WORDS,
    analyze_like_transformers_copy,
    make_texts,
    make_tokenizer,
    write_jsonl,
)


def nanogpt_state(args: dict, seed: int, *, mask_buffer: bool = True) -> dict[str, torch.Tensor]:
    """A nanoGPT-shaped state dict with random values (Linear weights [out, in]; lm_head tied to wte)."""
    g = torch.Generator().manual_seed(seed)
    C, V, T, bias = args["n_embd"], args["vocab_size"], args["block_size"], args["bias"]

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {"transformer.wte.weight": r(V, C), "transformer.wpe.weight": r(T, C)}
    for i in range(args["n_layer"]):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = 1 + r(C, scale=0.1)
        sd[p + "attn.c_attn.weight"] = r(3 * C, C)
        sd[p + "attn.c_proj.weight"] = r(C, C)
        sd[p + "ln_2.weight"] = 1 + r(C, scale=0.1)
        sd[p + "mlp.c_fc.weight"] = r(4 * C, C)
        sd[p + "mlp.c_proj.weight"] = r(C, 4 * C)
        if bias:
            for name, n in (("ln_1", C), ("attn.c_attn", 3 * C), ("attn.c_proj", C), ("ln_2", C)):
                sd[p + name + ".bias"] = r(n, scale=0.1)
            sd[p + "mlp.c_fc.bias"] = r(4 * C, scale=0.1)
            sd[p + "mlp.c_proj.bias"] = r(C, scale=0.1)
        if mask_buffer:  # nanoGPT's slow-attention causal mask, a persistent buffer named "bias"
            sd[p + "attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    sd["transformer.ln_f.weight"] = 1 + r(C, scale=0.1)
    if bias:
        sd["transformer.ln_f.bias"] = r(C, scale=0.1)
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # weight tying: one tensor under two names
    return sd


def nanogpt_forward(sd: dict[str, torch.Tensor], args: dict, idx: torch.Tensor) -> torch.Tensor:
    """nanoGPT's GPT.forward (eval, no dropout) on a raw state dict: logits [B, T, V]."""
    B, T = idx.shape
    C, nh = args["n_embd"], args["n_head"]
    hs = C // nh
    get = sd.get
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(args["n_layer"]):
        p = f"transformer.h.{i}."
        h = F.layer_norm(x, (C,), sd[p + "ln_1.weight"], get(p + "ln_1.bias"), 1e-5)
        qkv = F.linear(h, sd[p + "attn.c_attn.weight"], get(p + "attn.c_attn.bias"))
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in qkv.split(C, dim=2))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        x = x + F.linear(y, sd[p + "attn.c_proj.weight"], get(p + "attn.c_proj.bias"))
        h = F.layer_norm(x, (C,), sd[p + "ln_2.weight"], get(p + "ln_2.bias"), 1e-5)
        h = F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], get(p + "mlp.c_fc.bias")))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], get(p + "mlp.c_proj.bias"))
    x = F.layer_norm(x, (C,), sd["transformer.ln_f.weight"], get("transformer.ln_f.bias"), 1e-5)
    return F.linear(x, sd["lm_head.weight"])


def save_nanogpt(
    file: Path,
    args: dict,
    sd: dict,
    iter_num: int,
    lr: float | None,
    prefix: str = "",
    config: dict | None = None,
) -> Path:
    """torch.save the dict nanoGPT's train.py writes (a real AdamW state over the model's parameters)."""
    params = {k: torch.nn.Parameter(v.clone()) for k, v in sd.items() if not k.endswith(".attn.bias")}
    params.pop("lm_head.weight")
    decay = [p for p in params.values() if p.dim() >= 2]
    nodecay = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}]
    )
    g = torch.Generator().manual_seed(iter_num)
    for p in params.values():  # one real AdamW step on random gradients: distinct second moments
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    for group in opt.param_groups:
        group["lr"] = lr if lr is not None else 1e-3
    ckpt = {
        "model": {prefix + k: v for k, v in sd.items()},
        "optimizer": opt.state_dict() if lr is not None else {},
        "model_args": dict(args, dropout=0.0),
        "iter_num": iter_num,
        "best_val_loss": torch.tensor(3.25),
        "config": config or {"learning_rate": 6e-4, "decay_lr": False, "batch_size": 12, "dataset": "owt"},
    }
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, file)
    return file


ARGS = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 24, "vocab_size": 61}


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("prefix", ["", "_orig_mod."])
def test_nanogpt_logits_equal_the_reference(tmp_path, bias, prefix):
    args = dict(ARGS, bias=bias)
    sd = nanogpt_state(args, seed=3)
    file = save_nanogpt(tmp_path / "out" / "ckpt.pt", args, sd, iter_num=120, lr=2e-4, prefix=prefix)
    (ref,) = ck.discover(tmp_path / "out")
    assert ref.step == 120 and ref.path == file
    model = ck.load_model(ref)
    idx = torch.randint(
        0, args["vocab_size"], (3, args["block_size"]), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        got = model(input_ids=idx).logits
    want = nanogpt_forward(sd, args, idx)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert model.lm_head.weight is model.transformer.wte.weight
    # the parameters commute differentiates are exactly nanoGPT's own (zero biases of bias=False are frozen)
    own = sum(v.numel() for k, v in sd.items() if not k.endswith(".attn.bias") and k != "lm_head.weight")
    assert sum(p.numel() for _, p in param_list(model)) == own
    assert ck.read_config(ref).n_positions == args["block_size"]
    lr = find_learning_rate(ref)
    assert (lr.value, lr.source, lr.step) == (2e-4, "ckpt.pt optimizer param_groups", 120)


def test_nanogpt_learning_rate_from_config(tmp_path):
    args = dict(ARGS, bias=False)
    sd = nanogpt_state(args, seed=1)
    cfg = {"learning_rate": 6e-4, "min_lr": 6e-5, "warmup_iters": 10, "lr_decay_iters": 100, "decay_lr": True}
    # nanoGPT's get_lr (train.py), written out here: warmup, then cosine to min_lr
    for it, want in (
        (4, 6e-4 * 5 / 11),
        (55, 6e-5 + 0.5 * (1 + math.cos(math.pi * 0.5)) * (6e-4 - 6e-5)),
        (200, 6e-5),
    ):
        file = save_nanogpt(tmp_path / f"ckpt_{it}.pt", args, sd, iter_num=it, lr=None, config=cfg)
        lr = find_learning_rate(ck.discover(file)[0])
        assert lr.source == "ckpt.pt config (nanoGPT get_lr)" and lr.value == pytest.approx(want, rel=1e-12)
    file = save_nanogpt(tmp_path / "const.pt", args, sd, iter_num=7, lr=None)
    assert find_learning_rate(ck.discover(file)[0]).value == 6e-4  # decay_lr False: the constant rate
    assert [r.step for r in ck.discover(tmp_path)] == [4, 55, 200]  # step-named files form a run


def test_nanogpt_pickle_payload_and_non_nanogpt_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').close()",))

    args = dict(ARGS, bias=True)
    file = save_nanogpt(tmp_path / "ckpt.pt", args, nanogpt_state(args, 0), iter_num=1, lr=1e-3)
    ckpt = torch.load(file, weights_only=True)
    ckpt["config"]["evil"] = Evil()
    torch.save(ckpt, file)
    with pytest.raises(CommuteError, match="weights_only"):
        ck.discover(tmp_path)
    assert not (tmp_path / "pwned").exists()
    torch.save({"weights": torch.zeros(2)}, file)
    with pytest.raises(CommuteError, match="not a nanoGPT checkpoint"):
        ck.discover(file)


def test_nanogpt_run_analyzed_like_its_transformers_copy(tmp_path, capsys):
    """`commute analyze` on ckpt_N.pt files gives the numbers of the same weights saved by save_pretrained."""
    en, xx = make_texts(EN_WORDS, 120, 0), make_texts(XX_WORDS, 120, 1)
    tok = make_tokenizer(en + xx, tmp_path / "tok")
    write_jsonl(tmp_path / "en.jsonl", en)
    write_jsonl(tmp_path / "xx.jsonl", xx)
    # bias=True: no frozen zero biases, so the saved transformers copy has exactly the same parameters
    args = dict(ARGS, vocab_size=len(tok), bias=True)
    saved = {
        it: save_nanogpt(tmp_path / "nano" / f"ckpt_{it}.pt", args, nanogpt_state(args, seed), it, lr=3e-4)
        for it, seed in ((100, 0), (200, 1))
    }
    a, b, common = analyze_like_transformers_copy(tmp_path, capsys, tmp_path / "nano", saved, 3e-4)
    assert list(a["step"]) == [100, 200]
    pd.testing.assert_frame_equal(a, b, rtol=1e-4, atol=1e-9)
    la, lb = pd.read_csv(tmp_path / "o1" / "losses.csv"), pd.read_csv(tmp_path / "o2" / "losses.csv")
    pd.testing.assert_frame_equal(la, lb, rtol=1e-6)
    run = json.loads((tmp_path / "o1" / "run.json").read_text())
    assert run["checkpoints"][0]["lr_source"]["source"] == "ckpt.pt optimizer param_groups"
    # without --tokenizer: one line naming --tokenizer, exit 2
    no_tok = [a for i, a in enumerate(common) if i not in (6, 7)]
    code, _, err = cli(["analyze", tmp_path / "nano", "--out", tmp_path / "o3", *no_tok], capsys)
    assert code == 2 and "--tokenizer" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_adam_state_mapped_to_the_transformers_names(tmp_path, bias):
    args = dict(ARGS, bias=bias)
    sd = nanogpt_state(args, seed=2)
    file = save_nanogpt(tmp_path / "ckpt.pt", args, sd, iter_num=30, lr=1e-3, prefix="_orig_mod.")
    model = ck.load_model(file)
    state = ck.load_adam_state(ck.discover(file)[0], model)
    saved = torch.load(file, weights_only=True)["optimizer"]
    # nanoGPT's own layout, written out: decay group = dim >= 2, then the rest, named_parameters order
    names = [k for k in sd if not k.endswith(".attn.bias") and k != "lm_head.weight"]
    layout = [n for n in names if sd[n].dim() >= 2] + [n for n in names if sd[n].dim() < 2]
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    for name, i in zip(layout, ids, strict=True):
        want = saved["state"][i]["exp_avg_sq"]
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            want = want.t()
        assert torch.equal(state.exp_avg_sq[name], want), name
    assert state.layout == "nanogpt" and state.lr == 1e-3 and state.step == 1 and not state.missing
    assert set(state.exp_avg_sq) == set(names)  # frozen zero biases of bias=False carry no state
