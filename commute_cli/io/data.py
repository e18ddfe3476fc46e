"""Domains: ``name=source`` specs and their sources (local files and folders, saved datasets, hub datasets).

Domain data goes through three modules of ``io``:

- this one: the ``name=source`` and ``name=column`` specs, a source resolved to its files (or hub dataset)
  and their format, and a source's fingerprint;
- :mod:`commute_cli.io.documents`: reading a source's documents through ``datasets`` (``load_texts``);
- :mod:`commute_cli.io.sampling`: token blocks: ``analyze``'s bounded seeded draw (``sample_domain``),
  packing (``pack_blocks``, ``cached_blocks``) and the tokenizer guard.

Sources (:data:`SUPPORTED_FORMATS_TEXT`): a local file or a folder (searched recursively, hidden entries
skipped) of files of one kind -- JSON lines or JSON (``.jsonl``, ``.ndjson``, ``.json``), text (``.txt``),
CSV (``.csv``), each also compressed as ``.gz``, ``.bz2``, ``.xz``, ``.zst``/``.zstd`` or ``.lz4``
(decompressed by ``datasets`` while streaming), Parquet (``.parquet``), Arrow (``.arrow``) -- or a
``Dataset.save_to_disk`` folder, or a hub dataset. Names such as ``c4-train.00000-of-01024.json.gz`` and
``c4-ru.tfrecord-00000-of-01024.json.gz`` are read by their last two suffixes.

Decisions worth knowing (also why):

- The text column is ``text`` unless named per domain (``text_field``; CLI ``--text-field code=content``).
  A source without it is refused with its columns listed, not guessed: corpora hold several string columns
  (``url``, ``path``, ``title``, ...), and a silently wrong column makes a plausible-looking analysis.
- A local path always wins over a hub name or alias: ``en=c4`` reads ``./c4`` when that exists.
- Hub sources (``c4`` -> ``allenai/c4`` config ``en``; ``mc4`` -> ``allenai/c4`` with the domain name as the
  language config; ``owner/name`` or ``owner/name:config``) are streamed through the same draw.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from commute_cli.errors import CommuteError

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

DEFAULT_TEXT_FIELD = "text"


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
        for compression in sorted({k[1] for k in kinds if k is not None and k[1] is not None}):
            _check_compression(compression, files[0])
        return Source(source, "files", builder=kinds[0][0], files=files, root=path)
    target = _hub_target(source, domain)
    if target is None:
        raise CommuteError(
            f"data source {str(path)!r}" + (f" (domain {domain})" if domain else "") + " does not exist",
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


# ----------------------------------------------------------------------------------------------- fingerprint


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
            for chunk in iter(functools.partial(fh.read, 1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
