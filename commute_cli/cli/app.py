"""The typer application of every command: its name and help, the choice types of the flags, the
``--debug``/``--version`` root options, and what one invocation remembers (for the error boundary and the
resume hints)."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

import typer

from commute_cli import __version__
from commute_cli.errors import CommuteError

app = typer.Typer(
    name="commute",
    help=(
        "Checkpoint analyzer for multi-domain training. At each saved checkpoint it evaluates the "
        "Lie-bracket criterion of 'Commute your domains' (gradients and Hessian-vector products of the "
        "per-domain losses) and tells where the domain-weight schedule was locally suboptimal, which "
        "way to shift weights, and how much loss that is worth, with error bars."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@dataclass
class Invocation:
    """This invocation: ``--debug`` (full tracebacks), and the arguments after ``commute`` (resume hints)."""

    debug: bool = False
    argv: list[str] = field(default_factory=list)


INVOCATION = Invocation()


class Format(StrEnum):
    """``--format``: a table on the terminal, or data only (csv/json) on stdout."""

    table = "table"
    csv = "csv"
    json = "json"


class AdviceKind(StrEnum):
    """``recommend --kind``: a measured late-phase schedule, or the local swaps around checkpoints."""

    phases = "phases"
    local = "local"


class Metric(StrEnum):
    euclid = "euclid"
    adam = "adam"


class Hvp(StrEnum):
    rr = "rr"
    fr = "fr"
    fd = "fd"  # finite differences of two gradients (engine.fd_hvp): fused attention, checked against rr


class Plan(StrEnum):
    auto = "auto"
    pair = "pair"
    target = "target"


class Device(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Offload(StrEnum):
    auto = "auto"
    on = "on"
    off = "off"


class Optimizer(StrEnum):
    adamw = "adamw"
    sgd = "sgd"


class LrSchedule(StrEnum):
    constant = "constant"
    cosine = "cosine"


class PlotKind(StrEnum):
    criterion = "criterion"
    pairs = "pairs"
    decomposition = "decomposition"
    orders = "orders"


_F = TypeVar("_F", bound=Callable[..., Any])


def help_paragraphs(command: _F) -> _F:
    """A command whose ``--help`` text is its docstring as paragraphs: the lines of each paragraph (blank
    line separated) are joined, so the terminal wraps them, not the source's line breaks (typer's rich
    help keeps single newlines after the first paragraph, and the command list shows the first
    paragraph as written). Every command function gets this decorator."""
    doc = inspect.cleandoc(command.__doc__ or "")
    paragraphs = [" ".join(line.strip() for line in p.splitlines()) for p in doc.split("\n\n")]
    command.__doc__ = "\n\n".join(p for p in paragraphs if p)
    return command


def alias(new: int | None, old: int | None, new_flag: str, old_flag: str) -> int | None:
    """The value of a renamed option: the new flag, or its hidden old name (not both)."""
    if old is None:
        return new
    if new is not None:
        raise CommuteError(
            f"{old_flag} is the old name of {new_flag}: give one of them", hint=f"use {new_flag}"
        )
    return old


def _version(value: bool) -> None:
    if value:
        typer.echo(f"commute {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    INVOCATION.debug = debug


def interrupted(ex: KeyboardInterrupt, fallback: str) -> None:
    """Ctrl-C inside a command: one line saying what was kept and how to resume, exit 130."""
    typer.echo(str(ex) if str(ex) else fallback, err=True)
    sys.exit(130)
