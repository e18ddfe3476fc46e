"""The HF Trainer / accelerate with FSDP and ``state_dict_type: SHARDED_STATE_DICT``.

What accelerate's ``save_fsdp_model`` / ``save_fsdp_optimizer`` write into each ``checkpoint-N/`` (beside
``config.json``, the tokenizer, ``trainer_state.json``, ``scheduler.pt``), with
``torch.distributed.checkpoint.save``:

- ``pytorch_model_fsdp_0/`` (``FSDP_MODEL_NAME`` + model index): ``{"model": state_dict}``, the model's own
  parameter names (FSDP's ``_fsdp_wrapped_module.`` and activation checkpointing's
  ``_checkpoint_wrapped_module.`` removed by FSDP's state-dict hooks; stripped here again if present);
- ``optimizer_0/``: ``{"optimizer": optim_state}``, FSDP's optimizer state dict keyed by parameter name
  (``state.<name>.exp_avg_sq``, ``param_groups[i].params`` = names).

The names are those of the transformers class in ``config.json``, so the mapping is the identity (wrapper
prefixes aside). Files of other FSDP settings: ``FULL_STATE_DICT`` writes ``pytorch_model_fsdp.bin``
(refused by discovery with the command that converts it); ``LOCAL_STATE_DICT`` and ``use_dcp=False`` write
per-rank ``*_rank{N}.bin`` shards of flat parameters, which only the same FSDP setup can reassemble.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from commute_cli.io import dcp
from commute_cli.io.dcp_checkpoints import DcpLayout

KIND = "HF Trainer/accelerate FSDP SHARDED_STATE_DICT"
MODEL_DIR = "pytorch_model_fsdp_0"
OPTIMIZER_DIR = "optimizer_0"
_WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def detect(folder: Path) -> DcpLayout | None:
    """A DCP ``pytorch_model_fsdp_0/`` (with ``config.json`` beside it: :func:`config` says when it is
    missing, as after accelerate's own ``save_state``); the optimizer's ``optimizer_0/`` if saved."""
    weights = folder / MODEL_DIR
    if not dcp.is_dcp(weights):
        return None
    optimizer = folder / OPTIMIZER_DIR
    return DcpLayout(
        folder=folder,
        weights=weights,
        optimizer=optimizer if dcp.is_dcp(optimizer) else None,
        model_path=("model",),
        optim_key="optimizer",
        fmt=sys.modules[__name__],
    )


def config(layout: DcpLayout) -> Any:
    """The Trainer's ``config.json`` (read as every transformers folder is: no remote code)."""
    from transformers import AutoConfig

    from commute_cli.errors import CommuteError

    if not (layout.folder / "config.json").is_file():
        raise CommuteError(
            f"{layout.folder} holds an FSDP SHARDED_STATE_DICT model ({MODEL_DIR}/) but no config.json "
            "(accelerate's save_state does not write one)",
            hint="write the model's config beside it once: "
            f"model.config.save_pretrained({str(layout.folder)!r})",
        )
    try:
        return AutoConfig.from_pretrained(str(layout.folder), local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise CommuteError(
            f"could not read config.json in {layout.folder}: {type(err).__name__}",
            hint="the model type must be one transformers knows without custom code",
        ) from err


def clean(name: str) -> str:
    """A parameter name without FSDP's, activation checkpointing's, compile's and DDP's wrapper parts."""
    for part in _WRAPPERS:
        name = name.replace(part, "") if part.startswith("_") else name.removeprefix(part)
    return name


def to_hf(name: str, tensor: torch.Tensor, config: Any) -> tuple[str, torch.Tensor] | None:
    """The saved tensor under its transformers name: the same name, wrapper parts removed."""
    del config
    return clean(name), tensor
