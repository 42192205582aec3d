"""How every diffprobe CLI reports a user's mistake: one line on stderr, exit code 2.

    with user_errors(): ...                        # a DiffprobeError -> "error: ..." and exit 2
    app = typer.Typer(cls=OneLineErrors, ...)      # click's usage errors get the same one line

`OneLineErrors` also tidies every command's ``--help``: flags show no ``<bool>`` metavar, and
an option documented as overriding a config key, e.g. "(extract.blocks)", shows that key's
built-in default.
"""

from __future__ import annotations

import contextlib
import re

import typer
from rich.console import Console
from rich.markup import escape
from typer._click import exceptions as usage  # typer vendors click: its errors are typer._click's, not click's
from typer.core import TyperGroup, TyperOption

from .errors import DiffprobeError

err = Console(stderr=True)


@contextlib.contextmanager
def user_errors():
    """Turn a DiffprobeError into one line on stderr and exit code 2."""
    try:
        yield
    except DiffprobeError as e:
        error_line(str(e))
        raise typer.Exit(2) from None


@contextlib.contextmanager
def stopping(bar):
    """``with stopping(bar):`` stops a rich progress ``bar`` on leaving, if it was ever shown:
    stopping a bar that never started prints an empty line (e.g. after a one-line error)."""
    try:
        yield bar
    finally:
        if bar.live.is_started:
            bar.stop()


def error_line(message: str) -> None:
    err.print("[red]error:[/red]", escape(message), highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """One warning line on stderr, in the same form as the errors."""
    err.print("[yellow]warning:[/yellow]", escape(message), highlight=False, soft_wrap=True)


def _allowed(param) -> str | None:
    """The allowed range of a ranged option (``min=``/``max=``), in words."""
    lo, hi = getattr(param, "min", None), getattr(param, "max", None)
    if lo is not None and hi is not None:
        return f"{lo}-{hi}"
    if lo is not None or hi is not None:
        return f"{lo} or more" if lo is not None else f"{hi} or less"
    return None


def _given(e: Exception) -> str | None:
    """The value the user gave, from the validation error behind a typer BadParameter."""
    errors = getattr(e.__cause__, "errors", None)
    try:
        return str(errors()[0]["input"]) if errors else None
    except (IndexError, KeyError, TypeError):
        return None


_BLOCK_OPTIONS = {"--block", "--blocks", "--target"}


def usage_line(e: usage.UsageError) -> str:
    """A click usage error in the project's words: the option, what was wrong, what is allowed."""
    param = getattr(e, "param", None)
    if isinstance(e, usage.MissingParameter) and param is not None:
        return f"{_name(param)}: required; see --help"
    if isinstance(e, usage.BadParameter) and param is not None:
        name = _name(param)
        allowed = _allowed(param)
        given = _given(e)
        if allowed and given is not None:
            message = f"{given} is out of range"
        else:
            message = e.message.rstrip(".")
            message = f"{given}: {message[:1].lower()}{message[1:]}" if given is not None else message
        hint = "; `extract blocks --store S` lists a store's blocks" if name in _BLOCK_OPTIONS else ""
        return f"{name}: {message}" + (f"; allowed: {allowed}" if allowed else "") + hint
    text = e.format_message().strip().rstrip(".")
    return text[:1].lower() + text[1:]


def _name(param) -> str:
    return max(param.opts, key=len) if param.opts else str(param.name)


@contextlib.contextmanager
def _one_line():
    try:
        yield
    except usage.NoArgsIsHelpError:
        raise
    except usage.UsageError as e:
        error_line(usage_line(e))
        raise typer.Exit(2) from None


_CONFIG_KEY = re.compile(r"\(([a-z]+)\.([a-z_]+)\b")


def _default_of(section: str, key: str) -> str | None:
    from .config import Config

    value = getattr(getattr(Config(), section, None), key, None)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        from .ranges import format_int_list

        return format_int_list(value) if all(isinstance(v, int) for v in value) else ",".join(map(str, value))
    return str(value)


def tidy_help(command, ctx) -> None:
    """Flags without a ``<bool>`` metavar; an option naming a config key shows its built-in default."""
    for param in command.get_params(ctx):
        if not isinstance(param, TyperOption):
            continue
        if param.is_flag and param.metavar is None:
            param.metavar = ""
        if param.default is None and not isinstance(param.show_default, str) and param.help:
            m = _CONFIG_KEY.search(param.help)
            default = _default_of(*m.groups()) if m else None
            if default is not None:
                param.show_default = default


class OneLineErrors(TyperGroup):
    """A typer group whose usage mistakes (a value out of range, an option missing or unknown)
    print the project's one line and exit 2, not click's usage box; and whose commands' help
    is tidied (`tidy_help`)."""

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx):
        with _one_line():
            return super().invoke(ctx)

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            tidy_help(command, ctx)
        return command

    def format_help(self, ctx, formatter):
        tidy_help(self, ctx)
        return super().format_help(ctx, formatter)
