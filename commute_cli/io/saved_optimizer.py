"""The optimizer state saved with a checkpoint (``optimizer.pt``, or the ``"optimizer"`` entry of a nanoGPT
``ckpt.pt``), read safely (``weights_only=True``), and the name of the optimizer a run used. Reading Adam's
second moments out of it, by parameter name, is ``io.optimizer_state``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from commute_cli.errors import CommuteError
from commute_cli.io import litgpt, megatron
from commute_cli.io.safefiles import torch_load


def saved_optimizer(path: Path) -> Mapping[str, Any] | None:
    """The optimizer state saved with a checkpoint (``torch.load(weights_only=True)``): ``optimizer.pt`` in a
    checkpoint folder, the ``"optimizer"`` entry of a nanoGPT ``ckpt.pt``, of a Megatron-LM rank-0 file or of
    a LitGPT ``lit_model.pth``; None when there is none or it cannot be read safely."""
    if path.is_dir() and (megatron.is_megatron_dir(path) or litgpt.is_litgpt_dir(path)):
        try:
            return (
                megatron.optimizer_state(path)
                if megatron.is_megatron_dir(path)
                else litgpt.optimizer_state(path)
            )
        except CommuteError:
            return None
    if path.is_dir():
        path = path / "optimizer.pt"
        if not path.is_file():
            return None
        try:
            saved = torch_load(path, "optimizer state")
        except CommuteError:
            return None
    else:
        try:
            saved = torch_load(path, "checkpoint")
        except CommuteError:
            return None
        saved = saved.get("optimizer") if isinstance(saved, Mapping) else None
    return saved if isinstance(saved, Mapping) else None


def optimizer_name(ref: Any, manifest_optimizer: Mapping[str, Any] | None = None) -> str | None:
    """The optimizer a run used, as a lower-case name (``"adamw"``, ``"adam"``, ``"sgd"``), or None.

    From the manifest's ``optimizer.name`` when it has one (``commute train`` writes it), else from the
    optimizer state saved with the checkpoint, read with ``weights_only=True``: Adam keeps ``exp_avg_sq`` per
    parameter and its param groups carry ``betas``; SGD with momentum keeps ``momentum_buffer`` and its groups
    carry ``momentum``. A nanoGPT ``ckpt.pt`` holds its optimizer under ``"optimizer"``. The name only selects
    which measured size error the output quotes (``core.known_sizes.known_size_error``); nothing is
    computed from it.
    """
    if manifest_optimizer and isinstance(manifest_optimizer.get("name"), str):
        return str(manifest_optimizer["name"]).lower()
    from commute_cli.io import dcp_checkpoints

    layout = dcp_checkpoints.find(Path(ref.path))
    if layout is not None:
        return dcp_checkpoints.optimizer_name(layout)
    saved = saved_optimizer(Path(ref.path))
    if not isinstance(saved, Mapping):
        return None
    state = saved.get("state") or {}
    groups = saved.get("param_groups") or []
    keys = set()
    for entry in list(state.values())[:4] if isinstance(state, Mapping) else []:
        if isinstance(entry, Mapping):
            keys |= set(entry)
    group_keys = set(groups[0]) if groups and isinstance(groups[0], Mapping) else set()
    if "exp_avg_sq" in keys or "betas" in group_keys:
        return "adamw" if float((groups[0] or {}).get("weight_decay", 0.0) or 0.0) > 0 else "adam"
    if "momentum_buffer" in keys or "momentum" in group_keys:
        return "sgd"
    return None
