"""The one loader of the package: weight preflight, model, config; the ``commute.json`` manifest.

Every command loads weights through :func:`load_model`, which always runs :func:`validate_weights` first
(safetensors headers through ``safetensors.safe_open``; pickles only through
``torch.load(weights_only=True)``; 0-element placeholder tensors, the mark of a DeepSpeed ZeRO-3 save,
refused with the command to run).
``trust_remote_code`` is never enabled and nothing is fetched from the hub (``local_files_only=True``);
``training_args.bin``, which needs an arbitrary pickle, is never read. ``torch.compile`` (``_orig_mod.``) and
DDP (``module.``) prefixes in weight names are stripped; nanoGPT files (:mod:`commute_cli.io.nanogpt`) and
Megatron-LM ``iter_N`` folders (:mod:`commute_cli.io.megatron`, every tensor-parallel and pipeline rank
merged) load as ``GPT2LMHeadModel``, Llama-like LitGPT folders (:mod:`commute_cli.io.litgpt`) as
``LlamaForCausalLM``; torch distributed checkpoints (FSDP ``SHARDED_STATE_DICT``, torchtitan, OLMo-core) load
as their transformers class (:mod:`commute_cli.io.dcp_checkpoints`), the metadata read through the
``weights_only`` unpickler.

Finding checkpoints lives in :mod:`commute_cli.io.discovery`, tokenizers in :mod:`commute_cli.io.tokenizer`,
optimizer state in :mod:`commute_cli.io.optimizer_state`, learning rates in
:mod:`commute_cli.io.learning_rate`; their public names are re-exported here for existing callers.

A manifest's paths must resolve (symlinks followed) inside the manifest's folder; a domain source that does
not exist there and looks like a hub name (``c4``, ``owner/name``) is kept as a hub name. A ``commute.json``
that is not a commute manifest (another tool's JSON) is ignored, not an error: the flags can say everything
it would have.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from commute_cli.errors import CommuteError
from commute_cli.io import dcp_checkpoints, litgpt, megatron, nanogpt
from commute_cli.io.discovery import (  # noqa: F401 (re-exported for callers that import them here)
    CheckpointRef,
    dcp_layout,
    discover,
    foreign_layout,
    is_checkpoint_dir,
    select,
    trainer_state,
    weight_files,
)
from commute_cli.io.optimizer_state import (  # noqa: F401 (re-exported)
    ADAM_FORMAT,
    AdamState,
    decay_parameter_names,
    flat_exp_avg_sq,
    load_adam_state,
    param_names,
    save_adam_state,
)
from commute_cli.io.safefiles import safetensors_shapes, torch_load
from commute_cli.io.tokenizer import (  # noqa: F401 (re-exported)
    TOKENIZER_FILES,
    check_tokenizer,
    check_tokenizer_encodes,
    load_tokenizer,
)

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


# ----------------------------------------------------------------------------------------------- weights


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
    path = Path(ref.path if isinstance(ref, CheckpointRef) else ref).expanduser()
    layout = dcp_layout(path) if path.is_dir() else None
    if layout is not None:  # torch DCP: the metadata, read through the weights_only unpickler
        return dcp_checkpoints.shapes(layout)
    if megatron.is_megatron_dir(path):
        return megatron.shapes(path)
    if litgpt.is_litgpt_dir(path):
        return {k: tuple(v.shape) for k, v in litgpt.state_dict(litgpt.read(path)).items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for file in weight_files(path):
        if file.name.endswith(".json"):
            continue
        found = _shapes(file)
        empty = [name for name, shape in found.items() if 0 in shape and not name.endswith(".attn.bias")]
        if empty:
            folder = file.parent
            zero = 2 * len(empty) >= len(found) or any(folder.glob("global_step*"))
            if not zero:  # a few empty tensors and no DeepSpeed shards: a damaged file, not a ZeRO-3 save
                raise CommuteError(
                    f"{file} holds empty (0-element) tensors ({len(empty)} of {len(found)}, "
                    f"e.g. {empty[0]}): the file is incomplete or damaged",
                    hint="save the checkpoint again (or leave it out with --steps)",
                )
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


def _build(config: Any, dtype: torch.dtype, attn: str = "eager") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, **{_dtype_kw(): dtype})


def _from_pretrained(path: Path, dtype: torch.dtype, attn: str = "eager") -> torch.nn.Module:
    import inspect

    from transformers import AutoModelForCausalLM, PreTrainedModel

    kwargs: dict[str, Any] = {
        "attn_implementation": attn,
        "trust_remote_code": False,
        "local_files_only": True,
        "output_loading_info": True,
        _dtype_kw(): dtype,
    }
    if "weights_only" in inspect.signature(PreTrainedModel.from_pretrained).parameters:
        kwargs["weights_only"] = True
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)  # (model, loading info)
        model, info = loaded
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


def _from_dcp(
    layout: dcp_checkpoints.DcpLayout, dtype: torch.dtype, attn_implementation: str = "eager"
) -> torch.nn.Module:
    """A torch distributed checkpoint (:mod:`commute_cli.io.dcp_checkpoints`) in its transformers class;
    a tied output embedding saved separately must equal the input embedding."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef,attr-defined]

    config = layout.fmt.config(layout)
    with no_init_weights():  # every weight is assigned below (a missing one is an error): skip random init
        model: Any = _build(config, dtype, attn_implementation)  # a transformers PreTrainedModel
    model.tie_weights()  # no_init_weights skips the tying that init_weights does
    state = dcp_checkpoints.hf_state(layout, config)
    persistent = set(model.state_dict())
    for name, _ in model.named_buffers():  # buffers this transformers version recomputes (causal masks,
        if name not in persistent:  # rotary inv_freq) but an older one saved: not weights
            state.pop(name, None)
    canonical = {id(p): n for n, p in model.named_parameters()}
    for alias, param in model.named_parameters(remove_duplicate=False):
        name = canonical[id(param)]
        if alias != name and alias in state:
            if name in state and not torch.equal(state[alias], state[name]):
                raise CommuteError(
                    f"{layout.weights}: {alias} differs from {name}, but config.json ties them",
                    hint="use the config the run was trained with (tie_word_embeddings)",
                )
            state.setdefault(name, state[alias])
            del state[alias]
    _assign(model, state, layout.weights)
    return model


def load_model(
    ref: CheckpointRef | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> torch.nn.Module:
    """The checkpoint's causal LM for curvature work: eager attention, ``dtype`` (upcasts half), eval mode.

    ``attn_implementation="sdpa"`` (fused attention, no double backward) is for first-order work only:
    finite-difference HVPs (``--hvp fd``, ``engine.fd_hvp``); exact HVPs need ``"eager"``.

        ``ref`` is a :class:`CheckpointRef`, a transformers folder, a nanoGPT ``.pt`` file, a Megatron-LM
    ``iter_N`` folder, or a LitGPT folder. The preflight
    (:func:`validate_weights`) always runs first. Missing or shape-mismatched weights are an error, not a
    silently re-initialized model. Parameters that exist only in the transformers form of a nanoGPT model
    (zero biases of a ``bias=False`` model) have ``requires_grad=False``. Call ``.train()`` to train it.
    """
    path = Path(ref.path if isinstance(ref, CheckpointRef) else ref).expanduser()
    if path.is_file():
        validate_weights(path)
        ckpt = nanogpt.read(path)
        config = nanogpt.gpt2_config(ckpt, path)
        state, frozen = nanogpt.gpt2_state_dict(ckpt, config)
        model = _build(config, dtype, attn_implementation)
        _assign(model, state, path)
        for name, param in model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
    elif megatron.is_megatron_dir(path):
        validate_weights(path)
        merged = megatron.load(path)
        model = _build(merged.config, dtype, attn_implementation)
        _assign(model, merged.state, path)
        for name, param in model.named_parameters():
            if name in merged.frozen:
                param.requires_grad_(False)
    elif litgpt.is_litgpt_dir(path):
        validate_weights(path)
        config = litgpt.llama_config(path)
        model = _build(config, dtype, attn_implementation)
        _assign(model, litgpt.llama_state_dict(path, config), path)
    else:
        if not is_checkpoint_dir(path):
            problem = foreign_layout(path) if path.is_dir() else None
            raise CommuteError(
                problem or f"{path} is not a model folder", hint="it needs config.json and weights"
            )
        names = validate_weights(path)
        layout = dcp_layout(path)
        if layout is not None:
            model = _from_dcp(layout, dtype, attn_implementation)
        elif any(n.startswith(nanogpt.WRAPPER_PREFIXES) for n in names):  # torch.compile / DDP state dict
            model = _build(read_config(path), dtype, attn_implementation)
            _assign(model, _read_state(path), path)
        else:
            model = _from_pretrained(path, dtype, attn_implementation)
    model.eval()
    return model.to(device)


def read_config(ref: CheckpointRef | Path):
    """The checkpoint's ``PretrainedConfig`` (no weights read, no remote code; nanoGPT: from model_args)."""
    from transformers import AutoConfig

    path = Path(ref.path if isinstance(ref, CheckpointRef) else ref).expanduser()
    if path.is_file():
        return nanogpt.gpt2_config(nanogpt.read(path), path)
    layout = dcp_layout(path)
    if layout is not None:
        return layout.fmt.config(layout)
    if megatron.is_megatron_dir(path):
        return megatron.read_config(path)
    if litgpt.is_litgpt_dir(path):
        return litgpt.llama_config(path)
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
