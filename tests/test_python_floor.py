"""The Python version pyproject.toml promises (``requires-python``) is one the package runs on.

Every module of ``commute_cli`` is scanned for standard-library names newer than Python 3.10, from a small
explicit list (:data:`NEWER`); the stated floor must be at least the newest version any of them needs, and
ruff's ``target-version`` must say the same floor. The list is not exhaustive: it holds the names this
code base uses or is likely to reach for; add a name when the code starts to use another.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "commute_cli"

NEWER: dict[tuple[str, str | None], tuple[int, int]] = {
    ("enum", "StrEnum"): (3, 11),
    ("datetime", "UTC"): (3, 11),
    ("tomllib", None): (3, 11),
    ("typing", "Self"): (3, 11),
    ("typing", "Never"): (3, 11),
    ("typing", "LiteralString"): (3, 11),
    ("typing", "assert_never"): (3, 11),
    ("typing", "NotRequired"): (3, 11),
    ("typing", "Required"): (3, 11),
    ("hashlib", "file_digest"): (3, 11),
    ("builtins", "ExceptionGroup"): (3, 11),
    ("builtins", "BaseExceptionGroup"): (3, 11),
    ("syntax", "except*"): (3, 11),
    ("typing", "override"): (3, 12),
    ("itertools", "batched"): (3, 12),
    ("warnings", "deprecated"): (3, 13),
}
"""(module, name) -> the first Python version that has it (``None``: the module itself)."""


def newer_names(source: str) -> set[tuple[str, str | None]]:
    """The entries of :data:`NEWER` a module's source uses: ``from M import N``, ``import M``, ``M.N``
    (after ``import M``), the builtins by name and ``except*``."""
    tree = ast.parse(source)
    modules = {m for m, _ in NEWER}
    imported: dict[str, str] = {}  # local name -> module, for `import M` / `import M as X`
    found: set[tuple[str, str | None]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules:
                    imported[a.asname or a.name] = a.name
                    if (a.name, None) in NEWER:
                        found.add((a.name, None))
        elif isinstance(node, ast.ImportFrom) and node.module in modules and not node.level:
            found |= {(node.module, a.name) for a in node.names if (node.module, a.name) in NEWER}
            if (node.module, None) in NEWER:
                found.add((node.module, None))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            key = (imported.get(node.value.id, ""), node.attr)
            if key in NEWER:
                found.add(key)
        elif isinstance(node, ast.Name) and ("builtins", node.id) in NEWER:
            found.add(("builtins", node.id))
        elif type(node).__name__ == "TryStar":
            found.add(("syntax", "except*"))
    return found


def stated_floor() -> tuple[int, int]:
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    match = re.fullmatch(r"\s*>=\s*(\d+)\.(\d+)\s*", spec)
    assert match, f"requires-python {spec!r}: expected the form '>=3.X'"
    return int(match[1]), int(match[2])


def needed() -> dict[str, tuple[int, int]]:
    """``module path: name`` -> the version it needs, over the whole package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, name in newer_names(path.read_text()):
            out[f"{path.relative_to(ROOT)}: {module}.{name or ''}".rstrip(".")] = NEWER[(module, name)]
    return out


def test_requires_python_covers_every_name_the_package_uses() -> None:
    floor = stated_floor()
    uses = needed()
    too_new = {where: v for where, v in uses.items() if v > floor}
    assert not too_new, f"requires-python >={floor[0]}.{floor[1]}, but the package uses " + "; ".join(
        f"{where} (needs {v[0]}.{v[1]})" for where, v in sorted(too_new.items())
    )
    # the names that set today's floor are still found, so the scan is not silently blind
    assert max(uses.values(), default=(3, 0)) >= (3, 11)
    assert floor >= (3, 11)


def test_ruff_targets_the_stated_floor() -> None:
    floor = stated_floor()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["ruff"]["target-version"] == f"py{floor[0]}{floor[1]}"
    mypy_version = config["tool"].get("mypy", {}).get("python_version")
    assert mypy_version in (None, f"{floor[0]}.{floor[1]}")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from enum import StrEnum\n", {("enum", "StrEnum")}),
        ("import datetime\nx = datetime.UTC\n", {("datetime", "UTC")}),
        ("import datetime as dt\nx = dt.UTC\n", {("datetime", "UTC")}),
        ("from datetime import UTC, datetime\n", {("datetime", "UTC")}),
        ("import tomllib\n", {("tomllib", None)}),
        ("try:\n    pass\nexcept* ValueError:\n    pass\n", {("syntax", "except*")}),
        ("raise ExceptionGroup('x', [])\n", {("builtins", "ExceptionGroup")}),
        ("from datetime import datetime, timezone\nx = datetime.now(timezone.utc)\n", set()),
    ],
)
def test_the_scan_sees_newer_names(source: str, expected: set) -> None:
    assert newer_names(source) == expected
