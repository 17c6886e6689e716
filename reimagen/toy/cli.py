"""``reimagen-eval toy ...``: the synthetic long-tail world (issue [toy]) from the command line."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)
toy_app = typer.Typer(no_args_is_help=True, help="The synthetic long-tail world: build it, train its judge, "
                      "run the paper's measurements on it.")

#: Where the shipped weights live (inside the package, so an installed copy finds them).
WEIGHTS = Path(__file__).parent / "weights"


@toy_app.command()
def build(out: Path = typer.Option(Path("runs/toyworld"), help="Folder for the world's image shards, knowledge "
                                   "bases and KNN-ImageText triples."),
          seed: int = typer.Option(0, help="World seed: the same seed gives the same world, byte for byte."),
          k: int = typer.Option(2, min=1, help="Neighbours per training pair (text BM25, Sec. 3.2).")) -> None:
    """Render the world (corpus, references, validation) and build its BM25 KNN-ImageText triples."""
    from .build import build_world_files
    from .world import World, WorldSpec

    paths = build_world_files(World(WorldSpec(seed=seed)), out, k=k)
    for name, p in paths.items():
        console.print(f"{name:>10}: {p}")


@toy_app.command()
def judge(out: Path = typer.Option(WEIGHTS / "judge", help="Folder for judge.safetensors and judge.json."),
          seed: int = typer.Option(0, help="World seed."),
          n_train: int = typer.Option(20_000, min=256, help="Fresh training renders."),
          n_test: int = typer.Option(3_000, min=100, help="Fresh test renders (accuracy is reported on these)."),
          epochs: int = typer.Option(6, min=1, help="Training epochs.")) -> None:
    """Train the judge CNN on fresh renders and report its per-attribute accuracy on new ones."""
    from .judge import save_judge, train_judge
    from .world import World, WorldSpec

    j, report = train_judge(World(WorldSpec(seed=seed)), n_train=n_train, n_test=n_test, epochs=epochs)
    save_judge(j, out, report)
    for a, v in report["test_accuracy"].items():
        console.print(f"{a:>15}: {v:.4f}")
    console.print(f"judge written to {out} ({report['seconds']} s)")


@toy_app.command()
def ship(base: Path = typer.Option(Path("runs/toy-train/base/last"), help="Trained base-stage checkpoint."),
         sr: Path = typer.Option(Path("runs/toy-train/sr/last"), help="Trained super-resolution checkpoint."),
         out: Path = typer.Option(WEIGHTS, help="Where the shipped checkpoints go (OUT/base, OUT/sr)."),
         log: list[Path] = typer.Option([], help="Training stdout logs (/usr/bin/time -v output) to read the "
                                        "measured wall time and peak memory from, one per stage in order."),
         weights: str = typer.Option("ema", help="ema (the EMA weights) or raw (the training weights; for short "
                                     "runs whose EMA still holds much of the initialisation).")) -> None:
    """Copy trained stages into the package: config + EMA weights in fp16 + loss log + loss-curve plot."""
    from .ship import ship_stage

    for i, (name, src) in enumerate((("base", base), ("sr", sr))):
        dst = ship_stage(src, out / name, log[i] if i < len(log) else None, weights=weights)
        console.print(f"{name}: {dst} ({sum(f.stat().st_size for f in dst.iterdir()) / 1e6:.1f} MB)")


@toy_app.command()
def probe(checkpoint: Path = typer.Option(WEIGHTS / "base", help="Base-stage checkpoint to probe."),
          per_split: int = typer.Option(12, min=1, help="Bench prompts per frequency split."),
          k: int = typer.Option(2, min=1, help="Neighbours per prompt."),
          ema: bool = typer.Option(True, help="Use the EMA weights when the checkpoint has them."),
          out: Path = typer.Option(None, help="Also write the rows as JSON here.")) -> None:
    """Does the stage use its neighbours' content? x0 error with right / wrong / no neighbours, per split."""
    import json

    from .diagnose import neighbour_probe, probe_table

    rows = neighbour_probe(checkpoint, per_split=per_split, k=k, ema=ema)
    print(probe_table(rows))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(out)
