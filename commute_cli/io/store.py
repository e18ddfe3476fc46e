"""commute's own artifacts: one content-addressed statistics cache, and analysis runs with typed loaders
next to their writers.

- **Cache** (``OUT/cache/``): per-checkpoint :class:`~commute_cli.core.checkpoint_stats.CheckpointStats` as
  safetensors, named by :func:`content_key` of everything that determines them (weights, sample, design,
  metric, plan, micro-batches, device type). Shared by every command: ``analyze`` fills it, ``validate``
  reads its prediction from it. Stale entries cannot be hit (the key covers the inputs); a damaged entry
  is recomputed. The entry's metadata keeps the checkpoint's weight digest and compute time, so a cached
  rerun neither re-hashes gigabytes of weights nor forgets what the computation cost.
- **Analysis runs** (:class:`AnalysisRun`): ``results.csv``, ``losses.csv`` and ``run.json`` (format
  :data:`ANALYSIS_FORMAT`), written together and read back by ``recommend`` and ``plot``. Each run has a
  ``run_id`` (:func:`run_identity`: checkpoints, data, schedule, targets, metric, and the options that
  change the numbers such as ``--dw``) in every row of ``results.csv``, so a file always says which run and
  schedule it belongs to; a run never replaces another run's results (:func:`choose_folder`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from commute_cli.core.checkpoint_stats import CheckpointStats
from commute_cli.core.regime import REGIME_MAX_PROGRESS, REGIME_MAX_RATIO
from commute_cli.core.schedule import Schedule
from commute_cli.errors import CommuteError
from commute_cli.io import atomic

CACHE_FORMAT = "commute-stats/2"  # 2: cross estimator (all block combinations, jackknife)
ANALYSIS_FORMAT = "commute-analysis/1"
KEY_LENGTH = 24
"""Hex characters of every content key (96 bits: no collision in any cache a person keeps)."""

RESULTS_COLUMNS = (
    "step",
    "target",
    "domain_i",
    "domain_j",
    "target_loss",
    "el_ij",
    "el_se",
    "t",
    "dw",
    "horizon",
    "first_order",
    "regime_ratio",
    "in_regime",
    "verdict",
)
"""Columns of ``results.csv`` that every reader needs (the file has more; see docs)."""

TEXT_COLUMNS = (
    "run_id",
    "target",
    "domain",
    "domain_i",
    "domain_j",
    "domain_1",
    "domain_2",
    "pair",
    "group",
    "verdict",
    "direction",
    "regime",
    "horizon_reason",
    "first_order_favours",
    "second_order_favours",
    "orders",
    "metric",
    "earlier",
    "later",
)
"""Identifier and name columns of the CSVs commute writes (results, losses, baselines, decomposition,
validate, recommend): always read as text, so a ``run_id`` of 8 decimal digits ("12345678"), a float-looking
one ("1e123456") or a domain named "2024" or "NA" reads back as written (:func:`read_table`)."""


# ------------------------------------------------------------------------------------------------ keys


def content_key(payload: Any) -> str:
    """The one key function: SHA-256 of the payload's canonical JSON, first :data:`KEY_LENGTH` hex digits."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def file_signature(path: Path) -> list[Any]:
    """``[name, size, mtime_ns]`` (``[name, None]`` for a missing file): cheap identity of a file."""
    if not path.is_file():
        return [path.name, None]
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def weights_digest(files: Sequence[Path]) -> str:
    """SHA-256 over a checkpoint's weight files (names and contents; ``io.checkpoints.weight_files``),
    recorded in ``run.json`` so a result can be traced to the exact weights. Streams the files (I/O-bound,
    ~1 s per GB): computed on cache misses only and kept in the cache entry's metadata."""
    h = hashlib.sha256()
    for file in files:
        h.update(file.name.encode() + b"\0")
        with file.open("rb") as fh:
            for chunk in iter(functools.partial(fh.read, 1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ cache


def stats_file(cache_dir: Path, name: str, key: str) -> Path:
    """Where the statistics of checkpoint ``name`` with key ``key`` live."""
    return Path(cache_dir) / f"stats-{name}-{key}.safetensors"


def load_stats(file: Path) -> tuple[CheckpointStats, dict[str, str]] | None:
    """A cache entry and its metadata, or None when absent or damaged (then it is recomputed)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="numpy") as fh:
            meta = dict(fh.metadata() or {})
        if meta.get("format") != CACHE_FORMAT:
            return None
        arrays = load_file(str(file))
        labels = json.loads(meta["group_labels"]) if "group_labels" in meta else None
        return (
            CheckpointStats.from_arrays(
                meta["plan"], arrays, int(meta["seqs_per_part"]), meta.get("estimator", "cross"), labels
            ),
            meta,
        )
    except Exception:  # a damaged entry is recomputed, never trusted
        return None


def save_stats(file: Path, stats: CheckpointStats, meta: dict[str, Any]) -> None:
    """Write a cache entry atomically; ``meta`` values are stored as strings."""
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in stats.to_arrays().items()}
    info = {k: str(v) for k, v in meta.items() if v is not None}
    info.update(
        format=CACHE_FORMAT,
        plan=stats.plan,
        seqs_per_part=str(stats.seqs_per_part),
        estimator=stats.estimator,
    )
    if stats.group_labels is not None:
        info["group_labels"] = json.dumps(stats.group_labels)
    Path(file).parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(Path(file)) as tmp:
        save_file(arrays, tmp, metadata=info)


# ------------------------------------------------------------------------------------------------ runs


QUESTION_OPTIONS = {
    "dw": None,
    "horizon": None,
    "lr": None,
    "seq_len": None,
    "confidence": 0.95,
    "min_effect": 0.01,
}
"""Options that change the numbers of ``results.csv`` (the intervention, the loss it is measured on, the
test and the negligible threshold), with their defaults: part of a run's identity when not the default."""


def _identity_parts(run: dict[str, Any]) -> dict[str, Any]:
    """What an analysis is about, by name: the parts of :func:`run_identity` (``--flag`` names for the
    options of :data:`QUESTION_OPTIONS`, only those not at their default)."""
    options = run.get("options", {})
    parts = {
        "checkpoints": run.get("ckpt_dir_resolved") or str(Path(str(options.get("ckpt_dir", ""))).resolve()),
        "domains": run.get("domains"),
        "schedule": run.get("schedule"),
        "targets": [t.get("name") for t in run.get("targets", [])],
        "metric": options.get("metric", "euclid"),
        "selected steps": run.get("selected_steps"),
        "text fields": run.get("text_fields") or {},
    }
    for key, default in QUESTION_OPTIONS.items():
        value = options.get(key, default)
        if value != default:
            parts["--" + key.replace("_", "-")] = value
    return parts


def run_identity(run: dict[str, Any]) -> str:
    """Which question an analysis answers: checkpoints (and which were selected), data and its text
    columns, schedule, targets and metric, and every option that changes the numbers of ``results.csv``
    (:data:`QUESTION_OPTIONS`: ``--dw``, ``--horizon``, ``--lr``, ``--seq-len``, ``--confidence``,
    ``--min-effect``; at their defaults they leave the id of earlier versions unchanged).

    Options that only change how precisely or how fast the same question is answered (``--samples``,
    ``--blocks``, ``--seed``, ``--budget``, the plan, HVP mode, micro-batches, device) are not part of it:
    a rerun with more samples refines the same analysis (docs/DECISIONS.md).
    """
    parts = _identity_parts(run)
    payload = list(parts.values())[:7]
    extra = {k: v for k, v in parts.items() if k.startswith("--")}
    return content_key([*payload, extra] if extra else payload)


def identity_difference(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two analyses' identities, in words (``--dw 0.05 here, default there``)."""
    a, b = _identity_parts(previous), _identity_parts(current)

    def word(parts: dict[str, Any], key: str) -> str:
        value = parts.get(key, "default")
        return f"{value:g}" if isinstance(value, float) else str(value)

    return [
        f"{key} {word(b, key)} here, {word(a, key)} there" if key.startswith("--") else key
        for key in dict.fromkeys([*a, *b])
        if a.get(key) != b.get(key)
    ]


def schedule_words(schedule: Schedule) -> str:
    """``en=0.8 ru=0.2`` (constant) or ``en=0.8 ru=0.2 from step 0, en=0.5 ru=0.5 from step 1000``."""
    parts = []
    for step, values in zip(schedule.steps, schedule.values, strict=True):
        w = " ".join(f"{n}={v:g}" for n, v in zip(schedule.domains, values, strict=True))
        parts.append(w if len(schedule.steps) == 1 else f"{w} from step {step}")
    return ", ".join(parts)


@dataclass
class AnalysisRun:
    """What ``commute analyze`` leaves in its folder; the one reader and writer of those files."""

    folder: Path
    results: pd.DataFrame
    losses: pd.DataFrame
    run: dict[str, Any]

    @property
    def schedule(self) -> Schedule:
        """The schedule the analysed run used (``run.json``)."""
        return Schedule.from_records(self.run["schedule"], context=str(self.folder / "run.json"))

    @property
    def checkpoint_steps(self) -> list[int]:
        """Every analysed checkpoint step (``run.json`` and ``results.csv``)."""
        steps = {int(c["step"]) for c in self.run.get("checkpoints", []) if c.get("step") is not None}
        if "step" in self.results.columns:
            steps |= {int(s) for s in self.results["step"].dropna()}
        return sorted(steps)

    @property
    def regime(self) -> dict[str, float]:
        """The regime thresholds the rows were judged with."""
        return {
            "max_ratio": REGIME_MAX_RATIO,
            "max_progress_fraction": REGIME_MAX_PROGRESS,
            **self.run.get("regime", {}),
        }

    @property
    def run_id(self) -> str:
        return str(self.run.get("run_id") or run_identity(self.run))

    @property
    def checkpoint_dir(self) -> Path:
        """The analysed checkpoint folder (absolute when ``run.json`` recorded it so)."""
        return Path(
            str(self.run.get("ckpt_dir_resolved") or self.run.get("options", {}).get("ckpt_dir", "."))
        )

    def checkpoint_before(self, step: int) -> tuple[int, Path] | None:
        """The latest analysed checkpoint at or before ``step`` that is still on disk: (its step, its
        folder as ``analyze`` was given it, relative paths stay relative). None when there is none."""
        given = Path(str(self.run.get("options", {}).get("ckpt_dir", self.checkpoint_dir)))
        found = None
        for c in self.run.get("checkpoints", []):
            s, name = c.get("step"), c.get("name")
            if s is None or not name or int(s) > step or (found and found[0] >= int(s)):
                continue
            for root in (given, self.checkpoint_dir):
                for folder in (root / str(name), root):
                    if folder.name == str(name) and folder.is_dir():
                        found = (int(s), folder)
                        break
                if found and found[0] == int(s):
                    break
        return found

    def run_batch_size(self) -> int | None:
        """Rows per step of the analysed run (its ``commute.json``'s ``batch_size``), or None."""
        value = self.run_manifest().get("batch_size")
        return int(value) if isinstance(value, int) and value > 0 else None

    def run_manifest(self) -> dict[str, Any]:
        """The ``commute.json`` of the analysed run (beside its checkpoints, or one folder up), as a dict;
        empty when there is none or it cannot be read. Read without torch: ``recommend`` and ``plot`` start
        without it."""
        for folder in (self.checkpoint_dir, self.checkpoint_dir.parent):
            file = folder / "commute.json"
            if file.is_file():
                try:
                    data = json.loads(file.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    return {}
                return data if isinstance(data, dict) else {}
        return {}

    def label(self) -> str:
        """``run 1a2b3c4d (sample_checkpoints, schedule en=0.8 ru=0.2)``: what every output names."""
        ckpt = self.run.get("options", {}).get("ckpt_dir", "?")
        return f"run {self.run_id[:8]} ({ckpt}, schedule {schedule_words(self.schedule)})"

    def write(self) -> None:
        """``results.csv``, ``losses.csv`` and ``run.json``, each atomically (run.json last)."""
        atomic.write_text(self.folder / "results.csv", self.results.to_csv(index=False))
        atomic.write_text(self.folder / "losses.csv", self.losses.to_csv(index=False))
        atomic.write_text(self.folder / "run.json", json.dumps(self.run, indent=2, default=str) + "\n")


def read_run_json(folder: Path) -> dict[str, Any] | None:
    """``folder/run.json`` as a dict, or None when absent or unreadable."""
    try:
        data = json.loads((Path(folder) / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_table(file: str | os.PathLike[str]) -> pd.DataFrame:
    """The one reader of the CSVs commute writes: :data:`TEXT_COLUMNS` as text (never a number, never
    missing unless the cell is empty), the other columns as pandas infers them; only empty cells are missing
    (no "NA"/"null" guessing)."""
    return pd.read_csv(file, dtype={c: str for c in TEXT_COLUMNS}, keep_default_na=False, na_values=[""])


def load_analysis(folder: str | os.PathLike[str]) -> AnalysisRun:
    """Read an analysis folder (``results.csv``, ``losses.csv`` when present, ``run.json``) with one-line
    errors; ``step`` becomes int and rows without a step (a single model folder) are dropped."""
    folder = Path(folder)
    results_file, run_file = folder / "results.csv", folder / "run.json"
    hint = f"run `commute analyze CHECKPOINTS --out {folder}` first"
    if not results_file.is_file():
        raise CommuteError(f"no analyze results in {folder}/ (results.csv is missing)", hint=hint)
    if not run_file.is_file():
        raise CommuteError(f"{folder}/run.json is missing: the schedule of the analysed run is unknown", hint)
    try:
        results = read_table(results_file)
        run = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise CommuteError(f"cannot read the analyze results in {folder}/: {err}", hint=hint) from err
    missing = [c for c in RESULTS_COLUMNS if c not in results.columns]
    if missing:
        raise CommuteError(
            f"{results_file} lacks columns {', '.join(missing)}", hint=f"rerun analyze: {hint}"
        )
    if results.empty:
        raise CommuteError(f"{results_file} has no rows", hint=hint)
    if not isinstance(run, dict) or "schedule" not in run:
        raise CommuteError(f"{run_file} has no schedule", hint=hint)
    results = results[results["step"].notna()].copy()
    if results.empty:
        raise CommuteError(
            f"{results_file} has no checkpoint steps (a single model folder?)",
            hint="recommend needs checkpoints with step numbers (checkpoint-N/ folders)",
        )
    results["step"] = results["step"].astype(int)
    for col in ("in_regime", "significant"):
        if col in results.columns and results[col].dtype != bool:
            results[col] = results[col].astype(str).str.lower().isin({"true", "1"})
    losses_file = folder / "losses.csv"
    losses = read_table(losses_file) if losses_file.is_file() else pd.DataFrame()
    return AnalysisRun(folder, results, losses, run)


def load_losses(folder: str | os.PathLike[str]) -> pd.DataFrame:
    """``losses.csv`` of an analysis folder (step, domain, loss, loss_se), with one-line errors."""
    file = Path(folder) / "losses.csv"
    if not file.is_file():
        raise CommuteError(
            f"no analyze results in {Path(folder)}/ (losses.csv is missing)",
            hint=f"run `commute analyze CHECKPOINTS --out {Path(folder)}` first",
        )
    losses = read_table(file)
    missing = [c for c in ("step", "domain", "loss", "loss_se") if c not in losses.columns]
    if missing:
        raise CommuteError(f"{file} lacks columns {', '.join(missing)}", hint="rerun commute analyze")
    return losses


def choose_folder(
    out: Path, identity: str, name: str | None = None, current: dict[str, Any] | None = None
) -> tuple[Path, str | None]:
    """Where an analysis with ``identity`` writes its results under ``--out``, and a note when it is not
    ``out`` itself. Never silently replaces another run's results:

    - ``--name NAME``: ``out/NAME/`` (refused when it holds another run);
    - ``out/`` when it holds no analysis or one of the same run and question (a rerun refines it);
    - otherwise ``out/run-<id>/``, one folder per distinct run and question, and the note says so, and what
      differs when ``current`` (the identity fields of this analysis) is given.

    The statistics cache stays shared in ``out/cache/`` (content-addressed, so sharing is safe).
    """
    out = Path(out)

    def holder(folder: Path) -> str | None:
        run = read_run_json(folder)
        return None if run is None else str(run.get("run_id") or run_identity(run))

    if name is not None:
        if not name or name in (".", "..", "cache") or "/" in name or "\\" in name:
            raise CommuteError(f"--name must be a plain folder name, got {name!r}", hint="e.g. --name en90")
        folder = out / name
        other = holder(folder)
        if other is not None and other != identity:
            raise CommuteError(
                f"{folder}/ holds the results of another run or schedule (run {other[:8]})",
                hint="choose another --name, or delete that folder",
            )
        return folder, None
    other = holder(out)
    if other is None or other == identity:
        return out, None
    folder = out / f"run-{identity[:8]}"
    previous = read_run_json(out)
    differs = identity_difference(previous, current) if current is not None and previous is not None else []
    why = "; ".join(differs) if differs else "other checkpoints, targets, domains, weights or options"
    return folder, (
        f"note: {out}/ holds the analysis of another run or question (run {other[:8]}: {why}); "
        f"this one is in {folder}/ (use --name to choose the folder)"
    )


def other_analyses(folder: str | os.PathLike[str]) -> list[tuple[Path, list[str]]]:
    """The analyses in ``folder``'s subfolders (``run-<id>/`` and ``--name`` folders, each with its own
    ``run.json``), sorted by name, each with what differs from ``folder``'s own analysis in words
    (:func:`identity_difference`; empty when ``folder`` holds none). ``cache/`` is not an analysis."""
    folder = Path(folder)
    top = read_run_json(folder) or {}
    found = []
    if folder.is_dir():
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "cache"):
            run = read_run_json(sub)
            if run is not None and (sub / "results.csv").is_file():
                found.append((sub, identity_difference(run, top) if top else []))
    return found


def merge_rerun(previous: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, Any]:
    """``run.json`` of a fully cached rerun keeps the original run's time and memory and adds the rerun's.

    When ``previous`` (the folder's run.json) is the same run and this invocation computed nothing (every
    checkpoint came from the cache entries previous used), its ``elapsed_seconds``, ``peak_rss_mb``,
    ``peak_gpu_mb`` and ``finished_at`` are kept and this invocation is appended to ``reruns``; otherwise
    ``current`` is returned unchanged.
    """
    if previous is None or previous.get("run_id") != current.get("run_id"):
        return current
    ckpts = current.get("checkpoints", [])
    prev_cache = {c.get("cache") for c in previous.get("checkpoints", [])}
    if not ckpts or not all(c.get("cached") and c.get("cache") in prev_cache for c in ckpts):
        return current
    kept = ("elapsed_seconds", "peak_rss_mb", "peak_gpu_mb", "finished_at")
    rerun = {k: current.get(k) for k in (*kept, "argv")}
    merged = {**current, **{k: previous.get(k) for k in kept}}
    merged["reruns"] = [*previous.get("reruns", []), rerun]
    return merged


def check_writable(out: Path) -> None:
    """Create ``out`` and probe that a file can be written there (one-line error otherwise)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".probe-", dir=out)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise CommuteError(
            f"output folder {out} is not writable ({err.strerror})", hint="pass --out DIR"
        ) from err
