"""The Re-Imagen cascade (Sec. 3.1-3.2, Sec. 4): a base text-to-image stage followed by super-resolution stages.

The paper's cascade is 64x64 -> 256x256 -> 1024x1024; ours is any list of stages whose resolutions chain.
Each stage carries its own sampler settings and guidance (the paper's EntityDrawBench runs use 256 / 128 /
32 steps, interleaved guidance on the 64 stage). Prompts and neighbour texts are encoded once per call by
the shared frozen text encoder; each stage then projects them once and encodes the neighbours once,
at its own resolution (the neighbour cache), before its denoising loop.

    cascade = Cascade([Stage(base, guidance=InterleavedGuidance(w_p=30, w_n=30, eta=0.5)),
                       Stage(sr, guidance=JointGuidance(w=5.0), settings=SamplerSettings(steps=128))],
                      text_encoder)
    out = cascade.sample(["Two Chortai are running on the field."], Neighbours.from_pairs([[(img, txt)]]), seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..diffusion.guidance import GuidanceStrategy, JointGuidance
from ..models.text import TextEncoder, TextEncoding
from ..models.unet import ReImagenUNet
from ..utils.precision import autocast, check_precision
from .sampling import SamplerSettings, make_generators, sample_stage

Tensor = torch.Tensor


@dataclass
class Neighbours:
    """The K retrieved (image, text) pairs c_n of every prompt.

    images: (B, K, 3, H, W) in [-1, 1] at any resolution (each stage resizes them to its own);
    texts:  B lists of K strings;
    mask:   optional (B, K) bool, False marks padding where a query retrieved fewer than K pairs (its
            image and text are ignored; a row with no neighbour at all uses the learned null neighbour).
    """

    images: Tensor
    texts: list[list[str]]
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dim() != 5:
            raise ValueError(f"neighbour images must be (B, K, 3, H, W), got {tuple(self.images.shape)}")
        b, k = self.images.shape[:2]
        if len(self.texts) != b or any(len(row) != k for row in self.texts):
            raise ValueError(f"neighbour texts must be {b} lists of {k} strings to match the images")
        if k == 0:
            raise ValueError("K = 0 neighbours: pass neighbours=None and text-only guidance to sample without retrieval")
        if self.mask is not None and tuple(self.mask.shape) != (b, k):
            raise ValueError(f"neighbour mask must be ({b}, {k}), got {tuple(self.mask.shape)}")

    @property
    def k(self) -> int:
        return self.images.shape[1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def index(self, idx: Sequence[int]) -> "Neighbours":
        mask = None if self.mask is None else self.mask[list(idx)]
        return Neighbours(self.images[list(idx)], [self.texts[i] for i in idx], mask)

    def at_size(self, size: int) -> Tensor:
        b, k = self.images.shape[:2]
        flat = self.images.reshape(b * k, *self.images.shape[2:]).float()
        if flat.shape[-1] != size or flat.shape[-2] != size:
            flat = F.interpolate(flat, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return flat.reshape(b, k, flat.shape[1], size, size)

    @classmethod
    def from_pairs(cls, pairs: Sequence[Sequence[tuple[object, str]]], size: int = 64) -> "Neighbours":
        """Build from B lists of K (PIL image | HWC uint8 array | CHW tensor in [-1, 1], text) pairs."""
        rows = []
        for row in pairs:
            rows.append(torch.stack([image_to_tensor(img, size) for img, _ in row]))
        return cls(torch.stack(rows), [[txt for _, txt in row] for row in pairs])


def neighbours_from_result(kb, result, k: int, size: int) -> Neighbours:
    """The ``Neighbours`` of a retrieval result (``reimagen.retrieval.SearchResult``) over a knowledge base: K
    images at ``size`` px and their texts, with a validity mask where a query got fewer than k neighbours
    (padding is ignored by the model)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    b = len(result)
    images = torch.zeros(b, k, 3, size, size)
    texts = [[""] * k for _ in range(b)]
    mask = torch.zeros(b, k, dtype=torch.bool)
    for i, row in enumerate(result.ids):
        for j, pid in enumerate(row[:k]):
            r = kb.index_of(pid)
            images[i, j] = image_to_tensor(kb.image(r), size)
            texts[i][j] = kb.texts[r]
            mask[i, j] = True
    return Neighbours(images, texts, mask)


def image_to_tensor(img: object, size: int) -> Tensor:
    """A PIL image, an HWC uint8 array or a CHW tensor in [-1, 1] as a (3, size, size) tensor in [-1, 1]
    (center crop to square, then resize)."""
    if isinstance(img, Tensor):
        t = img.float()
    else:
        from PIL import Image

        if isinstance(img, Image.Image):
            img = np.asarray(img.convert("RGB"))
        arr = np.asarray(img)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an RGB image, got an array of shape {arr.shape}")
        t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    h, w = t.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    t = t[:, top:top + side, left:left + side]
    if side != size:
        t = F.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return t


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class Stage:
    """One cascade stage: a network, its guidance, its sampler settings and its precision (fp32, or bf16 / fp16
    autocast on a GPU)."""

    model: ReImagenUNet
    guidance: GuidanceStrategy = field(default_factory=lambda: JointGuidance(w=1.0))
    settings: SamplerSettings = field(default_factory=SamplerSettings)
    name: str = ""
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_precision(self.precision, next(self.model.parameters()).device)
        if not self.name:
            c = self.model.cfg
            self.name = f"{c.lowres_size}->{c.image_size}" if c.is_super_resolution else f"{c.image_size}x{c.image_size}"


@dataclass
class CascadeOutput:
    images: Tensor  # (B, 3, H, W) in [0, 1], the last stage's output
    stages: list[Tensor]  # every stage's output in [0, 1] when requested, else empty


class Cascade:
    """Stages chained by resolution, sharing one frozen text encoder."""

    def __init__(self, stages: Sequence[Stage], text_encoder: TextEncoder):
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        if stages[0].model.cfg.is_super_resolution:
            raise ValueError("the first stage must be a text-to-image stage, not super-resolution")
        for prev, nxt in zip(stages, stages[1:]):
            if nxt.model.cfg.lowres_size != prev.model.cfg.image_size:
                raise ValueError(f"stage {nxt.name} expects {nxt.model.cfg.lowres_size}px input but stage "
                                 f"{prev.name} produces {prev.model.cfg.image_size}px")
        for st in stages:
            if st.model.cfg.text_dim != text_encoder.dim:
                raise ValueError(f"stage {st.name} was built for {st.model.cfg.text_dim}-d text embeddings, "
                                 f"the text encoder gives {text_encoder.dim}-d")
        self.stages = list(stages)
        self.text_encoder = text_encoder

    @classmethod
    def from_checkpoints(cls, checkpoints: Sequence[str | Path], guidance: Sequence[GuidanceStrategy],
                         settings: Sequence[SamplerSettings], device: str | torch.device = "cpu",
                         ema: bool = True, precision: str = "fp32") -> "Cascade":
        """The cascade of trained stage checkpoints (base first; folders written by ``reimagen.training.train``) with one
        guidance and one sampler setting per stage, sharing the base stage's text encoder. A stage without
        neighbour attention samples its joint guidance text-only; interleaved or weighted guidance needs
        neighbour attention (refused, naming the checkpoint)."""
        from ..models.checkpoint import load_stage

        check_precision(precision, device)
        if not checkpoints:
            raise ValueError("no stage checkpoints: give the base stage first, then each super-resolution stage")
        if len(guidance) != len(checkpoints) or len(settings) != len(checkpoints):
            raise ValueError(f"{len(checkpoints)} stage checkpoints need as many guidance strategies and sampler "
                             f"settings, got {len(guidance)} and {len(settings)}")
        loaded = [load_stage(p, ema=ema, device=device) for p in checkpoints]
        stages = []
        for path, (model, _), g, st in zip(checkpoints, loaded, guidance, settings):
            if g.needs_neighbours and model.neighbour_attn is None:
                if not isinstance(g, JointGuidance):
                    raise ValueError(f"{path} has no neighbour attention: {type(g).__name__} needs it; sample "
                                     "it without retrieval")
                g = JointGuidance(w=g.w, use_neighbours=False)
            stages.append(Stage(model, g, st, precision=precision))
        return cls(stages, loaded[0][1])

    def without_retrieval(self) -> "Cascade":
        """The same stages sampled text-only: joint guidance on the text (an interleaved or weighted stage uses its
        text weight w_p), as the benchmarks' text-only runs of a Re-Imagen cascade."""
        stages = []
        for st in self.stages:
            w = st.guidance.w if isinstance(st.guidance, JointGuidance) else st.guidance.w_p  # type: ignore[attr-defined]
            stages.append(Stage(st.model, JointGuidance(w=w, use_neighbours=False), st.settings, st.name, st.precision))
        return Cascade(stages, self.text_encoder)

    @property
    def device(self) -> torch.device:
        return next(self.stages[0].model.parameters()).device

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[str],
        neighbours: Neighbours | None = None,
        seed: int = 0,
        prompt_ids: Sequence[str | int] | None = None,
        sample_indices: Sequence[int] | None = None,
        return_stages: bool = False,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> CascadeOutput:
        """Sample one image per prompt. Image i is a function of (prompt_ids[i], sample_indices[i], seed):
        repeat a prompt with sample indices 0..3 for the paper's 4 samples per prompt.

        ``prompt_ids`` default to the prompt strings and ``sample_indices`` to 0. ``batch_size`` splits the
        work into chunks (the result does not depend on it).
        """
        n = len(prompts)
        prompt_ids = list(prompts) if prompt_ids is None else list(prompt_ids)
        sample_indices = [0] * n if sample_indices is None else list(sample_indices)
        if len(prompt_ids) != n or len(sample_indices) != n:
            raise ValueError(f"batch length mismatch: {n} prompts, {len(prompt_ids)} prompt ids, "
                             f"{len(sample_indices)} sample indices")
        if neighbours is not None and len(neighbours) != n:
            raise ValueError(f"batch length mismatch: {n} prompts, {len(neighbours)} neighbour rows")
        # 1. Encode prompts and neighbour texts once (the encoder deduplicates repeated prompts).
        text = self.text_encoder.encode(list(prompts))
        nbr_text = (self.text_encoder.encode([t for row in neighbours.texts for t in row])
                    if neighbours is not None else None)
        bs = batch_size or n
        finals: list[Tensor] = []
        per_stage: list[list[Tensor]] = [[] for _ in self.stages]
        for start in range(0, n, bs):
            rows = list(range(start, min(n, start + bs)))
            outs = self._sample_rows(rows, text, nbr_text, neighbours, seed, prompt_ids, sample_indices, progress)
            finals.append(outs[-1])
            for j, o in enumerate(outs):
                per_stage[j].append(o)
        to01 = lambda x: ((x + 1) / 2).clamp(0, 1)  # noqa: E731
        stages = [to01(torch.cat(p)) for p in per_stage] if return_stages else []
        return CascadeOutput(to01(torch.cat(finals)), stages)

    def _sample_rows(self, rows: list[int], text: TextEncoding, nbr_text: TextEncoding | None,
                     neighbours: Neighbours | None, seed: int, prompt_ids: list, sample_indices: list,
                     progress: bool) -> list[Tensor]:
        pids = [prompt_ids[i] for i in rows]
        sidx = [sample_indices[i] for i in rows]
        k = neighbours.k if neighbours is not None else 0
        nbr_rows = [i * k + j for i in rows for j in range(k)]
        outs: list[Tensor] = []
        lowres = None
        sub = neighbours.index(rows) if neighbours is not None else None
        ptext = TextEncoding(text.embeddings[rows], text.mask[rows])
        ntext = TextEncoding(nbr_text.embeddings[nbr_rows], nbr_text.mask[nbr_rows]) if nbr_text is not None else None
        for si, st in enumerate(self.stages):
            cb = prog = None
            if progress:
                from rich.progress import Progress

                prog = Progress(transient=True)
                task = prog.add_task(f"stage {st.name}", total=st.settings.steps)
                prog.start()
                cb = lambda i, tot: prog.update(task, completed=i)  # noqa: E731
            try:
                x = run_stage(st, ptext, sub, ntext, seed, pids, sidx, si, lowres=lowres, callback=cb)
            finally:
                if prog is not None:
                    prog.stop()
            outs.append(x.cpu())
            lowres = x
        return outs


@torch.no_grad()
def run_stage(stage: Stage, text: TextEncoding, neighbours: Neighbours | None, neighbour_text: TextEncoding | None,
              seed: int, prompt_ids: Sequence[str | int], sample_indices: Sequence[int], stage_index: int,
              lowres: Tensor | None = None, callback: Callable[[int, int], None] | None = None,
              init: Tensor | None = None) -> Tensor:
    """One stage for B rows, in [-1, 1]: project the prompts' text, encode the neighbours once through the
    shared DStack at t = 0 (the neighbour cache, Sec. 3.2; only if the stage has neighbour attention and its
    guidance uses it), then sample with the seeds of (prompt id, sample index, ``stage_index``, seed).

    ``text`` holds the B prompts' encodings, ``neighbour_text`` the B*K neighbour texts' (row-major), ``lowres``
    the previous stage's output for super-resolution stages, ``init`` the images an SDEdit run starts from
    (``SamplerSettings.start_t``). ``Cascade.sample`` chains it; the FID sweep's
    super-resolution generator and the toy world's stage decomposition call it on images of their own."""
    model = stage.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with autocast(stage.precision, device):
            tc = model.project_text(text.embeddings.to(device), text.mask.to(device))
            memory = None
            if neighbours is not None and model.neighbour_attn is not None and stage.guidance.needs_neighbours:
                if neighbour_text is None:
                    raise ValueError("neighbours were given without their texts")
                ntc = model.project_text(neighbour_text.embeddings.to(device), neighbour_text.mask.to(device))
                valid = None if neighbours.mask is None else neighbours.mask.to(device)
                memory = model.encode_neighbours(neighbours.at_size(model.cfg.image_size).to(device), ntc, valid)
            return sample_stage(model, tc, memory, stage.guidance, stage.settings,
                                make_generators(seed, prompt_ids, sample_indices, stage_index, "noise", device),
                                make_generators(seed, prompt_ids, sample_indices, stage_index, "guidance", device),
                                lowres=lowres, stage_name=stage.name, callback=callback, init=init)
    finally:
        model.train(was_training)
