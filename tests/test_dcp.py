"""Torch distributed checkpoints (DCP): the HF Trainer/accelerate FSDP SHARDED_STATE_DICT layout and
torchtitan's step-N/, written with ``torch.distributed.checkpoint.save`` the way those trainers write them.

References are independent of the loader: the original transformers model (FSDP: the names are the
model's own), and for torchtitan a minimal re-implementation of torchtitan's Llama (``models/llama3/model``:
RMSNorm, rotary embedding by complex multiplication of interleaved pairs, grouped-query attention, SwiGLU)
written here with torch.nn; it shares no code with ``commute_cli.io.torchtitan``.
"""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed.checkpoint as dist_cp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)

from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints as ck
from commute_cli.io import dcp
from commute_cli.io.learning_rate import find_learning_rate
from commute_cli.io.saved_optimizer import optimizer_name

from cli_runner import cli
from tiny_run import make_run

FAST = ["--samples", "12", "--blocks", "2", "--target", "mix", "-q"]


def _save(state: dict, folder: Path) -> None:
    """``dcp.save`` in one process without a process group (what a 1-rank job writes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist_cp.save(state, storage_writer=dist_cp.FileSystemWriter(str(folder)), no_dist=True)


def _adam_step(model: nn.Module, seed: int, lr: float = 1e-3) -> torch.optim.AdamW:
    """One real AdamW step on random gradients: distinct second moments per element."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    return opt


# ------------------------------------------------------------------------------------ HF Trainer + FSDP


def save_hf_fsdp(model: nn.Module, folder: Path, step: int, lr: float, opt=None, tokenizer=None) -> Path:
    """A ``checkpoint-N/`` as the HF Trainer writes it with FSDP SHARDED_STATE_DICT: config.json,
    trainer_state.json, and accelerate's ``save_fsdp_model`` / ``save_fsdp_optimizer`` DCP folders
    (``{"model": state_dict}`` in pytorch_model_fsdp_0/, ``{"optimizer": optim_state}`` in optimizer_0/)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    state = {"global_step": step, "log_history": [{"step": step, "learning_rate": lr, "loss": 0.0}]}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    _save({"model": get_model_state_dict(model)}, folder / "pytorch_model_fsdp_0")
    if opt is not None:
        _save({"optimizer": get_optimizer_state_dict(model, opt)}, folder / "optimizer_0")
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("run") / "run", steps=(0, 10), n_docs=120)


def _flags(run: Path) -> list:
    return [
        "--domains", f"en={run / 'data' / 'en.jsonl'}", f"xx={run / 'data' / 'xx.jsonl'}",
        "--weights", "en=0.7", "xx=0.3", "--tokenizer", run / "tokenizer",
    ]  # fmt: skip


def test_hf_fsdp_logits_and_adam_moments_equal_the_originals(run_dir, tmp_path):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(str(run_dir / "checkpoint-10")).eval()
    opt = _adam_step(model, seed=4)
    folder = save_hf_fsdp(model, tmp_path / "run" / "checkpoint-10", 10, 1e-3, opt=opt)
    (ref,) = ck.discover(tmp_path / "run")
    assert (ref.step, ref.name) == (10, "checkpoint-10")
    assert ck.is_checkpoint_dir(folder)
    loaded = ck.load_model(ref)
    ids = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=0), (got - want).abs().max()  # sdpa vs eager attention
    saved = model.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in loaded.state_dict().items() if k in saved)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    state = ck.load_adam_state(ref, loaded)
    assert state is not None and not state.missing
    for name, param in model.named_parameters():
        assert torch.equal(state.exp_avg_sq[name], opt.state[param]["exp_avg_sq"]), name
    assert (state.step, state.betas, state.eps, state.lr) == (1, (0.9, 0.95), 1e-7, 1e-3)
    assert optimizer_name(ref) == "adamw"
    assert [f.name for f in ck.weight_files(ref)] == [".metadata", "__0_0.distcp"]
    assert set(ck.validate_weights(ref)) == set(model.state_dict())


def test_hf_fsdp_run_analyzed_like_its_transformers_copy(run_dir, tmp_path, capsys):
    """`commute analyze` on a Trainer+FSDP run gives the numbers of the same weights saved by
    save_pretrained (the Adam metric too: the moments of optimizer_0/ against optimizer.safetensors)."""
    from transformers import GPT2LMHeadModel

    from commute_cli.io.optimizer_state import AdamState, param_names, save_adam_state

    for step in (0, 10):
        model = GPT2LMHeadModel.from_pretrained(str(run_dir / f"checkpoint-{step}")).eval()
        opt = _adam_step(model, seed=step)
        save_hf_fsdp(model, tmp_path / "fsdp" / f"checkpoint-{step}", step, 0.05, opt=opt)
        hf = tmp_path / "hf" / f"checkpoint-{step}"
        shutil.copytree(run_dir / f"checkpoint-{step}", hf)
        model.save_pretrained(str(hf))
        moments = {n: opt.state[p]["exp_avg_sq"] for n, p in model.named_parameters()}
        adam = AdamState(moments, step=1, betas=(0.9, 0.95), eps=1e-7, lr=0.05)
        adam.exp_avg_sq = {n: moments[n] for n in param_names(model)}
        save_adam_state(adam, hf / "optimizer.safetensors")
    for metric in ("euclid", "adam"):
        outs = []
        for name in ("fsdp", "hf"):
            out = tmp_path / f"out-{name}-{metric}"
            code, _, err = cli(
                ["analyze", tmp_path / name, "--out", out, "--metric", metric, *_flags(run_dir), *FAST],
                capsys,
            )
            assert code == 0, err
            outs.append(pd.read_csv(out / "results.csv").drop(columns="run_id"))
        assert list(outs[0]["step"].unique()) == [0, 10]
        pd.testing.assert_frame_equal(outs[0], outs[1], rtol=1e-6, atol=1e-12)


def test_hf_fsdp_without_config_says_how_to_write_it(tmp_path):
    from transformers import GPT2LMHeadModel

    from tiny_run import tiny_config

    folder = save_hf_fsdp(GPT2LMHeadModel(tiny_config(40)), tmp_path / "checkpoint_3", 3, 1e-3)
    (folder / "config.json").unlink()  # accelerate's own save_state writes no config.json
    (ref,) = ck.discover(tmp_path)
    with pytest.raises(CommuteError, match=r"FSDP SHARDED_STATE_DICT model .* no config\.json") as info:
        ck.load_model(ref)
    assert "save_pretrained" in str(info.value.hint)


def test_fsdp_per_rank_shards_named(tmp_path):
    folder = tmp_path / "run" / "checkpoint-4"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    torch.save({"flat_param": torch.zeros(8)}, folder / "pytorch_model_fsdp_0_rank0.bin")
    with pytest.raises(CommuteError, match=r"FSDP per-rank shards .*SHARDED_STATE_DICT"):
        ck.discover(tmp_path / "run")


def test_config_without_weights_still_refused_and_unknown_dcp_named(tmp_path):
    (tmp_path / "run" / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-5" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CommuteError, match="no model weights"):
        ck.discover(tmp_path / "run")
    # a DCP of a layout none of the readers knows: the format and the one conversion command
    other = tmp_path / "other" / "step-3"
    _save({"encoder": {"w": torch.ones(2, 2)}}, other)
    with pytest.raises(
        CommuteError, match=r"torch distributed checkpoint \(DCP\).*format_utils dcp_to_torch"
    ):
        ck.discover(tmp_path / "other")


def test_metadata_with_a_pickle_payload_is_refused(tmp_path):
    """``.metadata`` is a pickle: anything outside the DCP metadata allowlist is refused, nothing runs."""

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').close()",))

    folder = tmp_path / "step-1"
    _save({"tok_embeddings.weight": torch.ones(2, 2)}, folder)
    meta = pickle.loads((folder / ".metadata").read_bytes())  # our own file, written just above
    meta.planner_data = {"x": Evil()}
    (folder / ".metadata").write_bytes(pickle.dumps(meta, protocol=4))
    with pytest.raises(CommuteError, match="weights_only unpickler"):
        dcp.read_metadata(folder)
    assert not (tmp_path / "pwned").exists()
    (folder / ".metadata").write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(CommuteError, match="weights_only unpickler"):
        dcp.entries(folder)
    assert not (tmp_path / "pwned").exists()


def test_metadata_reencoding_keeps_every_value(tmp_path):
    """The protocol-2 re-encoding reads exactly what pickle itself reads (nested keys, bytes entries)."""
    state = {
        "model": {"a.weight": torch.randn(3, 4), "b": torch.tensor(2)},
        "optimizer": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "params": ["a.weight"]}]},
    }
    _save(state, tmp_path / "ck")
    want = pickle.loads((tmp_path / "ck" / ".metadata").read_bytes())  # our own file
    assert dcp.read_metadata(tmp_path / "ck") == want
    got = dcp.load(tmp_path / "ck", ["model.a.weight", "optimizer.param_groups.0.betas"])
    assert torch.equal(got["model.a.weight"], state["model"]["a.weight"])
    assert tuple(got["optimizer.param_groups.0.betas"]) == (0.9, 0.95)


# ------------------------------------------------------------------------------------------- torchtitan


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, freqs_cis):
        bs, seq, _ = x.shape
        q = self.wq(x).view(bs, seq, self.n_heads, self.head_dim)
        k = self.wk(x).view(bs, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bs, seq, self.n_kv_heads, self.head_dim)
        q, k = (  # torchtitan's apply_rotary_emb: interleaved pairs as complex numbers
            torch.view_as_real(torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2)) * freqs_cis)
            .flatten(3)
            .type_as(t)
            for t in (q, k)
        )
        rep = self.n_heads // self.n_kv_heads
        k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(bs, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a: dict):
        super().__init__()
        self.attention = Attention(a["dim"], a["n_heads"], a["n_kv_heads"])
        self.feed_forward = FeedForward(a["dim"], a["hidden"])
        self.attention_norm = RMSNorm(a["dim"], a["eps"])
        self.ffn_norm = RMSNorm(a["dim"], a["eps"])

    def forward(self, x, freqs_cis):
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class TitanLlama(nn.Module):
    """torchtitan's Llama 3 (``Transformer``) in miniature, with its parameter names."""

    def __init__(self, a: dict):
        super().__init__()
        self.tok_embeddings = nn.Embedding(a["vocab"], a["dim"])
        self.layers = nn.ModuleDict({str(i): Block(a) for i in range(a["n_layers"])})
        self.norm = RMSNorm(a["dim"], a["eps"])
        self.output = nn.Linear(a["dim"], a["vocab"], bias=False)
        hd = a["dim"] // a["n_heads"]
        freqs = 1.0 / (a["theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
        angles = torch.outer(torch.arange(a["seq"]).float(), freqs)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=True)
        with torch.no_grad():  # non-trivial norm weights, so a mix-up of the norms shows
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(0.3 * torch.randn(p.shape))

    def forward(self, ids):
        h = self.tok_embeddings(ids)
        freqs = self.freqs_cis[: ids.shape[1]].view(1, ids.shape[1], 1, -1)
        for layer in self.layers.values():
            h = layer(h, freqs)
        return self.output(self.norm(h))


TITAN = {"vocab": 61, "dim": 32, "n_heads": 4, "n_kv_heads": 2, "hidden": 48, "n_layers": 2, "eps": 1e-5}
TITAN |= {"theta": 10000.0, "seq": 32}


def llama_config(a: dict):
    """The transformers config of the same sizes (what the run's HF assets config.json holds)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=a["vocab"],
        hidden_size=a["dim"],
        intermediate_size=a["hidden"],
        num_hidden_layers=a["n_layers"],
        num_attention_heads=a["n_heads"],
        num_key_value_heads=a["n_kv_heads"],
        rms_norm_eps=a["eps"],
        rope_theta=a["theta"],
        max_position_embeddings=a["seq"],
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
    )


def save_torchtitan(model: TitanLlama, folder: Path, step: int, lr: float, seed: int, prefix: bool = False):
    """``step-N/`` as torchtitan's CheckpointManager saves it: the model's state dict merged at the top
    level (or under ``model.`` for releases before the merge), the optimizer flattened by parameter name,
    and the train state."""
    opt = _adam_step(model, seed, lr)
    model_sd = get_model_state_dict(model)
    optim_sd = get_optimizer_state_dict(
        model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True)
    )
    state = {"model": model_sd} if prefix else dict(model_sd)
    state |= {"optimizer": optim_sd, "train_state": {"step": torch.tensor(step, dtype=torch.int32)}}
    _save(state, folder)
    return opt


@pytest.mark.parametrize("prefix", [False, True])
def test_torchtitan_logits_equal_its_own_forward(tmp_path, prefix):
    torch.manual_seed(1)
    model = TitanLlama(TITAN).eval()
    ckpt = tmp_path / "checkpoint"
    opt = save_torchtitan(model, ckpt / "step-20", 20, lr=3e-4, seed=2, prefix=prefix)
    # torchtitan keeps sizes in its Python flavours: without config.json the one line says what to do
    with pytest.raises(CommuteError, match=r"torchtitan.*config\.json"):
        ck.load_model(ck.discover(ckpt)[0])
    llama_config(TITAN).save_pretrained(str(ckpt))
    (ref,) = ck.discover(ckpt)
    assert (ref.step, ref.name) == (20, "step-20")
    loaded = ck.load_model(ref)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, TITAN["vocab"], (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(ids), loaded(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    lr = find_learning_rate(ref)
    assert (lr.value, lr.source, lr.step) == (pytest.approx(3e-4), "step-20/ param_groups (torch DCP)", 20)
    # Adam's moments move with their weights: the row order found by matching q_proj's rows to wq's
    state = ck.load_adam_state(ref, loaded)
    assert state is not None and not state.missing and state.step == 1 and state.betas == (0.9, 0.95)
    params = dict(model.named_parameters())
    hf = dict(loaded.named_parameters())
    for i in range(TITAN["n_layers"]):
        for tt, name in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
            w_tt, w_hf = (
                params[f"layers.{i}.attention.{tt}.weight"],
                hf[f"model.layers.{i}.self_attn.{name}.weight"],
            )
            rows = [int((w_tt == row).all(dim=1).nonzero()) for row in w_hf]  # rows of random weights differ
            assert sorted(rows) == list(range(w_tt.shape[0])) and (rows != sorted(rows)) == (tt != "wv")
            sq = opt.state[params[f"layers.{i}.attention.{tt}.weight"]]["exp_avg_sq"]
            assert torch.equal(state.exp_avg_sq[f"model.layers.{i}.self_attn.{name}.weight"], sq[rows])
    emb = opt.state[params["tok_embeddings.weight"]]["exp_avg_sq"]
    assert torch.equal(state.exp_avg_sq["model.embed_tokens.weight"], emb)


def test_torchtitan_config_that_does_not_fit_is_refused(tmp_path):
    torch.manual_seed(0)
    save_torchtitan(TitanLlama(TITAN), tmp_path / "step-5", 5, lr=1e-3, seed=0)
    llama_config(dict(TITAN, n_kv_heads=4)).save_pretrained(str(tmp_path))
    with pytest.raises(CommuteError, match="does not describe"):
        ck.load_model(tmp_path / "step-5")


def test_torchtitan_run_analyzed_like_its_transformers_copy(run_dir, tmp_path, capsys):
    """`commute analyze` on torchtitan step-N/ folders gives the numbers of the same weights saved by
    save_pretrained (learning rate from the saved param groups against trainer_state.json)."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(run_dir / "tokenizer")))
    args = dict(TITAN, vocab=vocab)
    llama_config(args).save_pretrained(str(tmp_path / "titan"))
    for step, seed in ((100, 0), (200, 1)):
        torch.manual_seed(seed)
        model = TitanLlama(args).eval()
        save_torchtitan(model, tmp_path / "titan" / f"step-{step}", step, lr=2e-3, seed=seed)
        hf = tmp_path / "hf" / f"checkpoint-{step}"
        ck.load_model(tmp_path / "titan" / f"step-{step}").save_pretrained(str(hf))
        log = {"global_step": step, "log_history": [{"step": step, "learning_rate": 2e-3}]}
        (hf / "trainer_state.json").write_text(json.dumps(log))
    outs = []
    for name in ("titan", "hf"):
        code, _, err = cli(
            ["analyze", tmp_path / name, "--out", tmp_path / f"o-{name}", *_flags(run_dir), *FAST], capsys
        )
        assert code == 0, err
        outs.append(pd.read_csv(tmp_path / f"o-{name}" / "results.csv").drop(columns="run_id"))
    assert list(outs[0]["step"].unique()) == [100, 200]
    pd.testing.assert_frame_equal(outs[0], outs[1], rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------------------- two ranks, real FSDP2

FSDP2_SCRIPT = """
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import GPT2Config, GPT2LMHeadModel
out = sys.argv[1]
dist.init_process_group("gloo")
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0)
model = GPT2LMHeadModel(cfg)
for block in model.transformer.h:
    fully_shard(block)
fully_shard(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
model(ids, labels=ids).loss.backward()
opt.step()
# accelerate's save_fsdp_model / save_fsdp_optimizer with fsdp_version=2, SHARDED_STATE_DICT
writer = dcp.FileSystemWriter
dcp.save({"model": get_model_state_dict(model)}, storage_writer=writer(out + "/pytorch_model_fsdp_0"))
dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, storage_writer=writer(out + "/optimizer_0"))
full = {n: p.full_tensor() for n, p in model.named_parameters()}
moments = {n: opt.state[p]["exp_avg_sq"].full_tensor() for n, p in model.named_parameters()}
if dist.get_rank() == 0:
    torch.save({"weights": full, "exp_avg_sq": moments}, out + "/reference.pt")
    cfg.save_pretrained(out)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_rank_fsdp2_sharded_save_assembled(tmp_path):
    """A real 2-rank FSDP2 job (gloo, torchrun) saves its shards as accelerate does; commute assembles the
    chunks of both ranks into the full weights and moments (~50 s on a loaded 2-core CPU)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "train_fsdp.py"
    script.write_text(FSDP2_SCRIPT)
    folder = tmp_path / "run" / "checkpoint-1"
    env = {
        k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(
        [*cmd, str(folder)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (folder / "pytorch_model_fsdp_0").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    ref = torch.load(folder / "reference.pt", weights_only=True)
    model = ck.load_model(folder)
    for name, param in model.named_parameters():
        assert torch.equal(param, ref["weights"][name]), name
    state = ck.load_adam_state(folder, model)
    assert state is not None and not state.missing and state.betas == (0.9, 0.95)
    for name in state.exp_avg_sq:
        assert torch.equal(state.exp_avg_sq[name], ref["exp_avg_sq"][name]), name


# -------------------------------------------------------------------------------------------- OLMo-core


def olmo_core_config(a: dict, block: str = "reordered_norm") -> dict:
    """``stepN/config.json`` as OLMo-core's ConfigSaverCallback writes it: the experiment config, whose
    ``model`` is ``TransformerConfig.as_config_dict()`` (the form of OLMo-core 3.0's ``olmo2_*``
    factories)."""
    norm = {"name": "rms", "eps": a["eps"], "bias": False, "dtype": "float32"}
    mixer = {
        "name": "default",
        "n_heads": a["n_heads"],
        "n_kv_heads": a["n_kv_heads"],
        "bias": False,
        "rope": {
            "name": "default",
            "theta": a["theta"],
            "full_precision": True,
            "partial_rotary_factor": 1.0,
        },
        "dtype": "float32",
        "use_head_qk_norm": False,
        "type": "attention",
    }
    if block == "reordered_norm":
        mixer["qk_norm"] = dict(norm)
    model = {
        "d_model": a["dim"],
        "vocab_size": a["vocab"],
        "n_layers": a["n_layers"],
        "block": {
            "sequence_mixer": mixer,
            "layer_norm": dict(norm),
            "feed_forward": {
                "hidden_size": a["hidden"],
                "name": "default",
                "bias": False,
                "activation": "silu",
            },
            "name": block,
        },
        "lm_head": {"name": "default", "layer_norm": dict(norm), "bias": False},
        "name": "default",
        "tie_word_embeddings": False,
    }
    return {"model": model, "dataset": {"sequence_length": a["seq"]}, "trainer": {"save_folder": "run"}}


class OlmoAttention(nn.Module):
    """OLMo-core's ``Attention`` with QK norm over the whole projection and half-split rotary embedding."""

    def __init__(self, a: dict, qk_norm: bool):
        super().__init__()
        d, h, kv = a["dim"], a["n_heads"], a["n_kv_heads"]
        self.h, self.kv, self.hd = h, kv, d // h
        self.w_q, self.w_k = nn.Linear(d, d, bias=False), nn.Linear(d, kv * self.hd, bias=False)
        self.w_v, self.w_out = nn.Linear(d, kv * self.hd, bias=False), nn.Linear(d, d, bias=False)
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(d, a["eps"]), RMSNorm(kv * self.hd, a["eps"])
        self.theta = a["theta"]

    def rope(self, x):
        seq, hd = x.shape[1], x.shape[-1]
        inv = 1.0 / (self.theta ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.cat([torch.outer(torch.arange(seq).float(), inv)] * 2, dim=-1)[None, :, None, :]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * ang.cos() + torch.cat([-x2, x1], dim=-1) * ang.sin()

    def forward(self, x):
        bs, seq, _ = x.shape
        q, k, v = self.w_q(x), self.w_k(x), self.w_v(x)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.rope(q.view(bs, seq, self.h, self.hd))
        k = self.rope(k.view(bs, seq, self.kv, self.hd))
        v = v.view(bs, seq, self.kv, self.hd)
        k, v = (t.repeat_interleave(self.h // self.kv, dim=2) for t in (k, v))
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        return self.w_out(out.transpose(1, 2).reshape(bs, seq, -1))


class OlmoBlock(nn.Module):
    def __init__(self, a: dict, reordered: bool):
        super().__init__()
        self.reordered = reordered
        self.attention = OlmoAttention(a, qk_norm=reordered)
        self.feed_forward = FeedForward(a["dim"], a["hidden"])
        self.attention_norm, self.feed_forward_norm = RMSNorm(a["dim"], a["eps"]), RMSNorm(a["dim"], a["eps"])

    def forward(self, x):
        if self.reordered:  # OLMo 2: the norm on each sub-layer's output, inside the residual
            h = x + self.attention_norm(self.attention(x))
            return h + self.feed_forward_norm(self.feed_forward(h))
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.feed_forward_norm(h))


class LMHead(nn.Module):
    def __init__(self, a: dict):
        super().__init__()
        self.norm, self.w_out = RMSNorm(a["dim"], a["eps"]), nn.Linear(a["dim"], a["vocab"], bias=False)

    def forward(self, x):
        return self.w_out(self.norm(x))


class OlmoTransformer(nn.Module):
    """OLMo-core's ``Transformer`` in miniature, with its parameter names."""

    def __init__(self, a: dict, reordered: bool = True):
        super().__init__()
        self.embeddings = nn.Embedding(a["vocab"], a["dim"])
        self.blocks = nn.ModuleDict({str(i): OlmoBlock(a, reordered) for i in range(a["n_layers"])})
        self.lm_head = LMHead(a)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if "norm" in name:
                    p.add_(0.3 * torch.randn(p.shape))

    def forward(self, ids):
        h = self.embeddings(ids)
        for block in self.blocks.values():
            h = block(h)
        return self.lm_head(h)


def save_olmo_core(model: OlmoTransformer, folder: Path, config: dict, lr: float, seed: int):
    """``stepN/`` as OLMo-core's Checkpointer writes it: ``model_and_optim/`` (the train module's
    ``{"model": ..., "optim": ...}``, optimizer flattened), ``train/rank0.pt``, and config.json."""
    opt = _adam_step(model, seed, lr)
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, opt, options=options),
    }
    _save(state, folder / "model_and_optim")
    (folder / "train").mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": int(folder.name.removeprefix("step"))}, folder / "train" / "rank0.pt")
    (folder / "config.json").write_text(json.dumps(config))
    return opt


@pytest.mark.parametrize("block", ["reordered_norm", "default"])
def test_olmo_core_logits_equal_its_own_forward(tmp_path, block):
    torch.manual_seed(3)
    model = OlmoTransformer(TITAN, reordered=block == "reordered_norm").eval()
    opt = save_olmo_core(model, tmp_path / "run" / "step300", olmo_core_config(TITAN, block), 4e-4, seed=1)
    (ref,) = ck.discover(tmp_path / "run")
    assert (ref.step, ref.name) == (300, "step300")
    loaded = ck.load_model(ref)
    want_class = "Olmo2ForCausalLM" if block == "reordered_norm" else "LlamaForCausalLM"
    assert type(loaded).__name__ == want_class
    ids = torch.randint(0, TITAN["vocab"], (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(ids), loaded(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    state = ck.load_adam_state(ref, loaded)
    assert state is not None and not state.missing and state.lr == pytest.approx(4e-4)
    params = dict(model.named_parameters())
    q = opt.state[params["blocks.1.attention.w_q.weight"]]["exp_avg_sq"]
    assert torch.equal(state.exp_avg_sq["model.layers.1.self_attn.q_proj.weight"], q)
    assert find_learning_rate(ref).value == pytest.approx(4e-4)


def test_olmo_core_model_transformers_cannot_express_is_refused(tmp_path):
    torch.manual_seed(0)
    config = olmo_core_config(TITAN)
    config["model"]["block"]["sequence_mixer"]["rope"]["name"] = "complex"
    save_olmo_core(OlmoTransformer(TITAN), tmp_path / "step5", config, 1e-3, seed=0)
    with pytest.raises(CommuteError, match=r"OLMo-core checkpoint .*cannot express .*'complex'") as info:
        ck.load_model(tmp_path / "step5")
    assert "convert_checkpoint_to_hf.py --checkpoint-input-path" in str(info.value.hint)
    (tmp_path / "step5" / "config.json").unlink()
    with pytest.raises(CommuteError, match=r"without its experiment config\.json"):
        ck.read_config(tmp_path / "step5")


def test_olmo_core_written_by_olmo_core_itself(tmp_path):
    """With OLMo-core installed: its own model, saved as its train module saves, against its own forward."""
    olmo = pytest.importorskip("olmo_core.nn.transformer")
    for cfg in (
        olmo.TransformerConfig.olmo2_30M(vocab_size=64),
        olmo.TransformerConfig.llama_like(d_model=64, vocab_size=64, n_layers=2, n_heads=4, n_kv_heads=2),
    ):
        torch.manual_seed(0)
        model = cfg.build(init_device="cpu").eval()
        folder = tmp_path / cfg.block.name / "step7"
        _save({"model": get_model_state_dict(model)}, folder / "model_and_optim")
        (folder / "config.json").write_text(json.dumps({"model": cfg.as_config_dict()}))
        loaded = ck.load_model(ck.discover(folder.parent)[0])
        ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model(ids)
            want = getattr(out, "logits", out)
            assert torch.allclose(loaded(ids).logits, want, atol=1e-5, rtol=0)


def test_olmo_core_run_analyzed_like_its_transformers_copy(run_dir, tmp_path, capsys):
    """`commute analyze` on OLMo-core stepN/ folders gives the numbers of the same weights saved by
    save_pretrained, with the Adam metric (moments from model_and_optim/ against optimizer.safetensors)."""
    from transformers import AutoTokenizer

    from commute_cli.io.optimizer_state import save_adam_state

    args = dict(TITAN, vocab=len(AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))))
    for step, seed in ((1000, 0), (2000, 1)):
        torch.manual_seed(seed)
        folder = tmp_path / "olmo" / f"step{step}"
        save_olmo_core(OlmoTransformer(args).eval(), folder, olmo_core_config(args), 3e-4, seed=seed)
        hf = tmp_path / "hf" / f"checkpoint-{step}"
        model = ck.load_model(folder)
        model.save_pretrained(str(hf))
        save_adam_state(ck.load_adam_state(folder, model), hf / "optimizer.safetensors")
        log = {"global_step": step, "log_history": [{"step": step, "learning_rate": 3e-4}]}
        (hf / "trainer_state.json").write_text(json.dumps(log))
    outs = []
    for name in ("olmo", "hf"):
        out = tmp_path / f"o-{name}"
        code, _, err = cli(
            ["analyze", tmp_path / name, "--out", out, "--metric", "adam", *_flags(run_dir), *FAST], capsys
        )
        assert code == 0, err
        outs.append(pd.read_csv(out / "results.csv").drop(columns="run_id"))
    assert list(outs[0]["step"].unique()) == [1000, 2000]
    pd.testing.assert_frame_equal(outs[0], outs[1], rtol=1e-6, atol=1e-12)
