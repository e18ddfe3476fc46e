"""Reading files a trainer wrote, safely: JSON, safetensors headers, and pickles through ``weights_only``.

Every reader of checkpoint files goes through these functions, so the safety rules live in one place:

- a ``.pt``/``.bin`` pickle is only ever read with ``torch.load(weights_only=True)``, which admits tensors,
  plain containers and numbers and refuses any other global (no code runs); a format whose pickle names a
  few other globals (Megatron-LM's ``argparse.Namespace``) is read by :func:`torch_load_allowing`, which
  builds only the plain-data classes its caller names and keeps the rest as inert records, never running them;
- a safetensors file is opened with ``safetensors.safe_open``, which checks the header, the tensor offsets
  and the file size without reading the tensor data;
- a JSON file that does not parse is one line naming the file, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from commute_cli.errors import CommuteError


def _one_line(err: BaseException, limit: int = 200) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:limit]}"


def read_json(file: Path, what: str) -> Any:
    """The parsed JSON of ``file``; CommuteError naming ``what`` and the file when it does not parse."""
    try:
        return json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CommuteError(
            f"could not read {what} {file}: {err}", hint="the file is damaged; re-save it"
        ) from err


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors file, from its header only (``safe_open``).

    ``safe_open`` refuses a header that does not parse, offsets that overlap or leave gaps, and a file whose
    size differs from what the header indexes (truncated or with trailing bytes). Raises CommuteError.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118
    except Exception as err:
        raise CommuteError(
            f"weights file {file} is truncated or not a safetensors file ({_one_line(err)})",
            hint="re-copy or re-save the checkpoint",
        ) from err


def torch_load(file: Path, what: str = "file", hint: str | None = None, mmap: bool | None = None) -> Any:
    """``torch.load(file, weights_only=True)`` on the CPU; anything else in the pickle is refused.

    ``mmap`` (default: when the file is a zip archive) keeps the tensor data on disk until it is used, so a
    check or a metadata read costs little memory. Raises CommuteError naming the file.
    """
    import torch

    file = Path(file)
    use_mmap = zipfile.is_zipfile(file) if mmap is None else mmap
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=use_mmap)
    except Exception as err:
        raise CommuteError(
            f"refusing to load {what} {file}: it does not load with torch.load(weights_only=True) "
            f"({_one_line(err, 160)})",
            hint=hint
            or "it may contain code; convert the checkpoint to safetensors from a trusted environment",
        ) from err


class InertRecord:
    """What a pickle built from a global that commute does not run: the arguments it was called with and the
    state it was given, kept as data. Subclasses carry the global's dotted name in ``name``."""

    name = ""
    args: tuple[Any, ...]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> InertRecord:
        record = object.__new__(cls)
        record.args = args
        record.state = None
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.name} (not unpickled)>"


_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


@contextlib.contextmanager
def _only_safe_globals(safe: Sequence[Any]) -> Iterator[None]:
    """``torch.serialization.safe_globals(safe)`` with the process-wide allowlist set aside meanwhile, so
    that what a load may build is ``safe`` and nothing another library registered."""
    import torch

    registered = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with torch.serialization.safe_globals(list(safe)):
            yield
    finally:
        torch.serialization.add_safe_globals(registered)


def torch_load_allowing(
    file: Path,
    what: str,
    allow: Sequence[type],
    inert: Callable[[str], bool],
    hint: str,
    mmap: bool | None = None,
) -> Any:
    """``torch.load(weights_only=True)`` of a pickle that also holds a few named non-tensor objects.

    ``allow``: classes built as themselves (``torch.serialization.safe_globals``; each must be plain
    data, e.g. ``argparse.Namespace``). ``inert(name)``: globals read as :class:`InertRecord` under their
    own name, so the objects they describe (an RNG's numpy state, a trainer's enum) are kept as arguments
    and nothing of theirs runs. Any other global is refused with one line naming it. The pickle's globals
    are found the way torch reports them (one per refused load; at most 32), so the rules hold for old and
    zip-format files alike. The allowlist is exactly this one: classes that a library imported in this process
    allowlisted for itself (``torch.serialization.add_safe_globals``, e.g. megatron-core's enums) are set
    aside for the load and restored after it.
    """
    import torch

    file = Path(file)
    use_mmap = zipfile.is_zipfile(file) if mmap is None else mmap
    records: dict[str, type] = {}
    for _ in range(32):
        safe: list[Any] = [*allow, *((cls, name) for name, cls in records.items())]
        try:
            with _only_safe_globals(safe):
                return torch.load(file, map_location="cpu", weights_only=True, mmap=use_mmap)
        except Exception as err:
            found = _UNSUPPORTED_GLOBAL.search(str(err))
            name = found.group(1) if found else None
            if name is None or name in records or not inert(name):
                detail = f"it needs {name}, which commute does not unpickle" if name else _one_line(err, 160)
                raise CommuteError(f"refusing to load {what} {file}: {detail}", hint=hint) from err
            records[name] = type(name.rsplit(".", 1)[-1], (InertRecord,), {"name": name})
    raise CommuteError(f"refusing to load {what} {file}: it names too many globals", hint=hint)
