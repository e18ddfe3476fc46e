"""Adam(W) second moments saved with a checkpoint, by parameter name (the Adam metric's input).

Formats read:

- ``optimizer.safetensors`` (what :func:`save_adam_state` writes; preferred over ``optimizer.pt`` when both
  exist): tensors ``exp_avg_sq.<parameter name>`` and metadata ``format`` = ``commute-adam/1``, ``step``,
  ``betas`` (JSON list), ``eps``, ``lr``.
- ``optimizer.pt``, a torch optimizer ``state_dict()`` read with ``torch.load(weights_only=True)`` only. It
  stores state by position in its param groups, not by name. Layouts are tried in this order and each is
  checked (group sizes and every tensor shape): parameter names saved by torch itself (``param_names``,
  torch >= 2.6 with named parameters); the HF Trainer's two groups (decay, no decay) under the decay rule of
  current transformers and under the older rule (LayerNorm modules and ``bias`` only); one group in
  ``named_parameters()`` order. If two rules fit but map names differently, or none fits, we refuse rather
  than guess.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from commute_cli.errors import CommuteError
from commute_cli.io import atomic
from commute_cli.io.safefiles import safetensors_shapes, torch_load

ADAM_FORMAT = "commute-adam/1"

# transformers' Trainer.get_decay_parameter_names (5.x): parameters inside nn.LayerNorm modules and names
# matching these patterns (lower-cased) get no weight decay.
_DECAY_EXCLUDED_PATTERNS = tuple(
    re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
)


@dataclass
class AdamState:
    """Adam(W) second moments by parameter name, in ``param_list`` order (de-duplicated, tied weights once).

    ``missing`` names parameters the optimizer holds no state for (they never received a gradient); their
    ``exp_avg_sq`` is zero. ``layout`` says how positions were mapped to names.
    """

    exp_avg_sq: dict[str, torch.Tensor]
    step: int | None
    betas: tuple[float, float]
    eps: float
    lr: float | None = None
    layout: str = ""
    source: Path | None = None
    missing: tuple[str, ...] = ()


def param_names(model: torch.nn.Module) -> list[str]:
    """``curvature.param_list`` order: de-duplicated ``named_parameters()``, tied weights once, trainable."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def decay_parameter_names(model: torch.nn.Module, legacy: bool = False) -> set[str]:
    """Names the HF Trainer puts in its weight-decay group (group 0).

    Current rule (transformers' ``Trainer.get_decay_parameter_names``): not inside an ``nn.LayerNorm`` and no
    match of ``bias|layernorm|rmsnorm|(^|.)norm($|.)|_norm($|.)`` in the lower-cased name. ``legacy=True``:
    the rule of transformers 4.x before name patterns (not inside ``nn.LayerNorm``, no ``bias`` in the name).
    """
    inside_norm: set[str] = set()
    for mod_name, module in model.named_modules():
        if mod_name and isinstance(module, torch.nn.LayerNorm):
            inside_norm.update(f"{mod_name}.{n}" for n, _ in module.named_parameters())
    out = set()
    for name, _ in model.named_parameters():
        if name in inside_norm:
            continue
        if legacy:
            if "bias" in name:
                continue
        elif any(p.search(name.lower()) for p in _DECAY_EXCLUDED_PATTERNS):
            continue
        out.add(name)
    return out


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """Every name of every parameter (tied ones too) -> its de-duplicated name."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}


def _candidate_layouts(model: torch.nn.Module, groups: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(layout name, parameter name per position, concatenated over groups) for each layout to try."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    out: list[tuple[str, list[str]]] = []
    if all("param_names" in g for g in groups):
        aliases = _aliases(model)
        saved = [n for g in groups for n in g["param_names"]]
        stripped = [n.removeprefix("module.").removeprefix("_orig_mod.") for n in saved]
        if all(n in aliases for n in stripped):
            out.append(("param_names", [aliases[n] for n in stripped]))
    for label, legacy in (("trainer", False), ("trainer-legacy", True)):
        decay = decay_parameter_names(model, legacy=legacy)
        out.append((label, [n for n in names if n in decay] + [n for n in names if n not in decay]))
    out.append(("single-group", names))
    return out


def _fits(
    label: str,
    order: list[str],
    groups: list[dict[str, Any]],
    state: Mapping[Any, Any],
    shapes: dict[str, torch.Size],
    model: torch.nn.Module,
) -> str | None:
    """None if the layout explains the saved groups and shapes; else why not."""
    sizes = [len(g["params"]) for g in groups]
    if label.startswith("trainer"):
        decay = decay_parameter_names(model, legacy=label == "trainer-legacy")
        want = [sum(n in decay for n in shapes), sum(n not in decay for n in shapes)]
        if sizes != want:
            return f"{label}: expected groups of {want} parameters, file has {sizes}"
    elif label == "single-group" and len(sizes) != 1:
        return f"{label}: expected 1 group, file has {len(sizes)}"
    ids = [i for g in groups for i in g["params"]]
    if len(ids) != len(order) or len(set(order)) != len(order):
        return f"{label}: expected {len(shapes)} parameters, file has {len(ids)}"
    for name, i in zip(order, ids, strict=True):
        entry = state.get(i)
        if entry is None:
            continue
        sq = entry.get("exp_avg_sq")
        if not isinstance(sq, torch.Tensor):
            return f"{label}: state {i} has no exp_avg_sq tensor (keys: {', '.join(map(str, entry))})"
        if tuple(sq.shape) != tuple(shapes[name]):
            return f"{label}: position {i} has shape {tuple(sq.shape)} but {name} is {tuple(shapes[name])}"
    return None


def _group_hyper(
    groups: list[dict[str, Any]], where: Path
) -> tuple[tuple[float, float], float, float | None]:
    betas = {tuple(float(b) for b in g.get("betas", (0.9, 0.999))) for g in groups}
    epss = {float(g.get("eps", 1e-8)) for g in groups}
    if len(betas) != 1 or len(epss) != 1:
        raise CommuteError(
            f"optimizer groups in {where} use different betas or eps",
            hint="commute needs one Adam metric for all parameters",
        )
    lr = groups[0].get("lr") if groups else None
    beta = next(iter(betas))
    return (beta[0], beta[1]), next(iter(epss)), float(lr) if isinstance(lr, (int, float)) else None


def load_adam_state(ref: Any, model: torch.nn.Module) -> AdamState | None:
    """Adam second moments saved with the checkpoint, by parameter name; None when no optimizer file exists.

    Reads ``optimizer.safetensors`` (preferred) or ``optimizer.pt`` (``weights_only=True`` only), or the
    ``optimizer`` entry of a nanoGPT ``ckpt.pt``. See the module docstring for how positions are mapped to
    names; an unexplained layout is refused.
    """
    folder = Path(getattr(ref, "path", ref))  # a CheckpointRef, a folder, or a nanoGPT .pt file
    if folder.is_file():
        return _load_adam_nanogpt(folder, model)
    from commute_cli.io import dcp_checkpoints

    layout = dcp_checkpoints.find(folder)
    if layout is not None:  # torch DCP (HF-FSDP, torchtitan, OLMo-core): by parameter name
        return dcp_checkpoints.adam_state(layout, model, getattr(model, "config", None))
    if (folder / "optimizer.safetensors").is_file():
        return _load_adam_safetensors(folder / "optimizer.safetensors", model)
    file = folder / "optimizer.pt"
    if not file.is_file():
        return None
    saved = torch_load(
        file,
        "optimizer state",
        hint="commute never unpickles arbitrary objects; save the optimizer's state_dict() with torch.save, "
        "or run without the Adam metric",
        mmap=False,
    )
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) or "state" not in saved:
        raise CommuteError(
            f"{file} is not a torch optimizer state_dict", hint="run without the Adam metric, or re-save it"
        )
    groups = saved["param_groups"]
    state = saved["state"]
    if not state:
        raise CommuteError(f"{file} holds no optimizer state (the optimizer never stepped)")
    names = param_names(model)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    fits: dict[str, list[str]] = {}
    reasons: list[str] = []
    for label, order in _candidate_layouts(model, groups):
        why = _fits(label, order, groups, state, shapes, model)
        if why is None:
            fits[label] = order
        else:
            reasons.append(why)
    if "param_names" in fits:
        label = "param_names"
    else:
        distinct = {tuple(o) for o in fits.values()}
        if not fits:
            raise CommuteError(
                f"cannot map {file} to the model's parameters: " + "; ".join(reasons[:3]),
                hint="it was written for another model or by an unknown parameter grouping; run without the "
                "Adam metric",
            )
        if len(distinct) > 1:
            raise CommuteError(
                f"{file} fits several parameter groupings ({', '.join(fits)}) that map positions differently",
                hint="refusing to guess; run without the Adam metric",
            )
        label = next(iter(fits))
    order = fits[label]
    ids = [i for g in groups for i in g["params"]]
    by_name: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    steps: list[int] = []
    for name, i in zip(order, ids, strict=True):
        entry = state.get(i)
        if entry is None:
            missing.append(name)
            continue
        by_name[name] = entry["exp_avg_sq"].detach().to("cpu", torch.float32).clone()
        step = entry.get("step")
        if isinstance(step, torch.Tensor):
            steps.append(int(step.item()))
        elif isinstance(step, (int, float)):
            steps.append(int(step))
    for name in missing:
        by_name[name] = torch.zeros(shapes[name], dtype=torch.float32)
    betas, eps, lr = _group_hyper(groups, file)
    return AdamState(
        exp_avg_sq={n: by_name[n] for n in names},
        step=max(steps) if steps else None,
        betas=betas,
        eps=eps,
        lr=lr,
        layout=label,
        source=file,
        missing=tuple(n for n in names if n in missing),
    )


def _step_of(entry: Mapping[str, Any]) -> int | None:
    step = entry.get("step")
    if isinstance(step, torch.Tensor):
        return int(step.item())
    return int(step) if isinstance(step, (int, float)) else None


def _load_adam_nanogpt(file: Path, model: torch.nn.Module) -> AdamState | None:
    """nanoGPT's ``configure_optimizers`` layout: group 0 = parameters with ``dim() >= 2``, group 1 = the
    rest, each in ``named_parameters()`` order (tied ``lm_head`` once); projection moments transposed like
    their weights (:mod:`commute_cli.io.nanogpt`)."""
    from commute_cli.io import nanogpt

    ckpt = nanogpt.read(file)
    saved = ckpt.get("optimizer")
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
        return None
    if not saved.get("state"):
        return None
    sd = nanogpt.state_dict(ckpt)
    aliases = _aliases(model)
    tied = aliases.get("lm_head.weight") != "lm_head.weight"
    order = [n for n in sd if not (tied and n == "lm_head.weight")]
    layout = [n for n in order if sd[n].dim() >= 2] + [n for n in order if sd[n].dim() < 2]
    groups = saved["param_groups"]
    ids = [i for g in groups for i in g["params"]]
    if len(groups) != 2 or len(ids) != len(layout):
        raise CommuteError(
            f"the optimizer state in {file} has groups of {[len(g['params']) for g in groups]} parameters; "
            f"nanoGPT's layout has {len(layout)} in two groups",
            hint="it was written by another optimizer setup; run without the Adam metric",
        )
    by_name: dict[str, torch.Tensor] = {}
    steps: list[int] = []
    for name, i in zip(layout, ids, strict=True):
        entry = saved["state"].get(i)
        if entry is None:
            continue
        sq = entry.get("exp_avg_sq")
        if not isinstance(sq, torch.Tensor) or tuple(sq.shape) != tuple(sd[name].shape):
            raise CommuteError(
                f"the optimizer state in {file} does not match parameter {name} at position {i}",
                hint="run without the Adam metric",
            )
        sq = sq.detach().to("cpu", torch.float32)
        by_name[aliases.get(name, name)] = sq.t().contiguous() if name.endswith(nanogpt.PROJECTIONS) else sq
        if (step := _step_of(entry)) is not None:
            steps.append(step)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    names = param_names(model)
    missing = tuple(n for n in names if n not in by_name)
    betas, eps, lr = _group_hyper(groups, file)
    return AdamState(
        exp_avg_sq={n: by_name.get(n, torch.zeros(shapes[n])) for n in names},
        step=max(steps) if steps else None,
        betas=betas,
        eps=eps,
        lr=lr,
        layout="nanogpt",
        source=file,
        missing=missing,
    )


def _load_adam_safetensors(file: Path, model: torch.nn.Module) -> AdamState:
    from safetensors import safe_open

    safetensors_shapes(file)  # header, offsets and size checked before any tensor is read
    aliases = _aliases(model)
    shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}
    by_name: dict[str, torch.Tensor] = {}
    with safe_open(str(file), framework="pt") as fh:
        meta = fh.metadata() or {}
        for key in fh.keys():  # noqa: SIM118 (safe_open is not a dict)
            kind, _, name = key.partition(".")
            if kind != "exp_avg_sq":
                continue
            if name not in aliases:
                raise CommuteError(
                    f"{file} holds state for {name!r}, which the model does not have",
                    hint="it was written for another model; run without the Adam metric",
                )
            tensor = fh.get_tensor(key).to(torch.float32)
            canon = aliases[name]
            if canon in shapes and tuple(tensor.shape) != tuple(shapes[canon]):
                raise CommuteError(
                    f"{file}: exp_avg_sq of {name} has shape {tuple(tensor.shape)}, the parameter "
                    f"{tuple(shapes[canon])}",
                    hint="it was written for another model; run without the Adam metric",
                )
            by_name[canon] = tensor
    if meta.get("format") != ADAM_FORMAT:
        raise CommuteError(f"{file} is not a {ADAM_FORMAT} file (format {meta.get('format')!r})")
    names = param_names(model)
    missing = tuple(n for n in names if n not in by_name)
    try:
        betas = tuple(float(b) for b in json.loads(meta.get("betas", "[0.9, 0.999]")))
        eps = float(meta.get("eps", "1e-8"))
        step = int(meta["step"]) if meta.get("step") not in (None, "", "null") else None
        lr = float(meta["lr"]) if meta.get("lr") not in (None, "", "null") else None
    except (ValueError, TypeError, json.JSONDecodeError) as err:
        raise CommuteError(f"{file} has unreadable metadata: {err}") from err
    if len(betas) != 2:
        raise CommuteError(f"{file}: betas must hold two numbers, got {betas}")
    return AdamState(
        exp_avg_sq={n: by_name.get(n, torch.zeros(shapes[n])) for n in names},
        step=step,
        betas=(betas[0], betas[1]),
        eps=eps,
        lr=lr,
        layout="safetensors",
        source=file,
        missing=missing,
    )


def save_adam_state(state: AdamState, file: Path) -> None:
    """Write ``state`` as ``optimizer.safetensors`` (format in the module docstring), atomically."""

    from safetensors.torch import save_file

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"exp_avg_sq.{n}": t.detach().to("cpu").contiguous() for n, t in state.exp_avg_sq.items()}
    meta = {
        "format": ADAM_FORMAT,
        "step": "" if state.step is None else str(int(state.step)),
        "betas": json.dumps(list(state.betas)),
        "eps": repr(float(state.eps)),
        "lr": "" if state.lr is None else repr(float(state.lr)),
    }
    with atomic.replacing(file) as tmp:
        save_file(tensors, tmp, metadata=meta)


def flat_exp_avg_sq(state: AdamState, names: Sequence[str]) -> torch.Tensor:
    """The second moments of ``names`` concatenated into one flat vector (the layout of parameter vectors)."""
    parts = []
    for name in names:
        if name not in state.exp_avg_sq:
            raise CommuteError(
                f"the optimizer state has no entry for parameter {name}",
                hint="the optimizer file and the model do not match",
            )
        parts.append(state.exp_avg_sq[name].reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0)
