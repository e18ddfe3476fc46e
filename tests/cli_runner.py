"""Run the real `commute` entry point in-process (argument rewriting, one-line errors, exit codes)."""

from __future__ import annotations

import signal

from commute_cli.cli import main


def cli(argv: list, capsys) -> tuple[int, str, str]:
    """`commute *argv`; returns (exit code, stdout, stderr) captured by pytest's ``capsys``."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as ex:
        code = int(ex.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def terminal_sigint() -> None:
    """In the child, before exec: SIGINT as a terminal delivers it (default action, not blocked). A test
    runner's worker may ignore or block it, and a child inherits both; Python then never raises
    KeyboardInterrupt, which is what these tests check."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
