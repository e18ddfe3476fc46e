"""LitGPT lit_model.pth folders: Llama-like ones read as LlamaForCausalLM, logits against LitGPT's forward;
the rest refused with one line naming the format and LitGPT's own converter.

The reference below re-implements LitGPT's ``GPT.forward`` for its Llama configs (``RMSNorm``, RoPE by halves,
grouped-query attention with each key/value group repeated for its query heads, ``LLaMAMLP``) on the raw
LitGPT state dict with torch.nn.functional; it shares no code with the loader.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

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

LLAMA = dict(
    name="micro-llama-test", block_size=32, vocab_size=60, padding_multiple=64, padded_vocab_size=64,
    n_layer=2, n_head=4, head_size=6, n_embd=16, rotary_percentage=1.0, parallel_residual=False,
    bias=False, lm_head_bias=False, n_query_groups=2, shared_attention_norm=False,
    norm_class_name="RMSNorm", post_attention_norm=False, post_mlp_norm=False, norm_eps=1e-5,
    mlp_class_name="LLaMAMLP", gelu_approximate="none", intermediate_size=40, rope_condense_ratio=1,
    rope_base=500, n_expert=0, scale_embeddings=False, attention_scores_scalar=None,
    sliding_window_size=None, rope_adjustments=None, attention_logit_softcapping=None,
    final_logit_softcapping=None, norm_qk=False,
)  # fmt: skip


def lit_state(cfg: dict, seed: int, *, interleaved: bool = False, tied: bool = False) -> dict:
    """LitGPT's GPT state dict (Linear [out, in]); ``attn.qkv`` [q; k; v], or ``attn.attn`` by group."""
    g = torch.Generator().manual_seed(seed)
    C, V, hs, nh, ng = (
        cfg["n_embd"],
        cfg["padded_vocab_size"],
        cfg["head_size"],
        cfg["n_head"],
        cfg["n_query_groups"],
    )

    def r(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    sd = {"transformer.wte.weight": r(V, C)}
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        q, k, v = r(nh * hs, C), r(ng * hs, C), r(ng * hs, C)
        if interleaved:
            per = nh // ng
            groups = [
                torch.cat(
                    [q[j * per * hs : (j + 1) * per * hs], k[j * hs : (j + 1) * hs], v[j * hs : (j + 1) * hs]]
                )
                for j in range(ng)
            ]
            sd[p + "attn.attn.weight"] = torch.cat(groups)
        else:
            sd[p + "attn.qkv.weight"] = torch.cat([q, k, v])
        sd[p + "norm_1.weight"] = 1 + r(C, scale=0.1)
        sd[p + "attn.proj.weight"] = r(C, nh * hs)
        sd[p + "norm_2.weight"] = 1 + r(C, scale=0.1)
        sd[p + "mlp.fc_1.weight"] = r(cfg["intermediate_size"], C)
        sd[p + "mlp.fc_2.weight"] = r(cfg["intermediate_size"], C)
        sd[p + "mlp.proj.weight"] = r(C, cfg["intermediate_size"])
    sd["transformer.ln_f.weight"] = 1 + r(C, scale=0.1)
    sd["lm_head.weight"] = sd["transformer.wte.weight"] if tied else r(V, C)
    return sd


def lit_forward(sd: dict, cfg: dict, idx: torch.Tensor) -> torch.Tensor:
    """LitGPT's GPT.forward for a Llama config (eval): logits [B, T, padded_vocab]."""
    B, T = idx.shape
    hs, nh, ng = cfg["head_size"], cfg["n_head"], cfg["n_query_groups"]

    def rms(x, w):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + cfg["norm_eps"]) * w

    theta = 1.0 / (cfg["rope_base"] ** (torch.arange(0, hs, 2).float() / hs))
    angles = torch.outer(torch.arange(T).float(), theta).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()

    def rope(x):
        x1, x2 = x[..., : hs // 2], x[..., hs // 2 :]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    x = sd["transformer.wte.weight"][idx]
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        h = rms(x, sd[p + "norm_1.weight"])
        if p + "attn.qkv.weight" in sd:
            q, k, v = F.linear(h, sd[p + "attn.qkv.weight"]).split((nh * hs, ng * hs, ng * hs), dim=-1)
        else:  # earlier LitGPT: per query group [q of its heads, k, v]
            qkv = F.linear(h, sd[p + "attn.attn.weight"]).view(B, T, ng, nh // ng + 2, hs)
            q, k, v = qkv[..., :-2, :], qkv[..., -2:-1, :], qkv[..., -1:, :]
            q, k, v = q.reshape(B, T, nh * hs), k.reshape(B, T, ng * hs), v.reshape(B, T, ng * hs)
        q = rope(q.view(B, T, nh, hs).transpose(1, 2))
        k = rope(k.view(B, T, ng, hs).transpose(1, 2)).repeat_interleave(nh // ng, dim=1)
        v = v.view(B, T, ng, hs).transpose(1, 2).repeat_interleave(nh // ng, dim=1)
        att = (q @ k.transpose(-2, -1) / math.sqrt(hs)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + F.linear((att @ v).transpose(1, 2).reshape(B, T, nh * hs), sd[p + "attn.proj.weight"])
        h = rms(x, sd[p + "norm_2.weight"])
        h = F.silu(F.linear(h, sd[p + "mlp.fc_1.weight"])) * F.linear(h, sd[p + "mlp.fc_2.weight"])
        x = x + F.linear(h, sd[p + "mlp.proj.weight"])
    return F.linear(rms(x, sd["transformer.ln_f.weight"]), sd["lm_head.weight"])


def write_lit(folder: Path, cfg: dict, sd: dict, step: int | None, lr: float = 4e-4) -> Path:
    """What `litgpt pretrain` saves (step is None: a bare state dict, as convert/finetune write)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    if step is None:
        torch.save(sd, folder / "lit_model.pth")
    else:
        params = [torch.nn.Parameter(t.clone()) for t in sd.values()]
        opt = torch.optim.AdamW(params, lr=lr)
        torch.save({"model": sd, "optimizer": opt.state_dict(), "iter_num": 4 * step, "step_count": step},
                   folder / "lit_model.pth")  # fmt: skip
    (folder / "model_config.yaml").write_text(yaml.safe_dump(cfg))
    return folder


IDX = torch.randint(0, 60, (3, 20), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("interleaved", "tied"), [(False, False), (True, False), (False, True)])
def test_litgpt_llama_logits_equal_litgpt_forward(tmp_path, interleaved, tied):
    sd = lit_state(LLAMA, seed=1, interleaved=interleaved, tied=tied)
    folder = write_lit(tmp_path / "out" / "step-00000050", LLAMA, sd, step=50)
    (ref,) = ck.discover(tmp_path / "out")
    assert (ref.path, ref.step) == (folder, 50)
    model = ck.load_model(ref)
    with torch.no_grad():
        got = model(input_ids=IDX).logits
    want = lit_forward(sd, LLAMA, IDX)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert model.config.tie_word_embeddings == tied and model.config.vocab_size == 64
    lr = find_learning_rate(ref)
    assert (lr.value, lr.step) == (4e-4, 50) and lr.source.startswith("lit_model.pth optimizer")


def test_litgpt_bare_state_dict_and_file_path(tmp_path):
    sd = lit_state(LLAMA, seed=2)
    folder = write_lit(tmp_path / "converted", LLAMA, sd, step=None)
    (ref,) = ck.discover(folder / "lit_model.pth")
    assert ref.path == folder and ref.step is None
    with torch.no_grad():
        got = ck.load_model(ref)(input_ids=IDX).logits
    assert torch.allclose(got, lit_forward(sd, LLAMA, IDX), atol=1e-5, rtol=0)


def test_litgpt_pythia_refused_with_the_conversion_command(tmp_path, capsys):
    pythia = dict(LLAMA, name="pythia-14m", norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP",
                  rotary_percentage=0.25, parallel_residual=True, bias=True)  # fmt: skip
    step = write_lit(tmp_path / "out" / "step-00000100", pythia, lit_state(LLAMA, seed=3), step=100)
    for path in (tmp_path / "out", step, step / "lit_model.pth"):
        with pytest.raises(CommuteError) as err:
            ck.load_model(ck.discover(path)[0])
        line = err.value.one_line()
        assert "LitGPT checkpoint (lit_model.pth + model_config.yaml, pythia-14m, 2 layers" in line
        assert "norm_class_name='LayerNorm'" in line and f"litgpt convert_from_litgpt {step} OUT" in line
    tok = tmp_path / "tok"
    make_tokenizer(make_texts(EN_WORDS, 20, 0), tok)
    write_jsonl(tmp_path / "a.jsonl", make_texts(EN_WORDS, 20, 0))
    write_jsonl(tmp_path / "b.jsonl", make_texts(XX_WORDS, 20, 1))
    domains = [f"a={tmp_path}/a.jsonl", f"b={tmp_path}/b.jsonl"]
    args = [
        "analyze",
        tmp_path / "out",
        "--domains",
        *domains,
        "--weights",
        "a=0.5",
        "b=0.5",
        "--tokenizer",
        tok,
    ]
    code, _, err = cli(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "litgpt convert_from_litgpt" in err


def test_litgpt_run_analyzed_like_its_transformers_copy(tmp_path, capsys):
    """`commute analyze` on a LitGPT pretrain run equals it on the same weights saved by save_pretrained."""
    en, xx = make_texts(EN_WORDS, 120, 0), make_texts(XX_WORDS, 120, 1)
    make_tokenizer(en + xx, tmp_path / "tok", vocab_size=300)
    write_jsonl(tmp_path / "en.jsonl", en)
    write_jsonl(tmp_path / "xx.jsonl", xx)
    cfg = dict(LLAMA, vocab_size=300, padded_vocab_size=320)
    saved = {
        it: write_lit(tmp_path / "lit" / f"step-{it:08d}", cfg, lit_state(cfg, seed), step=it, lr=3e-4)
        for it, seed in ((100, 5), (200, 6))
    }
    a, b, _ = analyze_like_transformers_copy(tmp_path, capsys, tmp_path / "lit", saved, 3e-4)
    assert list(a["step"]) == [100, 200]
    pd.testing.assert_frame_equal(a, b, rtol=1e-4, atol=1e-9)
