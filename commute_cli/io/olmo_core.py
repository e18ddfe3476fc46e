"""OLMo-core checkpoints (``<save_folder>/stepN/``) read as transformers' ``Olmo2ForCausalLM`` (or
``LlamaForCausalLM`` for OLMo-core's pre-norm Llama-like models).

OLMo-core's ``Checkpointer.save`` writes ``stepN/model_and_optim/``, a torch distributed checkpoint of the
train module's ``{"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(...)}`` (the
optimizer flattened by parameter name or nested, both read), ``stepN/train/rank*.pt`` (trainer state) and,
through its ``ConfigSaverCallback``, ``stepN/config.json``: the experiment config, whose ``model`` entry is
the ``TransformerConfig`` (``d_model``, ``vocab_size``, ``n_layers``, ``block`` with its
``sequence_mixer`` -- ``attention`` in older releases -- ``feed_forward`` and ``layer_norm``, ``lm_head``).

The transformers config is built from that ``model`` entry and the weights renamed with OLMo-core's own
mapping (``olmo_core.nn.hf.convert``: ``OLMO_CORE_TO_HF_WEIGHT_MAPPINGS``, with its ``llama`` override):

=====================================  ===================================================================
OLMo-core                              transformers
=====================================  ===================================================================
``embeddings.weight``                  ``model.embed_tokens.weight``
``blocks.N.attention.w_q/w_k/w_v``     ``model.layers.N.self_attn.q_proj/k_proj/v_proj``
``blocks.N.attention.w_out``           ``model.layers.N.self_attn.o_proj``
``blocks.N.attention.q_norm/k_norm``   ``model.layers.N.self_attn.q_norm/k_norm`` (Olmo2)
``blocks.N.attention_norm``            ``post_attention_layernorm`` (Olmo2's reordered norm) /
                                       ``input_layernorm`` (pre-norm Llama)
``blocks.N.feed_forward_norm``         ``post_feedforward_layernorm`` (Olmo2) / ``post_attention_layernorm``
``blocks.N.feed_forward.w1/w2/w3``     ``model.layers.N.mlp.gate_proj/down_proj/up_proj``
``lm_head.norm`` / ``lm_head.w_out``   ``model.norm`` / ``lm_head``
=====================================  ===================================================================

OLMo-core's default rotary embedding rotates halves, as transformers does, so no weight is permuted. Models
that transformers' Olmo2/Llama classes cannot express (MoE, complex or scaled RoPE, head-wise QK norm, biased
feed-forward, norms with different epsilons) are refused with OLMo-core's converter command.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import torch

from commute_cli.errors import CommuteError
from commute_cli.io import dcp
from commute_cli.io.dcp_checkpoints import DcpLayout
from commute_cli.io.safefiles import read_json

KIND = "OLMo-core"
STATE_DIR = "model_and_optim"
_LAYER = re.compile(r"^blocks\.(\d+)\.(.+)$")
_COMMON = {
    "attention.w_q.weight": "self_attn.q_proj.weight",
    "attention.w_k.weight": "self_attn.k_proj.weight",
    "attention.w_v.weight": "self_attn.v_proj.weight",
    "attention.w_out.weight": "self_attn.o_proj.weight",
    "attention.w_q.bias": "self_attn.q_proj.bias",
    "attention.w_k.bias": "self_attn.k_proj.bias",
    "attention.w_v.bias": "self_attn.v_proj.bias",
    "attention.w_out.bias": "self_attn.o_proj.bias",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
_IN_LAYER = {
    "olmo2": _COMMON
    | {
        "attention.q_norm.weight": "self_attn.q_norm.weight",
        "attention.k_norm.weight": "self_attn.k_norm.weight",
        "attention_norm.weight": "post_attention_layernorm.weight",
        "feed_forward_norm.weight": "post_feedforward_layernorm.weight",
    },
    "llama": _COMMON
    | {
        "attention_norm.weight": "input_layernorm.weight",
        "feed_forward_norm.weight": "post_attention_layernorm.weight",
    },
}
_TOP = {
    "embeddings.weight": "model.embed_tokens.weight",
    "lm_head.norm.weight": "model.norm.weight",
    "lm_head.w_out.weight": "lm_head.weight",
}


def convert_command(folder: Path) -> str:
    """OLMo-core's own converter, for messages."""
    return (
        "python src/examples/huggingface/convert_checkpoint_to_hf.py "
        f"--checkpoint-input-path {folder} --huggingface-output-dir OUT --max-sequence-length 4096 "
        "(from an OLMo-core checkout), then analyze OUT"
    )


def detect(folder: Path) -> DcpLayout | None:
    """``stepN/`` with a DCP ``model_and_optim/`` whose model tensors carry OLMo-core's names."""
    state = folder / STATE_DIR
    if not (dcp.is_dcp(state) and dcp.mentions(state, "model.embeddings.weight")):
        return None
    return DcpLayout(
        folder=folder,
        weights=state,
        optimizer=state if dcp.mentions(state, "optim") else None,
        model_path=("model",),
        optim_key="optim",
        fmt=sys.modules[__name__],
    )


def _refuse(layout: DcpLayout, what: str) -> CommuteError:
    return CommuteError(
        f"{layout.folder} is an OLMo-core checkpoint whose model transformers' Olmo2/Llama classes cannot "
        f"express ({what})",
        hint=f"convert it once with OLMo-core's converter: {convert_command(layout.folder)}",
    )


def _section(parent: dict[str, Any], *names: str) -> dict[str, Any]:
    for name in names:
        value = parent.get(name)
        if isinstance(value, dict):
            return value
    return {}


def config(layout: DcpLayout) -> Any:
    """The transformers config of ``stepN/config.json``'s ``model`` entry (module docstring)."""
    from transformers import LlamaConfig, Olmo2Config

    file = layout.folder / "config.json"
    raw = read_json(file, "OLMo-core config") if file.is_file() else None
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, dict) or "d_model" not in model:
        raise CommuteError(
            f"{layout.folder} is an OLMo-core checkpoint without its experiment config.json (the model's "
            "sizes are only there)",
            hint=f"copy config.json from the run's other stepN/ folders, or convert: "
            f"{convert_command(layout.folder)}",
        )
    block = _section(model, "block")
    attn = _section(block, "sequence_mixer", "attention")
    rope = _section(attn, "rope")
    norm = _section(block, "layer_norm")
    ff = _section(block, "feed_forward")
    qk = _section(attn, "qk_norm")
    head_norm = _section(_section(model, "lm_head"), "layer_norm")
    kind = {"reordered_norm": "olmo2", "default": "llama"}.get(str(block.get("name", "default")))
    if kind is None or model.get("name", "default") != "default":
        raise _refuse(layout, f"block {block.get('name')!r}, model {model.get('name')!r}")
    if kind == "olmo2" and not qk:
        raise _refuse(layout, "reordered-norm blocks without QK norm")
    if kind == "llama" and qk:
        raise _refuse(layout, "pre-norm blocks with QK norm")
    if attn.get("use_head_qk_norm") or str(rope.get("name", "default")) != "default" or rope.get("scaling"):
        raise _refuse(layout, f"rope {rope.get('name')!r}, head-wise QK norm {attn.get('use_head_qk_norm')}")
    if float(rope.get("partial_rotary_factor", 1.0) or 1.0) != 1.0 or not rope:
        raise _refuse(layout, "partial or no rotary embedding")
    if (
        ff.get("bias")
        or str(ff.get("activation", "silu")) != "silu"
        or str(ff.get("name", "default")) != "default"
    ):
        raise _refuse(layout, "a biased or non-SwiGLU feed-forward")
    epss = {float(n.get("eps", 1e-5)) for n in (norm, qk, head_norm) if n}
    names = {str(n.get("name", "rms")) for n in (norm, qk, head_norm) if n}
    if len(epss) != 1 or names != {"rms"} or any(n.get("bias") for n in (norm, qk, head_norm)):
        raise _refuse(layout, f"layer norms {sorted(names)} with epsilons {sorted(epss)}")
    d_model, n_heads = int(model["d_model"]), int(attn["n_heads"])
    dataset = _section(raw, "dataset") if isinstance(raw, dict) else {}
    seq = int(dataset.get("sequence_length") or 0)
    kwargs: dict[str, Any] = {
        "vocab_size": int(model["vocab_size"]),
        "hidden_size": d_model,
        "intermediate_size": int(ff["hidden_size"]),
        "num_hidden_layers": int(model["n_layers"]),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(attn.get("n_kv_heads") or n_heads),
        "rms_norm_eps": next(iter(epss)),
        "rope_theta": float(rope.get("theta", 500000)),
        "attention_bias": bool(attn.get("bias", False)),
        "max_position_embeddings": max(seq, 4096),
        "tie_word_embeddings": bool(model.get("tie_word_embeddings", False)),
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if attn.get("head_dim") and int(attn["head_dim"]) != d_model // n_heads:
        kwargs["head_dim"] = int(attn["head_dim"])
    return Olmo2Config(**kwargs) if kind == "olmo2" else LlamaConfig(**kwargs)


def to_hf(name: str, tensor: torch.Tensor, config: Any) -> tuple[str, torch.Tensor] | None:
    """One OLMo-core tensor under its transformers name (the module docstring's table)."""
    if name in _TOP:
        return _TOP[name], tensor
    match = _LAYER.match(name)
    table = _IN_LAYER.get(getattr(config, "model_type", ""), {})
    if not match or match.group(2) not in table:
        raise CommuteError(
            f"OLMo-core tensor {name!r} has no counterpart in transformers' "
            f"{getattr(config, 'model_type', '')}",
            hint="convert the checkpoint with OLMo-core's converter "
            "(src/examples/huggingface/convert_checkpoint_to_hf.py)",
        )
    return f"model.layers.{match.group(1)}.{table[match.group(2)]}", tensor
