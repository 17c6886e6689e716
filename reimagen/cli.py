"""The model's commands: ``train`` (one stage from a KNN-ImageText triples table), ``sample`` (a cascade of
trained stages), ``presets`` (the paper's and the small configurations, with parameter counts). The
``reimagen-eval`` application (``reimagen_eval.cli``) mounts them beside the benchmarks' commands."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .cliutil import friendly

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Re-Imagen's model: train a stage, sample a cascade, list the presets.")
console = Console(stderr=True)


class TextEncoderName(str, Enum):
    tiny = "tiny"
    minilm = "minilm"
    t5 = "t5"


class GuidanceName(str, Enum):
    interleaved = "interleaved"
    joint = "joint"
    weighted = "weighted"


class SamplerName(str, Enum):
    ddpm = "ddpm"
    ddim = "ddim"


@app.command()
@friendly
def train(
    triples: Path = typer.Option(..., exists=False, help="KNN-ImageText triples table (.parquet/.jsonl/.csv) with "
                                 "columns id, text, image, neighbor_ids."),
    out: Path = typer.Option(..., help="Run folder: checkpoints in OUT/last, loss log in OUT/log.jsonl. "
                             "Rerunning with the same folder resumes."),
    preset: str = typer.Option("small-32", help="Stage configuration (see `reimagen-eval presets`)."),
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
    ckpt_every: int = typer.Option(500, min=1, help="Checkpoint every N steps."),
    seed: int = typer.Option(0, help="Seed: every step's randomness is a function of (seed, step)."),
    device: str = typer.Option("cpu", help="torch device, e.g. cuda."),
) -> None:
    """Train one cascade stage (base or super-resolution, from the preset) on KNN-ImageText triples."""
    from .config import get_preset
    from .data import TripleData
    from .text import build_text_encoder
    from .train import TrainConfig, Trainer
    from .unet import ReImagenUNet

    spec = {"name": text_encoder.value}
    if text_encoder == TextEncoderName.t5:
        spec["name_or_path"] = t5
    enc = build_text_encoder(spec, device=device)
    overrides = {k: v for k, v in (("prediction", prediction), ("schedule", schedule)) if v}
    cfg = get_preset(preset, text_dim=enc.dim, **overrides)
    data = TripleData.from_table(triples, cfg.image_size)
    if data.skipped:
        console.print(f"[yellow]skipped[/] {sum(data.skipped.values())} rows: {data.skipped}")
    tc = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, optimizer=optimizer,
                     ema_decay=ema_decay, ema_warmup=ema_warmup,
                     grad_clip=grad_clip, p_drop_text=p_drop_text, p_drop_neighbours=p_drop_neighbours,
                     max_aug_level=max_aug_level, min_snr_gamma=min_snr_gamma, ckpt_every=ckpt_every, seed=seed)
    trainer = Trainer(ReImagenUNet(cfg), enc, data, tc, out_dir=out, device=device)
    hist = trainer.fit()
    if hist:
        console.print(f"loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f}; checkpoint: {out / 'last'}")


@app.command()
@friendly
def sample(
    checkpoint: list[Path] = typer.Option(..., help="Stage checkpoint folders, base stage first (repeat the option)."),
    prompt: list[str] = typer.Option(..., help="Prompt(s) (repeat the option); prompt i gets the id p0000 + i."),
    neighbour_image: list[Path] = typer.Option([], help="Neighbour image for every prompt (repeat for K > 1)."),
    neighbour_text: list[str] = typer.Option([], help="Text of each neighbour image, in the same order."),
    guidance: GuidanceName = typer.Option(GuidanceName.interleaved, help="Base-stage guidance (Eq. 5 / Eq. 6)."),
    w_p: float = typer.Option(3.0, help="Text guidance weight w_p (interleaved/weighted) or w (joint)."),
    w_n: float = typer.Option(3.0, help="Neighbour guidance weight w_n (interleaved/weighted)."),
    eta: float = typer.Option(0.5, help="Interleave ratio: probability of the text-enhanced step (Eq. 6)."),
    sr_guidance: float = typer.Option(5.0, help="Joint guidance weight of super-resolution stages."),
    steps: int = typer.Option(64, min=1, help="Sampling steps of every stage."),
    sampler: SamplerName = typer.Option(SamplerName.ddpm, help="ddpm (Eq. 4) or ddim."),
    num_samples: int = typer.Option(1, min=1, help="Samples per prompt (sample indices 0..N-1)."),
    batch_size: int = typer.Option(8, min=1, help="Images per sampling batch: jobs are cut into fixed blocks of this "
                                   "size (recorded in run.json; a resume must use the same)."),
    seed: int = typer.Option(0, help="Image = f(prompt id, sample index, seed)."),
    out: Path = typer.Option(Path("runs/samples"), help="Run folder: <prompt id>__<sample index>.png, run.json, "
                             "prompts.json. Rerun to resume; RANK / WORLD_SIZE (torchrun) shard it."),
    device: str = typer.Option("cpu", help="torch device."),
) -> None:
    """Sample images from a cascade of trained stages, with retrieved neighbours given as files."""
    import hashlib

    from .atomic import write_json
    from .cascade import Cascade, Neighbours
    from .generate import CascadeGenerator, Job, generate_run, shard_from_env
    from .guidance import JointGuidance, make_guidance
    from .retrieval.base import load_image
    from .sampling import SamplerSettings
    from .train import checkpoint_digest, read_checkpoint_config

    # 1. Every argument and input file is checked before a model is loaded or a file written.
    if len(neighbour_image) != len(neighbour_text):
        raise ValueError(f"{len(neighbour_image)} neighbour images but {len(neighbour_text)} neighbour texts")
    for p in checkpoint:
        read_checkpoint_config(p)
    shard_from_env()
    has_nbrs = bool(neighbour_image)
    base_g = make_guidance(guidance.value, w_text=w_p, w_neighbours=w_n, eta=eta, lam=eta,  # --eta: weighted's lam too
                           use_neighbours=has_nbrs)
    sr_g = JointGuidance(w=sr_guidance, use_neighbours=has_nbrs)
    pairs = []
    for p in neighbour_image:
        if not p.is_file():
            raise FileNotFoundError(f"neighbour image {p} does not exist")
        pairs.append(load_image(str(p)))  # CorruptImageError names the file
    # 2. The cascade and the jobs.
    settings = SamplerSettings(steps=steps, sampler=sampler.value)
    cascade = Cascade.from_checkpoints(checkpoint, [base_g] + [sr_g] * (len(checkpoint) - 1),
                                       [settings] * len(checkpoint), device=device)
    ids = [f"p{i:04d}" for i in range(len(prompt))]
    jobs = [Job(pid, text, s) for pid, text in zip(ids, prompt) for s in range(num_samples)]
    neighbours_for = None
    digest = hashlib.sha256(json.dumps(list(zip(ids, prompt))).encode())
    if has_nbrs:
        size = max(st.model.cfg.image_size for st in cascade.stages)
        row = Neighbours.from_pairs([list(zip(pairs, neighbour_text))], size=size)
        neighbours_for = lambda batch: row.index([0] * len(batch))  # noqa: E731  (every prompt: the same files)
        for p, text in zip(neighbour_image, neighbour_text):
            digest.update(hashlib.sha256(p.read_bytes()).digest() + text.encode() + b"\0")
    gen = CascadeGenerator(cascade, settings={"checkpoints": [checkpoint_digest(p) for p in checkpoint]})
    # 3. Generate (resumable, sharded by blocks), then the prompt table.
    counts = generate_run(gen, jobs, out, seed=seed, neighbours_for=neighbours_for, batch_size=batch_size,
                          settings={"prompts": digest.hexdigest()[:16], "samples_per_prompt": num_samples})
    write_json(out / "prompts.json", [{"prompt_id": pid, "prompt": text} for pid, text in zip(ids, prompt)], indent=2)
    console.print(f"made {counts['made']}, skipped {counts['skipped']} (existing) of {counts['total']} images in {out}")


@app.command()
def presets(paper_only: bool = typer.Option(False, help="Only the paper's configurations.")) -> None:
    """List stage presets with parameter counts (built on the meta device: no memory, no weights)."""
    import torch

    from .config import PRESETS
    from .unet import ReImagenUNet, count_parameters

    table = Table(title="stage presets")
    for col in ("preset", "resolution", "params", "paper", "note"):
        table.add_column(col)
    for name, p in PRESETS.items():
        if paper_only and p.paper_params is None:
            continue
        with torch.device("meta"):
            n = count_parameters(ReImagenUNet(p.config))
        c = p.config
        res = f"{c.lowres_size}->{c.image_size}" if c.is_super_resolution else f"{c.image_size}"
        table.add_row(name, res, f"{n / 1e6:,.1f}M", f"{p.paper_params / 1e6:,.0f}M" if p.paper_params else "-", p.note)
    Console().print(table)
