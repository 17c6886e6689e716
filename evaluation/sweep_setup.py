"""What an FID sweep is made of: its configuration (``SweepConfig``), the guidance grid and its points, the
retrieval database, the kinds of model it measures, and the super-resolution generator that conditions on a
point's saved base-stage images. ``evaluation.sweep.FidSweep`` runs them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from reimagen.pipelines.generate import ImageGenerator, Job, image_name

PAPER_GRID_64 = (1.0, 1.25, 1.5, 1.75, 2.0)
PAPER_GRID_SR = (1.0, 5.0, 8.0, 10.0)
NAMED_DBS = ("none", "coco-train", "wikiimages-train", "laion")


@dataclass
class SweepConfig:
    dataset: str = "coco"
    out: str = "runs/fid"
    dataset_root: str | None = None
    dataset_options: dict[str, Any] = field(default_factory=dict)
    num_prompts: int | None = None            # None: the dataset's default (COCO 30000, WikiImages 20000)
    seed: int = 0                             # prompt draw and every image (f(prompt id, sample index, seed))
    db: str = "none"                          # none | coco-train | wikiimages-train | laion | FORMAT:PATH | .parquet
    db_root: str | None = None                # data of a named database that is not the dataset's own
    index: str | None = None                  # a saved retriever folder (reimagen-eval index build)
    retriever: str | None = None              # bm25 | clip (default: bm25, or the kind of --index)
    k: int = 2                                # neighbours per prompt (paper: 2)
    model: str = ""                           # KIND:TARGET (reimagen:, diffusers:, folder:, python:) or a bare path
    model_args: tuple[str, ...] = ()          # --model-arg KEY=VALUE of a non-Re-Imagen model
    sr_model: str | None = None               # super-resolution checkpoint (Re-Imagen cascades)
    guidance_64: Sequence[float] = PAPER_GRID_64
    guidance_sr: Sequence[float] = PAPER_GRID_SR
    steps: int = 1000                         # sampling steps of the base stage (paper: T = 1000)
    sr_steps: int | None = None               # of the SR stage (default: steps)
    sampler: str = "ddpm"
    sr_aug_level: float = 0.0                 # SR noise-conditioning augmentation at sampling
    batch_size: int = 16                      # images per generation batch
    device: str = "cpu"
    precision: str = "fp32"                   # fp32 | bf16 | fp16 autocast of the Re-Imagen stages (GPU)
    backend: str = "clean-fid"                # clean-fid | torch-fidelity
    mode: str = "clean"                       # clean-fid mode: clean | legacy_tensorflow
    feature_extractor: str = "inception"
    inception_weights: str | None = None
    resolution: int | None = None            # None: the dataset's (COCO / WikiImages 256, synthetic 64)
    metrics: Sequence[str] = ("fid", "kid")   # evaluation.metric_set.METRICS
    bootstrap: int = 100                      # resamples of the 95% intervals (0: none)
    metric_weights: dict[str, str] = field(default_factory=dict)  # cmmd / clip-fid: local CLIP weights files
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = None        # open-clip tag or checkpoint: CLIP score (and CLIP retrieval)
    stats_cache: str | None = None            # default $REIMAGEN_CACHE/fid_stats or ~/.cache/reimagen/fid_stats
    label: str = "auto"                       # auto | FID | ZS-FID
    feature_batch_size: int = 64
    workers: int = 0                          # DataLoader workers of the feature extraction
    wait_timeout: float = 7 * 24 * 3600.0     # rank 0: how long to wait for the other processes' images
    progress: bool = True


@dataclass
class Point:
    """One cell of the guidance grid."""

    name: str
    w_64: float | None
    w_sr: float | None
    folder: Path                      # the final images
    base: Path | None = None          # the cached base-stage images it is made from


@dataclass
class Database:
    name: str
    kb: Any = None                    # KnowledgeBase or None (no retrieval)
    in_domain: bool = False
    source: str = ""


def fmt_w(w: float) -> str:
    return f"{float(w):g}"


def parse_grid(text: str | Sequence[float], what: str) -> list[float]:
    """"1.0,1.25" -> [1.0, 1.25]; each weight finite and >= 0 (Eq. 5), no duplicates."""
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", "").split(",") if p]
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    else:
        vals = [float(v) for v in text]
    if not vals:
        raise ValueError(f"{what}: give at least one guidance weight")
    for v in vals:
        if not np.isfinite(v) or v < 0:
            raise ValueError(f"{what}: guidance weights must be finite and >= 0, got {v}")
    if len(set(vals)) != len(vals):
        raise ValueError(f"{what}: duplicate guidance weights in {vals}")
    return vals


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def checkpoint_identity(path: str) -> dict[str, Any]:
    from reimagen.models.checkpoint import read_checkpoint_config

    meta = read_checkpoint_config(path)
    p = Path(path)
    sizes = {f.name: f.stat().st_size for f in sorted(p.glob("*.safetensors"))}
    return {"path": str(p.resolve()), "step": meta.get("step"), "unet": meta.get("unet"), "files": sizes}


class SuperResolutionGenerator(ImageGenerator):
    """The super-resolution stage of a cascade, conditioned on base-stage images saved in ``base`` (the sweep's
    cache: one base folder per 64-stage weight serves every SR weight). Seeds follow ``Cascade``: stage index 1,
    so an image is a function of (prompt id, sample index, seed, base image).

    Differences from ``Cascade.sample`` on the same prompts: the SR stage conditions on the saved 8-bit base image
    (within 1/255 of the float one), and it encodes text with the SR checkpoint's own text encoder (``Cascade``
    shares the base stage's; they are the same for the frozen T5 / MiniLM encoders)."""

    def __init__(self, model, text_encoder, guidance, settings, base: Path, base_name: str, stage_index: int = 1,
                 precision: str = "fp32"):
        self.model, self.text_encoder, self.guidance, self.settings = model, text_encoder, guidance, settings
        self.precision = precision
        self.base, self.base_name, self.stage_index = Path(base), base_name, stage_index
        self.uses_neighbours = bool(guidance.needs_neighbours)

    def _lowres(self, job: Job) -> torch.Tensor:
        from PIL import Image

        path = self.base / image_name(job.prompt_id, job.sample_index)
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        s = self.model.cfg.lowres_size
        if arr.shape[:2] != (s, s):
            raise ValueError(f"{path} is {arr.shape[1]}x{arr.shape[0]}, the SR stage expects {s}x{s}")
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0

    @torch.no_grad()
    def generate(self, jobs, neighbours, seed):
        from reimagen.pipelines.cascade import Stage, run_stage

        dev = next(self.model.parameters()).device
        low = torch.stack([self._lowres(j) for j in jobs]).to(dev)
        text = self.text_encoder.encode([j.prompt for j in jobs])
        nt = (self.text_encoder.encode([t for row in neighbours.texts for t in row])
              if neighbours is not None and self.uses_neighbours else None)
        stage = Stage(self.model, self.guidance, self.settings,
                      name=f"sr {self.model.cfg.lowres_size}->{self.model.cfg.image_size}", precision=self.precision)
        x = run_stage(stage, text, neighbours if nt is not None else None, nt, seed,
                      [j.prompt_id for j in jobs], [j.sample_index for j in jobs], self.stage_index, lowres=low)
        return ((x + 1) / 2).clamp(0, 1).cpu()

    def describe(self) -> dict[str, Any]:
        return {"generator": "reimagen-sr-from-base", "base": self.base_name, "stage_index": self.stage_index,
                "stage": {"guidance": repr(self.guidance), "settings": repr(self.settings),
                          "config": self.model.cfg.to_dict(), **({} if self.precision == "fp32" else
                                                                 {"precision": self.precision})},
                "text_encoder": self.text_encoder.spec()}
