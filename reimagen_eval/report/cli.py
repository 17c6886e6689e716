"""``reimagen-eval report``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from reimagen.utils.cliutil import friendly

console = Console(stderr=True)


@friendly
def report(
    runs: list[str] = typer.Argument(..., help="Run folders, as PATH or NAME=PATH: EntityDrawBench runs "
                                     "(`entitydraw`, shown side by side on their shared prompts), FID sweeps "
                                     "(`fid`), `sample` runs and `rate report` folders; the kind is detected."),
    out: Path = typer.Option(Path("runs/report"), "--out", help="Site folder (OUT/index.html opens from disk; "
                             "copy the folder to any web host). A previous report there is replaced."),
    title: str = typer.Option("reimagen report", "--title", help="The page's title."),
) -> None:
    """Write a static HTML report of runs: look at the images, side by side across models.

    Per EntityDrawBench prompt: the text, entity, split and category, the entity's reference images, each run's
    retrieved neighbours (texts and scores) and its samples with their scores (judge attributes, CLIP / DINO /
    VQA where scored), the best-of-N pick marked; filters for split, category and model, and a view of the
    prompts where the runs disagree most. Thumbnails are written once per image content and loaded lazily,
    a page of prompts at a time; nothing is fetched from the network.
    """
    from .site import build_report

    rep = build_report(runs, out, title=title, progress=lambda msg: console.print(f"[dim]{escape(msg)}[/]"))
    if rep.missing:
        console.print(f"[yellow]{len(rep.missing)} image(s) missing or unreadable: listed at the top of the page[/]")
    console.print(f"report: {rep.images} images, {rep.thumbs_written} thumbnails written ({rep.thumbs_reused} "
                  f"reused), {rep.bytes / 1e6:.1f} MB, {rep.seconds:.1f} s", highlight=False)
    typer.echo(str(rep.index))


__all__ = ["report"]
