"""One error type for everything a user can fix.

The CLI prints ``error: <message> (hint: <hint>)`` on one line and exits with ``exit_code``:
2 for bad input (the default), 1 for a failure while running. Any other exception is a bug
and keeps its traceback only under ``--debug``.
"""

from __future__ import annotations


class CommuteError(Exception):
    """A failure the user can act on: what is wrong, and what to do about it."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 2) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def one_line(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return " ".join(text.split())
