"""What every command line of the project shares: bad input ends as one red line on stderr and exit code 2.

It sits here, below every package's command line (the model's, retrieval's, the benchmarks', the human
evaluation's, the toy world's), so that each of them can also run on its own (``python -m evaluation.cli fid``
under ``torchrun``) with the same behaviour as under ``reimagen-eval``."""

from __future__ import annotations

import functools
from typing import Callable

import typer
from rich.console import Console
from rich.markup import escape

err_console = Console(stderr=True)

#: Exceptions that mean bad input or an unusable file, never a bug: FloatingPointError is the sampler's
#: NonFiniteError (unstable guidance weights, an untrained checkpoint), PermissionError a refused rater token.
BAD_INPUT = (ValueError, FileNotFoundError, PermissionError, RuntimeError, ImportError, KeyError, FloatingPointError)


def friendly(fn: Callable) -> Callable:
    """Run a command; a ``BAD_INPUT`` exception becomes one red line (a multi-line message joined) and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BAD_INPUT as err:
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            line = " ".join(str(msg).split())
            err_console.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None

    return wrapper
