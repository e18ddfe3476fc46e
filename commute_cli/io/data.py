"""Domains: ``name=source`` specs, reading text with ``datasets``, tokenizing, fixed-length blocks, samples.

Two pipelines share one reader:

- ``commute analyze`` draws its sample with :func:`sample_domain`: a *bounded* read that takes only the
  documents the sample needs, spread over the source's shards, and records where they came from. Its cost is
  the sample's, not the corpus's: the same for a 10 MB file and a folder of 1024 C4 shards.
- ``train``/``validate`` read whole domains with :func:`load_texts` (optionally capped by ``max_chars``) and
  cut them with :func:`pack_blocks`; :func:`cached_blocks` keeps that result on disk.

Sources (:data:`SUPPORTED_FORMATS_TEXT`): a local file or a folder (searched recursively, hidden entries
skipped) of files of one kind -- JSON lines or JSON (``.jsonl``, ``.ndjson``, ``.json``), text (``.txt``),
CSV (``.csv``), each also compressed as ``.gz``, ``.bz2``, ``.xz``, ``.zst``/``.zstd`` or ``.lz4``
(decompressed by ``datasets`` while streaming), Parquet (``.parquet``), Arrow (``.arrow``) -- or a
``Dataset.save_to_disk`` folder, or a hub dataset. Names such as ``c4-train.00000-of-01024.json.gz`` and
``c4-ru.tfrecord-00000-of-01024.json.gz`` are read by their last two suffixes.

Decisions worth knowing (also why):

- Everything is read through ``datasets.load_dataset(..., streaming=True)``, local files and hub datasets
  alike: one ``IterableDataset`` whose shards are the files, read lazily shard by shard (``.shard()``).
  Nothing is copied into the ``datasets`` Arrow cache (no multi-GB copy of the user's data in ``~/.cache``).
  The JSON and text readers are given a 256 KB chunk size (``READ_CHUNK_BYTES``) and Parquet/CSV a batch
  of ``READ_ROWS`` rows, so stopping early really stops reading. For local files the bounded draw opens a
  stream over the selected shards only (``MAX_SHARDS`` at a time), so that ``datasets``' per-file work does
  not grow with the number of files in the folder.
- The bounded draw (:func:`sample_domain`): a seeded permutation of the shards; the first
  ``min(shards, MAX_SHARDS)`` of it each contribute an equal share of a pool of ``POOL_FACTOR`` times the
  sample's tokens, read from the start of the shard in file order (later shards in the permutation only fill
  in for shards that run out). The sample's blocks are drawn from the pool without replacement, in a seeded
  random order, so every design block mixes all the shards read, and a source smaller than the pool is
  sampled over its whole length. A shard is read from its start because a compressed stream cannot seek,
  and a ``.json.gz`` shard must give the same sample as the same ``.jsonl``. Same files, tokenizer, size and
  seed: the same token ids.
- The text column is ``text`` unless named per domain (``text_field``; CLI ``--text-field code=content``).
  A source without it is refused with its columns listed, not guessed: corpora hold several string columns
  (``url``, ``path``, ``title``, ...), and a silently wrong column makes a plausible-looking analysis.
- A ``.txt`` file holds one document per *blank-line-separated paragraph*, read line by line. A paragraph
  longer than ``MAX_DOC_CHARS`` characters is cut (at a line break) into documents of about that size, so a
  sentence-per-line file without blank lines never becomes one giant document in memory. Splitting per line
  would put an EOS token after every wrapped line of prose.
- A tokenizer that maps the text to almost nothing (fewer than ``MIN_TOKENS_PER_CHAR`` content tokens per
  character, special and unknown tokens not counted) is refused: an empty tokenizer (what ``AutoTokenizer``
  builds from a checkpoint saved without tokenizer files) turns every document into end-of-text tokens only,
  and the analysis would silently compare identical all-EOS blocks.
- A local path always wins over a hub name or alias: ``en=c4`` reads ``./c4`` when that exists.
- Hub sources (``c4`` -> ``allenai/c4`` config ``en``; ``mc4`` -> ``allenai/c4`` with the domain name as the
  language config; ``owner/name`` or ``owner/name:config``) are streamed through the same draw. Offline
  variables (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) are read from the environment at call time and
  fail at once, without the ~23 s of retries ``datasets`` does. Without them, one metadata request with a
  ``HUB_PROBE_TIMEOUT_S`` timeout checks that the hub answers before streaming starts.
- Documents are separated by the tokenizer's EOS token. A tokenizer without one gets no separator at all (the
  documents are simply concatenated); no token is invented, because any id we picked would carry meaning
  the model never learned.
- Limits: a ``.json`` file holding one JSON *array* (not JSON lines) is parsed whole by ``datasets`` (the
  format has no record boundaries): convert it to JSON lines for big data. A single line of JSON lines or
  text is read whole. Zip/tar archives are not read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
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
    ".ndjson": "json",
    ".json": "json",
    ".txt": "text",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
#: compression suffix -> fsspec compression name (what ``datasets`` decompresses while streaming)
COMPRESSIONS: dict[str, str] = {
    ".gz": "gzip",
    ".bz2": "bz2",
    ".xz": "xz",
    ".zst": "zstd",
    ".zstd": "zstd",
    ".lz4": "lz4",
}
#: the Python package each optional compression needs
_COMPRESSION_PACKAGES = {"zstd": "zstandard", "lz4": "lz4"}
#: builders whose files may be compressed as a whole (Parquet and Arrow compress inside the file)
_COMPRESSIBLE = {"json", "text", "csv"}
#: the supported set in words, for --help, errors and the README
SUPPORTED_FORMATS_TEXT = (
    ".jsonl/.ndjson/.json, .txt and .csv, each optionally compressed (.gz, .bz2, .xz, .zst, .lz4); "
    ".parquet; .arrow; a save_to_disk folder; a folder of such files (shards, also nested); "
    "or a hub dataset (c4, mc4, owner/name[:config])"
)

#: hub aliases: alias -> (dataset name, config or None = the domain name)
HUB_ALIASES: dict[str, tuple[str, str | None]] = {"c4": ("allenai/c4", "en"), "mc4": ("allenai/c4", None)}

#: how many characters ``load_texts`` takes from a hub stream when the caller gives no ``max_chars``
HUB_DEFAULT_MAX_CHARS = 4_000_000
#: seconds the one hub metadata request may take before the hub counts as unreachable
HUB_PROBE_TIMEOUT_S = 10.0

#: the bounded draw spreads a sample over at most this many shards (each costs one open and one chunk)
MAX_SHARDS = 16
#: bytes the JSON and text readers take per read (``datasets``' default is 10 MB)
READ_CHUNK_BYTES = 256 << 10
#: rows per batch of the Parquet and CSV readers
READ_ROWS = 256
#: a .txt paragraph longer than this many characters is cut into documents of about this size
MAX_DOC_CHARS = 100_000
#: the draw reads this many times the sample's tokens and picks the sample's blocks among them
POOL_FACTOR = 4
#: shards of a save_to_disk dataset in the bounded draw (contiguous row ranges)
SAVED_SHARDS = 64
#: a tokenizer giving fewer content tokens per character than this is refused. Real tokenizers give
#: 0.15-0.35 on prose (GPT-2 ~0.25 on English; ~4-6 characters per token) and more on code and other
#: scripts; 0.02 is one token per 50 characters, far below any of them.
MIN_TOKENS_PER_CHAR = 0.02
#: the draw checks the tokenizer once it has tokenized this many characters (and again at the end)
GUARD_CHARS = 20_000

DEFAULT_TEXT_FIELD = "text"
#: columns that often hold the text, named in the hint when ``text`` is missing (never used silently)
_COMMON_TEXT_COLUMNS = (
    "content",
    "document",
    "raw_content",
    "body",
    "article",
    "sentence",
    "code",
    "markdown",
)
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


def parse_text_fields(specs: Sequence[str], names: Sequence[str]) -> dict[str, str]:
    """``--text-field code=content`` values -> ``{"code": "content"}``; each name must be a domain.

    A column is named per domain (``NAME=COLUMN``) rather than inside the source (``path:column``) because
    ``:`` already separates a hub dataset from its config (``owner/name:config``) and may occur in paths.
    """
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, column = (part.strip() for part in spec.partition("="))
        if not sep or not name or not column:
            raise CommuteError(
                f"--text-field {spec!r} is not NAME=COLUMN", hint="e.g. --text-field code=content"
            )
        if name not in names:
            raise CommuteError(
                f"--text-field names domain {name!r}, which is not among the domains ({', '.join(names)})",
                hint="use the domain's name from --domains",
            )
        if name in out:
            raise CommuteError(f"--text-field gives domain {name!r} twice", hint="give each domain once")
        out[name] = column
    return out


# ----------------------------------------------------------------------------------------------- sources


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


def file_kind(path: Path) -> tuple[str, str | None] | None:
    """``(builder, compression)`` of a data file from its name, or None when it is not a data file.

    The format is the suffix before an optional compression suffix: ``c4-train.00000-of-01024.json.gz`` ->
    ``("json", "gzip")``, ``x.parquet`` -> ``("parquet", None)``. Parquet and Arrow files compressed as a
    whole are not data files (their readers need random access).
    """
    name = path.name.lower()
    compression = None
    for suffix, kind in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = kind, name[: -len(suffix)]
            break
    dot = name.rfind(".")
    builder = SUPPORTED_SUFFIXES.get(name[dot:]) if dot > 0 else None
    if builder is None or (compression is not None and builder not in _COMPRESSIBLE):
        return None
    return builder, compression


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
    return source in HUB_ALIASES or bool(_HUB_NAME_RE.match(source) and file_kind(Path(source)) is None)


def _silence_datasets_logging() -> None:
    """datasets logs a parse failure at ERROR level before raising it; we turn the exception into one
    CommuteError line, so its log line would only print the same problem twice (and a traceback-like
    'Logging error' when stderr is captured)."""
    import logging

    logging.getLogger("datasets").setLevel(logging.CRITICAL)


@dataclass
class Source:
    """A resolved domain source: local files of one builder, a save_to_disk folder, or a hub dataset."""

    label: str  # the source as given, for messages and run.json
    kind: str  # "files" | "saved" | "hub"
    builder: str | None = None  # files: the datasets builder (json, text, csv, parquet, arrow)
    files: list[Path] = field(default_factory=list)  # files: sorted by path
    root: Path | None = None  # files/saved: the path given
    hub: tuple[str, str | None] | None = None  # hub: (dataset, config)

    def shard_name(self, index: int, total: int) -> str:
        if self.kind == "files":
            f = self.files[index]
            return f.name if self.root is None or f == self.root else f.relative_to(self.root).as_posix()
        return f"shard {index} of {total}"


def resolve_source(source: str, *, domain: str | None = None, base_dir: Path | None = None) -> Source:
    """Find what ``source`` names (see the module docstring); checks names and types, reads no data."""
    path = _resolve_local(source, base_dir)
    if path.exists():
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            return Source(source, "saved", root=path)
        files = _data_files_in(path) if path.is_dir() else [path]
        kinds = [file_kind(f) for f in files]
        if kinds[0] is None:
            raise CommuteError(
                f"unsupported data file type: {files[0]}",
                hint=f"use {SUPPORTED_FORMATS_TEXT}",
            )
        builders = {k[0] for k in kinds if k is not None}
        if len(builders) > 1:
            raise CommuteError(
                f"folder {path} mixes data file types ({', '.join(sorted(builders))})",
                hint="keep one type of file per domain folder, or pass the files as separate domains",
            )
        for compression in {k[1] for k in kinds if k is not None} - {None}:
            _check_compression(compression, files[0])
        return Source(source, "files", builder=kinds[0][0], files=files, root=path)
    target = _hub_target(source, domain)
    if target is None:
        raise CommuteError(
            f"data source {str(path)!r} does not exist",
            hint=f"give an existing file or folder ({SUPPORTED_FORMATS_TEXT})",
        )
    return Source(source, "hub", hub=target, root=path)


def _check_compression(compression: str, example: Path) -> None:
    import fsspec.compression

    if compression not in fsspec.compression.compr:
        package = _COMPRESSION_PACKAGES.get(compression, compression)
        raise CommuteError(
            f"{example.name} is {compression}-compressed and the {package!r} package is not installed",
            hint=f"pip install {package}, or decompress the files",
        )


def _data_files_in(folder: Path) -> list[Path]:
    """The data files in a folder (recursively, hidden entries skipped), sorted by relative path.

    ``os.walk`` (``scandir``) and names only, no ``stat`` per file: listing stays ~10 us per file.
    """
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder).as_posix()
        prefix = "" if rel == "." else rel + "/"
        found += [(prefix + f, Path(dirpath) / f) for f in filenames if not f.startswith(".")]
    found.sort(key=lambda item: item[0])
    found_paths = [p for _, p in found]
    data = [p for p in found_paths if file_kind(p) is not None]
    if not data:
        seen = ", ".join(sorted({p.suffix or p.name for p in found_paths})[:8]) or "nothing"
        raise CommuteError(
            f"no data files in folder {folder} (found: {seen})",
            hint=f"put data files there ({SUPPORTED_FORMATS_TEXT})",
        )
    return data


# ----------------------------------------------------------------------------------------------- streams


def open_stream(src: Source) -> Any:
    """The source as one ``datasets.IterableDataset`` whose shards are its files (hub: its data files).

    Local files and hub datasets go through the same ``load_dataset(..., streaming=True)`` call and the same
    ``IterableDataset`` API (``num_shards``, ``shard``), so the local tests exercise the hub's code path.
    """
    import datasets

    _silence_datasets_logging()
    if src.kind == "hub":
        assert src.hub is not None
        _probe_hub(*src.hub, local_hint=str(src.root))
        name, config = src.hub
        try:
            return datasets.load_dataset(name, config, split="train", streaming=True)
        except Exception as err:
            raise _hub_error(src, err) from err
    if src.kind == "saved":
        assert src.root is not None
        loaded = _load_saved(src.root)
        return loaded.to_iterable_dataset(num_shards=max(1, min(len(loaded), SAVED_SHARDS)))
    for f in src.files:  # only the files handed to datasets: a draw stats its selected shards alone
        if f.stat().st_size == 0:
            raise CommuteError(f"data file {f} is empty", hint="remove it or point the domain at real data")
    kwargs: dict[str, Any] = {
        "json": {"chunksize": READ_CHUNK_BYTES},
        "text": {"chunksize": READ_CHUNK_BYTES, "sample_by": "line"},
        "csv": {"chunksize": READ_ROWS},
        "parquet": {"batch_size": READ_ROWS},
    }.get(src.builder or "", {})
    try:
        return datasets.load_dataset(
            src.builder, data_files=[str(f) for f in src.files], split="train", streaming=True, **kwargs
        )
    except Exception as err:  # the builder reads the first file to learn the columns
        raise _read_error(src, src.files[0], err) from err


def _load_saved(folder: Path) -> Any:
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
    return loaded


def _probe_hub(name: str, config: str | None, *, local_hint: str) -> None:
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


def _hub_error(src: Source, err: Exception) -> CommuteError:
    assert src.hub is not None
    name, config = src.hub
    label = name + (f" ({config})" if config else "")
    detail = " ".join(str(err).split())[:200]
    return CommuteError(
        f"could not stream hub dataset {label}: {type(err).__name__}: {detail}",
        hint=f"pass a local file or folder instead (no local path {str(src.root)!r} exists)",
    )


def _read_error(src: Source, where: Path | str, err: Exception) -> CommuteError:
    if isinstance(err, CommuteError):
        return err
    if src.kind == "hub":
        return _hub_error(src, err)
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, UnicodeDecodeError):
            return CommuteError(
                f"data file {where} is not UTF-8 ({cause.reason} near byte {cause.start} of a read)",
                hint="convert it, e.g. iconv -f latin1 -t utf-8",
            )
        cause = cause.__cause__ or cause.__context__
    detail = " ".join(str(err).split())[:200]
    kind = "invalid JSON" if src.builder == "json" else f"unreadable {src.builder or 'dataset'} data"
    return CommuteError(
        f"{kind} in {where}: {type(err).__name__}: {detail}",
        hint="check the file: JSON lines need one object per line with the text column",
    )


def _missing_column(where: str, column: str, columns: Sequence[str], domain: str | None) -> CommuteError:
    shown = ", ".join(list(columns)[:12]) + (", ..." if len(columns) > 12 else "")
    guess = next((c for c in _COMMON_TEXT_COLUMNS if c in columns), None)
    name = domain or "NAME"
    hint = f"name the text column, e.g. --text-field {name}={guess or 'COLUMN'}" + (
        ", or rename the column to 'text'" if column == DEFAULT_TEXT_FIELD else ""
    )
    return CommuteError(f"no {column!r} column in {where} (columns: {shown or 'none'})", hint=hint)


def _column_names(stream: Any) -> list[str] | None:
    try:
        names = stream.column_names
    except Exception:  # pragma: no cover - features unknown
        return None
    return list(names) if names else None


def _text_of(row: dict[str, Any], column: str, where: str, domain: str | None) -> str:
    if column not in row:
        raise _missing_column(where, column, list(row), domain)
    value = row[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise CommuteError(
            f"the {column!r} column in {where} holds {type(value).__name__}, not a string",
            hint="name a column of strings with --text-field NAME=COLUMN",
        )
    return value


def _shard_documents(
    src: Source, stream: Any, index: int, column: str, domain: str | None
) -> Iterator[tuple[int, str]]:
    """``(rows read so far, document)`` of one shard, in file order; empty documents are skipped.

    Rows are lines for text files: non-blank lines are joined into paragraphs (a blank or whitespace-only
    line ends one), and a paragraph is cut after ``MAX_DOC_CHARS`` characters.
    """
    total = stream.num_shards
    where = src.files[index] if src.kind == "files" else f"{src.label} ({src.shard_name(index, total)})"
    shard = stream.shard(num_shards=total, index=index) if total > 1 else stream
    if src.builder != "text":
        columns = _column_names(stream)
        if columns is not None and column not in columns:
            raise _missing_column(str(where), column, columns, domain)
    rows = 0
    try:
        if src.builder == "text":
            lines: list[str] = []
            size = 0
            for row in shard:
                rows += 1
                line = row["text"]
                if line.strip():
                    lines.append(line)
                    size += len(line) + 1
                    if size < MAX_DOC_CHARS:
                        continue
                if lines:
                    yield rows, "\n".join(lines)
                    lines, size = [], 0
            if lines:
                yield rows, "\n".join(lines)
        else:
            for row in shard:
                rows += 1
                text = _text_of(row, column, str(where), domain)
                if text.strip():
                    yield rows, text
    except CommuteError:
        raise
    except Exception as err:  # pyarrow, json, UnicodeDecodeError and DatasetGenerationError variants
        raise _read_error(src, where, err) from err


def _text_column(src: Source, text_field: str | None) -> str:
    if text_field is not None and text_field != DEFAULT_TEXT_FIELD and src.builder == "text":
        raise CommuteError(
            f"{src.label} is plain text: it has no column {text_field!r}",
            hint="drop the --text-field for this domain (a .txt file is read as paragraphs)",
        )
    return text_field or DEFAULT_TEXT_FIELD


# ----------------------------------------------------------------------------------------------- reading


def load_texts(
    source: str,
    *,
    domain: str | None = None,
    base_dir: Path | None = None,
    max_chars: int | None = None,
    text_field: str | None = None,
) -> list[str]:
    """Read the documents of one domain source, shard after shard in order, as a list of strings.

    ``source``: see the module docstring; relative paths are taken relative to ``base_dir`` when given.
    Reading stops once the documents read hold at least ``max_chars`` characters (a hub stream defaults to
    ``HUB_DEFAULT_MAX_CHARS``): without a cap the whole source is read, which is what training wants and
    what ``analyze`` avoids (it uses :func:`sample_domain`). ``text_field``: the column holding the text
    (default ``text``). Empty documents are dropped. Raises ``CommuteError`` for a missing source, an
    unsupported or unreadable file, a missing column, or no text at all.
    """
    src = resolve_source(source, domain=domain, base_dir=base_dir)
    if src.kind == "hub" and max_chars is None:
        max_chars = HUB_DEFAULT_MAX_CHARS
    column = _text_column(src, text_field)
    stream = open_stream(src)
    texts: list[str] = []
    total = 0
    for index in range(stream.num_shards):
        for _rows, doc in _shard_documents(src, stream, index, column, domain):
            texts.append(doc)
            total += len(doc)
            if max_chars is not None and total >= max_chars:
                return texts
    if not texts:
        raise _no_text(src, column, domain)
    return texts


def _no_text(src: Source, column: str, domain: str | None) -> CommuteError:
    return CommuteError(
        f"no text in {src.label!r}" + (f" (domain {domain})" if domain else ""),
        hint=f"the source holds no non-empty documents; check the files and their {column!r} column",
    )


# ----------------------------------------------------------------------------------------------- sample


@dataclass
class DomainSample:
    """The bounded sample of one domain: ``blocks`` ``[n, seq_len]`` int64 token ids and where they came from.

    ``provenance`` (written to ``run.json``): ``source``, ``kind``, ``text_column``, ``shards_total``,
    ``shards`` (per shard read, in read order: its ``name``, ``rows_read`` -- the first rows of the shard,
    counted in lines for text files --, ``documents`` used and ``tokens`` taken), totals ``documents``,
    ``characters`` and ``tokens_per_character`` of the text tokenized, and ``text_sha256`` (a hash of the
    documents' text as used, in order).
    """

    blocks: torch.Tensor
    provenance: dict[str, Any]


def _encode_prefix(tokenizer: Any, doc: str, want: int) -> tuple[list[int], int, bool, int]:
    """Tokenize no more of ``doc`` than its first ``want`` tokens need (no special tokens added).

    Returns ``(ids, keep, complete, chars)``: ``ids`` are the tokens of the first ``chars`` characters,
    of which the first ``keep`` are used; ``complete`` when they are the whole document. A prefix of the
    text is tokenized (16 characters per wanted token, growing 4x when short); its first ``want`` tokens
    are kept only if it gave at least 16 more, so the cut cannot change them (tokenizers merge within a
    few characters).
    """
    cap = 16 * want + 256
    while True:
        whole = cap >= len(doc)
        text = doc if whole else doc[:cap]
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if whole:
            return ids, min(len(ids), want), len(ids) <= want, len(text)
        if len(ids) >= want + 16:
            return ids, want, False, len(text)
        cap *= 4


def check_tokenizer_output(n_tokens: int, n_chars: int, where: str) -> None:
    """Refuse a tokenizer that maps text to almost nothing (see ``MIN_TOKENS_PER_CHAR``).

    ``n_tokens``: content tokens (special and unknown tokens not counted) of ``n_chars`` characters.
    Raises ``CommuteError`` when there are none, or fewer than ``MIN_TOKENS_PER_CHAR`` per character over
    at least 1000 characters.
    """
    if n_chars <= 0:
        return
    if n_tokens == 0 or (n_chars >= 1000 and n_tokens / n_chars < MIN_TOKENS_PER_CHAR):
        raise CommuteError(
            f"the tokenizer maps {where} to almost nothing: {n_tokens} tokens for {n_chars} characters "
            f"(real tokenizers give over {MIN_TOKENS_PER_CHAR:g} per character)",
            hint="the tokenizer is empty or wrong (a checkpoint saved without tokenizer files gets an empty "
            "one): pass --tokenizer with the tokenizer the model was trained with",
        )


def _content_count(tokenizer: Any, ids: Iterable[int]) -> int:
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        special.add(int(unk))
    return sum(1 for i in ids if i not in special)


def _local_shards(src: Source, order: list[int], batch: int) -> Iterator[tuple[Source, Any, int]]:
    """``(source, stream, index)`` of local files in ``order``: one stream per ``batch`` files, opened lazily,
    so that only the files read are handed to ``datasets`` (its setup costs ~1 ms per file)."""
    for start in range(0, len(order), batch):
        picked = order[start : start + batch]
        sub = Source(
            src.label, "files", builder=src.builder, files=[src.files[i] for i in picked], root=src.root
        )
        stream = open_stream(sub)
        if int(stream.num_shards) != len(
            picked
        ):  # pragma: no cover - a builder that splits files differently
            raise RuntimeError(f"datasets made {stream.num_shards} shards of {len(picked)} files")
        for index in range(len(picked)):
            yield sub, stream, index


def sample_domain(
    source: str,
    tokenizer: Any,
    seq_len: int,
    n: int,
    seed: int,
    *,
    domain: str | None = None,
    base_dir: Path | None = None,
    text_field: str | None = None,
    max_shards: int = MAX_SHARDS,
) -> DomainSample:
    """Draw ``n`` blocks of ``seq_len`` tokens from a domain, reading only what they need.

    The draw (module docstring): shards in a permutation seeded by ``seed``; the first
    ``m = min(shards, max_shards)`` each give ``ceil(POOL_FACTOR * n * seq_len / m)`` tokens of documents read
    from the shard's start (documents tokenized without special tokens, each followed by EOS, the last one
    cut where the share ends); later shards fill in for shards that run out. The token stream is cut into a
    pool of blocks of ``seq_len``, of which ``n`` are drawn without replacement by the same seeded generator
    (``torch.randperm``). Cost: at most ``m`` (plus fill-in) shard opens and about
    ``POOL_FACTOR * n * seq_len`` tokens of text, whatever the size of the corpus.

    Raises ``CommuteError`` when the whole source has fewer than ``n * seq_len`` tokens, for the reading
    errors of :func:`load_texts`, and when the tokenizer maps the text to almost nothing
    (:func:`check_tokenizer_output`).
    """
    if seq_len < 1 or n < 1:
        raise CommuteError(f"need a positive number of blocks and seq_len, got {n} x {seq_len}")
    src = resolve_source(source, domain=domain, base_dir=base_dir)
    column = _text_column(src, text_field)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if src.kind == "files":
        total_shards = len(src.files)
        order = torch.randperm(total_shards, generator=gen).tolist()
        shard_iter = _local_shards(src, order, max(1, max_shards))
    else:
        stream = open_stream(src)
        total_shards = int(stream.num_shards)
        order = torch.randperm(total_shards, generator=gen).tolist()
        shard_iter = ((src, stream, index) for index in order)
    m = max(1, min(total_shards, max_shards))
    need = n * seq_len
    pool = POOL_FACTOR * need
    share = -(-pool // m)
    eos = getattr(tokenizer, "eos_token_id", None)
    label = f"domain {domain}" if domain else repr(src.label)
    ids: list[int] = []
    text_hash = hashlib.sha256()
    shards: list[dict[str, Any]] = []
    n_docs = n_chars = n_content = 0
    for shard_src, stream, index in shard_iter:
        if len(ids) >= pool:
            break
        got = docs = rows = 0
        for rows, doc in _shard_documents(shard_src, stream, index, column, domain):  # noqa: B007
            want = min(share - got, pool - len(ids))
            encoded, keep, complete, chars = _encode_prefix(tokenizer, doc, want)
            n_chars += chars
            n_content += _content_count(tokenizer, encoded)
            if n_chars >= GUARD_CHARS:  # an empty tokenizer must not make us read the whole corpus
                check_tokenizer_output(n_content, n_chars, f"the text of {label}")
            piece = encoded[:keep] + ([int(eos)] if complete and eos is not None else [])
            ids.extend(piece)
            got += len(piece)
            docs += 1
            text_hash.update(doc[:chars].encode("utf-8", "surrogatepass") + b"\0")
            if got >= share or len(ids) >= pool:
                break
        shards.append(
            {
                "name": shard_src.shard_name(index, total_shards),
                "rows_read": rows,
                "documents": docs,
                "tokens": got,
            }
        )
        n_docs += docs
    if n_docs == 0:
        raise _no_text(src, column, domain)
    check_tokenizer_output(n_content, n_chars, f"the text of {label}")
    if len(ids) < need:
        raise CommuteError(
            f"{label} has {len(ids)} tokens ({len(ids) // seq_len} blocks of {seq_len}), "
            f"fewer than the {n} blocks the sample needs",
            hint="add data, lower --samples, or shorten --seq-len",
        )
    n_pool = min(len(ids), pool) // seq_len
    chosen = torch.randperm(n_pool, generator=gen)[:n]
    blocks = torch.tensor(ids[: n_pool * seq_len], dtype=torch.long).view(n_pool, seq_len)[chosen]
    provenance = {
        "source": src.label,
        "kind": src.kind,
        "text_column": column if src.builder != "text" else None,
        "shards_total": total_shards,
        "shards": shards,
        "documents": n_docs,
        "characters": n_chars,
        "tokens_per_character": n_content / n_chars if n_chars else None,
        "pool_blocks": n_pool,
        "blocks": chosen.tolist(),  # the sample's blocks as positions in the pool (shards in read order)
        "text_sha256": text_hash.hexdigest(),
    }
    if src.kind == "hub" and src.hub is not None:
        provenance["hub"] = {"dataset": src.hub[0], "config": src.hub[1], "split": "train"}
    return DomainSample(blocks, provenance)


# ----------------------------------------------------------------------------------------------- blocks


def pack_blocks(texts: Sequence[str], tokenizer: Any, seq_len: int) -> torch.Tensor:
    """Tokenize, join documents with EOS, cut into ``[N, seq_len]`` int64 blocks, dropping the remainder.

    Each document is tokenized without special tokens and followed by ``tokenizer.eos_token_id`` (nothing when
    the tokenizer has no EOS, see the module docstring). ``N = total_tokens // seq_len``. Raises
    ``CommuteError`` when that is less than one block, or when the tokenizer maps the text to almost nothing
    (:func:`check_tokenizer_output`).
    """
    if seq_len < 1:
        raise CommuteError(f"seq_len must be positive, got {seq_len}")
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    batch = 256
    n_chars = n_content = 0
    for start in range(0, len(texts), batch):
        chunk = list(texts[start : start + batch])
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        n_chars += sum(len(t) for t in chunk)
        for doc in encoded:
            n_content += _content_count(tokenizer, doc)
            ids.extend(doc)
            if eos is not None:
                ids.append(int(eos))
    check_tokenizer_output(n_content, n_chars, "the text")
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
    text_field: str | None = None,
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
                *([text_field] if text_field not in (None, DEFAULT_TEXT_FIELD) else []),
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
    texts = load_texts(source, domain=domain, base_dir=base_dir, max_chars=max_chars, text_field=text_field)
    blocks = pack_blocks(texts, tokenizer, seq_len)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(entry) as tmp:
        save_file(
            {"blocks": blocks.contiguous()},
            tmp,
            metadata={"format": _CACHE_FORMAT, "source": source, "seq_len": str(seq_len)},
        )
    return blocks
