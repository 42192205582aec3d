"""How every diffprobe CLI reports a user's mistake: one line on stderr, exit code 2."""

from __future__ import annotations

import contextlib

import typer
from rich.console import Console
from rich.markup import escape

from .errors import DiffprobeError

err = Console(stderr=True)


@contextlib.contextmanager
def user_errors():
    """Turn a DiffprobeError into one line on stderr and exit code 2."""
    try:
        yield
    except DiffprobeError as e:
        err.print("[red]error:[/red]", escape(str(e)), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def warn(message: str) -> None:
    """One warning line on stderr, in the same form as the errors."""
    err.print("[yellow]warning:[/yellow]", escape(message), highlight=False, soft_wrap=True)
