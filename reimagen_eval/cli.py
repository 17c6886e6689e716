"""``reimagen-eval``: each package's commands mounted on one Typer app.

    train, sample, presets          the model (reimagen.cli)
    index, retrieve, triples        retrieval (reimagen.retrieval.cli)
    entitydraw, entitydraw-*        EntityDrawBench (entitydrawbench.cli)
    fid, fid-table                  the FID sweeps and their combined tables (evaluation.cli)
    rate ...                        the human evaluation (human_eval.cli)
    toy ...                         the synthetic long-tail world (toyworld.cli)
    report                          a static HTML report of runs, side by side (reimagen_eval.report)
    doctor                          checks the environment (a mixed torch / torchvision install)
    demo, toy demo                  the main job on the embedded default (reimagen_eval.demo)
"""

from __future__ import annotations

from typing import Optional

import typer

import reimagen.cli as model_cli
from entitydrawbench.cli import COMMANDS as ENTITYDRAW_COMMANDS
from evaluation.cli import fid, fid_table
from human_eval.cli import rate_app
from reimagen.retrieval.cli import index_app, retrieve, triples
from toyworld.cli import toy_app

from .demo import demo
from .doctor import doctor
from .report.cli import report

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Re-Imagen: retrieval-augmented text-to-image diffusion, benchmarks and evaluation.")

app.command()(demo)
app.command()(doctor)
app.registered_commands += model_cli.app.registered_commands
app.add_typer(index_app, name="index")
app.command()(retrieve)
app.command()(triples)
for _cmd in ENTITYDRAW_COMMANDS:
    app.command()(_cmd)
app.command()(fid)
app.command("fid-table")(fid_table)
app.add_typer(rate_app, name="rate")
app.command()(report)
toy_app.command("demo")(demo)
app.add_typer(toy_app, name="toy")


def main(argv: Optional[list[str]] = None) -> None:  # pragma: no cover - console entry
    app(argv)


if __name__ == "__main__":  # pragma: no cover  (torchrun -m reimagen_eval.cli train ...)
    app()
