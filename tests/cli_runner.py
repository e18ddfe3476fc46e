"""Run the real `commute` entry point in-process (argument rewriting, one-line errors, exit codes)."""

from __future__ import annotations

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
