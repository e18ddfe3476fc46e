"""torchtitan checkpoints (``<dump_folder>/checkpoint/step-N/``, a torch distributed checkpoint) read as
transformers' ``LlamaForCausalLM``.

torchtitan's ``CheckpointManager`` saves ``step-N/`` with ``dcp.save``: the model's state dict merged at the
top level (``tok_embeddings.weight``, ``layers.N.attention.wq.weight``; releases before the merge kept it
under ``model.``), beside ``optimizer`` (``get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)``:
``optimizer.state.<name>.exp_avg_sq``, ``optimizer.param_groups.<name>.lr``), ``lr_scheduler``,
``dataloader`` and ``train_state``. A ``model_weights_only`` save holds the model alone.

The mapping to transformers is that of torchtitan's own ``Llama3StateDictAdapter.to_hf``
(``scripts/checkpoint_conversion/convert_to_hf.py``), written out here and checked in tests/test_dcp.py
against an independent forward pass of torchtitan's Llama written on the raw state dict:

======================================  ==================================================
torchtitan                              transformers ``LlamaForCausalLM``
======================================  ==================================================
``tok_embeddings.weight``               ``model.embed_tokens.weight``
``layers.N.attention.wq/wk/wv/wo``      ``model.layers.N.self_attn.q_proj/k_proj/v_proj/o_proj``
``layers.N.feed_forward.w1/w2/w3``      ``model.layers.N.mlp.gate_proj/down_proj/up_proj``
``layers.N.attention_norm``             ``model.layers.N.input_layernorm``
``layers.N.ffn_norm``                   ``model.layers.N.post_attention_layernorm``
``norm.weight`` / ``output.weight``     ``model.norm.weight`` / ``lm_head.weight``
``freqs_cis`` (a buffer)                dropped
======================================  ==================================================

torchtitan's rotary embedding rotates interleaved pairs ``(x[2i], x[2i+1])`` (complex multiplication);
transformers rotates halves ``(x[i], x[i + d/2])``. The rows of ``wq`` (and ``wk``) are therefore permuted
within each head: ``w.view(h, d/2, 2, dim).transpose(1, 2).reshape(h*d, dim)`` with ``h`` the number of
query (key-value) heads; Adam's second moments are permuted the same way.

torchtitan keeps the model's hyperparameters in its Python flavours, not in the checkpoint, so a
transformers ``config.json`` (``model_type`` ``llama``) is read from ``step-N/`` or the folder holding it
(the ``config.json`` of the HF assets the run used, ``--model.hf_assets_path``); its sizes are checked
against the saved tensors.
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

KIND = "torchtitan"
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_IN_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_MARKERS = ("tok_embeddings.weight", "layers.0.attention.wq.weight")


def convert_command(folder: Path) -> str:
    """torchtitan's own converter, for messages."""
    return (
        f"python scripts/checkpoint_conversion/convert_to_hf.py {folder} OUT --model_name llama3 "
        "--model_flavor FLAVOR --hf_assets_path ASSETS (from a torchtitan checkout), then copy "
        "ASSETS/config.json into OUT"
    )


def detect(folder: Path) -> DcpLayout | None:
    """A DCP folder whose model tensors carry torchtitan's Llama names, at the top level or under
    ``model.``."""
    if not dcp.is_dcp(folder):
        return None
    for prefix in (("model",), ()):
        if dcp.mentions(folder, *(".".join((*prefix, name)) for name in _MARKERS)):
            return DcpLayout(
                folder=folder,
                weights=folder,
                optimizer=folder if dcp.mentions(folder, "optimizer") else None,
                model_path=prefix,
                optim_key="optimizer",
                fmt=sys.modules[__name__],
            )
    return None


def _config_dir(folder: Path) -> Path | None:
    for where in (folder, folder.parent):
        if (where / "config.json").is_file():
            return where
    return None


def config(layout: DcpLayout) -> Any:
    """The ``LlamaConfig`` of ``config.json`` in ``step-N/`` or its parent, checked against the tensors."""
    from transformers import AutoConfig

    where = _config_dir(layout.folder)
    if where is None:
        raise CommuteError(
            f"{layout.folder} is a torchtitan checkpoint (torch DCP, Llama names) without a transformers "
            "config.json: torchtitan keeps the model's sizes in its flavours, not in the checkpoint",
            hint=f"copy the config.json of the run's HF assets (--model.hf_assets_path) into {layout.folder} "
            f"or {layout.folder.parent}; or convert once: {convert_command(layout.folder)}",
        )
    try:
        cfg = AutoConfig.from_pretrained(str(where), local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise CommuteError(
            f"{where / 'config.json'} is not a transformers config ({type(err).__name__})",
            hint="use the config.json of the run's HF assets (model_type llama)",
        ) from err
    if getattr(cfg, "model_type", None) != "llama":
        raise CommuteError(
            f"{where / 'config.json'} has model_type {getattr(cfg, 'model_type', None)!r}; torchtitan's "
            "Llama weights need model_type 'llama'",
            hint="use the config.json of the run's HF assets",
        )
    _check_sizes(layout, cfg, where / "config.json")
    return cfg


def _check_sizes(layout: DcpLayout, cfg: Any, file: Path) -> None:
    from commute_cli.io.dcp_checkpoints import shapes

    found = shapes(layout)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads or cfg.num_attention_heads
    layers = 1 + max(int(m.group(1)) for n in found if (m := _LAYER.match(n)))
    want = {
        "tok_embeddings.weight": (cfg.vocab_size, cfg.hidden_size),
        "layers.0.attention.wq.weight": (cfg.num_attention_heads * head_dim, cfg.hidden_size),
        "layers.0.attention.wk.weight": (kv * head_dim, cfg.hidden_size),
        "layers.0.feed_forward.w1.weight": (cfg.intermediate_size, cfg.hidden_size),
    }
    for name, shape in want.items():
        if name in found and tuple(found[name]) != shape:
            raise CommuteError(
                f"{file} does not describe {layout.folder}: {name} is {tuple(found[name])}, the config says "
                f"{shape}",
                hint="use the config.json of the HF assets the run was trained with",
            )
    if layers != cfg.num_hidden_layers:
        raise CommuteError(
            f"{file} says {cfg.num_hidden_layers} layers; {layout.folder} holds {layers}",
            hint="use the config.json of the HF assets the run was trained with",
        )


def permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a query/key projection from interleaved-pair to half-split rotary order, per head:
    ``w.view(heads, d/2, 2, dim).transpose(1, 2).reshape(heads*d, dim)`` (transformers' Llama converter)."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols).contiguous()


def to_hf(name: str, tensor: torch.Tensor, config: Any) -> tuple[str, torch.Tensor] | None:
    """One torchtitan tensor under its ``LlamaForCausalLM`` name and layout (the module docstring's
    table)."""
    if name == "freqs_cis" or name.endswith(".freqs_cis"):
        return None
    if name in _TOP:
        return _TOP[name], tensor
    match = _LAYER.match(name)
    if not match or match.group(2) not in _IN_LAYER:
        raise CommuteError(
            f"torchtitan tensor {name!r} has no LlamaForCausalLM counterpart",
            hint="commute reads torchtitan's dense Llama models; convert others with torchtitan's converter",
        )
    layer, rest = match.groups()
    if rest == "attention.wq.weight":
        tensor = permute(tensor, config.num_attention_heads)
    elif rest == "attention.wk.weight":
        tensor = permute(tensor, config.num_key_value_heads or config.num_attention_heads)
    return f"model.layers.{layer}.{_IN_LAYER[rest]}", tensor
