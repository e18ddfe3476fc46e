"""A fresh causal LM for ``commute train``: the default tiny GPT-2, or the fields of a config JSON, with the
vocabulary and context taken from the data. Loading a saved model is ``io.checkpoints.load_model``'s job."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from commute_cli.errors import CommuteError

DEFAULT_MODEL: dict[str, Any] = {
    "model_type": "gpt2",
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 4,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
"""The default model, a tiny GPT-2; ``n_positions`` (= seq_len) and ``vocab_size`` (= tokenizer) are added."""

_DROPOUT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")


def model_config(tokenizer: Any, seq_len: int, init_json: Path | None, overrides: Mapping[str, Any]) -> Any:
    """A model config: DEFAULT_MODEL, or a JSON file's fields, with vocabulary and context from the data."""
    from transformers import AutoConfig

    fields: dict[str, Any] = dict(DEFAULT_MODEL)
    if init_json is not None:
        try:
            given = json.loads(init_json.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CommuteError(f"cannot read model config {init_json}: {err}", "give a JSON file") from err
        if not isinstance(given, dict):
            raise CommuteError(f"model config {init_json} is not a JSON object")
        fields = {"model_type": "gpt2", **dict.fromkeys(_DROPOUT_KEYS, 0.0), **given}
    fields.update(overrides)
    fields.setdefault("vocab_size", len(tokenizer))
    if fields["model_type"] == "gpt2":
        fields.setdefault("n_positions", seq_len)
    eos = tokenizer.eos_token_id
    if eos is not None:
        fields.setdefault("bos_token_id", eos)
        fields.setdefault("eos_token_id", eos)
    model_type = fields.pop("model_type")
    for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        fields.pop(key, None)
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError) as err:
        raise CommuteError(f"bad model config: {err}", "check the config's fields") from err
    if config.vocab_size < len(tokenizer):
        raise CommuteError(
            f"the model's vocabulary ({config.vocab_size}) is smaller than the tokenizer's "
            f"({len(tokenizer)})",
            "drop vocab_size from the config, or use the matching tokenizer",
        )
    return config


def new_model(config: Any, seed: int) -> torch.nn.Module:
    """A freshly initialized causal LM (float32, eager attention), initialized from ``seed``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.float()
