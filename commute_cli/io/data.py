"""Domains: ``name=source`` specs, reading text with ``datasets``, tokenizing, fixed-length blocks, samples.

The pipeline for one domain is ``load_texts`` -> ``pack_blocks`` (or ``cached_blocks``, which does both once
per run and keeps the result on disk) -> ``sample_blocks`` -> ``split_parts``.

Decisions worth knowing (also why):

- A ``.txt`` file holds one document per *blank-line-separated paragraph block*. A file without blank lines
  is therefore one document. Splitting per line would put an EOS token after every wrapped line of prose;
  treating a line-per-document file as one document only loses the EOS separators, which matters much less.
- Local files are read with ``datasets.load_dataset(..., streaming=True)``: the real ``datasets`` readers do
  the parsing, but nothing is converted into the ``datasets`` Arrow cache (no multi-GB copy of the user's data
  in ``~/.cache``), and ``max_chars`` can stop reading early.
- A local path always wins over a hub name or alias: ``en=c4`` reads ``./c4`` when that exists.
- Hub sources (``c4`` -> ``allenai/c4`` config ``en``; ``mc4`` -> ``allenai/c4`` with the domain name as the
  language config; ``owner/name`` or ``owner/name:config``) are streamed. Offline variables
  (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) are read from the environment at call time and fail at once,
  without the ~23 s of retries ``datasets`` does. Without them, one metadata request with a
  ``HUB_PROBE_TIMEOUT_S`` timeout checks that the hub answers before streaming starts, so an unreachable hub
  costs at most that long, never an endless hang.
- Documents are separated by the tokenizer's EOS token. A tokenizer without one gets no separator at all (the
  documents are simply concatenated); no token is invented, because any id we picked would carry meaning
  the model never learned.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from commute_cli.errors import CommuteError
from commute_cli.io import atomic

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(:[A-Za-z0-9_.-]+)?$")

#: file suffix -> ``datasets`` packaged builder
SUPPORTED_SUFFIXES: dict[str, str] = {
    ".jsonl": "json",
    ".json": "json",
    ".txt": "text",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
_TEXT_SUFFIXES = {".jsonl", ".json", ".txt"}

#: hub aliases: alias -> (dataset name, config or None = the domain name)
HUB_ALIASES: dict[str, tuple[str, str | None]] = {"c4": ("allenai/c4", "en"), "mc4": ("allenai/c4", None)}

#: how many characters to take from a hub stream when the caller gives no ``max_chars``
HUB_DEFAULT_MAX_CHARS = 4_000_000
#: seconds the one hub metadata request may take before the hub counts as unreachable
HUB_PROBE_TIMEOUT_S = 10.0

_TEXT_FIELD = "text"
_CACHE_FORMAT = "commute-blocks/1"


# ----------------------------------------------------------------------------------------------- specs


def parse_domain_specs(specs: Sequence[str]) -> dict[str, str]:
    """Parse ``["en=data/en.jsonl", "ru=mc4"]`` into ``{"en": "data/en.jsonl", "ru": "mc4"}`` (order kept)."""
    domains: dict[str, str] = {}
    for spec in specs:
        if "=" not in spec:
            raise CommuteError(
                f"domain spec {spec!r} has no '='", hint="write NAME=SOURCE, e.g. en=data/en.jsonl or ru=mc4"
            )
        name, source = (part.strip() for part in spec.split("=", 1))
        if not name or not source:
            raise CommuteError(f"domain spec {spec!r} has an empty name or source", hint="write NAME=SOURCE")
        if not _NAME_RE.match(name):
            raise CommuteError(
                f"domain name {name!r} is not allowed",
                hint="use letters, digits, '_', '.' or '-' (it becomes a column name and a file name)",
            )
        if name in domains:
            raise CommuteError(f"domain {name!r} is given twice", hint="give each domain once")
        domains[name] = source
    return domains


# ----------------------------------------------------------------------------------------------- reading


def _offline_env() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return var
    return None


def _resolve_local(source: str, base_dir: Path | None) -> Path:
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def _hub_target(source: str, domain: str | None) -> tuple[str, str | None] | None:
    """(dataset, config) if ``source`` names a hub dataset, else None."""
    if source in HUB_ALIASES:
        name, config = HUB_ALIASES[source]
        if config is None:
            if not domain:
                raise CommuteError(
                    f"{source!r} takes its language from the domain name, and there is none",
                    hint=f"name the domain after the language, e.g. ru={source}",
                )
            config = domain
        return name, config
    if is_hub_source(source):
        name, _, config = source.partition(":")
        return name, (config or None)
    return None


def is_hub_source(source: str) -> bool:
    """Whether ``source`` reads as a hub dataset (an alias or ``owner/name[:config]``) rather than a path."""
    return source in HUB_ALIASES or bool(
        _HUB_NAME_RE.match(source) and Path(source).suffix.lower() not in SUPPORTED_SUFFIXES
    )


def _silence_datasets_logging() -> None:
    """datasets logs a parse failure at ERROR level before raising it; we turn the exception into one
    CommuteError line, so its log line would only print the same problem twice (and a traceback-like
    'Logging error' when stderr is captured)."""
    import logging

    logging.getLogger("datasets").setLevel(logging.CRITICAL)


def load_texts(
    source: str,
    *,
    domain: str | None = None,
    base_dir: Path | None = None,
    max_chars: int | None = None,
) -> list[str]:
    """Read the documents of one domain source as a list of strings.

    ``source`` is a local file (.jsonl/.json with a ``text`` field, .txt, .parquet, .arrow), a folder written
    by ``Dataset.save_to_disk``, a folder of files of one supported type, or a hub dataset (see the module
    docstring). Relative paths are taken relative to ``base_dir`` when given. Reading stops once the documents
    read hold at least ``max_chars`` characters (a hub stream defaults to ``HUB_DEFAULT_MAX_CHARS``).
    Empty documents are dropped.
    """
    _silence_datasets_logging()
    path = _resolve_local(source, base_dir)
    if path.exists():
        texts = _collect(_iter_local(path), max_chars)
    else:
        target = _hub_target(source, domain)
        if target is None:
            raise CommuteError(
                f"data source {str(path)!r} does not exist",
                hint="give an existing file or folder (jsonl/json/txt/parquet/arrow or a save_to_disk "
                "folder), or a hub dataset such as c4, mc4 or owner/name",
            )
        texts = _collect(
            _iter_hub(*target, local_hint=str(path)),
            max_chars if max_chars is not None else HUB_DEFAULT_MAX_CHARS,
        )
    if not texts:
        raise CommuteError(
            f"no text in {source!r}" + (f" (domain {domain})" if domain else ""),
            hint="the source holds no non-empty documents; check the file and its 'text' field",
        )
    return texts


def _collect(docs: Iterable[str], max_chars: int | None) -> list[str]:
    texts: list[str] = []
    total = 0
    for doc in docs:
        if not doc or not doc.strip():
            continue
        texts.append(doc)
        total += len(doc)
        if max_chars is not None and total >= max_chars:
            break
    return texts


def _iter_local(path: Path) -> Iterator[str]:
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            yield from _iter_saved(path)
            return
        files = _data_files_in(path)
    else:
        files = [path]
    suffix = files[0].suffix.lower()
    builder = SUPPORTED_SUFFIXES.get(suffix)
    if builder is None:
        raise CommuteError(
            f"unsupported data file type {suffix or '(no suffix)'!r}: {files[0]}",
            hint="use " + ", ".join(SUPPORTED_SUFFIXES) + " or a save_to_disk folder",
        )
    # One file at a time: checks and errors name the exact file, and max_chars stops before later files
    # are even opened (a load_dataset call costs ~10 ms, nothing next to reading a shard).
    for file in files:
        _check_file(file)
        yield from _iter_builder(builder, file)


def _data_files_in(folder: Path) -> list[Path]:
    """The data files in a folder (recursively, hidden entries skipped); all must share one type."""
    found = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    data = [p for p in found if p.suffix.lower() in SUPPORTED_SUFFIXES]
    if not data:
        seen = ", ".join(sorted({p.suffix or p.name for p in found})[:8]) or "nothing"
        raise CommuteError(
            f"no data files in folder {folder} (found: {seen})",
            hint="put .jsonl/.json/.txt/.parquet/.arrow files there, or pass a save_to_disk folder",
        )
    kinds = {SUPPORTED_SUFFIXES[p.suffix.lower()] for p in data}
    if len(kinds) > 1:
        raise CommuteError(
            f"folder {folder} mixes data file types ({', '.join(sorted({p.suffix for p in data}))})",
            hint="keep one type of file per domain folder, or pass the files as separate domains",
        )
    if "json" in kinds and len({p.suffix.lower() for p in data}) > 1:
        raise CommuteError(
            f"folder {folder} mixes .json and .jsonl files", hint="keep one type of file per domain folder"
        )
    return data


def _check_file(file: Path) -> None:
    """Empty files and text files that are not UTF-8 fail here, with the file's name and the byte offset."""
    if file.stat().st_size == 0:
        raise CommuteError(f"data file {file} is empty", hint="remove it or point the domain at real data")
    if file.suffix.lower() not in _TEXT_SUFFIXES:
        return
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = 0
    with open(file, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                raise CommuteError(
                    f"data file {file} is not UTF-8 (bad byte near offset {offset + err.start})",
                    hint="convert it, e.g. iconv -f latin1 -t utf-8",
                ) from err
            if not chunk:
                break
            offset += len(chunk)


def _iter_builder(builder: str, file: Path) -> Iterator[str]:
    import datasets

    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        stream = datasets.load_dataset(
            builder, data_files=[str(file)], split="train", streaming=True, **kwargs
        )
        for row in stream:
            text = _text_of(row, str(file))
            # paragraph mode leaves the newlines around a paragraph that sat between 3+ line breaks
            yield text.strip("\n") if builder == "text" else text
    except CommuteError:
        raise
    except Exception as err:  # pyarrow, json, ValueError and DatasetGenerationError variants
        detail = " ".join(str(err).split())[:200]
        kind = "invalid JSON" if builder == "json" else f"unreadable {builder} data"
        raise CommuteError(
            f"{kind} in {file}: {type(err).__name__}: {detail}",
            hint="check the file: JSON lines need one object per line with a 'text' field",
        ) from err


def _text_of(row: dict[str, Any], where: str) -> str:
    if _TEXT_FIELD not in row:
        cols = ", ".join(list(row)[:10])
        raise CommuteError(
            f"no 'text' field in {where} (fields: {cols or 'none'})",
            hint="each record needs a string field named 'text'",
        )
    value = row[_TEXT_FIELD]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CommuteError(
            f"the 'text' field in {where} holds {type(value).__name__}, not a string",
            hint="each record needs a string field named 'text'",
        )
    return value


def _iter_saved(folder: Path) -> Iterator[str]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as err:
        raise CommuteError(
            f"could not read the save_to_disk folder {folder}: {type(err).__name__}: {err}",
            hint="re-save it with Dataset.save_to_disk, or export it to jsonl/parquet",
        ) from err
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise CommuteError(
                f"{folder} holds several splits ({', '.join(loaded)}) and none is 'train'",
                hint="pass the folder of one split",
            )
    if _TEXT_FIELD not in loaded.column_names:
        raise CommuteError(
            f"no 'text' field in {folder} (fields: {', '.join(loaded.column_names[:10])})",
            hint="each record needs a string field named 'text'",
        )
    for row in loaded.select_columns([_TEXT_FIELD]):
        yield _text_of(row, str(folder))


def _iter_hub(name: str, config: str | None, *, local_hint: str) -> Iterator[str]:
    label = name + (f" ({config})" if config else "")
    hint = f"pass a local file or folder instead (no local path {local_hint!r} exists)"
    var = _offline_env()
    if var is not None:
        raise CommuteError(f"can't reach the Hugging Face hub for {label}: {var} is set (offline)", hint=hint)
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError as err:  # pragma: no cover - huggingface_hub ships with datasets
        raise CommuteError(f"can't reach the Hugging Face hub for {label}: {err}", hint=hint) from err
    try:
        HfApi().dataset_info(name, timeout=HUB_PROBE_TIMEOUT_S)
    except (RepositoryNotFoundError, GatedRepoError) as err:
        raise CommuteError(
            f"hub dataset {name} is not available: {type(err).__name__}",
            hint="check the name (and that you accepted its terms if it is gated), or " + hint,
        ) from err
    except Exception as err:  # connection errors come from several HTTP stacks
        raise CommuteError(
            f"can't reach the Hugging Face hub for {label} ({type(err).__name__})", hint=hint
        ) from err
    import datasets

    try:
        stream = datasets.load_dataset(name, config, split="train", streaming=True)
        for row in stream:
            yield _text_of(row, label)
    except CommuteError:
        raise
    except Exception as err:
        detail = " ".join(str(err).split())[:200]
        raise CommuteError(
            f"could not stream hub dataset {label}: {type(err).__name__}: {detail}", hint=hint
        ) from err


# ----------------------------------------------------------------------------------------------- blocks


def pack_blocks(texts: Sequence[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Tokenize, join documents with EOS, cut into ``[N, seq_len]`` int64 blocks, dropping the remainder.

    Each document is tokenized without special tokens and followed by ``tokenizer.eos_token_id`` (nothing when
    the tokenizer has no EOS, see the module docstring). ``N = total_tokens // seq_len``.
    """
    if seq_len < 1:
        raise CommuteError(f"seq_len must be positive, got {seq_len}")
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    batch = 256
    for start in range(0, len(texts), batch):
        chunk = list(texts[start : start + batch])
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        for doc in encoded:
            ids.extend(doc)
            if eos is not None:
                ids.append(int(eos))
    n_blocks = len(ids) // seq_len
    if n_blocks == 0:
        raise CommuteError(
            f"the data gives {len(ids)} tokens, fewer than one block of seq_len={seq_len} needs",
            hint="add data or lower --seq-len",
        )
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def sample_blocks(blocks: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` distinct rows of ``blocks``, chosen by a CPU ``torch.Generator`` seeded with ``seed``.

    The same blocks, n and seed always give the same sample (in the same order), so every checkpoint is
    evaluated on the same sequences.
    """
    total = int(blocks.shape[0])
    if n < 1:
        raise CommuteError(f"the number of samples must be positive, got {n}")
    if n > total:
        raise CommuteError(
            f"asked for {n} samples but the data has only {total} blocks",
            hint="add data, lower the number of samples, or shorten --seq-len",
        )
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    index = torch.randperm(total, generator=gen)[:n]
    return blocks[index]


def split_parts(blocks: torch.Tensor, n_blocks_design: int, n_parts: int = 3) -> list[list[torch.Tensor]]:
    """Split a sample into ``n_blocks_design`` disjoint design blocks of ``n_parts`` disjoint parts each.

    MATH.md "Noise": every product in the criterion multiplies factors estimated on disjoint samples; with
    three parts per block, one part gives the gradients that become HVP vectors, one the HVPs, one the paired
    gradients. All parts have ``len(blocks) // (n_blocks_design * n_parts)`` rows; the remainder is unused.
    Rows are taken in order, so pass a shuffled sample (``sample_blocks``).
    """
    if n_blocks_design < 1 or n_parts < 1:
        raise CommuteError(f"need at least one block and one part, got {n_blocks_design} x {n_parts}")
    per_part = int(blocks.shape[0]) // (n_blocks_design * n_parts)
    if per_part < 1:
        raise CommuteError(
            f"{blocks.shape[0]} samples cannot fill {n_blocks_design} blocks x {n_parts} parts",
            hint=f"use at least {n_blocks_design * n_parts} samples, or fewer blocks",
        )
    out: list[list[torch.Tensor]] = []
    for b in range(n_blocks_design):
        base = b * n_parts * per_part
        out.append([blocks[base + p * per_part : base + (p + 1) * per_part] for p in range(n_parts)])
    return out


# ----------------------------------------------------------------------------------------------- cache


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything in the tokenizer that changes token ids: its serialized model, vocab and EOS."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    h.update(json.dumps(sorted((int(k), str(v)) for k, v in added.items())).encode())
    h.update(repr(getattr(tokenizer, "eos_token_id", None)).encode())
    return h.hexdigest()


def source_fingerprint(source: str, *, domain: str | None = None, base_dir: Path | None = None) -> str:
    """A hash of a source: names, sizes and full contents of its files (hub sources: name and config).

    Contents rather than mtimes: rewriting a file within the filesystem's timestamp granularity must still
    invalidate the cache, and hashing runs at hundreds of MB/s, far faster than tokenizing.
    """
    h = hashlib.sha256()
    path = _resolve_local(source, base_dir)
    if not path.exists():
        h.update(f"hub:{_hub_target(source, domain)}".encode())
        return h.hexdigest()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        rel = file.name if file == path else file.relative_to(path).as_posix()
        h.update(f"{rel}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cached_blocks(
    source: str,
    tokenizer: Any,
    seq_len: int,
    cache_dir: Path,
    *,
    domain: str | None = None,
    base_dir: Path | None = None,
    max_chars: int | None = None,
) -> torch.Tensor:
    """``pack_blocks(load_texts(source), tokenizer, seq_len)``, computed once and kept in ``cache_dir``.

    The key hashes the source (``source_fingerprint``), the tokenizer (``tokenizer_fingerprint``), ``seq_len``
    and ``max_chars``. Entries are safetensors files written to a temporary name and renamed into place, so an
    entry is complete or absent; an unreadable entry is recomputed.
    """
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(
        json.dumps(
            [
                _CACHE_FORMAT,
                source_fingerprint(source, domain=domain, base_dir=base_dir),
                tokenizer_fingerprint(tokenizer),
                int(seq_len),
                max_chars,
            ]
        ).encode()
    ).hexdigest()[:32]
    cache_dir = Path(cache_dir)
    entry = cache_dir / f"blocks-{key}.safetensors"
    if entry.is_file():
        try:
            blocks = load_file(str(entry))["blocks"]
            if blocks.dim() == 2 and blocks.shape[1] == seq_len:
                return blocks
        except Exception:  # a damaged entry is a cache miss, not an error
            pass
    texts = load_texts(source, domain=domain, base_dir=base_dir, max_chars=max_chars)
    blocks = pack_blocks(texts, tokenizer, seq_len)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(entry) as tmp:
        save_file(
            {"blocks": blocks.contiguous()},
            tmp,
            metadata={"format": _CACHE_FORMAT, "source": source, "seq_len": str(seq_len)},
        )
    return blocks
