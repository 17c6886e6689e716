"""``reimagen-eval toy ...``: the synthetic long-tail world from the command line (the main job, ``toy demo``,
is the application's: ``reimagen_eval.demo``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from reimagen.utils.cliutil import friendly
from . import WEIGHTS
from .world import V3_OBJECT_SCALE

console = Console(stderr=True)
toy_app = typer.Typer(no_args_is_help=True, help="The synthetic long-tail world: build it, train its judge, "
                      "run the paper's measurements on it.")


_OBJECT_SCALE = typer.Option(1.0, min=0.5, max=1.6, help=f"Size of the entities: 1.0 is the shipped cascade's world "
                             f"(copies 15-25 px across at 64 px), {V3_OBJECT_SCALE} world v3 (toyworld/README.md).")


@toy_app.command()
@friendly
def build(out: Path = typer.Option(Path("runs/toyworld"), help="Folder for the world's image shards, knowledge "
                                   "bases and KNN-ImageText triples."),
          seed: int = typer.Option(0, help="World seed: the same seed gives the same world, byte for byte."),
          k: int = typer.Option(2, min=1, help="Neighbours per training pair (text BM25, Sec. 3.2)."),
          object_scale: float = _OBJECT_SCALE) -> None:
    """Render the world (corpus, references, validation) and build its BM25 KNN-ImageText triples."""
    from .build import build_world_files
    from .world import World, WorldSpec

    paths = build_world_files(World(WorldSpec(seed=seed, object_scale=object_scale)), out, k=k)
    for name, p in paths.items():
        console.print(f"{name:>10}: {p}")


@toy_app.command("repeat-triples")
@friendly
def repeat_triples(world: Path = typer.Option(Path("runs/toyworld"), help="World folder (`toy build`)."),
                   out: Optional[Path] = typer.Option(None, help="Table to write; default WORLD/triples-rfs.parquet."),
                   threshold: int = typer.Option(100, min=1, help="Entities seen fewer times than this are "
                                                 "repeated sqrt(threshold / n) times on average."),
                   seed: int = typer.Option(0, help="Seed of the coins that round the repeat factors.")) -> None:
    """Write the world's triples with rare entities' rows repeated (repeat factor sampling, LVIS): train on it
    with `train --triples` to weigh the long tail up."""
    from .build import repeat_factor_triples

    if not (world / "triples.parquet").is_file():
        raise typer.BadParameter(f"--world {world} has no triples.parquet (build it: toy build --out {world})")
    out = out or world / "triples-rfs.parquet"
    sizes = repeat_factor_triples(world, out, threshold=threshold, seed=seed)
    console.print(f"{out}: {sizes['rows_repeated']:.0f} rows from {sizes['rows']:.0f} (mean repeat "
                  f"{sizes['mean_repeat']:.2f})")


@toy_app.command()
@friendly
def judge(out: Path = typer.Option(WEIGHTS / "judge", help="Folder for judge.safetensors and judge.json."),
          seed: int = typer.Option(0, help="World seed."),
          n_train: int = typer.Option(16_000, min=256, help="Fresh training renders."),
          n_test: int = typer.Option(3_000, min=100, help="Fresh test renders (accuracy is reported on these)."),
          epochs: int = typer.Option(5, min=1, help="Training epochs."),
          object_scale: float = _OBJECT_SCALE) -> None:
    """Train the judge CNN on fresh renders and report its per-attribute accuracy on new ones."""
    from .judge import save_judge, train_judge
    from .world import World, WorldSpec

    j, report = train_judge(World(WorldSpec(seed=seed, object_scale=object_scale)), n_train=n_train, n_test=n_test,
                            epochs=epochs)
    save_judge(j, out, report)
    for a, v in report["test_accuracy"].items():
        console.print(f"{a:>15}: {v:.4f}")
    console.print(f"judge written to {out} ({report['seconds']} s)")


@toy_app.command()
@friendly
def ship(base: Path = typer.Option(Path("runs/toy-train/base/last"), help="Trained base-stage checkpoint."),
         sr: Path = typer.Option(Path("runs/toy-train/sr/last"), help="Trained super-resolution checkpoint."),
         out: Path = typer.Option(WEIGHTS, help="Where the shipped checkpoints go (OUT/base, OUT/sr)."),
         log: list[Path] = typer.Option([], help="Training stdout logs (/usr/bin/time -v output) to read the "
                                        "measured wall time and peak memory from, one per stage in order."),
         weights: str = typer.Option("ema", help="ema (the EMA weights) or raw (the training weights; for short "
                                     "runs whose EMA still holds much of the initialisation)."),
         layout_rank: int = typer.Option(0, min=0, help="Reduce the base stage's text layout maps to this rank "
                                         "first (a full map is C x S x S by 4 x 192 weights per text attention), "
                                         "exactly on the span of the --captions' pooled tokens."),
         captions: Path = typer.Option(Path("runs/toyworld/triples.parquet"), help="With --layout-rank: a table "
                                       "with a text column, the captions the reduction keeps exact."),
         keep_sr: bool = typer.Option(False, "--keep-sr", help="Ship the base stage only; the shipped "
                                      "super-resolution stage stays.")) -> None:
    """Copy trained stages into the package: config + EMA weights in fp16 + loss log + loss-curve plot."""
    from .ship import reduce_stage, ship_stage

    if layout_rank:
        if not captions.is_file():
            raise typer.BadParameter(f"--captions {captions} does not exist (build the world: toy build)")
        base, kept = reduce_stage(base, layout_rank, captions)
        console.print(f"base: layout maps reduced to rank {layout_rank} in {base} (pooled variance kept >= {kept:.4f})")
    for i, (name, src) in enumerate((("base", base),) + ((("sr", sr),) if not keep_sr else ())):
        dst = ship_stage(src, out / name, log[i] if i < len(log) else None, weights=weights)
        console.print(f"{name}: {dst} ({sum(f.stat().st_size for f in dst.iterdir()) / 1e6:.1f} MB)")


_WORLD = typer.Option(None, help="World folder (its world.json, from `toy build`); default: the default world.")


def _world(folder: Path | None):
    from .build import load_world

    return None if folder is None else load_world(folder)


@toy_app.command()
@friendly
def probe(checkpoint: Path = typer.Option(WEIGHTS / "base", help="Base-stage checkpoint to probe."),
          per_split: int = typer.Option(12, min=1, help="Bench prompts per frequency split."),
          k: int = typer.Option(2, min=1, help="Neighbours per prompt."),
          ema: bool = typer.Option(True, help="Use the EMA weights when the checkpoint has them."),
          out: Path = typer.Option(None, help="Also write the rows as JSON here."),
          world: Path = _WORLD) -> None:
    """Does the stage use its neighbours' content? x0 error with right / wrong / no neighbours, per split; and
    does it read the caption's position and background words (x0 error with them swapped)?"""
    from .diagnose import caption_table, neighbour_probe, probe_table

    rows = neighbour_probe(checkpoint, world=_world(world), per_split=per_split, k=k, ema=ema)
    _write_rows(out, rows)  # before printing: a closed pipe (| head) must not lose them
    print(probe_table(rows) + "\n\n" + caption_table(rows))


# options shared by the stage diagnostics (probe, decompose, recover)
_JUDGE = typer.Option(WEIGHTS / "judge", help="Judge folder.")
_PER_SPLIT = typer.Option(12, min=1, help="Bench prompts per frequency split.")
_SAMPLES = typer.Option(2, min=1, help="Samples per prompt.")
_REF_K = typer.Option(2, min=1, help="Neighbours per prompt (the entity's reference pairs).")


@toy_app.command()
@friendly
def decompose(base: Path = typer.Option(WEIGHTS / "base", help="Base-stage checkpoint."),
              sr: Path = typer.Option(WEIGHTS / "sr", help="Super-resolution checkpoint."),
              judge: Path = _JUDGE,
              per_split: int = _PER_SPLIT,
              samples: int = _SAMPLES,
              k: int = _REF_K,
              steps: int = typer.Option(25, min=1, help="Base-stage DDIM steps."),
              sr_steps: int = typer.Option(10, min=1, help="Super-resolution DDIM steps."),
              w: float = typer.Option(3.0, min=0.0, help="Base-stage guidance weight (w_p = w_n)."),
              sr_w: float = typer.Option(3.0, min=0.0, help="Super-resolution guidance weight."),
              eta: float = typer.Option(0.5, min=0.0, max=1.0, help="Interleave ratio of the base stage (Eq. 6)."),
              sources: str = typer.Option(None, help="Comma-separated image sources (default: all): render (the "
                                          "real render), render32+bilinear (it at the base size, upsampled), "
                                          "render32+sr / render32+sr(text) (it through the SR stage with / "
                                          "without the references), base+bilinear, base+sr (the cascade with "
                                          "retrieval), base(text)+sr(text) (the cascade without)."),
              out: Path = typer.Option(None, help="Also write the rows as JSON here."),
              world: Path = _WORLD) -> None:
    """Where is faithfulness lost? Judge rates per attribute when each stage is fed the truth instead of the
    stage before it (real 32px renders into the SR stage, real renders upsampled), next to the cascade."""
    from .diagnose import SOURCES, stage_decomposition

    sources = sources or ",".join(SOURCES)
    rows = stage_decomposition(base, sr, judge, world=_world(world), per_split=per_split, samples=samples, k=k,
                               steps=steps,
                               sr_steps=sr_steps, w=w, sr_w=sr_w, eta=eta,
                               sources=tuple(s.strip() for s in sources.split(",") if s.strip()))
    _write_rows(out, rows)
    _print_split_tables(rows)


@toy_app.command()
@friendly
def recover(base: Path = typer.Option(WEIGHTS / "base", help="Base-stage checkpoint."),
            judge: Path = _JUDGE,
            times: str = typer.Option("0.2,0.4,0.5,0.6,0.8,1", help="Comma-separated times t in (0, 1] to noise the "
                                      "true 32 px render to (cosine schedule: SNR about 9.5, 1.9, 1, 0.53, 0.1, 0)."),
            per_split: int = _PER_SPLIT,
            samples: int = _SAMPLES,
            k: int = _REF_K,
            steps: int = typer.Option(25, min=1, help="DDIM steps of a run from t = 1 (a run from t takes t of them)."),
            w: float = typer.Option(3.0, min=0.0, help="Guidance weight (w_p = w_n)."),
            eta: float = typer.Option(0.5, min=0.0, max=1.0, help="Interleave ratio with retrieval (Eq. 6)."),
            out: Path = typer.Option(None, help="Also write the rows as JSON here."),
            world: Path = _WORLD) -> None:
    """Where in the noise range does the base stage lose an attribute? It denoises the true 32 px render noised
    to each t (SDEdit), with retrieval and text only; judge rates per attribute (t = 1: ordinary sampling)."""
    from .diagnose import noise_recovery

    try:
        ts = tuple(float(t) for t in times.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--times must be comma-separated numbers, got {times!r}") from None
    rows = noise_recovery(base, judge, world=_world(world), times=ts, per_split=per_split, samples=samples, k=k,
                          steps=steps, w=w, eta=eta)
    _write_rows(out, rows)
    _print_split_tables(rows)


def _print_split_tables(rows: list[dict]) -> None:
    """The judge-rate table pooled over splits, then one per frequency split."""
    from .diagnose import decomposition_table

    for sp in (None, "frequent", "infrequent", "unseen"):
        print(decomposition_table(rows, sp) + "\n")


def _write_rows(out: Path | None, rows: list[dict]) -> None:
    """Rows as JSON at ``out`` (if given), atomically."""
    if out is not None:
        from reimagen.utils.atomic import write_json

        write_json(out, rows, indent=2)
