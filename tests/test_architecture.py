"""The package's dependency rule (docs/ARCHITECTURE.md), checked on the source.

- ``core``: pure math (numpy); imports nothing of the package but ``errors``, and no torch.
- ``engine`` (torch) and ``io`` (files): import only ``core`` (and their own layer).
- ``commands``: import ``core``, ``engine``, ``io`` and ``render``, and the services of their layer
  (``commands.options``, ``commands.stats``, ``commands.outputs``, ``commands.watch``,
  ``commands.validate_inputs``, ``commands.validate_branches``, ``commands.train_setup``);
  never ``cli``, never a command.
- ``render``: imports ``core`` only (and its own layer).
- nothing but ``__main__`` imports ``cli``.

Every ``import`` statement counts, including the function-local ones that keep start-up fast.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "commute_cli"

ALLOWED = {
    "core": {"core"},
    "engine": {"core", "engine"},
    "io": {"core", "io"},
    "render": {"core", "render"},
    "commands": {"core", "engine", "io", "render"},
    "cli": {"core", "engine", "io", "render", "commands", "cli"},
    "api": {"core", "engine", "io", "commands"},
    "__main__": {"cli"},
    "__init__": set(),
    "errors": set(),
}
ALWAYS = {"errors", "__init__"}  # the error type and the version string are the ground floor
#: modules of the commands layer that are not commands: the analyze options and the per-checkpoint statistics
#: service that analyze and validate share, validate's inputs and branches and train's set-up (split out of
#: validate.py and train.py to keep each module one idea); a command may import these, never another command
COMMAND_SERVICES = {
    "outputs",
    "watch",
    "options",
    "stats",
    "validate_inputs",
    "validate_branches",
    "train_setup",
    "continuations",
}
NOT_IN_CORE = {"torch", "transformers", "datasets", "safetensors", "tokenizers"}


def _layer(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path, package: Path = PACKAGE) -> list[tuple[int, str]]:
    """``(line, dotted module)`` for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = ["commute_cli", *path.relative_to(package).with_suffix("").parts]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level] + ([base] if base else []))
            if base == "commute_cli":  # a submodule, or a name of the package's __init__ (__version__)
                for a in node.names:
                    name = "__init__" if a.name.startswith("__") else a.name
                    found.append((node.lineno, f"commute_cli.{name}"))
            elif base.count(".") == 1 and base.startswith("commute_cli."):  # from commute_cli.layer import m
                found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, base))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _violations(path: Path, package: Path = PACKAGE) -> list[str]:
    layer = _layer(path, package)
    allowed = ALLOWED[layer] | ALWAYS
    bad = []
    for line, module in _imports(path, package):
        parts = module.split(".")
        if parts[0] == "commute_cli" and len(parts) > 1:
            target = parts[1]
            service = layer == "commands" and target == "commands" and len(parts) > 2
            if service and parts[2] in COMMAND_SERVICES and path.stem != parts[2]:
                continue
            if service and path.stem in COMMAND_SERVICES and parts[2] in COMMAND_SERVICES:
                continue
            if target not in allowed:
                bad.append(f"line {line}: {module}")
        elif layer == "core" and parts[0] in NOT_IN_CORE:
            bad.append(f"line {line}: {module} (core is numpy-only)")
    return bad


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_layer_imports_follow_the_rule(path: Path) -> None:
    bad = _violations(path)
    assert not bad, f"{path.relative_to(PACKAGE)} breaks the dependency rule: " + "; ".join(bad)


def test_the_rule_checker_sees_violations(tmp_path: Path) -> None:
    """The checker itself, on a throw-away package: each kind of violation is caught, a clean file is not."""
    pkg = tmp_path / "commute_cli"
    for sub in ("core", "commands", "render"):
        (pkg / sub).mkdir(parents=True)
    (pkg / "core" / "bad.py").write_text("import torch\ndef f():\n    from commute_cli.engine import x\n")
    (pkg / "commands" / "a.py").write_text(
        "from commute_cli.commands import b\nfrom .b import c\nfrom . import stats\n"
    )
    (pkg / "render" / "r.py").write_text("from ..io import data\n")
    (pkg / "core" / "good.py").write_text("import numpy as np\nfrom commute_cli.errors import CommuteError\n")
    assert len(_violations(pkg / "core" / "bad.py", pkg)) == 2
    assert _violations(pkg / "commands" / "a.py", pkg) == [
        "line 1: commute_cli.commands.b",
        "line 2: commute_cli.commands.b",
    ]
    assert _violations(pkg / "render" / "r.py", pkg) == ["line 1: commute_cli.io.data"]
    assert _violations(pkg / "core" / "good.py", pkg) == []


#: names that mean one thing each: defined (``def``, ``class`` or assignment at module level) in one module
#: of the package only, so two copies cannot drift apart; the others import it
ONE_DEFINITION = (
    "resolve_device",
    "TOKENIZER_FILES",
    "has_tokenizer",
    "checkpoint_step",
    "name_step",
    "read_json",
)


def _definitions(name: str, package: Path = PACKAGE) -> list[str]:
    where = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names = {node.name}
            elif isinstance(node, ast.Assign):
                names = {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names = {node.target.id}
            else:
                continue
            if name in names:
                where.append(f"{path.relative_to(package)}:{node.lineno}")
    return where


@pytest.mark.parametrize("name", ONE_DEFINITION)
def test_each_idea_is_defined_once(name: str) -> None:
    where = _definitions(name)
    assert len(where) == 1, f"{name} is defined in {len(where)} places: {', '.join(where)}"
