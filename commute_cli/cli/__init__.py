"""Command-line interface: parse arguments, call one function, render. No math and no I/O logic here.

typer only, one module per command group: ``app`` (the typer app and the flags' choice types), ``analyze``,
``train`` (train and validate), ``results`` (toy, recommend, plot, help), ``entry`` (``main``, the error
boundary). ``commute_cli.cli:main`` is the console script.
"""

from commute_cli.cli.entry import main

__all__ = ["main"]
