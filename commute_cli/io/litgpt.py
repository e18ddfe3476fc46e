"""LitGPT checkpoints (``lit_model.pth`` + ``model_config.yaml``): recognised, named, sent to its converter.

LitGPT (Lightning-AI/litgpt) saves a folder per checkpoint (``out/pretrain/step-00001000/``, ``final/``) with
``lit_model.pth`` (the state dict, or ``{"model": ..., "optimizer": ..., "iter_num": ...}`` from
``litgpt pretrain``), ``model_config.yaml`` (its ``Config``: ``name``, ``n_layer``, ``n_embd``, ...) and the
tokenizer files. Its weights use LitGPT's own names and a fused QKV whose row order changed between LitGPT
releases with no mark in the file, so commute does not guess at them: LitGPT's own conversion,
``litgpt convert_from_litgpt``, writes the transformers state dict (``model.pth``), and with the model's
``config.json`` beside it (as ``model.safetensors`` or ``pytorch_model.bin``) that folder is analysed like any
other. :func:`describe` is the one line that says so, naming what was found.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_FILE = "lit_model.pth"
CONFIG_FILE = "model_config.yaml"


def is_litgpt_dir(folder: Path) -> bool:
    """A folder with ``lit_model.pth`` (and, as LitGPT writes it, ``model_config.yaml``)."""
    folder = Path(folder)
    return folder.is_dir() and (folder / WEIGHTS_FILE).is_file()


def _config_summary(folder: Path) -> str:
    """``name``, layers and width from ``model_config.yaml`` (yaml.safe_load; empty when unreadable)."""
    file = folder / CONFIG_FILE
    if not file.is_file():
        return ""
    try:
        import yaml

        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except Exception:
        return ""
    if not isinstance(raw, dict):
        return ""
    parts = [str(raw["name"])] if raw.get("name") else []
    for key, label in (("n_layer", "layers"), ("n_embd", "width")):
        if isinstance(raw.get(key), int):
            parts.append(f"{raw[key]} {label}")
    return f", {', '.join(parts)}" if parts else ""


def describe(folder: Path) -> str | None:
    """One line for a LitGPT checkpoint folder: the format found and the command converting it; else None."""
    folder = Path(folder)
    if not is_litgpt_dir(folder):
        return None
    has_config = (folder / CONFIG_FILE).is_file()
    found = f"{WEIGHTS_FILE} + {CONFIG_FILE}" if has_config else WEIGHTS_FILE
    return (
        f"{folder} is a LitGPT checkpoint ({found}{_config_summary(folder)}), which commute does not read: "
        f"convert it with LitGPT, `litgpt convert_from_litgpt {folder} OUT`, put the model's transformers "
        "config.json in OUT and save OUT/model.pth as OUT/pytorch_model.bin (or model.safetensors), then "
        "analyze OUT"
    )
