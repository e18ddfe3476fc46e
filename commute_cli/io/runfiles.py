"""A training run's folder: what ``commute train`` writes there and how it is read back (the resolver of a
run's inputs, which reads these files, is ``io.run_inputs``).

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
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from commute_cli import __version__
from commute_cli.errors import CommuteError
from commute_cli.io import atomic
from commute_cli.io.checkpoints import MANIFEST_FORMAT, MANIFEST_NAME
from commute_cli.io.discovery import checkpoint_step, name_step
from commute_cli.io.safefiles import read_json
from commute_cli.io.tokenizer import tokenizer_files

STATE_NAME = "commute_state.json"
STATE_FORMAT = "commute-train-state/1"
INCOMPLETE_NAME = ".commute-incomplete"

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "STATE_FORMAT",
    "STATE_NAME",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it


def write_json(path: Path, obj: Any) -> Path:
    """Atomic JSON write (temp file in the same folder + os.replace), UTF-8, indented."""
    return atomic.write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer files of folder ``src`` (``io.tokenizer.tokenizer_files``) into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for file in tokenizer_files(src):
        shutil.copyfile(file, dst / file.name)


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
    data = read_json(file, "commute state") if file.is_file() else {}
    return data if isinstance(data, dict) else {}


def read_training_state(folder: Path) -> Resumed:
    """Step, optimizer state, stream positions, log history and RNG state of a checkpoint folder."""
    step = checkpoint_step(folder) or 0  # trainer_state.json's global_step, else the folder's name
    history = []
    ts = folder / "trainer_state.json"
    if ts.is_file() and isinstance(data := read_json(ts, "trainer state"), dict):
        history = list(data.get("log_history", []))
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
                (p for p in where.iterdir() if p.is_dir() and name_step(p.name) is not None),
                key=lambda p: name_step(p.name) or 0,
            )
            last = f"; its last checkpoint is {done[-1].name}" if done else ""
            raise CommuteError(
                f"the run in {where} is incomplete: `commute train` was interrupted{last}",
                hint=f"resume it: {_resume_command(marker) or 'commute train ... --init LAST'}",
            )


def _resume_command(marker: Path) -> str | None:
    note = read_json(marker, "the interrupted-run marker")
    return note.get("resume") if isinstance(note, dict) else None


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
