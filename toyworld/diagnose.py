"""Does a trained stage use its neighbours' *content*? A denoising probe.

Sampling metrics (faithfulness, FID) mix everything a weak model gets wrong. This probe isolates the retrieval
path: it noises real renders of bench scenes to level t (Eq. 1), predicts x0 once with

    right   the entity's own reference pairs as neighbours (what retrieval gives),
    wrong   another entity's reference pairs (same format, wrong content),
    none    the neighbours dropped (the learned null keys/values of Sec. 3.2's neighbour dropout),

and reports the x0 mean squared error per frequency split, over the whole image and over the entity's own pixels
(``entity_masks``: the entity covers ~7% of an image, so the whole-image error dilutes what a neighbour can
tell about ~13x). A model that copies the look from its neighbours has err(right) < err(wrong) on unseen
entities (their look is nowhere else); a model that ignores them has err(right) = err(wrong), whatever
err(none) is. It runs in seconds, so it can follow a training run.

The same probe also asks whether the stage reads the caption's words: with the right neighbours, the caption
of the same scene with left and right swapped (``swap:position``) or with another background
(``swap:background``). A stage that reads a word predicts worse x0 with it swapped (``caption_table``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .world import BACKGROUNDS, BenchPrompt, World, entity_masks, render_many, scene_attributes

if TYPE_CHECKING:
    from reimagen.pipelines.cascade import Neighbours


def _images(world: World, scenes, key: str, size: int) -> torch.Tensor:
    x = torch.from_numpy(render_many(world, scenes, key)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return _down(x, size) if size != 64 else x


def _down(x: torch.Tensor, size: int) -> torch.Tensor:
    """64 px renders at a stage's size (bilinear, antialiased: what the trainer does to the corpus)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _up64(x: torch.Tensor) -> torch.Tensor:
    """A stage's images at the judge's 64 px (bilinear): an upsampler that adds nothing."""
    return F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)


def _base_guidance(retrieval: bool, w: float, eta: float):
    """The base stage's guidance in the toy world's EntityDrawBench default: interleaved (Eq. 6) with
    retrieval, joint on the text alone without."""
    from reimagen.diffusion.guidance import JointGuidance, make_guidance

    return make_guidance("interleaved", w_text=w, w_neighbours=w, eta=eta) if retrieval else JointGuidance(w=w, use_neighbours=False)


@torch.no_grad()
def neighbour_probe(checkpoint: str | Path, world: World | None = None, per_split: int = 12, k: int = 2,
                    levels: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9), seed: int = 0, ema: bool = True) -> list[dict]:
    """Rows (t, condition, split, x0_mse) for a base-stage checkpoint (see the module docstring)."""
    from reimagen.diffusion.gaussian import get_schedule, q_sample, to_x0
    from reimagen.models.checkpoint import load_stage

    world = world or World()
    model, enc = load_stage(checkpoint, ema=ema)
    if model.cfg.is_super_resolution:
        raise ValueError("the probe takes a base (text-to-image) stage")
    size = model.cfg.image_size
    prompts = world.bench_prompts(per_split=per_split, seed=seed)
    refs = world.reference_rows
    if k > min(len(v) for v in refs.values()):
        raise ValueError(f"k = {k} exceeds the {world.spec.n_references} reference pairs per entity")
    x0 = _images(world, [p.scene for p in prompts], "probe", size)
    mask = torch.from_numpy(entity_masks(world, [p.scene for p in prompts], "probe"))[:, None]
    mask = F.interpolate(mask, size=(size, size), mode="area") if size != 64 else mask
    right = torch.stack([_images(world, [world.references[i] for i in refs[p.entity][:k]], "probe-ref", size)
                         for p in prompts])
    perm = [(i + 1) % len(prompts) for i in range(len(prompts))]  # each prompt gets its successor's references
    texts = {"right": [world.reference_caption(p.entity) for p in prompts for _ in range(k)],
             "wrong": [world.reference_caption(prompts[j].entity) for j in perm for _ in range(k)]}
    nbrs = {"right": right, "wrong": right[perm]}
    text = enc.encode([p.text for p in prompts])
    tc = model.project_text(text.embeddings, text.mask)
    log_snr = get_schedule(model.cfg.schedule)
    b = len(prompts)
    split = np.array([p.split for p in prompts])
    g = torch.Generator().manual_seed(seed)
    rows = []
    memories = {}
    for name in ("right", "wrong"):
        e = enc.encode(texts[name])
        memories[name] = model.encode_neighbours(nbrs[name], model.project_text(e.embeddings, e.mask))
    # the caption of the same scene with left and right swapped, or with another background (variant 0, as the
    # bench prompts): does the stage read the words at all? (the right neighbours)
    swapped = {"swap:position": [replace(p.scene, position="right" if p.scene.position == "left" else "left")
                                 for p in prompts],
               "swap:background": [replace(p.scene, background=BACKGROUNDS[(BACKGROUNDS.index(p.scene.background) + 2)
                                                                           % len(BACKGROUNDS)]) for p in prompts]}
    tcs = {}  # condition -> projected caption; the others use the prompt's own (tc)
    for name, scenes in swapped.items():
        e = enc.encode([world.caption(sc, 0) for sc in scenes])
        tcs[name] = model.project_text(e.embeddings, e.mask)
    for t in levels:
        tt = torch.full((b,), float(t))
        lt = log_snr(tt)
        x_t = q_sample(x0, lt, torch.randn(x0.shape, generator=g))
        for cond in ("right", "wrong", "none", *swapped):
            mem = memories["wrong" if cond == "wrong" else "right"]
            drop = torch.full((b,), cond == "none")
            pred = model(x_t, tt, tcs.get(cond, tc), mem, torch.zeros(b, dtype=torch.bool), drop)
            sq = (to_x0(pred, x_t, lt, model.cfg.prediction).clamp(-1, 1) - x0) ** 2
            err = {"image": sq.mean(dim=(1, 2, 3)).numpy(),
                   "entity": ((sq * mask).sum(dim=(1, 2, 3)) / (3 * mask.sum(dim=(1, 2, 3)))).numpy()}
            for sp in ("frequent", "infrequent", "unseen"):
                m = split == sp
                for region, e in err.items():
                    rows.append({"t": t, "condition": cond, "split": sp, "region": region,
                                 "x0_mse": float(e[m].mean()), "n": int(m.sum())})
    return rows


def caption_table(rows: list[dict]) -> str:
    """Markdown: one line per t (splits pooled), the x0 error with the prompt's own caption and with its position
    or background word swapped (right neighbours), on the entity's pixels and on the whole image."""
    out = ["| t | entity: caption | left/right swapped | gain | background swapped | gain "
           "| image: caption | left/right swapped | gain | background swapped | gain |",
           "| ---: |" + " ---: |" * 10]

    def pooled(t, cond, region):
        sel = [r for r in rows if r["t"] == t and r["condition"] == cond and r["region"] == region]
        return sum(r["x0_mse"] * r["n"] for r in sel) / sum(r["n"] for r in sel)

    for t in sorted({r["t"] for r in rows}):
        cells = []
        for region in ("entity", "image"):
            own = pooled(t, "right", region)
            cells.append(f"{own:.4f}")
            for cond in ("swap:position", "swap:background"):
                other = pooled(t, cond, region)
                cells += [f"{other:.4f}", f"{(other - own) / other:+.1%}"]
        out.append(f"| {t:g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def probe_table(rows: list[dict]) -> str:
    """Markdown: one line per (t, split), x0 error with right / wrong / no neighbours and the relative gain of
    right over wrong, on the entity's pixels and (last two columns) on the whole image."""
    out = ["| t | split | entity: right | wrong | none | (wrong - right) / wrong | image: right | gain |",
           "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    order = ["frequent", "infrequent", "unseen"]
    keys = sorted({(r["t"], r["split"]) for r in rows}, key=lambda x: (x[0], order.index(x[1])))

    def gain(v: dict) -> float:
        return (v["wrong"] - v["right"]) / v["wrong"] if v["wrong"] else float("nan")

    for t, sp in keys:
        v = {(r["region"], r["condition"]): r["x0_mse"] for r in rows if r["t"] == t and r["split"] == sp}
        ent = {c: v["entity", c] for c in ("right", "wrong", "none")}
        img = {c: v["image", c] for c in ("right", "wrong")}
        out.append(f"| {t:g} | {sp} | {ent['right']:.4f} | {ent['wrong']:.4f} | {ent['none']:.4f} | {gain(ent):+.1%} "
                   f"| {img['right']:.4f} | {gain(img):+.1%} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Where is faithfulness lost? Each stage fed the truth in place of the stage before it.
# ----------------------------------------------------------------------------------------------
#: The sources of ``stage_decomposition``: how the 64x64 image the judge reads was made.
SOURCES: tuple[str, ...] = (
    "render",                 # the real render of the prompt's scene: the judge's ceiling
    "render32+bilinear",      # the render at the base stage's size, upsampled: a perfect base stage, no SR
    "render32+sr",            # the SR stage on the real low-res render, with the entity's references
    "render32+sr(text)",      # ... and without them
    "base+bilinear",          # the base stage's samples with retrieval, upsampled without the SR stage
    "base+sr",                # the whole cascade with retrieval (what EntityDrawBench runs)
    "base(text)+sr(text)",    # the whole cascade without retrieval
)


def _check_sources(sources: tuple[str, ...]) -> None:
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown sources {sorted(unknown)}; choose from {list(SOURCES)}")


def _bench_rows(world: World, per_split: int, samples: int, k: int, seed: int
                ) -> tuple[list[BenchPrompt], list[int], Neighbours, torch.Tensor]:
    """The bench prompts, each repeated ``samples`` times, their sample indices, their neighbours (the entity's
    first ``k`` reference pairs, freshly rendered) and their scenes' true 64x64 renders, in [-1, 1]."""
    from reimagen.pipelines.cascade import Neighbours

    refs = world.reference_rows
    if k > min(len(v) for v in refs.values()):
        raise ValueError(f"k = {k} exceeds the {world.spec.n_references} reference pairs per entity")
    prompts = [p for p in world.bench_prompts(per_split=per_split, seed=seed) for _ in range(samples)]
    sidx = [i % samples for i in range(len(prompts))]
    truth = _images(world, [p.scene for p in prompts], "decompose", 64)
    nbr64 = _images(world, [world.references[i] for p in prompts for i in refs[p.entity][:k]], "decompose-ref", 64)
    nbrs = Neighbours(nbr64.reshape(len(prompts), k, *nbr64.shape[1:]),
                      [[world.reference_caption(p.entity)] * k for p in prompts])
    return prompts, sidx, nbrs, truth


def _judged_rates(jd, world: World, prompts: list[BenchPrompt], x: torch.Tensor) -> list[dict]:
    """Rows (split, attribute, rate, n): the judge's readings of images ``x`` (B, 3, 64, 64) in [-1, 1] against
    the prompts' scenes; ``look`` is all four look attributes right and ``faithful`` look and scene right
    (Sec. 4.2). The pattern colour counts on patterned entities only."""
    from .judge import judged_attributes, verdicts

    scenes = [p.scene for p in prompts]
    split = np.array([p.split for p in prompts])
    truths = [scene_attributes(world, s) for s in scenes]
    patterned = np.array([t["pattern"] != "plain" for t in truths])
    hits: dict[str, list[bool]] = {}
    for t, v in zip(truths, verdicts(jd, world, ((x + 1) / 2).clamp(0, 1), scenes)):
        for a in judged_attributes(t):
            hits.setdefault(a, []).append(v.readings[a] == t[a])
        hits.setdefault("look", []).append(v.look_ok)
        hits.setdefault("faithful", []).append(v.faithful)
    rows = []
    for a, h in hits.items():
        sp_of = split[patterned] if a == "pattern_colour" else split
        h = np.array(h)
        for sp in ("frequent", "infrequent", "unseen"):
            m = sp_of == sp
            rows.append({"split": sp, "attribute": a, "rate": float(h[m].mean()) if m.any() else float("nan"),
                         "n": int(m.sum())})
    return rows


@torch.no_grad()
def decomposition_images(base: str | Path, sr: str | Path, world: World | None = None, per_split: int = 12,
                         samples: int = 2, k: int = 2, seed: int = 0, steps: int = 25, sr_steps: int = 10,
                         w: float = 3.0, sr_w: float = 3.0, eta: float = 0.5, sources: tuple[str, ...] = SOURCES
                         ) -> tuple[list[BenchPrompt], list[int], Neighbours, dict[str, torch.Tensor]]:
    """The bench prompts (each repeated ``samples`` times), their sample indices, their neighbours (the entity's
    first ``k`` reference pairs, freshly rendered) and, per source, their 64x64 images in [-1, 1] (see
    ``stage_decomposition``)."""
    from reimagen.pipelines.cascade import Stage, run_stage
    from reimagen.diffusion.guidance import JointGuidance
    from reimagen.pipelines.sampling import SamplerSettings
    from reimagen.models.checkpoint import load_stage

    _check_sources(sources)
    world = world or World()
    base_model, enc = load_stage(base)
    sr_model, sr_enc = load_stage(sr)
    if base_model.cfg.is_super_resolution or not sr_model.cfg.is_super_resolution:
        raise ValueError("give a base (text-to-image) checkpoint and a super-resolution checkpoint, in that order")
    if sr_model.cfg.lowres_size != base_model.cfg.image_size:
        raise ValueError(f"the SR stage takes {sr_model.cfg.lowres_size}px, the base makes {base_model.cfg.image_size}px")
    prompts, sidx, nbrs, truth = _bench_rows(world, per_split, samples, k, seed)
    pids = [p.id for p in prompts]
    low = base_model.cfg.image_size
    truth_low = _down(truth, low)

    encoded: dict[int, tuple] = {}  # id(encoder) -> (prompt texts, neighbour texts), each encoded once

    def run(model, encoder, stage: int, retrieval: bool, lowres=None) -> torch.Tensor:
        if id(encoder) not in encoded:
            encoded[id(encoder)] = (encoder.encode([p.text for p in prompts]),
                                    encoder.encode([t for row in nbrs.texts for t in row]))
        text, nt = encoded[id(encoder)]
        g = _base_guidance(retrieval, w, eta) if stage == 0 else JointGuidance(w=sr_w, use_neighbours=retrieval)
        st = Stage(model, g, SamplerSettings(steps=steps if stage == 0 else sr_steps, sampler="ddim"))
        return run_stage(st, text, nbrs if retrieval else None, nt if retrieval else None, seed, pids, sidx, stage,
                         lowres=lowres)

    images: dict[str, torch.Tensor] = {}
    base_r = run(base_model, enc, 0, True) if {"base+bilinear", "base+sr"} & set(sources) else None
    for src in sources:
        if src == "render":
            images[src] = truth
        elif src == "render32+bilinear":
            images[src] = _up64(truth_low)
        elif src in ("render32+sr", "render32+sr(text)"):
            images[src] = run(sr_model, sr_enc, 1, src == "render32+sr", truth_low)
        elif src == "base+bilinear":
            images[src] = _up64(base_r)
        elif src == "base+sr":
            images[src] = run(sr_model, sr_enc, 1, True, base_r)
        else:
            images[src] = run(sr_model, sr_enc, 1, False, run(base_model, enc, 0, False))
    return prompts, sidx, nbrs, images


def stage_decomposition(base: str | Path, sr: str | Path, judge: str | Path, world: World | None = None,
                        **kw) -> list[dict]:
    """Judge-read attribute rates of the bench prompts' images made by each of ``SOURCES`` (keyword arguments:
    ``decomposition_images``'s).

    EntityDrawBench judges the cascade's output only; this feeds each stage the truth in place of the stage
    before it, so a missing attribute can be pinned on the base stage (right in ``render32+sr``, wrong in
    ``base+sr``), on the super-resolution stage (wrong in ``render32+sr``) or on the 32x32 resolution itself
    (wrong in ``render32+bilinear`` too). Sampling is the toy world's EntityDrawBench default (DDIM, interleaved
    guidance on the base stage, joint on the SR stage) and uses the same seeds per (prompt, sample, stage) as
    the cascade, so ``base+sr`` is what ``Cascade.sample`` draws with these settings and neighbours (tested).
    Rows: (source, split, attribute, rate, n), the attribute ``look`` being all four look attributes right and
    ``faithful`` look and scene right (Sec. 4.2).
    """
    from .judge import load_judge

    _check_sources(kw.get("sources", SOURCES))  # before anything is loaded
    world = world or World()
    jd = load_judge(judge)
    prompts, _, _, images = decomposition_images(base, sr, world, **kw)
    return [{"source": src, **r} for src, x in images.items() for r in _judged_rates(jd, world, prompts, x)]


@torch.no_grad()
def noise_recovery(base: str | Path, judge: str | Path, world: World | None = None,
                   times: tuple[float, ...] = (0.2, 0.4, 0.5, 0.6, 0.8, 1.0), per_split: int = 12, samples: int = 2,
                   k: int = 2, seed: int = 0, steps: int = 25, w: float = 3.0, eta: float = 0.5) -> list[dict]:
    """Where in the noise range does the base stage lose an attribute? Judge rates of the base stage's output
    (upsampled bilinearly) when it starts from the scene's true 32 px render noised to time t by Eq. 1 (SDEdit,
    ``SamplerSettings.start_t``), instead of from pure noise, with retrieval (interleaved guidance) and text only.

    At t = 1 this is ordinary sampling (``base+bilinear`` of the decomposition); at small t the answer is still
    in x_t and a good denoiser keeps it. An attribute that is already lost from a t where the true image is
    plainly visible (the cosine schedule's SNR at t = 0.5 is 1) is not a matter of guidance or of composing the
    scene from noise but of how well the denoiser was trained at that noise level. DDIM with
    max(1, round(``steps`` t)) steps, so the step size is that of a ``steps``-step run. Rows (source, t,
    retrieval, split, attribute, rate, n); ``decomposition_table`` prints them.
    """
    from reimagen.pipelines.cascade import Stage, run_stage
    from reimagen.pipelines.sampling import SamplerSettings
    from reimagen.models.checkpoint import load_stage
    from .judge import load_judge

    if not times or not all(0.0 < t <= 1.0 for t in times):
        raise ValueError(f"times must be in (0, 1], got {list(times)}")
    world = world or World()
    model, enc = load_stage(base)
    if model.cfg.is_super_resolution:
        raise ValueError("noise recovery takes a base (text-to-image) checkpoint")
    jd = load_judge(judge)
    prompts, sidx, nbrs, truth = _bench_rows(world, per_split, samples, k, seed)
    pids = [p.id for p in prompts]
    init = _down(truth, model.cfg.image_size)
    text, nt = enc.encode([p.text for p in prompts]), enc.encode([t for row in nbrs.texts for t in row])
    rows = []
    for t in times:
        for retrieval in (True, False):
            st = Stage(model, _base_guidance(retrieval, w, eta),
                       SamplerSettings(steps=max(1, round(steps * t)), sampler="ddim", start_t=t))
            x = _up64(run_stage(st, text, nbrs if retrieval else None, nt if retrieval else None, seed, pids, sidx, 0,
                                init=init if t < 1 else None))
            src = f"render32 noised to t={t:g} -> base" + ("" if retrieval else " (text only)")
            rows += [{"source": src, "t": t, "retrieval": retrieval, **r}
                     for r in _judged_rates(jd, world, prompts, x)]
    return rows


def decomposition_table(rows: list[dict], split: str | None = None) -> str:
    """Markdown: one line per source, the judge's rate per attribute (pooled over splits, or one split)."""
    attrs = list(dict.fromkeys(r["attribute"] for r in rows))
    out = [f"| source ({split or 'all splits'}) | " + " | ".join(attrs) + " |",
           "| --- |" + " ---: |" * len(attrs)]
    for src in dict.fromkeys(r["source"] for r in rows):
        cells = []
        for a in attrs:
            sel = [r for r in rows if r["source"] == src and r["attribute"] == a and (split is None or r["split"] == split)]
            n = sum(r["n"] for r in sel)
            cells.append(f"{sum(r['rate'] * r['n'] for r in sel if r['n']) / n:.2f}" if n else "-")
        out.append(f"| {src} | " + " | ".join(cells) + " |")
    return "\n".join(out)
