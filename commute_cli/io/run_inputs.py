"""ONE resolver of a training run's inputs for ``analyze``, ``validate`` and ``train``: domains, held-out
data, tokenizer, schedule, sequence length, batch size and seed, each from the first of the flag, the
checkpoint, the manifest, a default; and the domains' text packed into blocks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from commute_cli.core.schedule import Schedule, check_weights, parse_weights
from commute_cli.errors import CommuteError
from commute_cli.io import checkpoints
from commute_cli.io.runfiles import STATE_NAME, read_commute_state
from commute_cli.io.schedules import load_schedule
from commute_cli.io.tokenizer import has_tokenizer

DEFAULT_SEQ_LEN = 128  # a new model's context when nothing else says
DEFAULT_BATCH_SIZE = 16
Note = Callable[[str], None]
LOGGED = " (log_history commute/weight/*)"  # the end of schedule_from for weights logged by a trainer

__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_SEQ_LEN", "RunInputs", "load_blocks", "resolve_run_inputs"]


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
    schedule_from: str = "none"
    """Where the schedule came from: ``--weights``, ``--schedule FILE``, the checkpoint's or the manifest's
    file, or a ``trainer_state.json`` log (``io.trainer_log``)."""
    schedule_logged: bool = False
    """True when the schedule was read from a trainer's log (``trainer_state.json``)."""

    @property
    def names(self) -> list[str]:
        return list(self.domains)

    @property
    def analysis_sources(self) -> dict[str, str]:
        """The data ``analyze`` measures on: the manifest's held-out domains when it names them (the
        criterion is about held-out losses), else the training domains."""
        if self.domains_from.startswith("manifest"):
            return dict(self.eval_domains or self.domains)
        return dict(self.domains)

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
    schedule_use: str = "the criterion is evaluated around the schedule given",
    trainer_logs: Sequence[Path] = (),
) -> RunInputs:
    """One precedence for every command: flag, then the checkpoint, then the manifest, then a default.

    - ``checkpoint``: a model folder (``checkpoint-N``); its ``commute_state.json`` gives schedule, seq_len,
      batch size and seed; its own tokenizer files the tokenizer; its config ``min(256, n_positions)`` as
      the last seq_len. The manifest is ``manifest`` (file or folder) or the one next to the checkpoint.
    - domains: the flag, the manifest's ``domains``, else its ``external_sources`` (data that ``train``
      read from outside the run folder, used when it still exists; ``note`` says so).
    - schedule: ``weights``/``schedule``, then the checkpoint's ``commute_state.json``, the manifest, then
      the weights logged in the ``trainer_state.json`` of ``trainer_logs`` (``io.trainer_log``: what a
      Trainer with the ``commute watch`` callback records); ``schedule_from`` says which.
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
    sched_from = "none"
    if weights and schedule is not None:
        raise CommuteError("both weights and a schedule given", "pass --weights or --schedule, not both")
    if not names:
        pass  # no domains: the caller says so; weights cannot be checked against nothing
    elif isinstance(schedule, Schedule):
        sched, sched_from = Schedule.from_entries(schedule.entries, names), "--schedule"
    elif schedule is not None:
        sched, sched_from = load_schedule(Path(schedule), names), f"--schedule {schedule}"
    elif isinstance(weights, Mapping):
        sched, sched_from = Schedule.constant(check_weights(weights, names), names), "--weights"
    elif weights:
        sched, sched_from = Schedule.constant(parse_weights(weights, names), names), "--weights"
    elif len(names) >= 2:  # one domain: nothing to mix; a run's saved schedule cannot be for it
        sched, sched_from = _recorded_schedule(saved, found, ckpt, names)
        if sched is None:
            sched, sched_from = _logged_schedule(trainer_logs, names, note)
    if sched is not None and (weights or schedule is not None) and note is not None and len(names) >= 2:
        own, where = _recorded_schedule(saved, found, ckpt, names)
        if own is not None and own.entries != sched.entries:
            note(
                f"note: the schedule given ({_describe(sched)}) replaces the one the run recorded "
                f"({_describe(own)}, {where}); {schedule_use}"
            )

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
        schedule_from=sched_from if sched is not None else "none",
        schedule_logged=sched is not None and sched_from.endswith(LOGGED),
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


def _recorded_schedule(
    saved: Mapping[str, Any], found: checkpoints.Manifest | None, ckpt: Path | None, names: Sequence[str]
) -> tuple[Schedule | None, str]:
    """The schedule the run recorded (the checkpoint's own state first, then the manifest) and where it is
    recorded; ``(None, "")`` when neither has one."""
    if saved.get("schedule"):
        where = f"{ckpt}/{STATE_NAME}"
        return Schedule.from_records(saved["schedule"], names, context=where), where
    if found is not None and found.schedule:
        return Schedule.from_records(found.schedule, names, context=str(found.path)), str(found.path)
    return None, ""


def _logged_schedule(
    folders: Sequence[Path], names: Sequence[str], note: Note | None
) -> tuple[Schedule | None, str]:
    """The schedule logged in a ``trainer_state.json`` of ``folders`` and where (``io.trainer_log``);
    ``(None, "")`` when none logs one. Notes when the first weights are logged after step 0."""
    from commute_cli.io.trainer_log import read_logged_schedule

    found = read_logged_schedule(folders, names)
    if found is None:
        return None, ""
    if found.first_logged > 0 and note is not None:
        note(
            f"note: {found.file} logs the domain weights first at step {found.first_logged}; they are taken "
            "as the weights from step 0"
        )
    return found.schedule, f"{found.file}{LOGGED}"


def _describe(schedule: Schedule) -> str:
    step, w = schedule.entries[0]
    text = ", ".join(f"{n} {v:g}" for n, v in w.items())
    if schedule.is_constant:
        return text
    return f"{text} from step {step}, then {len(schedule.entries) - 1} change(s)"
