"""Torch distributed checkpoints (DCP: a folder with ``.metadata`` and ``__R_I.distcp`` files) read safely,
in one process, without a process group.

DCP is what ``torch.distributed.checkpoint.save`` writes: FSDP's ``SHARDED_STATE_DICT`` through the HF
Trainer / accelerate (:mod:`commute_cli.io.hf_fsdp`), torchtitan (:mod:`commute_cli.io.torchtitan`),
OLMo-core (:mod:`commute_cli.io.olmo_core`). Nested state dicts are saved flattened: a key such as
``optimizer.state.lm_head.weight.exp_avg_sq`` has the path ``("optimizer", "state", "lm_head.weight",
"exp_avg_sq")`` in the metadata's ``planner_data``; a tensor saved by several ranks is several chunks,
which torch's own loader (``torch.distributed.checkpoint.load``, ``no_dist=True``) assembles.

Safety (docs/DECISIONS.md, "DCP metadata through the weights_only unpickler"): torch itself reads
``.metadata`` with plain ``pickle.load`` and non-tensor entries with ``torch.load(weights_only=False)``.
commute does neither:

- ``.metadata`` (a protocol-4 pickle of torch's metadata dataclasses) is re-encoded, without executing
  anything, to protocol 2 (:func:`_protocol2`: drop ``FRAME``, ``STACK_GLOBAL`` -> ``GLOBAL``,
  ``SHORT_BINUNICODE`` -> ``BINUNICODE``, ``MEMOIZE`` -> ``LONG_BINPUT``) and read by torch's ``weights_only``
  unpickler with an explicit allowlist (``_metadata_classes``); anything else in it is refused with one line.
- tensors are read by torch's ``FileSystemReader`` (which uses ``torch.load(weights_only=True)``); non-tensor
  entries (``param_groups``) by ``torch.load(weights_only=True)`` in :class:`_SafePlanner`.
"""

from __future__ import annotations

import functools
import io
import pickletools
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from commute_cli.errors import CommuteError

METADATA = ".metadata"
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}


def is_dcp(folder: Path) -> bool:
    """A folder with DCP's ``.metadata`` and at least one ``.distcp`` data file."""
    folder = Path(folder)
    return (folder / METADATA).is_file() and any(folder.glob("*.distcp"))


def files(folder: Path) -> list[Path]:
    """``.metadata`` and the ``.distcp`` data files, sorted: what identifies the checkpoint's bytes."""
    folder = Path(folder)
    return [folder / METADATA, *sorted(folder.glob("*.distcp"))]


def mentions(folder: Path, *names: str) -> bool:
    """Whether ``.metadata`` holds each of ``names`` as a pickled string (a flat key or a path element).

    A byte search, nothing unpickled: what layout detection needs, cheaply, for every folder discovery
    looks at (reading metadata in full costs seconds at pretraining scale; ``benchmarks/bench_dcp.py``).
    The full, safe read (:func:`read_metadata`) checks what detection assumed.
    """
    try:
        data = (Path(folder) / METADATA).read_bytes()
    except OSError:
        return False
    for name in names:
        raw = name.encode("utf-8")
        short = b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else None  # SHORT_BINUNICODE
        if not ((short is not None and short in data) or b"X" + struct.pack("<I", len(raw)) + raw in data):
            return False
    return True


def _metadata_classes() -> list[Any]:
    import pathlib

    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    return [
        md.Metadata,
        md.TensorStorageMetadata,
        md.BytesStorageMetadata,
        md.ChunkStorageMetadata,
        md.TensorProperties,
        md.MetadataIndex,
        md.StorageMeta,
        md._MEM_FORMAT_ENCODING,
        fs._StorageInfo,
        torch.Size,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
    ]


def _binunicode(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _protocol2(data: bytes) -> bytes:
    """The same pickle in protocol 2, the opcodes torch's ``weights_only`` unpickler reads; nothing is run.

    Framing is dropped; ``STACK_GLOBAL`` becomes ``GLOBAL`` of the two strings pushed before it (those two
    pushes are kept off the output stack; where such a string is fetched again it is written out again:
    strings are immutable, so the value is the same); other strings become ``BINUNICODE``; ``MEMOIZE``
    becomes ``LONG_BINPUT`` with its own numbering, fetches ``LONG_BINGET``. Raises ValueError on a stream
    it does not understand.
    """
    ops = list(pickletools.genops(data))
    operands: set[int] = set()  # positions of the pushes STACK_GLOBAL consumes
    for j, (op, _, _) in enumerate(ops):
        if op.name == "STACK_GLOBAL":
            k, found = j - 1, 0
            while k >= 0 and found < 2:
                if ops[k][0].name != "MEMOIZE":
                    operands.add(k)
                    found += 1
                k -= 1
            if found < 2:
                raise ValueError("STACK_GLOBAL without its module and name strings")
    out = bytearray(b"\x80\x02")
    memo: dict[int, tuple[int | None, str | None]] = {}  # input memo index -> (output index, text if a str)
    pending: list[str] = []  # STACK_GLOBAL's operands, off the output stack
    new_index = 0
    last: tuple[bool, str | None] = (False, None)  # (the previous push was an operand, its text if a str)
    for i, (op, arg, pos) in enumerate(ops):
        name = op.name
        if name in ("PROTO", "FRAME"):
            continue
        ref = arg if isinstance(arg, int) else -1
        if name in ("BINGET", "LONG_BINGET") and ref not in memo:
            raise ValueError(f"memo index {arg} fetched before it was stored")
        if i in operands:
            text = (
                str(arg) if name in _STRINGS else memo[ref][1] if name in ("BINGET", "LONG_BINGET") else None
            )
            if text is None:
                raise ValueError("STACK_GLOBAL of something other than two strings")
            pending.append(text)
            last = (True, text)
            continue
        if name == "MEMOIZE":
            if last[0]:
                memo[len(memo)] = (None, last[1])
            else:
                memo[len(memo)] = (new_index, last[1])
                out.extend(b"r" + struct.pack("<I", new_index))  # LONG_BINPUT
                new_index += 1
            continue
        last = (False, None)
        if name == "STACK_GLOBAL":
            module, attr = pending[-2], pending[-1]
            del pending[-2:]
            if "\n" in module or "\n" in attr:
                raise ValueError("a global's name holds a newline")
            out.extend(b"c" + module.encode() + b"\n" + attr.encode() + b"\n")  # GLOBAL
        elif name in _STRINGS:
            out.extend(_binunicode(str(arg)))
            last = (False, str(arg))
        elif name in ("BINGET", "LONG_BINGET"):
            index, text = memo[ref]
            if index is not None:
                out.extend(b"j" + struct.pack("<I", index))  # LONG_BINGET
            elif text is not None:
                out.extend(_binunicode(text))
        elif name in ("BINPUT", "LONG_BINPUT", "PUT", "GET"):
            raise ValueError(f"{name} in a protocol-4 stream")
        else:
            end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
            out.extend(data[pos:end])
    if pending:
        raise ValueError("strings left for a STACK_GLOBAL that never came")
    return bytes(out)


def read_metadata(folder: Path) -> Any:
    """The ``torch.distributed.checkpoint.metadata.Metadata`` of a DCP folder, read with torch's
    ``weights_only`` unpickler and an explicit allowlist (see the module docstring); CommuteError otherwise.
    Read once per file version (path, size, mtime): discovery, preflight and loading all ask for it.
    """
    file = Path(folder) / METADATA
    try:
        st = file.stat()
    except OSError as err:
        raise CommuteError(f"cannot read {file}: {err}", hint="the checkpoint is incomplete") from err
    return _read_metadata(str(file), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_metadata(name: str, size: int, mtime_ns: int) -> Any:
    from torch import _weights_only_unpickler
    from torch.distributed.checkpoint.metadata import Metadata

    del size, mtime_ns  # part of the cache key only
    file = Path(name)
    try:
        data = file.read_bytes()
        encoded = _protocol2(data)
        with torch.serialization.safe_globals(_metadata_classes()):
            meta = _weights_only_unpickler.Unpickler(io.BytesIO(encoded)).load()
    except Exception as err:
        text = " ".join(str(err).split())[:200]
        raise CommuteError(
            f"refusing to read {file}: it is not torch distributed-checkpoint metadata that loads with "
            f"the weights_only unpickler ({type(err).__name__}: {text})",
            hint="commute never unpickles arbitrary objects; re-save the checkpoint with "
            "torch.distributed.checkpoint.save from a trusted environment",
        ) from err
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise CommuteError(f"{file} is not torch distributed-checkpoint metadata")
    return meta


@dataclass(frozen=True)
class Entry:
    """One saved entry: its flat key, its path in the nested state dict, and (tensors) shape and dtype."""

    key: str
    path: tuple[Any, ...]
    shape: tuple[int, ...] | None  # None for a non-tensor entry (saved as bytes)
    dtype: torch.dtype | None


def entries(folder: Path) -> dict[str, Entry]:
    """Flat key -> :class:`Entry` for everything saved in a DCP folder (metadata only, no data read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = read_metadata(folder)
    planner = meta.planner_data if isinstance(meta.planner_data, dict) else {}
    out: dict[str, Entry] = {}
    for key, value in meta.state_dict_metadata.items():
        path = tuple(planner.get(key, (key,)))
        if isinstance(value, TensorStorageMetadata):
            out[key] = Entry(str(key), path, tuple(int(s) for s in value.size), value.properties.dtype)
        else:
            out[key] = Entry(str(key), path, None, None)
    return out


def _reader_and_planner(folder: Path) -> tuple[Any, Any]:
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    class _SafeReader(FileSystemReader):
        """torch's reader, with ``.metadata`` read through :func:`read_metadata`."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:
                raise CommuteError(f"{folder} has per-rank metadata, which commute does not read")
            return read_metadata(folder)

    class _SafePlanner(DefaultLoadPlanner):
        """torch's planner, with non-tensor entries read by ``torch.load(weights_only=True)``."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            from torch.distributed.checkpoint._nested_dict import set_element

            obj = torch.load(value, map_location="cpu", weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return _SafeReader(str(folder)), _SafePlanner()


def load(folder: Path, keys: Collection[str]) -> dict[str, Any]:
    """The saved values of ``keys`` (flat keys, see :func:`entries`): tensors on the CPU in their saved
    dtype, chunks of several ranks assembled; non-tensor entries as plain Python values.

    One process, no process group (``no_dist=True``). CommuteError naming the folder when a key is absent
    or the data files do not load.
    """
    import warnings

    import torch.distributed.checkpoint as dist_cp

    folder = Path(folder)
    known = entries(folder)
    missing = [k for k in keys if k not in known]
    if missing:
        raise CommuteError(f"{folder} has no saved entry {missing[0]!r}", hint="the checkpoint is incomplete")
    state: dict[str, Any] = {}
    for key in keys:
        entry = known[key]
        state[key] = torch.empty(entry.shape, dtype=entry.dtype) if entry.shape is not None else None
    reader, planner = _reader_and_planner(folder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
            dist_cp.load(state, storage_reader=reader, planner=planner, no_dist=True)
    except CommuteError:
        raise
    except Exception as err:
        text = " ".join(str(err).split())[:200]
        raise CommuteError(
            f"could not read the distributed checkpoint {folder}: {type(err).__name__}: {text}",
            hint="a .distcp file is missing, truncated or not loadable with weights_only; re-copy the folder",
        ) from err
    return state
