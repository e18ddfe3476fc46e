"""The entry point: the commands registered in their help order, the multi-value flags, and the one error
boundary (exit codes, one-line errors, click's usage errors)."""

from __future__ import annotations

import os
import sys

import typer

from commute_cli.cli.analyze import analyze_command
from commute_cli.cli.app import INVOCATION, app
from commute_cli.cli.results import help_command, plot_command, recommend_command, toy_command
from commute_cli.cli.train import train_command, validate_command
from commute_cli.errors import CommuteError

for _name, _command in (
    ("toy", toy_command),
    ("analyze", analyze_command),
    ("train", train_command),
    ("validate", validate_command),
    ("recommend", recommend_command),
    ("plot", plot_command),
    ("help", help_command),
):
    app.command(_name)(_command)

#: options that take several values after one flag (``--domains en=a ru=b``), which click lacks
_MULTI_VALUE_OPTIONS = ("--domains", "--weights", "--eval-domains", "--text-field")


def expand_multi_value(argv: list[str]) -> list[str]:
    """``--domains a=x b=y`` -> ``--domains a=x --domains b=y``: values are the following ``name=...``
    tokens (a value must contain '=', so a positional path after them is left alone)."""
    out: list[str] = []
    current: str | None = None
    for tok in argv:
        if tok in _MULTI_VALUE_OPTIONS:
            current = tok
            out.append(tok)
            continue
        if current is not None and not tok.startswith("-") and "=" in tok and out[-1] != current:
            out.append(current)
        elif tok.startswith("-") or "=" not in tok:
            current = None
        out.append(tok)
    return out


def _is_click_error(exc: BaseException) -> bool:
    """A click usage/parameter error from click itself or from the copy that typer bundles (typer._click):
    matched by class name, so it holds under every typer/click version."""
    return any(k.__name__ == "ClickException" for k in type(exc).__mro__)


def _show_click_error(exc: Exception) -> int:
    """Print a click usage error as one line with a hint (like every other commute error); its exit code.

    Plain ``commute`` (click's NoArgsIsHelpError) names the commands instead of printing the whole help.
    """
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) or "commute"
    if type(exc).__name__ == "NoArgsIsHelpError":
        names = ", ".join(sorted(c.name or "" for c in app.registered_commands))
        typer.echo(f"error: no command given (hint: one of {names}; see '{path} --help')", err=True)
        return 2
    try:
        message = exc.format_message()  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - every click error has it
        message = str(exc)
    message = " ".join(str(message).replace("Value error, ", "").split())
    typer.echo(f"error: {message} (hint: see '{path} --help')", err=True)
    code = int(getattr(exc, "exit_code", 2))
    return 2 if code == 1 else code


def _ended_process_group() -> bool:
    """Whether this process created and destroyed a process group (without importing torch for commands
    that never did: ``recommend`` and ``plot`` start without it)."""
    module = sys.modules.get("commute_cli.engine.distributed")
    return bool(module is not None and module.ended_own_group())


PIPE_CLOSED_EXIT = 141
"""Exit code when the reader of stdout or stderr went away (``| head``): 128 + SIGPIPE, as a Unix tool
killed by SIGPIPE reports it."""


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``commute`` console script and ``python -m commute_cli``.

    Exit codes: 0 done; 1 a failure while running (``CommuteError(exit_code=1)``); 2 bad input or usage
    (one line, or typer's usage panel); 130 interrupted (Ctrl-C); 141 (128 + SIGPIPE, like ``cat`` or
    ``yes`` in ``| head``) when the reader of stdout or stderr closed the pipe: the command stops at its next
    write, quietly (no traceback, no message), and files it had already written (``--out``) stay. A pipeline
    without ``set -o pipefail`` reports the last command's status, so ``commute analyze X | head -1`` exits 0.
    Tracebacks only under ``--debug``.

    A rank of a data-parallel run (torchrun) that created and destroyed its process group leaves with
    ``os._exit`` after flushing its output: every file is written and closed by then, and interpreter
    finalization with gloo's threads around can abort a finished rank (SIGABRT, which torchrun reports as
    the whole run failing).
    """
    try:
        _main(argv)
    except BrokenPipeError:
        _quiet_closed_streams()
        if _ended_process_group():
            os._exit(PIPE_CLOSED_EXIT)
        sys.exit(PIPE_CLOSED_EXIT)


def _pipe_closed() -> bool:
    """Whether typer (or click) met a closed stdout or stderr: it then wraps both streams in its
    ``PacifyFlushWrapper`` and exits 1, a code that would read as a failure of the command."""
    return any("PacifyFlushWrapper" in type(stream).__name__ for stream in (sys.stdout, sys.stderr))


def _quiet_closed_streams() -> None:
    """A stream whose flush fails (its reader went away) writes to /dev/null from now on, so the
    interpreter's last flush at exit cannot fail again (Python then prints 'Exception ignored' and exits
    120)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
            except (OSError, ValueError):  # no file descriptor (captured in-process): nothing to flush
                pass


def _main(argv: list[str] | None) -> None:
    try:
        _run(argv)
    except SystemExit as ex:
        if _pipe_closed():
            raise BrokenPipeError from ex
        code = ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
        if not _ended_process_group():
            sys.stdout.flush()  # a closed pipe fails here (BrokenPipeError), not at interpreter exit
            raise
        if ex.code is not None and not isinstance(ex.code, int):
            typer.echo(str(ex.code), err=True)
    else:
        sys.stdout.flush()
        if not _ended_process_group():
            return
        code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run(argv: list[str] | None) -> None:
    raw = list(sys.argv[1:] if argv is None else argv)
    INVOCATION.argv[:] = raw
    args = expand_multi_value(raw)
    try:
        code = app(args=args, standalone_mode=False, prog_name="commute")
    except CommuteError as err:
        if INVOCATION.debug:
            raise
        if not getattr(err, "silent", False):  # data parallel: another rank already printed it
            typer.echo(err.one_line(), err=True)
        sys.exit(err.exit_code)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if type(exc).__name__ == "Abort":  # click's Abort (EOF on a prompt)
            typer.echo("aborted", err=True)
            sys.exit(130)
        if _is_click_error(exc):
            sys.exit(_show_click_error(exc))
        raise
    if isinstance(code, int) and code != 0:  # typer turns Ctrl-C outside a command into Exit(130) -> 130
        if code == 130:
            typer.echo("interrupted", err=True)
        sys.exit(code)
