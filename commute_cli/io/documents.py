"""A domain source's documents, read through ``datasets``: streams, the text column, ``.txt`` paragraphs.

Sources are resolved by :mod:`commute_cli.io.data`; this module opens them and yields their documents, for
:func:`load_texts` (whole domains, optionally capped) and for the bounded draw of
:mod:`commute_cli.io.sampling`.

Decisions worth knowing (also why):

- Everything is read through ``datasets.load_dataset(..., streaming=True)``, local files and hub datasets
  alike: one ``IterableDataset`` whose shards are the files, read lazily shard by shard (``.shard()``).
  Nothing is copied into the ``datasets`` Arrow cache (no multi-GB copy of the user's data in ``~/.cache``).
  The JSON and text readers are given a 256 KB chunk size (``READ_CHUNK_BYTES``) and Parquet/CSV a batch
  of ``READ_ROWS`` rows, so stopping early really stops reading. For local files the bounded draw opens a
  stream over the selected shards only (``io.sampling.MAX_SHARDS`` at a time), so that ``datasets``'
  per-file work does not grow with the number of files in the folder.
- A ``.txt`` file holds one document per *blank-line-separated paragraph*, read line by line. A paragraph
  longer than ``MAX_DOC_CHARS`` characters is cut (at a line break) into documents of about that size, so a
  sentence-per-line file without blank lines never becomes one giant document in memory. Splitting per line
  would put an EOS token after every wrapped line of prose.
- Hub sources: offline variables (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) are read from the
  environment at call time and fail at once, without the ~23 s of retries ``datasets`` does. Without them,
  one metadata request with a ``HUB_PROBE_TIMEOUT_S`` timeout checks that the hub answers before streaming
  starts.
- Limits: a ``.json`` file holding one JSON *array* (not JSON lines) is parsed whole by ``datasets`` (the
  format has no record boundaries): convert it to JSON lines for big data. A single line of JSON lines or
  text is read whole. Zip/tar archives are not read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from commute_cli.errors import CommuteError
from commute_cli.io.data import DEFAULT_TEXT_FIELD, Source, resolve_source

#: how many characters ``load_texts`` takes from a hub stream when the caller gives no ``max_chars``
HUB_DEFAULT_MAX_CHARS = 4_000_000

#: seconds the one hub metadata request may take before the hub counts as unreachable
HUB_PROBE_TIMEOUT_S = 10.0

#: bytes the JSON and text readers take per read (``datasets``' default is 10 MB)
READ_CHUNK_BYTES = 256 << 10

#: rows per batch of the Parquet and CSV readers
READ_ROWS = 256

#: a .txt paragraph longer than this many characters is cut into documents of about this size
MAX_DOC_CHARS = 100_000

#: shards of a save_to_disk dataset in the bounded draw (contiguous row ranges)
SAVED_SHARDS = 64

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


# ----------------------------------------------------------------------------------------------- streams


def _offline_env() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return var
    return None


def _silence_datasets_logging() -> None:
    """datasets logs a parse failure at ERROR level before raising it; we turn the exception into one
    CommuteError line, so its log line would only print the same problem twice (and a traceback-like
    'Logging error' when stderr is captured)."""
    import logging

    logging.getLogger("datasets").setLevel(logging.CRITICAL)


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
    readers: dict[str, dict[str, Any]] = {
        "json": {"chunksize": READ_CHUNK_BYTES},
        "text": {"chunksize": READ_CHUNK_BYTES, "sample_by": "line"},
        "csv": {"chunksize": READ_ROWS},
        "parquet": {"batch_size": READ_ROWS},
    }
    kwargs = readers.get(src.builder or "", {})
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


def shard_documents(
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


def text_column(src: Source, text_field: str | None) -> str:
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

    ``source``: see :mod:`commute_cli.io.data`; relative paths are taken relative to ``base_dir`` when given.
    Reading stops once the documents read hold at least ``max_chars`` characters (a hub stream defaults to
    ``HUB_DEFAULT_MAX_CHARS``): without a cap the whole source is read, which is what training wants and
    what ``analyze`` avoids (it uses :func:`sample_domain`). ``text_field``: the column holding the text
    (default ``text``). Empty documents are dropped. Raises ``CommuteError`` for a missing source, an
    unsupported or unreadable file, a missing column, or no text at all.
    """
    src = resolve_source(source, domain=domain, base_dir=base_dir)
    if src.kind == "hub" and max_chars is None:
        max_chars = HUB_DEFAULT_MAX_CHARS
    column = text_column(src, text_field)
    stream = open_stream(src)
    texts: list[str] = []
    total = 0
    for index in range(stream.num_shards):
        for _rows, doc in shard_documents(src, stream, index, column, domain):
            texts.append(doc)
            total += len(doc)
            if max_chars is not None and total >= max_chars:
                return texts
    if not texts:
        raise no_text(src, column, domain)
    return texts


def no_text(src: Source, column: str, domain: str | None) -> CommuteError:
    return CommuteError(
        f"no text in {src.label!r}" + (f" (domain {domain})" if domain else ""),
        hint=f"the source holds no non-empty documents; check the files and their {column!r} column",
    )
