"""Find the checkpoints under a path as trainers save them: :func:`discover`, and :func:`select` among them.

What counts as a checkpoint, and why:

- A **transformers folder**: ``config.json`` and weights (``model.safetensors``, a sharded index, or
  ``pytorch_model.bin``). Its step is ``global_step`` of ``trainer_state.json`` when present, else its name
  (``checkpoint-N``, ``step-N``/``step_N``, ``iter-N``, ``global_stepN``): the file is what the trainer
  wrote; a name may have been edited.
- A **nanoGPT** ``ckpt.pt`` (:mod:`commute_cli.io.nanogpt`): a ``.pt`` file passed directly, a folder with
  ``ckpt.pt``, or a folder of step-named ``.pt`` files (``ckpt_2000.pt``). Its step is ``iter_num``. Its
  :class:`CheckpointRef` ``path`` is the file itself.
- A folder that holds step-named checkpoints is a **run**: its checkpoints are those entries; a model saved at
  its top level (the Trainer's final ``save_model``) is ignored.
- **Links and extra entries** (``best``, ``last``, ``latest``, copies): entries that resolve to the same
  folder are one checkpoint; an entry without a step in its name that has the step of a step-named one is an
  alias of it; two step-named entries with one step are one checkpoint if their weight files are
  byte-identical, else the run is ambiguous and refused. Files (DeepSpeed's ``latest``) are ignored.
- **Refused with one line saying what to run** (:func:`foreign_layout`): LoRA/PEFT adapter folders
  (``adapter_config.json`` without full weights: merge the adapter first), DeepSpeed ``global_stepN/``
  folders without consolidated weights (run ``zero_to_fp32.py``), Megatron-LM ``torch_dist`` folders
  (re-save them in the torch format).
- A **torch distributed checkpoint** (:mod:`commute_cli.io.dcp_checkpoints`): the HF Trainer / accelerate
  with FSDP ``SHARDED_STATE_DICT`` (``checkpoint-N/pytorch_model_fsdp_0/``), torchtitan (``step-N/`` with
  ``.metadata``), OLMo-core (``stepN/model_and_optim/``); a DCP of another layout is refused with torch's
  ``format_utils dcp_to_torch`` conversion.
- A **Megatron-LM** ``iter_N`` folder (:mod:`commute_cli.io.megatron`): ``mp_rank_*/model_optim_rng.pt``; its
  step is ``iteration``. In a run folder, an ``iter_N`` past ``latest_checkpointed_iteration.txt`` is a save
  still being written (Megatron updates the file last) and is left out.
- A **LitGPT** folder (:mod:`commute_cli.io.litgpt`): ``lit_model.pth`` + ``model_config.yaml``; its step is
  ``step_count``, else its name (``step-00001000``).
- ``select(every=N)`` keeps the checkpoints whose step is a multiple of N.
"""

from __future__ import annotations

import filecmp
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from commute_cli.errors import CommuteError
from commute_cli.io import litgpt, megatron, nanogpt
from commute_cli.io.safefiles import read_json

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
NANOGPT_FILE = "ckpt.pt"
_STEP_NAME_RE = re.compile(r"^(?:checkpoint|step|iter|global_step)[-_]?(\d+)$", re.IGNORECASE)
_STEP_FILE_RE = re.compile(r"^(?:ckpt|checkpoint|step|iter|model)[-_]?(\d+)\.(?:pt|pth)$", re.IGNORECASE)


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


# ----------------------------------------------------------------------------------------------- discovery


def is_checkpoint_dir(path: Path) -> bool:
    """A folder with ``config.json`` and weights (single file, sharded index, or ``pytorch_model.bin``), or
    a checkpoint in a torch distributed-checkpoint layout commute reads (:func:`dcp_layout`)."""
    path = Path(path)
    return _has_weight_files(path) or dcp_layout(path) is not None


def _has_weight_files(path: Path) -> bool:
    return (
        path.is_dir()
        and (path / "config.json").is_file()
        and any((path / name).is_file() for name in WEIGHT_FILES)
    )


def dcp_layout(path: Path):
    """The :class:`commute_cli.io.dcp_checkpoints.DcpLayout` of a folder saved as a torch distributed
    checkpoint by the HF Trainer/accelerate (FSDP ``SHARDED_STATE_DICT``), torchtitan or OLMo-core; else
    None. A folder that also holds transformers weight files (``model.safetensors``) is read from those."""
    from commute_cli.io import dcp_checkpoints

    path = Path(path)
    return None if _has_weight_files(path) else dcp_checkpoints.find(path)


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


def name_step(name: str) -> int | None:
    """The one parser of a step in a checkpoint's name: N of a folder ``checkpoint-N``, ``step-N``/``step_N``,
    ``iter-N`` or ``global_stepN``, or of a file ``ckpt_N.pt`` (and the like); None for another name."""
    match = _STEP_NAME_RE.match(name) or _STEP_FILE_RE.match(name)
    return int(match.group(1)) if match else None


def checkpoint_step(folder: Path) -> int | None:
    """A checkpoint folder's step: ``global_step`` of its ``trainer_state.json`` when present, else
    :func:`name_step` of its name (discovery, and train's resume, read it here)."""
    file = Path(folder) / "trainer_state.json"
    if file.is_file():
        raw = read_json(file, "trainer state")
        step = raw.get("global_step") if isinstance(raw, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):
            return step
    return name_step(Path(folder).name)


def _nanogpt_ref(file: Path, name: str) -> CheckpointRef:
    ckpt = nanogpt.read(file)
    step = nanogpt.step(ckpt)
    return CheckpointRef(path=file, step=step if step is not None else name_step(file.name), name=name)


def _megatron_step(folder: Path) -> int | None:
    step = megatron.step(folder)
    return step if step is not None else name_step(folder.name)


def _litgpt_step(folder: Path) -> int | None:
    step = litgpt.step(folder)
    return step if step is not None else name_step(folder.name)


def foreign_layout(folder: Path) -> str | None:
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
    dist = [folder, *sorted(p for p in folder.glob("iter_*") if p.is_dir())]
    torch_dist = [p for p in dist if (p / "common.pt").is_file() and (p / "metadata.json").is_file()]
    if torch_dist:  # a DCP too: Megatron's own conversion, before the generic DCP refusal
        return (
            f"{torch_dist[0]} is a Megatron-LM torch_dist checkpoint, which commute does not read: save "
            "it in the torch format once, in a Megatron-LM checkout, by running your pretrain_gpt.py "
            f"command with --load {torch_dist[0].parent if torch_dist[0] != folder else folder.parent} "
            "--ckpt-convert-format torch --ckpt-convert-save OUT, then analyze OUT/torch (where Megatron "
            "writes it)"
        )
    unknown = _unknown_dcp(folder)
    if unknown:
        return unknown
    ranks = sorted(folder.glob("pytorch_model_fsdp*_rank*.bin"))
    if ranks:
        return (
            f"{folder} holds FSDP per-rank shards ({ranks[0].name}: LOCAL_STATE_DICT, or SHARDED_STATE_DICT "
            "saved with use_dcp=False), flat parameters only the same FSDP setup can reassemble: load the "
            "checkpoint in that setup and save it with fsdp_state_dict_type SHARDED_STATE_DICT (a torch "
            "distributed checkpoint, which commute reads) or FULL_STATE_DICT"
        )
    return None


def _unknown_dcp(folder: Path) -> str | None:
    """One line for a torch distributed checkpoint none of the readers recognise, with its conversion."""
    from commute_cli.io import dcp

    if not folder.is_dir() or dcp_layout(folder) is not None:
        return None
    candidates = (folder, *sorted(p for p in folder.iterdir() if p.is_dir()))
    where = next((p for p in candidates if dcp.is_dcp(p) and dcp_layout(p) is None), None)
    if where is None:
        return None
    keys = sorted(dcp.entries(where))[:3]
    return (
        f"{where} is a torch distributed checkpoint (DCP) in a layout commute does not read (keys "
        f"{', '.join(keys)} ...; it reads the HF Trainer/accelerate FSDP, torchtitan and OLMo-core layouts): "
        "convert it once, in a trusted environment, with `python -m "
        f"torch.distributed.checkpoint.format_utils dcp_to_torch {where} OUT.pt`, load the model's "
        "entries into its transformers class and save_pretrained it with config.json"
    )


def _same_weights(a: Path, b: Path) -> bool:
    files_a, files_b = weight_files(a), weight_files(b)
    if [f.name for f in files_a] != [f.name for f in files_b]:
        return False
    return all(filecmp.cmp(x, y, shallow=False) for x, y in zip(files_a, files_b, strict=True))


def _dedupe(entries: list[CheckpointRef]) -> list[CheckpointRef]:
    """One entry per checkpoint: links to one target, aliases (``best``, ``last``) and identical copies."""
    by_target: dict[Path, CheckpointRef] = {}
    for ref in sorted(entries, key=lambda r: (name_step(r.path.name) is None, r.name)):
        by_target.setdefault(ref.path.resolve(), ref)  # a step-named entry wins over a link named best/last
    by_step: dict[int, list[CheckpointRef]] = {}
    for ref in by_target.values():
        assert ref.step is not None
        by_step.setdefault(ref.step, []).append(ref)
    out: list[CheckpointRef] = []
    for step, refs in sorted(by_step.items()):
        named = [r for r in refs if name_step(r.path.name) is not None] or refs
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
    """The checkpoints directly inside ``path`` that have a step: transformers folders; only when there are
    none, nanoGPT files and folders (so a stray ``model_3.pt`` beside a Trainer run is not read)."""
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    out: list[CheckpointRef] = []
    for entry in entries:
        if entry.is_dir() and is_checkpoint_dir(entry):
            step = checkpoint_step(entry)
            if step is not None:
                out.append(CheckpointRef(path=entry, step=step, name=entry.name))
        elif entry.is_dir() and megatron.is_megatron_dir(entry):
            step = _megatron_step(entry)
            done = megatron.tracker_iteration(path)
            if step is not None and (done is None or step <= done):
                out.append(CheckpointRef(path=entry, step=step, name=entry.name))
        elif entry.is_dir() and litgpt.is_litgpt_dir(entry):
            step = _litgpt_step(entry)
            if step is not None:
                out.append(CheckpointRef(path=entry, step=step, name=entry.name))
        elif entry.is_dir() and name_step(entry.name) is not None and not (entry / NANOGPT_FILE).is_file():
            problem = None if entry.name.lower().startswith("global_step") else foreign_layout(entry)
            if problem:
                raise CommuteError(problem)
    if out:
        return out
    for entry in entries:
        if entry.is_file() and _STEP_FILE_RE.match(entry.name):
            out.append(_nanogpt_ref(entry, entry.stem))
        elif entry.is_dir() and (entry / NANOGPT_FILE).is_file():
            ref = _nanogpt_ref(entry / NANOGPT_FILE, entry.name)
            if ref.step is not None:
                out.append(ref)
    return out


def discover(path: Path) -> list[CheckpointRef]:
    """The checkpoints under ``path``, sorted by step (see the module docstring for what counts)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CommuteError(
            f"checkpoint path {path} does not exist", hint="pass a checkpoint folder or a run folder"
        )
    if path.is_file() and path.name == megatron.CHECKPOINT_FILE:  # one rank's file: its iter_N folder
        path = path.parent.parent
    if path.is_file() and path.name == litgpt.WEIGHTS_FILE:  # LitGPT's file: its folder
        path = path.parent
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return [_nanogpt_ref(path, path.stem if name_step(path.name) else path.parent.name or path.stem)]
        raise CommuteError(
            f"checkpoint path {path} is a file, not a folder",
            hint="pass the folder that holds it (or a nanoGPT ckpt.pt)",
        )
    refs = _entries(path)
    if refs:
        return _dedupe(refs)
    if is_checkpoint_dir(path):
        return [CheckpointRef(path=path, step=checkpoint_step(path), name=path.name)]
    if megatron.is_megatron_dir(path):
        return [CheckpointRef(path=path, step=_megatron_step(path), name=path.name)]
    if litgpt.is_litgpt_dir(path):
        return [CheckpointRef(path=path, step=_litgpt_step(path), name=path.name)]
    if (path / NANOGPT_FILE).is_file():
        return [_nanogpt_ref(path / NANOGPT_FILE, path.name)]
    problem = foreign_layout(path)
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
        problem = foreign_layout(sub)
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
    if megatron.is_megatron_dir(path):
        return [f for _, f in sorted(megatron.rank_files(path).items())]
    if litgpt.is_litgpt_dir(path):
        return [path / litgpt.WEIGHTS_FILE]
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
    layout = dcp_layout(path)
    if layout is not None:
        from commute_cli.io import dcp_checkpoints

        return dcp_checkpoints.weight_files(layout)
    raise CommuteError(
        f"no model weights in {path}", hint="expected model.safetensors (or an index) or pytorch_model.bin"
    )
