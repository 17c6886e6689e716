"""The training room's commands: ``train`` (one stage from triples or shards, on one process or under torchrun),
``shards`` (webdataset training shards) and ``embed-text`` (the shards' captions through a frozen encoder, once)."""

from __future__ import annotations

from dataclasses import fields
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..utils.cliutil import friendly

console = Console(stderr=True)


class TextEncoderName(str, Enum):
    tiny = "tiny"
    minilm = "minilm"
    t5 = "t5"


@friendly
def train(
    triples: Optional[Path] = typer.Option(None, help="KNN-ImageText triples table (.parquet/.jsonl/.csv) with "
                                           "columns id, text, image, neighbor_ids, loaded into RAM (small data)."),
    shards: Optional[Path] = typer.Option(None, help="Training shards (`reimagen-eval shards`), streamed: for data "
                                          "that does not fit in RAM. Give --triples or --shards."),
    text_store: Optional[Path] = typer.Option(None, help="Precomputed text embeddings of the shards "
                                              "(`reimagen-eval embed-text`); default SHARDS/text/<encoder>. Needed "
                                              "with --shards and a frozen encoder (minilm, t5), which is then "
                                              "never loaded."),
    out: Path = typer.Option(..., help="Run folder: checkpoints in OUT/last, loss log in OUT/log.jsonl. "
                             "Rerunning with the same folder resumes."),
    preset: str = typer.Option("small-32", help="Stage configuration: a preset (see `reimagen-eval presets`), or a "
                               "stage checkpoint folder whose configuration to train (with --init-from it: continue "
                               "a shipped stage, whose folder has no optimiser state to resume)."),
    prediction: Optional[str] = typer.Option(None, help="Override the preset's network output: eps, x0 or v "
                                             "(v weights the loss towards high noise levels, where an image's "
                                             "colours are decided). Default: the preset's."),
    schedule: Optional[str] = typer.Option(None, help="Override the preset's noise schedule: cosine, linear, or "
                                           "NAME:SHIFT with the log-SNR shifted by SHIFT (cosine:-3: noisier). "
                                           "Sampling uses the checkpoint's own schedule."),
    text_encoder: TextEncoderName = typer.Option(TextEncoderName.tiny, help="tiny: small trainable encoder; "
                                                 "minilm: offline pretrained all-MiniLM-L6-v2; t5: a T5 checkpoint."),
    t5: str = typer.Option("google/t5-v1_1-xxl", help="T5 checkpoint id or local folder (with --text-encoder t5)."),
    steps: int = typer.Option(1000, min=1, help="Total optimiser steps."),
    batch_size: int = typer.Option(16, min=1, help="Examples per step."),
    lr: float = typer.Option(1e-4, help="Learning rate (the paper: 1e-4)."),
    warmup_steps: int = typer.Option(0, min=0, help="Linear learning-rate warm-up over the first N steps."),
    optimizer: str = typer.Option("adamw", help="adamw or adafactor (the paper's choice for the 64x64 stage)."),
    ema_decay: float = typer.Option(0.999, help="EMA decay of the weights used for sampling."),
    ema_warmup: bool = typer.Option(True, help="Warm the EMA up: decay min(ema_decay, (1 + step) / (10 + step)), "
                                    "so that short runs do not sample with weights still close to the initial ones."),
    grad_clip: float = typer.Option(1.0, help="Max gradient norm (0 disables)."),
    p_drop_text: float = typer.Option(0.1, help="Probability of dropping the text (Sec. 3.2: 0.1)."),
    p_drop_neighbours: float = typer.Option(0.1, help="Probability of dropping the neighbours (Sec. 3.2: 0.1)."),
    max_aug_level: float = typer.Option(1.0, min=0.0, max=1.0, help="Super-resolution stages: the low-resolution "
                                        "input is noised to a level ~ U[0, this] (Imagen's noise-conditioning "
                                        "augmentation). Sampling uses level 0 by default; a short run trained with "
                                        "1.0 spends most steps on inputs it will never see (README, toy world)."),
    min_snr_gamma: float = typer.Option(0.0, min=0.0, help="Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is "
                                        "their default): caps the weight of low-noise steps at gamma. 0 trains "
                                        "with the paper's loss. The logged loss is the weighted one."),
    min_snr_plus_one: bool = typer.Option(False, help="With --min-snr-gamma and v / x0 prediction: weigh the x0 "
                                          "error by min(SNR, gamma) + 1, so that the high-noise steps, where the "
                                          "layout is decided, keep the plain loss's weight instead of ~0."),
    ckpt_every: int = typer.Option(500, min=1, help="Checkpoint every N steps."),
    log_every: int = typer.Option(25, min=1, help="Log the mean loss (over steps and processes) every N steps."),
    keep_last: int = typer.Option(0, min=0, help="Besides OUT/last, keep the N most recent OUT/step-XXXXXXXX "
                                  "checkpoints."),
    grad_accum: int = typer.Option(1, min=1, help="Micro-batches per step: --batch-size is the global batch, "
                                   "split over processes and then into N micro-batches."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 autocast (fp16 with a gradient scaler that skips "
                                  "non-finite steps). bf16 also runs on CPU."),
    grad_checkpointing: bool = typer.Option(False, help="Recompute block activations in the backward pass: less "
                                            "memory, ~30% more compute."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the stage network."),
    channels_last: bool = typer.Option(False, "--channels-last", help="NHWC memory layout for the convolutions: "
                                       "the same maths, other kernels (on a 2-core AVX2 CPU: no gain for toy-32; "
                                       "benchmarks/README.md). Try it on your hardware."),
    fsdp: bool = typer.Option(False, help="With torchrun: shard parameters, gradients and optimiser state (FSDP2) "
                              "instead of replicating them (DDP), for stages that do not fit one GPU."),
    workers: int = typer.Option(0, min=0, help="DataLoader worker processes per rank (decoding, crops, noise)."),
    random_crop: bool = typer.Option(False, help="Random square crops of the training images instead of centred "
                                     "ones (Imagen trains its super-resolution stages on random crops)."),
    mirror_words: str = typer.Option("", metavar="WORD:WORD,...", help="Mirror half the training images left-right "
                                     "and swap these words in their captions (e.g. left:right), so that a layout "
                                     "word is learnt from the text, not from the neighbours' layout. With a frozen "
                                     "encoder: --triples only (both captions are encoded once)."),
    init_from: Optional[Path] = typer.Option(None, help="Start from this stage checkpoint's EMA weights (fine-tuning), "
                                             "e.g. toy-32's shipped stage into toy-32-layout: tensors the "
                                             "checkpoint lacks keep their initial values. Ignored when OUT already "
                                             "has a checkpoint (the run resumes)."),
    seed: int = typer.Option(0, help="Seed: every sample's randomness is a function of (seed, its stream position)."),
    wait: bool = typer.Option(False, "--wait", help="If another run writes OUT, wait for it to finish instead of "
                              "refusing (the refusal names its host, pid and start time)."),
    device: str = typer.Option("cpu", help="torch device, e.g. cuda (under torchrun each process takes the GPU "
                               "LOCAL_RANK)."),
) -> None:
    """Train one cascade stage (base or super-resolution, from the preset) on KNN-ImageText triples.

    One process, or many: `torchrun --nproc-per-node 8 -m reimagen_eval.cli train ...` (DDP, or FSDP2 with --fsdp;
    multi-node with torchrun's --nnodes / --rdzv-endpoint). The batch is global, so a run resumes on another
    number of processes. SIGTERM or SIGUSR1 (pre-emption) ends the run after the current step with a checkpoint
    and exit code 75; rerunning the command resumes (docs/training.md)."""
    run_train(dict(locals()))


def run_train(opts: dict) -> None:
    """``train``'s work: refuse bad input before loading anything, build the stage and its data, fit."""
    import torch

    from ..models.checkpoint import init_from as start_from
    from ..models.unet import ReImagenUNet
    from ..utils.launch import shard_from_env
    from .config import TrainConfig
    from .data import TripleData
    from .distributed import shutdown_distributed
    from .preemption import EXIT_PREEMPTED, Preempted
    from .train import Trainer

    triples, shards, text_encoder, out = opts["triples"], opts["shards"], opts["text_encoder"], opts["out"]
    if (triples is None) == (shards is None):
        raise typer.BadParameter("give exactly one of --triples (a table, in RAM) and --shards (streamed)")
    if opts["mirror_words"] and shards is not None and text_encoder != TextEncoderName.tiny:
        raise typer.BadParameter(f"--mirror-words with --shards needs the trainable tiny encoder: the text store "
                                 f"holds the {text_encoder.value} embeddings of each caption as written; use --triples")
    shard_from_env()  # a half-set launcher environment is refused before anything is loaded
    if opts["init_from"] is not None:
        _check_init_from(opts["init_from"], text_encoder)
    tc = TrainConfig(**{f.name: opts[f.name] for f in fields(TrainConfig) if f.name in opts})
    enc, store = _train_text(text_encoder, opts["t5"], shards, opts["text_store"], opts["device"])
    dim = store.dim if store is not None else enc.dim
    overrides = {k: opts[k] for k in ("prediction", "schedule") if opts[k]}
    cfg = _stage_config(opts["preset"], dim, overrides)
    if shards is not None:
        data = shards
    else:
        data = TripleData.from_table(triples, cfg.image_size)
        if data.skipped:
            console.print(f"[yellow]skipped[/] {sum(data.skipped.values())} rows: {data.skipped}")
    with torch.random.fork_rng(devices=[]):  # the same initial weights in every process and run
        torch.manual_seed(opts["seed"])
        model = ReImagenUNet(cfg)
    if opts["init_from"] is not None:
        new = start_from(model, opts["init_from"])
        console.print(f"started from {opts['init_from']}; new tensors: {', '.join(new) or 'none'}")
    trainer = Trainer(model, store.encoder_spec if store is not None else enc, data, tc, out_dir=out,
                      device=opts["device"], text_store=store)
    try:
        hist = trainer.fit(wait=opts["wait"])
    except Preempted as stop:
        if trainer.dist.is_main:
            console.print(f"[yellow]pre-empted:[/] {stop}", highlight=False)
        shutdown_distributed()
        raise typer.Exit(EXIT_PREEMPTED) from None
    if hist and trainer.dist.is_main:
        console.print(f"loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f}; checkpoint: {out / 'last'}")
    shutdown_distributed()


def _stage_config(preset: str, text_dim: int, overrides: dict):
    """A preset's configuration, or a checkpoint folder's (``--preset runs/base/last``)."""
    from ..models.checkpoint import read_checkpoint_config
    from ..models.config import PRESETS, UNetConfig, get_preset

    if preset in PRESETS or not Path(preset).is_dir():
        return get_preset(preset, text_dim=text_dim, **overrides)
    if not (Path(preset) / "config.json").is_file():
        raise typer.BadParameter(f"--preset {preset} is a folder but not a stage checkpoint (no config.json)")
    cfg = UNetConfig.from_dict({**read_checkpoint_config(preset)["unet"], **overrides})
    if cfg.text_dim != text_dim:
        raise typer.BadParameter(f"--preset {preset} reads {cfg.text_dim}-wide text embeddings, the text encoder "
                                 f"gives {text_dim}")
    return cfg


def _check_init_from(path: Path, text_encoder: TextEncoderName) -> None:
    from ..models.checkpoint import read_checkpoint_config

    if not (path / "config.json").is_file():
        raise typer.BadParameter(f"--init-from {path} is not a stage checkpoint (no config.json)")
    name = read_checkpoint_config(path)["text_encoder"].get("name")
    if name != text_encoder.value:
        raise typer.BadParameter(f"--init-from {path} was trained with the {name} text encoder, not "
                                 f"{text_encoder.value}: pass --text-encoder {name}")


def _train_text(name: TextEncoderName, t5: str, shards: Optional[Path], text_store: Optional[Path], device: str):
    """(encoder, None) for in-RAM data or the trainable tiny encoder; (None, store) for shards with a frozen one."""
    from ..models.text import build_text_encoder

    spec = {"name": name.value}
    if name == TextEncoderName.t5:
        spec["name_or_path"] = t5
    if shards is None or name == TextEncoderName.tiny:
        return build_text_encoder(spec, device=device), None
    from .text_store import TextStore

    store = TextStore(text_store or shards / "text" / name.value)
    if store.encoder_spec.get("name") != name.value:
        raise typer.BadParameter(f"the text store {store.store} holds {store.encoder_spec.get('name')} embeddings, "
                                 f"not {name.value}")
    return None, store


@friendly
def shards(
    triples: Path = typer.Option(..., help="KNN-ImageText triples table (`reimagen-eval triples`)."),
    out: Path = typer.Option(..., help="Shard folder: shard-000000.tar ..., their sidecars, manifest.json. Rerun "
                             "to resume; under torchrun (RANK / WORLD_SIZE) each process writes its shards."),
    samples_per_shard: int = typer.Option(1000, min=1, help="Samples per tar shard."),
    max_side: Optional[int] = typer.Option(None, min=8, help="Re-encode images (and neighbours) as JPEG with the "
                                           "longer side at most this; default: keep the original bytes."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the table's first N rows as samples (a quick trial); "
                                        "their neighbours still come from the whole table."),
) -> None:
    """Write webdataset training shards: each sample carries its image, caption and K neighbours' images and
    captions, so that training reads sequentially. Missing or unreadable images are counted and skipped."""
    from ..utils.launch import shard_from_env
    from .shards import ShardSettings, write_shards

    rank, world = shard_from_env()
    report = write_shards(triples, out, ShardSettings(samples_per_shard, max_side), rank, world, limit=limit)
    console.print(str(report), highlight=False)


@friendly
def embed_text(
    shards: Path = typer.Option(..., help="Shard folder written by `reimagen-eval shards`."),
    text_encoder: TextEncoderName = typer.Option(TextEncoderName.minilm, help="The frozen encoder: minilm (offline) "
                                                 "or t5 (the paper's T5-XXL)."),
    t5: str = typer.Option("google/t5-v1_1-xxl", help="T5 checkpoint id or local folder (with --text-encoder t5)."),
    dtype: str = typer.Option("fp16", help="Stored precision: fp16, bf16 or fp32."),
    batch_size: int = typer.Option(64, min=1, help="Texts per encoder call."),
    device: str = typer.Option("cpu", help="torch device, e.g. cuda (under torchrun: the GPU LOCAL_RANK)."),
) -> None:
    """Encode every caption and neighbour caption of the shards once (into SHARDS/text/<encoder>), so that
    training never runs the text encoder. Resumable; under torchrun each process encodes its shards."""
    import os

    from ..models.text import build_text_encoder
    from ..utils.launch import shard_from_env
    from .text_store import DTYPES, embed_shards

    if dtype not in DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if text_encoder == TextEncoderName.tiny:
        raise typer.BadParameter("the tiny encoder is trained with the model; nothing to precompute")
    rank, world = shard_from_env()
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    spec = {"name": text_encoder.value, **({"name_or_path": t5} if text_encoder == TextEncoderName.t5 else {})}
    enc = build_text_encoder(spec, device=device)
    enc.batch_size = batch_size
    store = embed_shards(shards, enc, dtype=dtype, rank=rank, world_size=world)
    console.print(f"text embeddings: {store}" if store else "this process's shards are done; others pending",
                  highlight=False)


COMMANDS = [("train", train), ("shards", shards), ("embed-text", embed_text)]
