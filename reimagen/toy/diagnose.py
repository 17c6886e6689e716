"""Does a trained stage use its neighbours' *content*? A denoising probe (issue [toy], "find out why").

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
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .world import World, entity_masks, render_many


def _images(world: World, scenes, key: str, size: int) -> torch.Tensor:
    x = torch.from_numpy(render_many(world, scenes, key)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False) if size != 64 else x


@torch.no_grad()
def neighbour_probe(checkpoint: str | Path, world: World | None = None, per_split: int = 12, k: int = 2,
                    levels: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9), seed: int = 0, ema: bool = True) -> list[dict]:
    """Rows (t, condition, split, x0_mse) for a base-stage checkpoint (see the module docstring)."""
    from ..diffusion import get_schedule, q_sample, to_x0
    from ..train import load_stage

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
    for t in levels:
        tt = torch.full((b,), float(t))
        lt = log_snr(tt)
        x_t = q_sample(x0, lt, torch.randn(x0.shape, generator=g))
        for cond in ("right", "wrong", "none"):
            mem = memories["right" if cond == "none" else cond]
            drop = torch.full((b,), cond == "none")
            pred = model(x_t, tt, tc, mem, torch.zeros(b, dtype=torch.bool), drop)
            sq = (to_x0(pred, x_t, lt, model.cfg.prediction).clamp(-1, 1) - x0) ** 2
            err = {"image": sq.mean(dim=(1, 2, 3)).numpy(),
                   "entity": ((sq * mask).sum(dim=(1, 2, 3)) / (3 * mask.sum(dim=(1, 2, 3)))).numpy()}
            for sp in ("frequent", "infrequent", "unseen"):
                m = split == sp
                for region, e in err.items():
                    rows.append({"t": t, "condition": cond, "split": sp, "region": region,
                                 "x0_mse": float(e[m].mean()), "n": int(m.sum())})
    return rows


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
