"""Megatron-LM's files: where each rank's pickle lies, how it is read safely, its step and learning rate.

The layout and what the pickle holds are described in :mod:`commute_cli.io.megatron`, which merges the
weights; this module finds ``iter_N/mp_rank_TT[_PPP]/model_optim_rng.pt`` (and Megatron-DeepSpeed's
``global_stepN/mp_rank_TT_model_states.pt``), reads one file with ``weights_only`` (``argparse.Namespace``
built, numpy's, Megatron's and DeepSpeed's globals kept as inert records, anything else refused), and reads
the step (``iteration``), the tracker file and the learning rate.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from commute_cli.errors import CommuteError
from commute_cli.io.safefiles import torch_load_allowing

CHECKPOINT_FILE = "model_optim_rng.pt"
TRACKER_FILE = "latest_checkpointed_iteration.txt"
DS_FILE_GLOB = "mp_rank_*_model_states.pt"
_DS_RE = re.compile(r"^mp_rank_(\d{2})_model_states\.pt$")
_RANK_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
#: run it in a Megatron-LM checkout: re-shards any checkpoint of a GPT to one tensor- and pipeline-rank
RESHARD = (
    "python tools/checkpoint/convert.py --model-type GPT --loader core --saver core "
    "--target-tensor-parallel-size 1 --target-pipeline-parallel-size 1 --load-dir {src} --save-dir OUT"
)
EXPORT_HINT = (
    "commute reads Megatron GPTs of GPT-2's architecture; export this one to a transformers folder with "
    "Megatron-Bridge, AutoBridge.from_hf_pretrained(<the transformers model it follows>).export_ckpt(<iter_N "
    "folder>, OUT), and analyze OUT"
)


def _inert(name: str) -> bool:
    """Globals kept as inert records: numpy's (the RNG state), Megatron's and DeepSpeed's own (enums)."""
    return name.startswith(("numpy.", "megatron.", "deepspeed.")) or name in ("_io.BytesIO", "io.BytesIO")


# ----------------------------------------------------------------------------------------------- files


def rank_files(folder: Path) -> dict[tuple[int, int], Path]:
    """(tensor rank, pipeline rank) -> ``model_optim_rng.pt`` of an ``iter_N`` folder; empty if none."""
    out: dict[tuple[int, int], Path] = {}
    folder = Path(folder)
    if not folder.is_dir():
        return out
    for sub in sorted(folder.glob(f"mp_rank_*/{CHECKPOINT_FILE}")):
        match = _RANK_RE.match(sub.parent.name)
        if match is None:
            continue
        if match.group(3) is not None:
            raise CommuteError(
                f"{folder} is a Megatron-LM checkpoint with expert parallelism ({sub.parent.name}/), "
                "which commute does not merge",
                hint="re-shard it to one rank in a Megatron-LM checkout: "
                + RESHARD.format(src=folder.parent),
            )
        out[(int(match.group(1)), int(match.group(2) or 0))] = sub
    if not out and is_deepspeed_dir(folder):
        for file in sorted(folder.glob(DS_FILE_GLOB)):
            found = _DS_RE.match(file.name)
            if found is not None:
                out[(int(found.group(1)), 0)] = file
    return out


def is_deepspeed_dir(folder: Path) -> bool:
    """A Megatron-DeepSpeed ``global_stepN`` folder (``--deepspeed``): DeepSpeed's
    ``mp_rank_TT_model_states.pt`` with Megatron's tracker file beside the folder (DeepSpeed alone writes
    only ``latest``)."""
    folder = Path(folder)
    return (
        folder.is_dir()
        and (folder.parent / TRACKER_FILE).is_file()
        and any(_DS_RE.match(f.name) for f in folder.glob(DS_FILE_GLOB))
    )


def is_megatron_dir(folder: Path) -> bool:
    """An ``iter_N`` (or ``release``) folder with ``mp_rank_*/model_optim_rng.pt``, or a Megatron-DeepSpeed
    ``global_stepN`` folder (:func:`is_deepspeed_dir`)."""
    folder = Path(folder)
    return folder.is_dir() and (any(folder.glob(f"mp_rank_*/{CHECKPOINT_FILE}")) or is_deepspeed_dir(folder))


def tracker_iteration(run: Path) -> int | None:
    """The iteration in ``latest_checkpointed_iteration.txt`` of a run folder (None: absent, or "release")."""
    file = Path(run) / TRACKER_FILE
    if not file.is_file():
        return None
    text = file.read_text(encoding="utf-8", errors="replace").strip()
    return int(text) if text.isdigit() else None


def read_file(file: Path) -> dict[str, Any]:
    """One rank's checkpoint dict, read with ``weights_only`` (memory-mapped; see the module docstring)."""
    saved = torch_load_allowing(
        file,
        "Megatron-LM checkpoint",
        allow=[argparse.Namespace],
        inert=_inert,
        hint="convert it once, in a trusted environment, to a transformers folder (config.json + "
        "model.safetensors) and analyze that",
    )
    if isinstance(saved, Mapping) and "module" in saved and "model" not in saved:  # DeepSpeed's engine
        if saved["module"] is None:  # PipelineModule: one file per layer
            raise CommuteError(
                f"{file.parent} is a Megatron-DeepSpeed pipeline checkpoint (layer_*-model_states.pt), which "
                "commute does not merge: convert it in a Megatron-DeepSpeed checkout with `python "
                "tools/convert_checkpoint/deepspeed_to_megatron.py --input_folder "
                f"{file.parent} --output_folder OUT --target_tp 1 --target_pp 1`, then analyze OUT",
            )
        saved = {**saved, "model": saved["module"]}
    if not isinstance(saved, Mapping) or not any(k in saved for k in ("model", "model0")):
        raise CommuteError(
            f"{file} is not a Megatron-LM checkpoint (no 'model' entry)",
            hint="pass the iter_N folder that Megatron-LM's save_checkpoint wrote",
        )
    return dict(saved)


def args_of(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    args = ckpt.get("args")
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else {}


def step(folder: Path) -> int | None:
    """``iteration`` of the folder's rank-0 file (None for a release without one)."""
    files = rank_files(folder)
    if not files:
        return None
    it = read_file(files[min(files)]).get("iteration")
    return int(it) if isinstance(it, int) and not isinstance(it, bool) else None


def checkpoint_files(folder: Path) -> dict[tuple[int, int], Path]:
    files = rank_files(folder)
    if not files:
        raise CommuteError(
            f"{folder} has no mp_rank_*/{CHECKPOINT_FILE}", hint="pass an iter_N folder of a Megatron-LM run"
        )
    tp, pp = max(t for t, _ in files) + 1, max(p for _, p in files) + 1
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in files]
    if missing:
        t, p = missing[0]
        name = f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "")
        raise CommuteError(f"{folder} lacks {name}/{CHECKPOINT_FILE}", hint="the checkpoint is incomplete")
    return files


def model_tree(ckpt: Mapping[str, Any], file: Path) -> Mapping[str, Any]:
    if "model" not in ckpt:
        raise CommuteError(
            f"{file} holds an interleaved (virtual) pipeline "
            f"({', '.join(k for k in ckpt if k.startswith('model'))}), which commute does not merge",
            hint="re-shard it to one rank in a Megatron-LM checkout: "
            + RESHARD.format(src=file.parent.parent),
        )
    tree = ckpt["model"]
    if not isinstance(tree, Mapping):
        raise CommuteError(f"{file}: 'model' is not a state dict", hint="pass a Megatron-LM torch checkpoint")
    return tree


# ----------------------------------------------------------------------------------------------- lr


def _torch_optimizer(opt: Any) -> Mapping[str, Any] | None:
    """The torch optimizer state inside Megatron's: plain torch, ``{"optimizer": ...}`` (mixed precision,
    distributed optimizer) or a list of those (``ChainedOptimizer``, the first)."""
    if isinstance(opt, (list, tuple)) and opt:
        opt = opt[0]
    if isinstance(opt, Mapping) and "param_groups" not in opt and isinstance(opt.get("optimizer"), Mapping):
        opt = opt["optimizer"]
    return opt if isinstance(opt, Mapping) else None


def _param_groups(opt: Any) -> list[Mapping[str, Any]]:
    inner = _torch_optimizer(opt)
    groups = inner.get("param_groups") if inner is not None else None
    return [g for g in groups if isinstance(g, Mapping)] if isinstance(groups, list) else []


def optimizer_state(folder: Path) -> Mapping[str, Any] | None:
    """The torch optimizer state saved in the rank-0 file (its param groups name the optimizer)."""
    files = checkpoint_files(folder)
    return _torch_optimizer(read_file(files[min(files)]).get("optimizer"))


def _scheduler_lr(sched: Mapping[str, Any], args: Mapping[str, Any]) -> float | None:
    """Megatron's ``OptimizerParamScheduler.get_lr`` at the saved ``num_steps`` (warmup from
    ``args.lr_warmup_init``; constant, linear, cosine, inverse-square-root decay; None for another style)."""
    try:
        max_lr, min_lr = float(sched["max_lr"]), float(sched["min_lr"])
        steps, warm, decay = (
            float(sched["num_steps"]),
            float(sched["lr_warmup_steps"]),
            float(sched["lr_decay_steps"]),
        )
        style = str(sched["lr_decay_style"])
    except (KeyError, TypeError, ValueError):
        return None
    if sched.get("lr_decay_tokens") or sched.get("lr_warmup_tokens"):
        return None  # Megatron-DeepSpeed's token-based schedule: not this formula
    init = float(args.get("lr_warmup_init", 0.0) or 0.0)
    if warm > 0 and steps <= warm:
        return init + (max_lr - init) * steps / warm
    if style == "constant":
        return max_lr
    if steps > decay:
        return min_lr
    if style == "inverse-square-root":
        return max(min_lr, max_lr * max(warm, 1.0) ** 0.5 / max(steps, 1.0) ** 0.5)
    if decay <= warm:
        return None
    ratio = (steps - warm) / (decay - warm)
    if style == "linear":
        return min_lr + (1.0 - ratio) * (max_lr - min_lr)
    if style == "cosine":
        return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (max_lr - min_lr)
    return None


def learning_rate(folder: Path) -> tuple[float | None, str]:
    """(lr of the next update, where it came from) of the checkpoint in ``folder``; (None, "") if unrecorded.

    In order: the optimizer's first param group with ``lr_mult`` 1 (Megatron's scheduler writes the next
    update's rate into it after each step); the saved ``opt_param_scheduler`` through Megatron's formula;
    ``args.lr`` when ``args.lr_decay_style`` is constant and warmup is over.
    """
    files = checkpoint_files(folder)
    ckpt = read_file(files[min(files)])
    groups = _param_groups(ckpt.get("optimizer"))
    base = [g for g in groups if float(g.get("lr_mult", 1.0) or 1.0) == 1.0] or groups
    lr = base[0].get("lr") if base else None
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return float(lr), "model_optim_rng.pt optimizer param_groups"
    args = args_of(ckpt)
    sched = ckpt.get("opt_param_scheduler", ckpt.get("lr_scheduler"))  # DeepSpeed: lr_scheduler
    if isinstance(sched, Mapping):
        value = _scheduler_lr(sched, args)
        if value is not None:
            return value, "model_optim_rng.pt opt_param_scheduler (Megatron get_lr)"
    it = ckpt.get("iteration")
    warm = args.get("lr_warmup_iters", 0) or 0
    if (
        args.get("lr_decay_style") == "constant"
        and isinstance(args.get("lr"), float)
        and (isinstance(it, int) and it >= warm)
    ):
        return float(args["lr"]), "model_optim_rng.pt args.lr (constant schedule)"
    return None, ""
