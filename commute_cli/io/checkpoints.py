"""Find and load checkpoints: step, learning rate, Adam second moments, manifest, tokenizer.

Security (docs/CONVENTIONS.md): weights come from safetensors or through ``torch.load(weights_only=True)``;
``trust_remote_code`` is never enabled; nothing is fetched from the hub (``local_files_only=True``);
``training_args.bin``, which needs an arbitrary pickle, is never read.

Decisions worth knowing (also why):

- The step of a folder comes from ``trainer_state.json`` (``global_step``) when present, else from its name
  (``checkpoint-N``, ``step-N``/``step_N``/``stepN``, ``iter-N``/``iter_N``, ``global_stepN``). The file is
  what the trainer wrote; a folder name may have been edited.
- A folder that holds step-named checkpoint subfolders is a run: its subfolders are the checkpoints, and a
  model saved at the run's top level (the Trainer's final ``save_model``) is ignored, as are subfolders
  without a step (``best/``, ``final/``). Only a folder without checkpoint subfolders is a single model.
- ``select(every=N)`` keeps the checkpoints whose step is a multiple of N.
- ``optimizer.pt`` stores state by position, not name. Layouts are tried in this order and each is checked
  (group sizes and every tensor shape): parameter names saved by torch itself (``param_names``, torch >= 2.6
  with named parameters); the HF Trainer's two groups (decay, no decay) under the decay rule of current
  transformers and under the older rule (LayerNorm modules and ``bias`` only); one group in
  ``named_parameters()`` order. If two rules fit but map names differently, or none fits, we refuse.
- ``optimizer.safetensors`` (what ``save_adam_state`` writes, preferred over ``optimizer.pt`` when both exist)
  holds tensors ``exp_avg_sq.<parameter name>`` and metadata ``format`` = ``commute-adam/1``, ``step``,
  ``betas`` (JSON list), ``eps``, ``lr``.
- A manifest's paths must resolve (symlinks followed) inside the manifest's folder; a domain source that does
  not exist there and looks like a hub name (``c4``, ``owner/name``) is kept as a hub name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from commute_cli.errors import CommuteError
from commute_cli.io import atomic

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_STEP_NAME_RE = re.compile(r"^(?:checkpoint|step|iter|global_step)[-_]?(\d+)$", re.IGNORECASE)
MANIFEST_NAME = "commute.json"
MANIFEST_FORMAT = "commute-manifest/1"
ADAM_FORMAT = "commute-adam/1"

#: config attributes that must agree across checkpoints of one series (read with transformers' aliases)
ESSENTIAL_CONFIG_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "n_inner",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
)

# transformers' Trainer.get_decay_parameter_names (5.x): parameters inside nn.LayerNorm modules and names
# matching these patterns (lower-cased) get no weight decay.
_DECAY_EXCLUDED_PATTERNS = tuple(
    re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
)
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


@dataclass(frozen=True)
class CheckpointRef:
    """One saved model: its folder, its training step (None if unknown) and a display name."""

    path: Path
    step: int | None
    name: str


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


@dataclass
class Manifest:
    """``commute.json`` (docs/CONVENTIONS.md) with its paths resolved to absolute ones inside ``root``."""

    path: Path
    root: Path
    domains: dict[str, str] = field(default_factory=dict)
    eval_domains: dict[str, str] = field(default_factory=dict)
    schedule: list[dict[str, Any]] | None = None
    tokenizer: Path | None = None
    seq_len: int | None = None
    optimizer: dict[str, Any] | None = None
    lr_schedule: str | None = None
    batch_size: int | None = None
    seed: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- discovery


def is_checkpoint_dir(path: Path) -> bool:
    """A folder with ``config.json`` and weights (single file, sharded index, or ``pytorch_model.bin``)."""
    path = Path(path)
    return (
        path.is_dir()
        and (path / "config.json").is_file()
        and any((path / name).is_file() for name in WEIGHT_FILES)
    )


def _read_json(file: Path, what: str) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CommuteError(
            f"could not read {what} {file}: {err}", hint="the file is damaged; re-save it"
        ) from err


def _trainer_state(folder: Path) -> dict[str, Any] | None:
    file = Path(folder) / "trainer_state.json"
    if not file.is_file():
        return None
    state = _read_json(file, "trainer state")
    return state if isinstance(state, dict) else None


def _step_of(folder: Path) -> int | None:
    state = _trainer_state(folder)
    if state is not None and isinstance(state.get("global_step"), int):
        return int(state["global_step"])
    match = _STEP_NAME_RE.match(folder.name)
    return int(match.group(1)) if match else None


def discover(path: Path) -> list[CheckpointRef]:
    """The checkpoints under ``path``, sorted by step (see the module docstring for what counts)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CommuteError(
            f"checkpoint path {path} does not exist", hint="pass a checkpoint folder or a run folder"
        )
    if not path.is_dir():
        raise CommuteError(
            f"checkpoint path {path} is a file, not a folder", hint="pass the folder that holds it"
        )
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    models = [p for p in subdirs if is_checkpoint_dir(p)]
    stepped = [(p, _step_of(p)) for p in models]
    refs = [CheckpointRef(path=p, step=s, name=p.name) for p, s in stepped if s is not None]
    if refs:
        refs.sort(key=lambda r: (r.step, r.name))
        seen: dict[int, CheckpointRef] = {}
        for ref in refs:
            assert ref.step is not None
            if ref.step in seen:
                raise CommuteError(
                    f"two checkpoints for step {ref.step}: {seen[ref.step].name} and {ref.name}",
                    hint="keep one of them, or pass the one you mean directly",
                )
            seen[ref.step] = ref
        return refs
    if is_checkpoint_dir(path):
        return [CheckpointRef(path=path, step=_step_of(path), name=path.name)]
    if models:
        names = ", ".join(p.name for p in models[:5])
        raise CommuteError(
            f"found model folders in {path} ({names}) but none has a step in its name or trainer_state.json",
            hint="name them step-N / checkpoint-N, or pass one model folder directly",
        )
    partial = [p.name for p in [path, *subdirs] if (p / "config.json").is_file()]
    if partial:
        raise CommuteError(
            f"no checkpoints in {path}: {', '.join(partial[:5])} has config.json but no model weights",
            hint="expected model.safetensors (or model.safetensors.index.json, pytorch_model.bin) beside it",
        )
    raise CommuteError(
        f"no checkpoints in {path}",
        hint="expected checkpoint-N/ (or step-N, iter-N) subfolders, or a model folder, each with "
        "config.json and model.safetensors (or pytorch_model.bin)",
    )


def select(
    refs: Sequence[CheckpointRef], steps: Sequence[int] | None = None, every: int | None = None
) -> list[CheckpointRef]:
    """The checkpoints at the requested ``steps``, or at steps that are multiples of ``every``; else all."""
    if steps is not None and every is not None:
        raise CommuteError("--steps and --every both given", hint="use one of them")
    if steps is None and every is None:
        return list(refs)
    available = [r.step for r in refs if r.step is not None]
    shown = ", ".join(str(s) for s in available[:20]) + (" ..." if len(available) > 20 else "")
    if any(r.step is None for r in refs):
        raise CommuteError(
            "cannot select by step: some checkpoints have no known step",
            hint="pass the checkpoint folder directly",
        )
    if every is not None:
        if every < 1:
            raise CommuteError(f"--every must be a positive number of steps, got {every}")
        chosen = [r for r in refs if r.step is not None and r.step % every == 0]
        if not chosen:
            raise CommuteError(
                f"no checkpoint step is a multiple of {every}", hint=f"available steps: {shown}"
            )
        return chosen
    by_step = {r.step: r for r in refs}
    wanted = list(dict.fromkeys(int(s) for s in steps or ()))
    for s in wanted:
        if s not in by_step:
            raise CommuteError(f"no checkpoint at step {s}", hint=f"available steps: {shown}")
    return sorted((by_step[s] for s in wanted), key=lambda r: r.step or 0)


# ----------------------------------------------------------------------------------------------- weights


def _check_safetensors(file: Path) -> None:
    """Parse the header and check that the data it indexes is all there (cheap: reads only the header)."""
    size = file.stat().st_size
    bad = f"weights file {file} is truncated or not a safetensors file"
    hint = "re-copy or re-save the checkpoint"
    if size < 8:
        raise CommuteError(bad + f" ({size} bytes)", hint=hint)
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n < 2 or n > size - 8 or n > 100 << 20:
            raise CommuteError(bad + " (bad header length)", hint=hint)
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, stop = (int(x) for x in info["data_offsets"])
            nbytes = _SAFETENSORS_DTYPE_BYTES.get(info["dtype"])
            if (
                begin < 0
                or stop < begin
                or (nbytes is not None and (stop - begin) != nbytes * math.prod(info["shape"]))
            ):
                raise ValueError(f"tensor {name} has inconsistent offsets")
            end = max(end, stop)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise CommuteError(bad + f" (unreadable header: {err})", hint=hint) from err
    if 8 + n + end != size:
        raise CommuteError(bad + f" (header needs {8 + n + end} bytes, file has {size})", hint=hint)


def _check_pickle(file: Path) -> None:
    """Prove a ``.bin`` holds only tensors and plain containers by loading it with ``weights_only=True``.

    Transformers 5 loads ``.bin`` files with ``weights_only=True`` itself; this check makes the guarantee
    independent of the installed version. ``mmap`` keeps it from reading the tensor data of zip files.
    """
    import zipfile

    try:
        torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as err:
        raise CommuteError(
            f"refusing to load {file}: it does not load with torch.load(weights_only=True) "
            f"({type(err).__name__}: {' '.join(str(err).split())[:160]})",
            hint="it may contain code; convert the checkpoint to safetensors from a trusted environment",
        ) from err


def validate_weights(folder: Path) -> None:
    """Cheap checks of the weight files of a checkpoint folder, before transformers touches them."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_file = folder / index_name
        if index_file.is_file():
            index = _read_json(index_file, "weights index")
            shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
            if not shards:
                raise CommuteError(
                    f"weights index {index_file} lists no files", hint="re-save the checkpoint"
                )
            for shard in shards:
                file = folder / shard
                if not file.is_file():
                    raise CommuteError(f"weights shard {file} is missing", hint="re-copy the checkpoint")
                if shard.endswith(".safetensors"):
                    _check_safetensors(file)
                else:
                    _check_pickle(file)
            return
    if (folder / "model.safetensors").is_file():
        _check_safetensors(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        _check_pickle(folder / "pytorch_model.bin")
    else:
        raise CommuteError(
            f"no model weights in {folder}",
            hint="expected model.safetensors (or an index) or pytorch_model.bin",
        )


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def load_model(
    ref: CheckpointRef | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """The checkpoint's causal LM for curvature work: eager attention, ``dtype`` (upcasts half), eval mode.

    Missing or shape-mismatched weights are an error, not a silently re-initialized model.
    """
    import inspect

    from transformers import AutoModelForCausalLM, PreTrainedModel

    path = ref.path if isinstance(ref, CheckpointRef) else Path(ref)
    if not is_checkpoint_dir(path):
        raise CommuteError(f"{path} is not a model folder", hint="it needs config.json and model weights")
    validate_weights(path)
    kwargs: dict[str, Any] = {
        "attn_implementation": "eager",
        "trust_remote_code": False,
        "local_files_only": True,
        "output_loading_info": True,
        ("dtype" if _transformers_major() >= 5 else "torch_dtype"): dtype,
    }
    if "weights_only" in inspect.signature(PreTrainedModel.from_pretrained).parameters:
        kwargs["weights_only"] = True
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except CommuteError:
        raise
    except Exception as err:
        text = " ".join(str(err).split())[:240]
        hint = "check that the folder is a complete causal-LM checkpoint"
        if "trust_remote_code" in text or "does not recognize this architecture" in text:
            hint = "this model needs custom code, and commute never runs code from checkpoints"
        raise CommuteError(
            f"could not load the model in {path}: {type(err).__name__}: {text}", hint=hint
        ) from err
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = f"missing weights {missing[:3]}" if missing else f"weights of the wrong shape {mismatched[:3]}"
        raise CommuteError(f"checkpoint {path} has {what}", hint="the weights do not match config.json")
    model.eval()
    return model.to(device)


def read_config(ref: CheckpointRef | Path):
    """The checkpoint's ``PretrainedConfig`` (no weights read, no remote code)."""
    from transformers import AutoConfig

    path = ref.path if isinstance(ref, CheckpointRef) else Path(ref)
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise CommuteError(
            f"could not read config.json in {path}: {type(err).__name__}: {' '.join(str(err).split())[:200]}",
            hint="the model type must be one transformers knows without custom code",
        ) from err


def check_compatible(refs: Sequence[CheckpointRef]) -> None:
    """All checkpoints share the architecture essentials (``ESSENTIAL_CONFIG_KEYS``); else name the first
    difference."""
    if len(refs) < 2:
        return
    first = refs[0]
    base = read_config(first)
    for ref in refs[1:]:
        config = read_config(ref)
        for key in ESSENTIAL_CONFIG_KEYS:
            a, b = getattr(base, key, None), getattr(config, key, None)
            if a != b:
                raise CommuteError(
                    f"checkpoint {ref.name} differs from {first.name} in {key}: {b!r} vs {a!r}",
                    hint="analyze checkpoints of one training run together",
                )


def learning_rate(ref: CheckpointRef) -> float | None:
    """The learning rate logged in ``trainer_state.json`` at the largest step <= the checkpoint's step.

    With no such entry, the entry closest to that step; with no step known, the last entry. None when the
    file or the ``learning_rate`` entries are absent. (The Trainer logs the rate the scheduler set after that
    step, i.e. the one that drives the next updates.)
    """
    state = _trainer_state(ref.path)
    if not state:
        return None
    entries = [
        (int(e["step"]), float(e["learning_rate"]))
        for e in state.get("log_history") or []
        if isinstance(e, dict)
        and isinstance(e.get("step"), int)
        and isinstance(e.get("learning_rate"), (int, float))
        and not isinstance(e.get("learning_rate"), bool)
    ]
    if not entries:
        return None
    target = ref.step if ref.step is not None else state.get("global_step")
    if not isinstance(target, int):
        return entries[-1][1]
    before = [e for e in entries if e[0] <= target]
    if before:
        best = max(e[0] for e in before)
        return [lr for s, lr in before if s == best][-1]
    return min(entries, key=lambda e: abs(e[0] - target))[1]


# ----------------------------------------------------------------------------------------------- Adam state


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


def load_adam_state(ref: CheckpointRef | Path, model: torch.nn.Module) -> AdamState | None:
    """Adam second moments saved with the checkpoint, by parameter name; None when no optimizer file exists.

    Reads ``optimizer.safetensors`` (preferred) or ``optimizer.pt`` (``weights_only=True`` only). See the
    module docstring for how positions are mapped to names; an unexplained layout is refused.
    """
    folder = ref.path if isinstance(ref, CheckpointRef) else Path(ref)
    if (folder / "optimizer.safetensors").is_file():
        return _load_adam_safetensors(folder / "optimizer.safetensors", model)
    file = folder / "optimizer.pt"
    if not file.is_file():
        return None
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CommuteError(
            f"refusing to read {file}: it does not load with torch.load(weights_only=True) "
            f"({type(err).__name__}: {' '.join(str(err).split())[:160]})",
            hint="commute never unpickles arbitrary objects; save the optimizer's state_dict() with "
            "torch.save, or run without the Adam metric",
        ) from err
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


def _load_adam_safetensors(file: Path, model: torch.nn.Module) -> AdamState:
    from safetensors import safe_open

    _check_safetensors(file)
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


# ----------------------------------------------------------------------------------------------- manifest


def _inside(root: Path, value: str, what: str) -> Path:
    target = (root / Path(value).expanduser()).resolve()
    if not target.is_relative_to(root):
        raise CommuteError(
            f"manifest path for {what} ({value!r}) leads outside the manifest's folder {root}",
            hint="manifest paths must be relative and stay inside its folder",
        )
    return target


def _domain_paths(root: Path, value: Any, key: str) -> dict[str, str]:
    from commute_cli.io.data import is_hub_source

    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise CommuteError(f"manifest field {key!r} must map domain names to sources")
    out: dict[str, str] = {}
    for name, source in value.items():
        if not (root / source).exists() and is_hub_source(source):
            out[name] = source
        else:
            out[name] = str(_inside(root, source, f"{key}.{name}"))
    return out


def _opt_int(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise CommuteError(f"manifest field {key!r} must be an integer, got {value!r}")
    return value


def read_manifest(folder: Path) -> Manifest | None:
    """``commute.json`` from ``folder`` or its parent (a single ``checkpoint-N`` may be passed), else None."""
    folder = Path(folder).expanduser()
    candidates = [folder / MANIFEST_NAME, folder.parent / MANIFEST_NAME]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        return None
    raw = _read_json(file, "manifest")
    if not isinstance(raw, dict):
        raise CommuteError(f"manifest {file} is not a JSON object")
    if raw.get("format") != MANIFEST_FORMAT:
        raise CommuteError(
            f"manifest {file} has format {raw.get('format')!r}, expected {MANIFEST_FORMAT!r}",
            hint="it was written by another version of commute",
        )
    root = file.parent.resolve()
    tokenizer = raw.get("tokenizer")
    if tokenizer is not None and not isinstance(tokenizer, str):
        raise CommuteError(f"manifest field 'tokenizer' must be a path, got {tokenizer!r}")
    schedule = raw.get("schedule")
    if schedule is not None and not isinstance(schedule, list):
        raise CommuteError("manifest field 'schedule' must be a list of {step, weights} entries")
    optimizer = raw.get("optimizer")
    if optimizer is not None and not isinstance(optimizer, dict):
        raise CommuteError("manifest field 'optimizer' must be an object")
    lr_schedule = raw.get("lr_schedule")
    if lr_schedule is not None and not isinstance(lr_schedule, str):
        raise CommuteError("manifest field 'lr_schedule' must be a string")
    return Manifest(
        path=file,
        root=root,
        domains=_domain_paths(root, raw.get("domains"), "domains"),
        eval_domains=_domain_paths(root, raw.get("eval_domains"), "eval_domains"),
        schedule=schedule,
        tokenizer=_inside(root, tokenizer, "tokenizer") if tokenizer else None,
        seq_len=_opt_int(raw, "seq_len"),
        optimizer=optimizer,
        lr_schedule=lr_schedule,
        batch_size=_opt_int(raw, "batch_size"),
        seed=_opt_int(raw, "seed"),
        raw=raw,
    )


# ----------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: Path):
    """A tokenizer from a local folder (``AutoTokenizer``) or a ``tokenizer.json`` file; never remote code."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CommuteError(
            f"tokenizer path {path} does not exist", hint="pass a tokenizer folder or tokenizer.json"
        )
    try:
        if path.is_file():
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise CommuteError(
            f"could not load a tokenizer from {path}: {type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}",
            hint="the folder needs tokenizer.json or tokenizer_config.json with its vocabulary files",
        ) from err


def check_tokenizer(tokenizer: Any, model_config: Any) -> None:
    """The tokenizer's ids must all be rows of the model's embedding: ``len(tokenizer) <= vocab_size``."""
    vocab = model_config.get("vocab_size") if isinstance(model_config, Mapping) else model_config.vocab_size
    size = len(tokenizer)
    if vocab is None or size > int(vocab):
        raise CommuteError(
            f"the tokenizer has {size} tokens but the model's vocabulary has {vocab}",
            hint="use the tokenizer the model was trained with",
        )
