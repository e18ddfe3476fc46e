"""Checkpoints saved as torch distributed checkpoints (:mod:`commute_cli.io.dcp`) read as transformers
models.

Three trainers' layouts, each in its own module with its mapping to a transformers class:

- :mod:`commute_cli.io.hf_fsdp`: the HF Trainer / accelerate with FSDP ``SHARDED_STATE_DICT``
  (``checkpoint-N/pytorch_model_fsdp_0/`` beside ``config.json``; optimizer in ``optimizer_0/``);
- :mod:`commute_cli.io.torchtitan`: torchtitan's ``step-N/`` (Llama names -> ``LlamaForCausalLM``);
- :mod:`commute_cli.io.olmo_core`: OLMo-core's ``stepN/model_and_optim/`` (-> ``Olmo2ForCausalLM``).

Each format module has ``KIND`` (its name in messages), ``detect(folder) -> DcpLayout | None``,
``config(layout)`` (the transformers config) and ``to_hf(name, tensor, config)`` (one saved tensor under its
transformers name and layout, or None for a tensor transformers does not keep). Here: what is common to the
three, namely the model's tensors and Adam's second moments (which are permuted like their weights) by
parameter name, the learning rate in the saved param groups, and the files that identify the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from commute_cli.errors import CommuteError
from commute_cli.io import dcp


@dataclass(frozen=True)
class DcpLayout:
    """One checkpoint in a DCP-based layout: ``folder`` (the :class:`CheckpointRef` path), ``weights`` (the
    DCP folder with the model), ``optimizer`` (the DCP folder with the optimizer state, or None),
    ``model_path`` (the path prefix of the model's tensors in the saved nested dict: ``("model",)`` or ``()``
    for a model saved at the top level), ``optim_key`` (the optimizer's top-level key), ``fmt`` (the format
    module)."""

    folder: Path
    weights: Path
    optimizer: Path | None
    model_path: tuple[str, ...]
    optim_key: str
    fmt: Any

    @property
    def kind(self) -> str:
        return str(self.fmt.KIND)


def _formats() -> list[Any]:
    from commute_cli.io import hf_fsdp, olmo_core, torchtitan

    return [hf_fsdp, torchtitan, olmo_core]


def find(folder: Path) -> DcpLayout | None:
    """The DCP layout of ``folder`` (a checkpoint folder), or None when it is not one of the formats read."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    for fmt in _formats():
        layout = fmt.detect(folder)
        if layout is not None:
            return layout
    return None


def model_entries(layout: DcpLayout) -> dict[str, dcp.Entry]:
    """The model's saved tensors by their names in the trainer's model (metadata only)."""
    n = len(layout.model_path)
    out: dict[str, dcp.Entry] = {}
    for entry in dcp.entries(layout.weights).values():
        if entry.shape is None or len(entry.path) != n + 1 or tuple(entry.path[:n]) != layout.model_path:
            continue
        out[str(entry.path[n])] = entry
    if not out:
        raise CommuteError(
            f"{layout.weights} ({layout.kind}) holds no model tensors", hint="the checkpoint is incomplete"
        )
    return out


def shapes(layout: DcpLayout) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the model's saved tensors; 0-element tensors refused (a damaged save)."""
    found = {name: e.shape for name, e in model_entries(layout).items() if e.shape is not None}
    empty = [name for name, shape in found.items() if 0 in shape]
    if empty:
        raise CommuteError(
            f"{layout.weights} holds empty (0-element) tensors ({len(empty)} of {len(found)}, "
            f"e.g. {empty[0]})",
            hint="the checkpoint is incomplete or damaged; save it again",
        )
    return found


def weight_files(layout: DcpLayout) -> list[Path]:
    """``.metadata`` and ``.distcp`` files of the model's DCP folder (what caches and digests identify)."""
    return dcp.files(layout.weights)


def hf_state(layout: DcpLayout, config: Any) -> dict[str, torch.Tensor]:
    """The model's tensors under the transformers names and layout (``fmt.to_hf``), in their saved dtype."""
    found = model_entries(layout)
    prefix = ".".join(layout.model_path)
    keys = {name: (f"{prefix}.{name}" if prefix else name) for name in found}
    loaded = dcp.load(layout.weights, list(keys.values()))
    out: dict[str, torch.Tensor] = {}
    for name, key in keys.items():
        mapped = layout.fmt.to_hf(name, loaded[key], config)
        if mapped is None:
            continue
        hf_name, tensor = mapped
        if hf_name in out:
            raise CommuteError(f"{layout.weights}: two saved tensors map to {hf_name}")
        out[hf_name] = tensor
    return out


def _dotted(entry: dcp.Entry) -> str:
    return ".".join(str(p) for p in entry.path)


def _optimizer_entries(layout: DcpLayout) -> dict[str, dcp.Entry]:
    if layout.optimizer is None:
        return {}
    head = layout.optim_key + "."
    return {_dotted(e): e for e in dcp.entries(layout.optimizer).values() if _dotted(e).startswith(head)}


def _group_values(layout: DcpLayout, field: str) -> list[Any]:
    """Every saved value of a param-group field (``lr``, ``betas``, ``eps``), nested or flattened layouts."""
    head = f"{layout.optim_key}.param_groups."
    keys = [k for k in _optimizer_entries(layout) if k.startswith(head) and k.endswith("." + field)]
    if not keys or layout.optimizer is None:
        return []
    return list(dcp.load(layout.optimizer, keys).values())


def learning_rate(layout: DcpLayout) -> float | None:
    """The ``lr`` of the saved param groups (the rate the scheduler set for the next update), or None."""
    values = {float(v) for v in _group_values(layout, "lr") if isinstance(v, (int, float, torch.Tensor))}
    return next(iter(values)) if len(values) == 1 else None


def adam_state(layout: DcpLayout, model: torch.nn.Module, config: Any) -> Any:
    """Adam's second moments by the model's parameter names (``io.optimizer_state.AdamState``), each mapped
    like its weight (``fmt.to_hf``: renamed, and permuted where the weight is); None without optimizer
    state. Parameters without saved state (never given a gradient) have zeros and are listed in ``missing``.
    """
    from commute_cli.io.optimizer_state import AdamState, param_names

    entries = _optimizer_entries(layout)
    if not entries or layout.optimizer is None:
        return None
    native = model_entries(layout)
    head = f"{layout.optim_key}.state."
    wanted = {f"{head}{name}.exp_avg_sq": name for name in native}
    steps_wanted = [f"{head}{name}.step" for name in native if f"{head}{name}.step" in entries]
    keys = [k for k in wanted if k in entries]
    if not keys:
        raise CommuteError(
            f"{layout.optimizer} ({layout.kind}) holds no Adam second moments (exp_avg_sq) for the model's "
            "parameters",
            hint="it was written by another optimizer; run without the Adam metric",
        )
    loaded = dcp.load(layout.optimizer, keys + steps_wanted)
    canonical = {id(p): n for n, p in model.named_parameters()}
    aliases = {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    shapes_ = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    by_name: dict[str, torch.Tensor] = {}
    for key in keys:
        mapped = layout.fmt.to_hf(wanted[key], loaded[key], config)
        if mapped is None:
            continue
        hf_name, tensor = mapped
        name = aliases.get(hf_name)
        if name is None or name not in shapes_ or tuple(tensor.shape) != tuple(shapes_[name]):
            raise CommuteError(
                f"{layout.optimizer}: the state of {wanted[key]} does not match the model's {hf_name}",
                hint="it was written for another model; run without the Adam metric",
            )
        by_name[name] = tensor.detach().to("cpu", torch.float32)
    names = param_names(model)
    steps = [int(loaded[k].item()) for k in steps_wanted if isinstance(loaded[k], torch.Tensor)]
    betas = {
        tuple(float(b) for b in v) for v in _group_values(layout, "betas") if isinstance(v, (list, tuple))
    }
    epss = {float(v) for v in _group_values(layout, "eps") if isinstance(v, (int, float))}
    if len(betas) > 1 or len(epss) > 1:
        raise CommuteError(
            f"optimizer groups in {layout.optimizer} use different betas or eps",
            hint="commute needs one Adam metric for all parameters",
        )
    beta = next(iter(betas)) if betas else (0.9, 0.999)
    return AdamState(
        exp_avg_sq={n: by_name.get(n, torch.zeros(shapes_[n])) for n in names},
        step=max(steps) if steps else None,
        betas=(beta[0], beta[1]),
        eps=next(iter(epss)) if epss else 1e-8,
        lr=learning_rate(layout),
        layout=layout.fmt.__name__.rsplit(".", 1)[-1],
        source=layout.optimizer,
        missing=tuple(n for n in names if n not in by_name),
    )


def optimizer_name(layout: DcpLayout) -> str | None:
    """``"adamw"``/``"adam"`` when the saved optimizer keeps ``exp_avg_sq`` (weight decay > 0: AdamW),
    ``"sgd"`` for ``momentum_buffer``, else None (no optimizer state saved)."""
    entries = _optimizer_entries(layout)
    last = {key.rsplit(".", 1)[-1] for key in entries}
    if "exp_avg_sq" in last:
        decay = [float(v) for v in _group_values(layout, "weight_decay") if isinstance(v, (int, float))]
        return "adamw" if any(d > 0 for d in decay) else "adam"
    if "momentum_buffer" in last:
        return "sgd"
    return None
