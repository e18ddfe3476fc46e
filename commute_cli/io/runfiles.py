"""A training run's folder: what ``commute train`` writes there, how it is read back, and ONE resolver of
the run's inputs for ``analyze``, ``validate`` and ``train``.

Layout (the Hugging Face Trainer's, so analyze reads ours and the Trainer's the same way)::

    RUN/commute.json                  the manifest (docs/CONVENTIONS.md), written when the run completes
    RUN/tokenizer/                    the tokenizer, copied in unless it already lives inside RUN
    RUN/checkpoint-N/                 config.json, model.safetensors, tokenizer files,
                                      trainer_state.json (transformers.TrainerState), optimizer.pt,
                                      rng_state.pth (both torch.load(weights_only=True)),
                                      commute_state.json (stream positions, schedule, batch, seq_len)
    RUN/.commute-incomplete           present while train runs; removed when it finishes

A checkpoint folder appears only complete (written under a temporary name, then renamed). The manifest is
written last, so a run that was interrupted has checkpoints and no new manifest; ``.commute-incomplete``
says so, and :func:`check_complete` turns it into a one-line refusal with the command that resumes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from commute_cli import __version__
from commute_cli.core.schedule import Schedule, check_weights, parse_weights
from commute_cli.errors import CommuteError
from commute_cli.io import atomic, checkpoints
from commute_cli.io.checkpoints import MANIFEST_FORMAT, MANIFEST_NAME
from commute_cli.io.schedules import load_schedule

STATE_NAME = "commute_state.json"
STATE_FORMAT = "commute-train-state/1"
INCOMPLETE_NAME = ".commute-incomplete"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)
"""The files copied when a tokenizer travels with a checkpoint (never model weights)."""
DEFAULT_SEQ_LEN = 128  # a new model's context when nothing else says
DEFAULT_BATCH_SIZE = 16
Note = Callable[[str], None]

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "STATE_FORMAT",
    "STATE_NAME",
    "RunInputs",
    "resolve_run_inputs",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it


def write_json(path: Path, obj: Any) -> Path:
    """Atomic JSON write (temp file in the same folder + os.replace), UTF-8, indented."""
    return atomic.write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from ``file``; a damaged file is a one-line error."""
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CommuteError(f"could not read {file}: {err}", hint="the file is damaged") from err
    return data if isinstance(data, dict) else {}


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer files (``TOKENIZER_FILES``) of folder ``src`` into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def has_tokenizer(folder: Path) -> bool:
    return (Path(folder) / "tokenizer.json").is_file() or (Path(folder) / "tokenizer_config.json").is_file()


# ----------------------------------------------------------------------------------------------- rng


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    import numpy as np

    legacy: Any = np.random.get_state()  # the legacy 5-tuple (kind, keys, pos, has_gauss, gauss)
    kind, keys, pos, has_gauss, gauss = legacy
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss)),
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    import numpy as np

    if "python" in state:
        random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    if "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: Path) -> int | None:
    """N of a ``checkpoint-N`` folder name, else None."""
    m = re.fullmatch(r"checkpoint-(\d+)", Path(path).name)
    return int(m.group(1)) if m else None


def trainer_state_json(**fields: Any) -> str:
    """``trainer_state.json`` text through the installed ``transformers.TrainerState`` (fields it does not
    know are dropped), serialized as its ``save_to_json`` does, so the user's own Trainer can resume it."""
    from transformers import TrainerState

    known = {f.name for f in dataclasses.fields(TrainerState)}
    state = TrainerState(**{k: v for k, v in fields.items() if k in known})
    return json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"


def _save_model_quietly(model: Any, folder: Path) -> None:
    """``save_pretrained`` (safetensors) without transformers' per-save progress bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(folder))
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokenizer_dir: Path,
    trainer_state: str,
    commute_state: dict[str, Any],
) -> Path:
    """Write ``out_dir/checkpoint-<step>/`` completely under a temporary name, then rename it into place.

    ``trainer_state`` is the text of :func:`trainer_state_json`. A kill leaves at most a hidden
    ``.checkpoint-<step>.*`` folder, never a half-written checkpoint.
    """
    final = out_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=out_dir))
    try:
        os.chmod(tmp, 0o777 & ~UMASK)
        _save_model_quietly(model, tmp)
        copy_tokenizer_files(tokenizer_dir, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng_state.pth")
        atomic.write_text(tmp / "trainer_state.json", trainer_state)
        write_json(tmp / STATE_NAME, {"format": STATE_FORMAT, **commute_state})
        for file in tmp.iterdir():  # some writers create 0600 files; give them the usual permissions
            os.chmod(file, 0o666 & ~UMASK)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@dataclass
class Resumed:
    """The training state of a checkpoint folder (a plain model folder gives step 0 and nothing else)."""

    step: int
    optimizer_state: dict[str, Any] | None
    positions: dict[str, int]
    log_history: list[dict[str, Any]]
    rng: dict[str, Any] | None
    seed: int | None = None


def load_tensors(file: Path, what: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code; a file that holds
    anything else (a pickled object, a code payload) or is damaged is a one-line error."""
    try:
        return torch.load(file, weights_only=True, map_location="cpu")
    except Exception as err:
        text = " ".join(str(err).split())[:160]
        raise CommuteError(
            f"refusing {file} ({what}): it is not a plain tensor file ({type(err).__name__}: {text})",
            hint="commute loads pickles only with torch.load(weights_only=True); remove or replace the file",
        ) from err


def read_commute_state(folder: Path) -> dict[str, Any]:
    """``commute_state.json`` of a checkpoint, or {} when there is none."""
    file = Path(folder) / STATE_NAME
    return read_json(file) if file.is_file() else {}


def read_training_state(folder: Path) -> Resumed:
    """Step, optimizer state, stream positions, log history and RNG state of a checkpoint folder."""
    step, history = 0, []
    ts = folder / "trainer_state.json"
    if ts.is_file():
        data = read_json(ts)
        step = int(data.get("global_step", 0))
        history = list(data.get("log_history", []))
    elif checkpoint_step(folder) is not None:
        step = int(checkpoint_step(folder) or 0)
    saved = read_commute_state(folder)
    positions = {str(k): int(v) for k, v in (saved.get("positions") or {}).items()}
    opt_file, rng_file = folder / "optimizer.pt", folder / "rng_state.pth"
    opt = load_tensors(opt_file, "optimizer state") if opt_file.is_file() else None
    rng = load_tensors(rng_file, "RNG state") if rng_file.is_file() else None
    history = [e for e in history if int(e.get("step", 0)) <= step]
    return Resumed(step, opt, positions, history, rng, saved.get("seed"))


# ----------------------------------------------------------------------------------------------- run folder


def mark_incomplete(out: Path, resume: str) -> None:
    """Say that a run is being written in ``out``, and the command that resumes it, until
    :func:`mark_complete`."""
    write_json(out / INCOMPLETE_NAME, {"resume": resume})


def mark_complete(out: Path) -> None:
    (out / INCOMPLETE_NAME).unlink(missing_ok=True)


def check_complete(folder: Path) -> None:
    """Refuse (one line) a run folder whose ``train`` was interrupted: its manifest is not the run's."""
    for where in (Path(folder), Path(folder).parent):
        marker = where / INCOMPLETE_NAME
        if marker.is_file():
            done = sorted(
                (p for p in where.iterdir() if checkpoint_step(p) is not None),
                key=lambda p: checkpoint_step(p) or 0,
            )
            last = f"; its last checkpoint is {done[-1].name}" if done else ""
            raise CommuteError(
                f"the run in {where} is incomplete: `commute train` was interrupted{last}",
                hint=f"resume it: {read_json(marker).get('resume') or 'commute train ... --init LAST'}",
            )


def relative_source(source: str, out_dir: Path, base_dir: Path | None) -> str | None:
    """A source as the manifest writes it: relative to ``out_dir`` when it is a local path inside it, as
    given when it is not a local path (a hub name), None when it is a local path outside ``out_dir``."""
    p = Path(source).expanduser()
    if not p.is_absolute():
        p = (base_dir or Path.cwd()) / p
    if not p.exists():
        return source
    try:
        return p.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return None


def manifest_dict(
    out_dir: Path,
    domains: Mapping[str, str],
    eval_domains: Mapping[str, str] | None,
    base_dir: Path | None,
    **fields: Any,
) -> dict[str, Any]:
    """The ``commute.json`` content: ``domains``/``eval_domains`` relative to ``out_dir`` when inside it;
    local data outside it goes to ``external_sources`` (absolute paths), which :func:`resolve_run_inputs`
    uses when the data still exists there. ``fields`` (schedule, tokenizer, seq_len, ...) follow."""
    manifest: dict[str, Any] = {"format": MANIFEST_FORMAT}
    external: dict[str, dict[str, str]] = {}
    for key, mapping in (("domains", domains), ("eval_domains", eval_domains)):
        if not mapping:
            continue
        rel = {name: relative_source(src, out_dir, base_dir) for name, src in mapping.items()}
        if all(v is not None for v in rel.values()):
            manifest[key] = rel
        else:
            external[key] = {
                n: str(((base_dir or Path.cwd()) / s).expanduser().resolve()) if rel[n] is None else s
                for n, s in mapping.items()
            }
    manifest.update(fields)
    if external:
        manifest["external_sources"] = external
    manifest["created_by"] = f"commute {__version__} train"
    return manifest


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class RunInputs:
    """A run's inputs, each from the first of: the flag, the checkpoint (its ``commute_state.json``, its own
    tokenizer files, its config), the manifest, a default. ``*_from`` says which, for messages."""

    checkpoint: Path | None
    manifest: checkpoints.Manifest | None
    domains: dict[str, str]
    eval_domains: dict[str, str]
    domains_from: str
    base_dir: Path | None
    tokenizer_path: Path | None
    tokenizer_from: str
    schedule: Schedule | None
    seq_len: int | None
    seq_len_from: str
    batch_size: int | None
    seed: int | None
    saved: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.domains)

    def load_tokenizer(self) -> Any:
        if self.tokenizer_path is None:
            raise CommuteError("no tokenizer", hint="pass --tokenizer FOLDER")
        return checkpoints.load_tokenizer(self.tokenizer_path)


def _external(manifest: checkpoints.Manifest, key: str) -> dict[str, str]:
    ext = manifest.raw.get("external_sources") or {}
    value = ext.get(key) if isinstance(ext, dict) else None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        return {}
    missing = [s for s in value.values() if Path(s).is_absolute() and not Path(s).exists()]
    if missing:
        raise CommuteError(
            f"{manifest.path} names {key} outside the run folder that no longer exist ({missing[0]})",
            hint="pass --domains name=source ... (the data the run trained on)",
        )
    return dict(value)


def resolve_run_inputs(
    checkpoint: Path | None = None,
    *,
    domains: Mapping[str, str] | None = None,
    eval_domains: Mapping[str, str] | None = None,
    manifest: Path | None = None,
    tokenizer: str | Path | None = None,
    weights: Sequence[str] | str | Mapping[str, float] | None = None,
    schedule: Path | Schedule | None = None,
    seq_len: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    note: Note | None = None,
) -> RunInputs:
    """One precedence for every command: flag, then the checkpoint, then the manifest, then a default.

    - ``checkpoint``: a model folder (``checkpoint-N``); its ``commute_state.json`` gives schedule, seq_len,
      batch size and seed; its own tokenizer files the tokenizer; its config ``min(256, n_positions)`` as
      the last seq_len. The manifest is ``manifest`` (file or folder) or the one next to the checkpoint.
    - domains: the flag, the manifest's ``domains``, else its ``external_sources`` (data that ``train``
      read from outside the run folder, used when it still exists; ``note`` says so).
    - Without anything: ``schedule`` None (the caller decides: train uses uniform weights, analyze
      refuses), ``seq_len`` None only when there is no checkpoint (train: ``DEFAULT_SEQ_LEN``).
    Raises ``CommuteError`` for a missing manifest given explicitly, or weights and a schedule both given.
    """
    ckpt = Path(checkpoint).expanduser() if checkpoint is not None else None
    if manifest is not None:
        path = Path(manifest).expanduser()
        found = checkpoints.read_manifest(path.parent if path.is_file() else path)
        if found is None:
            raise CommuteError(
                f"no commute.json at {path}", "give a manifest file or the folder that holds one"
            )
    else:
        found = checkpoints.read_manifest(ckpt) if ckpt is not None else None
    saved = read_commute_state(ckpt) if ckpt is not None and ckpt.is_dir() else {}

    base_dir = None
    if domains:
        train, origin = dict(domains), "--domains"
    elif found is not None and found.domains:
        train, origin, base_dir = dict(found.domains), "manifest", found.root
    elif found is not None and _external(found, "domains"):
        train, origin = _external(found, "domains"), "manifest (external_sources)"
    else:
        train, origin = {}, "none"
    if eval_domains:
        held = dict(eval_domains)
    elif origin.startswith("manifest"):
        assert found is not None  # origin "manifest..." is only set from a manifest
        held = dict(found.eval_domains) if found.eval_domains else _external(found, "eval_domains")
    else:
        held = {}
    if origin == "manifest (external_sources)" and note is not None and found is not None:
        where = f"training: {', '.join(train.values())}" + (
            f"; held-out: {', '.join(held.values())}" if held else ""
        )
        note(f"note: {found.path} records data outside the run folder ({where})")

    if tokenizer:
        tok, tok_from = Path(tokenizer).expanduser(), "--tokenizer"
    elif ckpt is not None and ckpt.is_dir() and has_tokenizer(ckpt):
        tok, tok_from = ckpt, "checkpoint"
    elif found is not None and found.tokenizer is not None:
        tok, tok_from = Path(found.tokenizer), "manifest"
    else:
        tok, tok_from = None, "none"

    names = list(train)
    sched: Schedule | None = None
    if weights and schedule is not None:
        raise CommuteError("both weights and a schedule given", "pass --weights or --schedule, not both")
    if not names:
        pass  # no domains: the caller says so; weights cannot be checked against nothing
    elif isinstance(schedule, Schedule):
        sched = Schedule.from_entries(schedule.entries, names)
    elif schedule is not None:
        sched = load_schedule(Path(schedule), names)
    elif isinstance(weights, Mapping):
        sched = Schedule.constant(check_weights(weights, names), names)
    elif weights:
        sched = Schedule.constant(parse_weights(weights, names), names)
    elif len(names) < 2:
        pass  # one domain: nothing to mix; a run's saved schedule cannot be for it
    elif saved.get("schedule"):
        sched = Schedule.from_records(saved["schedule"], names, context=f"{ckpt}/{STATE_NAME}")
    elif found is not None and found.schedule:
        sched = Schedule.from_records(found.schedule, names, context=str(found.path))

    if seq_len:
        seq, seq_from = int(seq_len), "--seq-len"
    elif saved.get("seq_len"):
        seq, seq_from = int(saved["seq_len"]), "checkpoint"
    elif found is not None and found.seq_len:
        seq, seq_from = int(found.seq_len), "manifest"
    elif ckpt is not None and checkpoints.is_checkpoint_dir(ckpt):
        config = checkpoints.read_config(ckpt)
        n_pos = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        seq, seq_from = min(256, int(n_pos or 256)), "model config (at most 256)"
    else:
        seq, seq_from = None, "none"

    manifest_batch = found.batch_size if found is not None else None
    manifest_seed = found.seed if found is not None else None
    return RunInputs(
        checkpoint=ckpt,
        manifest=found,
        domains=train,
        eval_domains=held,
        domains_from=origin,
        base_dir=base_dir,
        tokenizer_path=tok,
        tokenizer_from=tok_from,
        schedule=sched,
        seq_len=seq,
        seq_len_from=seq_from,
        batch_size=batch_size or saved.get("batch_size") or manifest_batch,
        seed=seed if seed is not None else saved.get("seed", manifest_seed),
        saved=saved,
    )


def load_blocks(
    sources: Mapping[str, str], tokenizer: Any, seq_len: int, base_dir: Path | None = None
) -> dict[str, torch.Tensor]:
    """Each domain's text packed into fixed-length blocks ``[N, seq_len]`` (token ids), in order."""
    from commute_cli.io.documents import load_texts
    from commute_cli.io.sampling import pack_blocks

    return {
        name: pack_blocks(load_texts(src, domain=name, base_dir=base_dir), tokenizer, seq_len)
        for name, src in sources.items()
    }
