"""The model's commands, one module per room, mounted on one Typer app: ``train``, ``shards``, ``embed-text``
(reimagen.training.cli), ``sample`` (reimagen.pipelines.cli) and ``presets`` (reimagen.models.cli). The
``reimagen-eval`` application (``reimagen_eval.cli``) mounts them beside the benchmarks' commands."""

from __future__ import annotations

import typer

from .models.cli import COMMANDS as MODEL_COMMANDS
from .pipelines.cli import COMMANDS as PIPELINE_COMMANDS
from .pipelines.cli import GuidanceName, SamplerName  # noqa: F401  (0.1's names)
from .training.cli import COMMANDS as TRAINING_COMMANDS
from .training.cli import TextEncoderName  # noqa: F401

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Re-Imagen's model: train a stage, sample a cascade, list the presets.")

for _name, _command in TRAINING_COMMANDS + PIPELINE_COMMANDS + MODEL_COMMANDS:
    app.command(_name)(_command)
