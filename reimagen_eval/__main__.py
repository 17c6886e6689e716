"""``python -m reimagen_eval ...`` (e.g. under ``torchrun``) is ``reimagen-eval ...``."""

from .cli import app

app()
