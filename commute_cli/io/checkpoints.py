"""Find checkpoints as trainers save them, preflight their files, and load model, config and tokenizer.

This is the one loader of the package: every command loads weights through :func:`load_model`, which always
runs :func:`validate_weights` first (safetensors headers through ``safe_open``; pickles only through
``torch.load(weights_only=True)``). ``trust_remote_code`` is never enabled and nothing is fetched from the
hub (``local_files_only=True``); ``training_args.bin``, which needs an arbitrary pickle, is never read.

What counts as a checkpoint (:func:`discover`), and why:

- A **transformers folder**: ``config.json`` and weights (``model.safetensors``, a sharded index, or
  ``pytorch_model.bin``). Its step is ``global_step`` of ``trainer_state.json`` (read through
  ``transformers.TrainerState``) when present, else its name (``checkpoint-N``, ``step-N``/``step_N``,
  ``iter-N``, ``global_stepN``): the file is what the trainer wrote; a name may have been edited.
- A **nanoGPT** ``ckpt.pt`` (:mod:`commute_cli.io.nanogpt`): a ``.pt`` file passed directly, a folder with
  ``ckpt.pt``, or a folder of step-named ``.pt`` files (``ckpt_2000.pt``). Its step is ``iter_num``.
- A folder that holds step-named checkpoints is a **run**: its checkpoints are those entries; a model saved at
  its top level (the Trainer's final ``save_model``) is ignored.
- **Links and extra entries** (``best``, ``last``, ``latest``, copies): entries that resolve to the same
  folder are one checkpoint; an entry without a step in its name that has the step of a step-named one is an
  alias of it; two step-named entries with one step are one checkpoint if their weight files are
  byte-identical, else the run is ambiguous and refused. Files (DeepSpeed's ``latest``) are ignored.
- **Refused with one line saying what to run**: LoRA/PEFT adapter folders (``adapter_config.json``, no full
  weights: merge the adapter first), DeepSpeed ``global_stepN/`` folders without consolidated weights and
  ZeRO-3 placeholder weights (0-element tensors: run ``zero_to_fp32.py``), Megatron-LM ``iter_N/mp_rank_*``
  checkpoints (their pickles hold an ``argparse.Namespace``, which ``weights_only`` refuses: convert them).
- ``torch.compile`` (``_orig_mod.``) and DDP (``module.``) prefixes in weight names are stripped.
- ``select(every=N)`` keeps the checkpoints whose step is a multiple of N.
- A manifest's paths must resolve (symlinks followed) inside the manifest's folder; a domain source that does
  not exist there and looks like a hub name (``c4``, ``owner/name``) is kept as a hub name. A
  ``commute.json`` that is not a commute manifest (another tool's JSON) is ignored, not an error: the flags
  can say everything it would have.
"""

from __future__ import annotations

import filecmp
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from commute_cli.errors import CommuteError
from commute_cli.io import nanogpt
from commute_cli.io.optimizer_state import (  # noqa: F401 (re-exported for callers that import them here)
    ADAM_FORMAT,
    AdamState,
    decay_parameter_names,
    flat_exp_avg_sq,
    load_adam_state,
    param_names,
    save_adam_state,
)
from commute_cli.io.safefiles import read_json, safetensors_shapes, torch_load

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.txt",
    "sentencepiece.bpe.model",
)
NANOGPT_FILE = "ckpt.pt"
_STEP_NAME_RE = re.compile(r"^(?:checkpoint|step|iter|global_step)[-_]?(\d+)$", re.IGNORECASE)
_STEP_FILE_RE = re.compile(r"^(?:ckpt|checkpoint|step|iter|model)[-_]?(\d+)\.(?:pt|pth)$", re.IGNORECASE)
MANIFEST_NAME = "commute.json"
MANIFEST_FORMAT = "commute-manifest/1"

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


@dataclass(frozen=True)
class CheckpointRef:
    """One saved model: its folder (or, for nanoGPT, its ``.pt`` file), training step (None if unknown),
    a display name (also the name of its cache entries)."""

    path: Path
    step: int | None
    name: str

    @property
    def is_nanogpt(self) -> bool:
        return self.path.is_file()


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


def trainer_state(folder: Path):
    """``trainer_state.json`` as a ``transformers.TrainerState`` (keys the installed version does not know
    are dropped; a file that is not a JSON object gives None); None when absent."""
    from dataclasses import fields

    from transformers import TrainerState

    file = Path(folder) / "trainer_state.json"
    if not file.is_file():
        return None
    raw = read_json(file, "trainer state")
    if not isinstance(raw, dict):
        return None
    known = {f.name for f in fields(TrainerState)}
    try:
        return TrainerState(**{k: v for k, v in raw.items() if k in known})
    except (TypeError, ValueError):
        return None


def _name_step(name: str) -> int | None:
    match = _STEP_NAME_RE.match(name) or _STEP_FILE_RE.match(name)
    return int(match.group(1)) if match else None


def _step_of(folder: Path) -> int | None:
    file = Path(folder) / "trainer_state.json"
    if file.is_file():
        raw = read_json(file, "trainer state")
        step = raw.get("global_step") if isinstance(raw, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    return _name_step(Path(folder).name)


def _nanogpt_ref(file: Path, name: str) -> CheckpointRef:
    ckpt = nanogpt.read(file)
    step = nanogpt.step(ckpt)
    return CheckpointRef(path=file, step=step if step is not None else _name_step(file.name), name=name)


def _foreign_layout(folder: Path) -> str | None:
    """One line for a folder that holds a model commute cannot read as it is (and what to run), else None."""
    if is_checkpoint_dir(folder):
        return None
    if (folder / "adapter_config.json").is_file():
        base = read_json(folder / "adapter_config.json", "adapter config")
        base_name = base.get("base_model_name_or_path") if isinstance(base, dict) else None
        return (
            f"{folder} is a LoRA/PEFT adapter (adapter_config.json"
            f"{', base ' + str(base_name) if base_name else ''}), not a full model: merge it first, e.g. "
            "PeftModel.from_pretrained(base, path).merge_and_unload().save_pretrained(out), "
            "and analyze the merged folders"
        )
    ds = sorted(p.name for p in folder.glob("global_step*") if p.is_dir() and any(p.glob("*model_states.pt")))
    if ds:
        return (
            f"{folder} holds DeepSpeed ZeRO shards ({ds[0]}/) but no consolidated weights: run "
            f"`python {folder / 'zero_to_fp32.py'} {folder} OUT` (DeepSpeed writes zero_to_fp32.py beside "
            "global_stepN/) and save the result with config.json, or save with "
            "stage3_gather_16bit_weights_on_model_save=true"
        )
    megatron = sorted(folder.glob("mp_rank_*/model_optim_rng.pt")) + sorted(
        folder.glob("iter_*/mp_rank_*/model_optim_rng.pt")
    )
    if megatron or (folder / "latest_checkpointed_iteration.txt").is_file():
        where = megatron[-1] if megatron else folder / "iter_N/mp_rank_00/model_optim_rng.pt"
        return (
            f"{folder} is a Megatron-LM checkpoint; its pickle stores the training arguments as an "
            "argparse.Namespace, which commute does not unpickle: convert it once, in a trusted environment "
            "with transformers<5, `python -m "
            f"transformers.models.megatron_gpt2.convert_megatron_gpt2_checkpoint {where}` (it writes "
            "config.json and pytorch_model.bin beside the file), then analyze that folder"
        )
    return None


def _same_weights(a: Path, b: Path) -> bool:
    files_a, files_b = weight_files(a), weight_files(b)
    if [f.name for f in files_a] != [f.name for f in files_b]:
        return False
    return all(filecmp.cmp(x, y, shallow=False) for x, y in zip(files_a, files_b, strict=True))


def _dedupe(entries: list[CheckpointRef]) -> list[CheckpointRef]:
    """One entry per checkpoint: links to one target, aliases (``best``, ``last``) and identical copies."""
    by_target: dict[Path, CheckpointRef] = {}
    for ref in sorted(entries, key=lambda r: (_name_step(r.path.name) is None, r.name)):
        by_target.setdefault(ref.path.resolve(), ref)  # a step-named entry wins over a link named best/last
    by_step: dict[int, list[CheckpointRef]] = {}
    for ref in by_target.values():
        assert ref.step is not None
        by_step.setdefault(ref.step, []).append(ref)
    out: list[CheckpointRef] = []
    for step, refs in sorted(by_step.items()):
        named = [r for r in refs if _name_step(r.path.name) is not None] or refs
        keep = named[0]
        for other in named[1:]:
            if not _same_weights(keep.path, other.path):
                raise CommuteError(
                    f"two different checkpoints for step {step}: {keep.name} and {other.name}",
                    hint="keep one of them, or pass the one you mean directly",
                )
        out.append(keep)
    return out


def _entries(path: Path) -> list[CheckpointRef]:
    """The checkpoints directly inside ``path`` (subfolders and nanoGPT files) that have a step."""
    out: list[CheckpointRef] = []
    for entry in sorted(p for p in path.iterdir() if not p.name.startswith(".")):
        if entry.is_file():
            if _STEP_FILE_RE.match(entry.name):
                out.append(_nanogpt_ref(entry, entry.stem))
            continue
        if not entry.is_dir():
            continue
        if is_checkpoint_dir(entry):
            step = _step_of(entry)
            if step is not None:
                out.append(CheckpointRef(path=entry, step=step, name=entry.name))
        elif (entry / NANOGPT_FILE).is_file():
            ref = _nanogpt_ref(entry / NANOGPT_FILE, entry.name)
            if ref.step is not None:
                out.append(ref)
        elif _name_step(entry.name) is not None and not entry.name.lower().startswith("global_step"):
            problem = _foreign_layout(entry)
            if problem:
                raise CommuteError(problem)
    return out


def discover(path: Path) -> list[CheckpointRef]:
    """The checkpoints under ``path``, sorted by step (see the module docstring for what counts)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CommuteError(
            f"checkpoint path {path} does not exist", hint="pass a checkpoint folder or a run folder"
        )
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return [_nanogpt_ref(path, path.stem if _name_step(path.name) else path.parent.name or path.stem)]
        raise CommuteError(
            f"checkpoint path {path} is a file, not a folder",
            hint="pass the folder that holds it (or a nanoGPT ckpt.pt)",
        )
    refs = _entries(path)
    if refs:
        return _dedupe(refs)
    if is_checkpoint_dir(path):
        return [CheckpointRef(path=path, step=_step_of(path), name=path.name)]
    if (path / NANOGPT_FILE).is_file():
        return [_nanogpt_ref(path / NANOGPT_FILE, path.name)]
    problem = _foreign_layout(path)
    if problem:
        raise CommuteError(problem)
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    models = [p for p in subdirs if is_checkpoint_dir(p)]
    if models:
        names = ", ".join(p.name for p in models[:5])
        raise CommuteError(
            f"found model folders in {path} ({names}) but none has a step in its name or trainer_state.json",
            hint="name them step-N / checkpoint-N, or pass one model folder directly",
        )
    for sub in subdirs:
        problem = _foreign_layout(sub)
        if problem:
            raise CommuteError(problem)
    partial = [p.name for p in [path, *subdirs] if (p / "config.json").is_file()]
    if partial:
        raise CommuteError(
            f"no checkpoints in {path}: {', '.join(partial[:5])} has config.json but no model weights",
            hint="expected model.safetensors (or model.safetensors.index.json, pytorch_model.bin) beside it",
        )
    raise CommuteError(
        f"no checkpoints in {path}",
        hint="expected checkpoint-N/ (or step-N, iter-N) subfolders, or a model folder, each with "
        "config.json and model.safetensors (or pytorch_model.bin), or a nanoGPT ckpt.pt",
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


def _path(ref: CheckpointRef | Path) -> Path:
    return Path(ref.path if isinstance(ref, CheckpointRef) else ref).expanduser()


def weight_files(ref: CheckpointRef | Path) -> list[Path]:
    """The files that hold a checkpoint's weights (index and shards, or one file; a nanoGPT ``.pt``), sorted.

    What identifies the weights for caches and digests; raises CommuteError when a listed file is missing.
    """
    path = _path(ref)
    if path.is_file():
        return [path]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_file = path / index_name
        if index_file.is_file():
            index = read_json(index_file, "weights index")
            shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
            if not shards:
                raise CommuteError(
                    f"weights index {index_file} lists no files", hint="re-save the checkpoint"
                )
            for shard in shards:
                if not (path / shard).is_file():
                    raise CommuteError(
                        f"weights shard {path / shard} is missing", hint="re-copy the checkpoint"
                    )
            return [index_file, *(path / s for s in shards)]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    raise CommuteError(
        f"no model weights in {path}", hint="expected model.safetensors (or an index) or pytorch_model.bin"
    )


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of one weights file, read safely and without loading tensor data."""
    if file.name.endswith(".safetensors"):
        return safetensors_shapes(file)
    saved = torch_load(file, "weights")
    if nanogpt.is_nanogpt(saved):
        saved = saved["model"]
    if not isinstance(saved, Mapping) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise CommuteError(
            f"{file} is not a state dict of tensors", hint="save the model with save_pretrained or torch.save"
        )
    return {str(k): tuple(v.shape) for k, v in saved.items()}


def validate_weights(ref: CheckpointRef | Path) -> dict[str, tuple[int, ...]]:
    """Preflight of a checkpoint's weight files, before transformers touches them; cheap (headers only).

    Returns tensor name -> shape over all files. Refuses, with one line naming the file: damaged or
    truncated safetensors, pickles that need more than ``weights_only``, files that are not state dicts,
    and placeholder (0-element) tensors, the mark of a DeepSpeed ZeRO-3 save without gathered weights.
    """
    path = _path(ref)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(path):
        if file.name.endswith(".json"):
            continue
        found = _shapes(file)
        empty = [name for name, shape in found.items() if 0 in shape and not name.endswith(".attn.bias")]
        if empty:
            folder = file.parent
            raise CommuteError(
                f"{file} holds empty (0-element) tensors ({len(empty)} of {len(found)}, e.g. {empty[0]}): "
                "a DeepSpeed ZeRO-3 save without gathered weights",
                hint=f"run zero_to_fp32.py in {folder} (DeepSpeed writes it beside global_stepN/) and save "
                "the result with config.json, or save with stage3_gather_16bit_weights_on_model_save=true",
            )
        shapes.update(found)
    return shapes


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _dtype_kw() -> str:
    return "dtype" if _transformers_major() >= 5 else "torch_dtype"


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers folder, names stripped of wrapper prefixes (weights_only)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        if file.name.endswith(".safetensors"):
            part = load_file(str(file))
        elif file.name.endswith(".json"):
            continue
        else:
            part = torch_load(file, "weights", mmap=False)
        state.update({nanogpt.strip_prefixes(k): v for k, v in part.items()})
    return state


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Copy ``state`` into ``model``; any missing (except tied aliases) or unknown name is an error."""
    result = model.load_state_dict(state, strict=False)
    canonical = {id(p): n for n, p in model.named_parameters()}
    tied = {n for n, p in model.named_parameters(remove_duplicate=False) if canonical[id(p)] != n}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        what = (
            f"missing weights {missing[:3]}" if missing else f"unknown weights {result.unexpected_keys[:3]}"
        )
        raise CommuteError(f"checkpoint {path} has {what}", hint="the weights do not match its config")


def _build(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, attn_implementation="eager", **{_dtype_kw(): dtype})


def _from_pretrained(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    import inspect

    from transformers import AutoModelForCausalLM, PreTrainedModel

    kwargs: dict[str, Any] = {
        "attn_implementation": "eager",
        "trust_remote_code": False,
        "local_files_only": True,
        "output_loading_info": True,
        _dtype_kw(): dtype,
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
    return model


def load_model(
    ref: CheckpointRef | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """The checkpoint's causal LM for curvature work: eager attention, ``dtype`` (upcasts half), eval mode.

    ``ref`` is a :class:`CheckpointRef`, a transformers folder, or a nanoGPT ``.pt`` file. The preflight
    (:func:`validate_weights`) always runs first. Missing or shape-mismatched weights are an error, not a
    silently re-initialized model. Parameters that exist only in the transformers form of a nanoGPT model
    (zero biases of a ``bias=False`` model) have ``requires_grad=False``. Call ``.train()`` to train it.
    """
    path = _path(ref)
    if path.is_file():
        validate_weights(path)
        ckpt = nanogpt.read(path)
        config = nanogpt.gpt2_config(ckpt, path)
        state, frozen = nanogpt.gpt2_state_dict(ckpt, config)
        model = _build(config, dtype)
        _assign(model, state, path)
        for name, param in model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
    else:
        if not is_checkpoint_dir(path):
            problem = _foreign_layout(path) if path.is_dir() else None
            raise CommuteError(
                problem or f"{path} is not a model folder", hint="it needs config.json and weights"
            )
        names = validate_weights(path)
        if any(n.startswith(nanogpt.WRAPPER_PREFIXES) for n in names):  # torch.compile / DDP state dict
            model = _build(read_config(path), dtype)
            _assign(model, _read_state(path), path)
        else:
            model = _from_pretrained(path, dtype)
    model.eval()
    return model.to(device)


def read_config(ref: CheckpointRef | Path):
    """The checkpoint's ``PretrainedConfig`` (no weights read, no remote code; nanoGPT: from model_args)."""
    from transformers import AutoConfig

    path = _path(ref)
    if path.is_file():
        return nanogpt.gpt2_config(nanogpt.read(path), path)
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
    """The value of :func:`commute_cli.io.learning_rate.find_learning_rate` (kept for existing callers)."""
    from commute_cli.io.learning_rate import find_learning_rate

    return find_learning_rate(ref).value


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
    """``commute.json`` from ``folder`` or its parent (a single ``checkpoint-N`` may be passed), else None.

    None also when the file is not a commute manifest (not JSON, not an object, no ``format`` of ours);
    a manifest of another commute format version, or one with bad fields, is refused.
    """
    folder = Path(folder).expanduser()
    candidates = [folder / MANIFEST_NAME, folder.parent / MANIFEST_NAME]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        return None
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # not JSON: another tool's file under our name; the flags say what it would have
    if not isinstance(raw, dict):
        return None
    fmt = raw.get("format")
    if isinstance(fmt, str) and fmt.startswith("commute-manifest/") and fmt != MANIFEST_FORMAT:
        raise CommuteError(
            f"manifest {file} has format {fmt!r}, expected {MANIFEST_FORMAT!r}",
            hint="it was written by another version of commute",
        )
    if fmt != MANIFEST_FORMAT:
        return None  # another tool's JSON: ignored (see the module docstring)
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

_PROBE = "The quick brown fox jumps over the lazy dog; 0123456789."


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.model"))


def load_tokenizer(path: Path | str):
    """A tokenizer from a local folder (``AutoTokenizer``), a ``tokenizer.json`` file, or a name already in
    the local Hugging Face cache (``gpt2``); never remote code, never the network.

    A folder without tokenizer files (``tokenizer.json``, ``vocab.json``, ``tokenizer.model``, ...) is
    refused: there AutoTokenizer would build an empty tokenizer from ``config.json`` alone that maps every
    text to no tokens. The tokenizer must also pass :func:`check_tokenizer_encodes`. Raises CommuteError.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path).expanduser()
    if path.is_file() and path.suffix in (".pt", ".pth"):
        raise CommuteError(
            f"{path} is a checkpoint, not a tokenizer: nanoGPT checkpoints carry none",
            hint="pass --tokenizer with the tokenizer the model was trained with (a folder, tokenizer.json,"
            " or gpt2 if it is in your Hugging Face cache)",
        )
    if path.is_dir() and not _has_tokenizer_files(path):
        raise CommuteError(
            f"{path} has no tokenizer files (no {', '.join(TOKENIZER_FILES[:3])}; a Trainer built without a "
            "tokenizer saves none)",
            hint="pass --tokenizer PATH with the tokenizer the model was trained with",
        )
    try:
        if path.is_file():
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
        elif path.is_dir():
            tokenizer = AutoTokenizer.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False
            )
        else:
            tokenizer = _cached_tokenizer(str(path))
    except CommuteError:
        raise
    except Exception as err:
        raise CommuteError(
            f"could not load a tokenizer from {path}: {type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}",
            hint="the folder needs tokenizer.json or tokenizer_config.json with its vocabulary files",
        ) from err
    check_tokenizer_encodes(tokenizer, str(path))
    return tokenizer


def _cached_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise CommuteError(
            f"tokenizer path {name} does not exist", hint="pass a tokenizer folder or tokenizer.json"
        )
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise CommuteError(
            f"tokenizer {name!r} is neither a local path nor in the local Hugging Face cache",
            hint="pass a tokenizer folder or tokenizer.json",
        ) from err


def check_tokenizer_encodes(tokenizer: Any, where: str) -> None:
    """Refuse a tokenizer that maps ordinary text to no ordinary tokens (an empty or broken vocabulary)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    if len(tokenizer) <= len(special) + 1 or not [i for i in ids if i not in special]:
        raise CommuteError(
            f"the tokenizer from {where} has {len(tokenizer)} tokens and maps text to no ordinary tokens",
            hint="pass --tokenizer with the tokenizer the model was trained with",
        )


def check_tokenizer(tokenizer: Any, model_config: Any) -> None:
    """The tokenizer's ids must all be rows of the model's embedding: ``len(tokenizer) <= vocab_size``."""
    vocab = model_config.get("vocab_size") if isinstance(model_config, Mapping) else model_config.vocab_size
    size = len(tokenizer)
    if vocab is None or size > int(vocab):
        raise CommuteError(
            f"the tokenizer has {size} tokens but the model's vocabulary has {vocab}",
            hint="use the tokenizer the model was trained with",
        )
