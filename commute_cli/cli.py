"""Command-line interface: parse arguments, call one function, render. No math and no I/O logic here."""

from __future__ import annotations

import sys

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

_DEBUG = False


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
    global _DEBUG
    _DEBUG = debug


def main() -> None:
    """Entry point of the ``commute`` console script and ``python -m commute_cli``."""
    try:
        app(standalone_mode=False)
    except CommuteError as err:
        if _DEBUG:
            raise
        typer.echo(err.one_line(), err=True)
        sys.exit(err.exit_code)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
