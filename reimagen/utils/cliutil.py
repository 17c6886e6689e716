"""What every command line of the project shares: bad input ends as one red line on stderr and exit code 2.

It sits here, below every package's command line (the model's, retrieval's, the benchmarks', the human
evaluation's, the toy world's), so that each of them can also run on its own (``python -m evaluation.cli fid``
under ``torchrun``) with the same behaviour as under ``reimagen-eval``."""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import typer
from rich.console import Console
from rich.markup import escape

from .atomic import DiskFullError, is_disk_full

err_console = Console(stderr=True)

#: Exceptions that mean bad input or an unusable file, never a bug: FloatingPointError is the sampler's
#: NonFiniteError (unstable guidance weights, an untrained checkpoint), PermissionError a refused rater token.
BAD_INPUT = (ValueError, FileNotFoundError, PermissionError, RuntimeError, ImportError, KeyError, FloatingPointError)


#: Removed or renamed command-line options that keep working, with a warning naming the new spelling, for one
#: minor version (docs/install.md, "Deprecations"): "command --old" -> (the new spelling, the version that drops it).
DEPRECATED_OPTIONS: dict[str, tuple[str, str]] = {
    "fid --no-kid": ("--metrics without kid, e.g. --metrics fid", "0.3"),
}


def warn_deprecated(spelling: str) -> None:
    """The warning of a deprecated option (a key of ``DEPRECATED_OPTIONS``), on stderr."""
    new, until = DEPRECATED_OPTIONS[spelling]
    err_console.print(f"[yellow]warning:[/] {spelling} is deprecated and stops working in {until}; use {new}",
                      soft_wrap=True, highlight=False)


def warn_renamed(old: str, new: str, until: str = "0.3") -> None:
    """The warning of a renamed option as the user wrote it (``old``), with the new spelling, on stderr."""
    err_console.print(f"[yellow]warning:[/] {old} is deprecated and stops working in {until}; use {new}",
                      soft_wrap=True, highlight=False)


def given_options(ctx: Any, names: Sequence[str]) -> list[str]:
    """The options among ``names`` (parameter names) that the user set (command line or environment), spelled as
    flags: what a model kind that has no use for them refuses by name."""
    given = []
    for name in names:
        src = ctx.get_parameter_source(name)  # by name: typer may carry its own copy of click's enum
        if getattr(src, "name", None) in ("COMMANDLINE", "ENVIRONMENT", "PROMPT"):
            given.append("--" + name.replace("_", "-"))
    return given


def friendly(fn: Callable) -> Callable:
    """Run a command; a ``BAD_INPUT`` exception becomes one red line (a multi-line message joined) and exit 2,
    and so does a full disk, named with the file being written."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:  # a chosen exit code (click's Exit is a RuntimeError: not bad input)
            raise
        except BAD_INPUT as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            _fail(str(msg))
        except OSError as err:
            if not is_disk_full(err):
                raise
            _fail(str(err) if isinstance(err, DiskFullError) else str(DiskFullError(err.filename or "a file", err)))

    return wrapper


def _fail(message: str) -> None:
    line = " ".join(message.split())
    err_console.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True, highlight=False)
    raise typer.Exit(2) from None
