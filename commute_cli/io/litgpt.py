"""LitGPT checkpoints (``lit_model.pth`` + ``model_config.yaml``): Llama-like ones read as LlamaForCausalLM.

LitGPT (Lightning-AI/litgpt) saves a folder per checkpoint (``out/pretrain/step-00001000/``, ``final/``) with
``lit_model.pth`` and ``model_config.yaml`` (its ``Config``: ``n_layer``, ``n_embd``, ``n_head``,
``n_query_groups``, ``norm_class_name``, ``mlp_class_name``, ...). ``litgpt pretrain`` saves
``{"model": state_dict, "optimizer": ..., "iter_num": ..., "step_count": ...}``; a converted or fine-tuned
folder holds the bare state dict. Both are read with ``torch.load(weights_only=True)``, the YAML with
``yaml.safe_load``.

**Llama-like models** (``RMSNorm``, ``LLaMAMLP``, full rotary, sequential residual: TinyLlama, Llama, the
``micro-llama`` pretraining configs) map exactly onto transformers' ``LlamaForCausalLM``, as LitGPT's own
``convert_lit_checkpoint.copy_weights_llama`` maps them (checked in tests/test_litgpt.py against an
independent forward pass written from LitGPT's ``GPT``):

- ``transformer.wte`` -> ``model.embed_tokens``; ``h.N.norm_1``/``norm_2`` -> ``input_layernorm`` /
  ``post_attention_layernorm``; ``attn.proj`` -> ``o_proj``; ``mlp.fc_1``/``fc_2``/``proj`` ->
  ``gate_proj``/``up_proj``/``down_proj``; ``transformer.ln_f`` -> ``model.norm``; ``lm_head`` as is (tied
  when it equals ``wte``).
- The fused QKV: ``attn.qkv`` (LitGPT >= 0.5) is ``[q (all heads); k (all groups); v (all groups)]``;
  ``attn.attn`` (earlier releases) interleaves them per query group, ``[q of the group's heads, k, v]`` per
  group. Both are split into ``q_proj``/``k_proj``/``v_proj``.
- LitGPT's RoPE rotates halves (``rotate_half``), as transformers' Llama does, so q and k are not permuted;
  the vocabulary stays LitGPT's ``padded_vocab_size``.

Anything else (GPT-NeoX/Pythia, Phi, Gemma, Falcon, partial or scaled rotary, mixtures of experts,
soft-capping, ...) is refused with one line that names the format and the converter, LitGPT's
``litgpt convert_from_litgpt`` (its ``model.pth`` with the model's ``config.json`` beside it is a folder
commute reads). The step is ``step_count`` (optimizer updates); the learning rate is the optimizer's
``param_groups[0]["lr"]``, which ``litgpt pretrain`` sets before each update: the rate of the update just
made, one micro-step of the schedule behind the next one.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from commute_cli.errors import CommuteError
from commute_cli.io.nanogpt import strip_prefixes
from commute_cli.io.safefiles import torch_load

WEIGHTS_FILE = "lit_model.pth"
CONFIG_FILE = "model_config.yaml"
#: Config fields whose non-default values Llama cannot express (default in LitGPT's Config)
_MUST_BE = {
    "norm_class_name": "RMSNorm",
    "mlp_class_name": "LLaMAMLP",
    "rotary_percentage": 1.0,
    "parallel_residual": False,
    "shared_attention_norm": False,
    "rope_condense_ratio": 1,
    "rope_adjustments": None,
    "rope_indices": None,
    "norm_qk": False,
    "post_attention_norm": False,
    "post_mlp_norm": False,
    "scale_embeddings": False,
    "attention_scores_scalar": None,
    "attention_logit_softcapping": None,
    "final_logit_softcapping": None,
    "sliding_window_size": None,
    "lm_head_bias": False,
    "n_expert": 0,
    "rope_local_base_freq": None,
}


def is_litgpt_dir(folder: Path) -> bool:
    """A folder with ``lit_model.pth`` (and, as LitGPT writes it, ``model_config.yaml``)."""
    folder = Path(folder)
    return folder.is_dir() and (folder / WEIGHTS_FILE).is_file()


def read_config(folder: Path) -> dict[str, Any]:
    """``model_config.yaml`` as a dict (``yaml.safe_load``); empty when absent or unreadable."""
    file = Path(folder) / CONFIG_FILE
    if not file.is_file():
        return {}
    try:
        import yaml

        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except Exception:
        return {}
    return raw if isinstance(raw, dict) else {}


def describe(folder: Path, why: str = "") -> str | None:
    """One line for a LitGPT folder commute does not read: the format found, why, the converting command."""
    folder = Path(folder)
    if not is_litgpt_dir(folder):
        return None
    raw = read_config(folder)
    found = f"{WEIGHTS_FILE} + {CONFIG_FILE}" if (folder / CONFIG_FILE).is_file() else WEIGHTS_FILE
    parts = [str(raw["name"])] if raw.get("name") else []
    parts += [f"{raw[k]} {label}" for k, label in (("n_layer", "layers"), ("n_embd", "width")) if k in raw]
    summary = f", {', '.join(parts)}" if parts else ""
    return (
        f"{folder} is a LitGPT checkpoint ({found}{summary}){': ' + why if why else ''}; convert it with "
        f"LitGPT, `litgpt convert_from_litgpt {folder} OUT`, put the model's transformers config.json in OUT "
        "and save OUT/model.pth as OUT/pytorch_model.bin (or model.safetensors), then analyze OUT"
    )


def _refuse(folder: Path, why: str) -> CommuteError:
    return CommuteError(describe(folder, why) or f"{folder}: {why}")


def read(folder: Path) -> dict[str, Any]:
    """The saved dict of ``lit_model.pth`` (weights_only, memory-mapped): ``{"model": ..., ...}`` form."""
    file = Path(folder) / WEIGHTS_FILE
    saved = torch_load(file, "LitGPT checkpoint", hint=describe(Path(folder)))
    if isinstance(saved, Mapping) and isinstance(saved.get("model"), Mapping):
        return dict(saved)
    if isinstance(saved, Mapping) and all(isinstance(v, torch.Tensor) for v in saved.values()):
        return {"model": dict(saved)}
    raise _refuse(Path(folder), "lit_model.pth holds no state dict")


def step(folder: Path) -> int | None:
    """``step_count`` (optimizer updates) of a ``litgpt pretrain`` save; None for a bare state dict."""
    value = read(folder).get("step_count")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _int(raw: Mapping[str, Any], key: str, folder: Path) -> int:
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _refuse(folder, f"model_config.yaml has {key}={value!r}")
    return value


def llama_config(folder: Path) -> Any:
    """The ``LlamaConfig`` of a Llama-like LitGPT folder; the one-line refusal for any other."""
    from transformers import LlamaConfig

    folder = Path(folder)
    raw = read_config(folder)
    if not raw:
        raise _refuse(folder, "no readable model_config.yaml beside lit_model.pth")
    for key, want in _MUST_BE.items():
        have = raw.get(key, want)
        if have != want and not (isinstance(want, float) and isinstance(have, (int, float)) and have == want):
            raise _refuse(
                folder, f"{key}={have!r}, which commute reads only as {want!r} (a Llama-like model)"
            )
    n_embd, n_head = _int(raw, "n_embd", folder), _int(raw, "n_head", folder)
    groups = raw.get("n_query_groups") or n_head
    head_size = raw.get("head_size") or n_embd // n_head
    sd = state_dict(read(folder))
    wte, head = sd.get("transformer.wte.weight"), sd.get("lm_head.weight")
    if wte is None:
        raise _refuse(folder, "lit_model.pth has no transformer.wte.weight")
    tied = head is None or (head.shape == wte.shape and torch.equal(head, wte))
    bias = bool(raw.get("bias", False))
    if bool(raw.get("attn_bias", False)) and not bias:  # Qwen2's q/k/v biases without an o_proj bias
        raise _refuse(folder, "attn_bias=True without bias (a Qwen2-like model)")
    theta = float(raw.get("rope_base", 10000))
    rope: dict[str, Any] = (  # transformers 5 keeps the rotary settings in rope_parameters
        {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
        if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters
        else {"rope_theta": theta}
    )
    return LlamaConfig(
        vocab_size=int(wte.shape[0]),
        hidden_size=n_embd,
        intermediate_size=_int(raw, "intermediate_size", folder),
        num_hidden_layers=_int(raw, "n_layer", folder),
        num_attention_heads=n_head,
        num_key_value_heads=int(groups),
        head_dim=int(head_size),
        max_position_embeddings=_int(raw, "block_size", folder),
        rms_norm_eps=float(raw.get("norm_eps", 1e-5)),
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=tied,
        hidden_act="silu",
        attention_dropout=0.0,
        **rope,
    )


def state_dict(saved: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The saved weights, wrapper prefixes (``_orig_mod.``, ``module.``) stripped."""
    return {strip_prefixes(str(k)): v for k, v in saved["model"].items() if isinstance(v, torch.Tensor)}


_NAMES = {
    "norm_1": "input_layernorm",
    "norm_2": "post_attention_layernorm",
    "attn.proj": "self_attn.o_proj",
    "mlp.fc_1": "mlp.gate_proj",
    "mlp.fc_2": "mlp.up_proj",
    "mlp.proj": "mlp.down_proj",
}


def _split_qkv(t: torch.Tensor, config: Any, interleaved: bool) -> tuple[torch.Tensor, ...]:
    hs, heads, groups = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    if not interleaved:
        return tuple(t.split((heads * hs, groups * hs, groups * hs)))
    per = heads // groups
    chunks = [c.split((per * hs, hs, hs)) for c in t.chunk(groups)]
    return tuple(torch.cat([c[i] for c in chunks]) for i in range(3))


def llama_state_dict(folder: Path, config: Any) -> dict[str, torch.Tensor]:
    """The weights under ``LlamaForCausalLM``'s names (module docstring); an unknown name is refused."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict(read(folder)).items():
        tensor = value.float() if value.is_floating_point() else value
        if key == "transformer.wte.weight":
            out["model.embed_tokens.weight"] = tensor
        elif key.startswith("transformer.ln_f."):
            out["model.norm." + key.rsplit(".", 1)[1]] = tensor
        elif key == "lm_head.weight":
            if not config.tie_word_embeddings:
                out[key] = tensor
        elif key.startswith("transformer.h."):
            index, rest = key[len("transformer.h.") :].split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            prefix = f"model.layers.{index}."
            if module in ("attn.qkv", "attn.attn"):
                for name, part in zip("qkv", _split_qkv(tensor, config, module == "attn.attn"), strict=True):
                    out[f"{prefix}self_attn.{name}_proj.{leaf}"] = part.contiguous()
            elif module in _NAMES:
                out[f"{prefix}{_NAMES[module]}.{leaf}"] = tensor
            else:
                raise _refuse(Path(folder), f"it has {key}, which a Llama-like model does not")
        else:
            raise _refuse(Path(folder), f"it has {key}, which a Llama-like model does not")
    return out


def optimizer_state(folder: Path) -> Mapping[str, Any] | None:
    """The torch optimizer state of a ``litgpt pretrain`` save; None for a bare state dict."""
    opt = read(folder).get("optimizer")
    return opt if isinstance(opt, Mapping) else None


def learning_rate(folder: Path) -> tuple[float | None, str]:
    """(lr, where it came from): the optimizer's first param group in a ``litgpt pretrain`` save."""
    opt = read(folder).get("optimizer")
    groups = opt.get("param_groups") if isinstance(opt, Mapping) else None
    lr = (
        groups[0].get("lr")
        if isinstance(groups, list) and groups and isinstance(groups[0], Mapping)
        else None
    )
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return float(lr), "lit_model.pth optimizer param_groups (the update just made)"
    return None, ""
