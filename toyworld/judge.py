"""The judge: a small CNN that reads every attribute of a rendered scene back from its pixels.

It plays three roles in the toy world:

1. **Faithfulness** exactly as the paper's raters define it (Sec. 4.2, "Faithfulness"): an image is faithful when
   the entity's appearance matches its reference (shape, body colour, pattern, pattern colour all read back as the
   entity's) AND the scene matches the text (background, count, position as the prompt says). ``score`` returns
   both halves per image.
2. **A world-specific FID**: ``features`` gives the penultimate activations (``FEATURE_DIM``-d), used by
   ``evaluation.synthetic`` in place of Inception's pool3 (Inception was trained on photographs; these are not).
3. **A simulated rater** for the human-evaluation reports (``human_eval``), from the same readings.

It is trained on fresh renders only (never on model samples), with generic photometric augmentation (blur,
noise, down-up sampling, JPEG-free colour jitter) so that it reads slightly degraded images; nothing about it is
fitted to the diffusion model it judges.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from reimagen.utils.atomic import replacing_path, write_json
from .world import ATTRIBUTE_CLASSES, LOOK_ATTRIBUTES, SCENE_ATTRIBUTES, Scene, World, render_many, scene_attributes

Tensor = torch.Tensor
FEATURE_DIM = 256
#: classes per head; pattern_colour has an extra "none" class (index 0) for plain entities
HEADS: dict[str, tuple] = {**ATTRIBUTE_CLASSES, "pattern_colour": ("",) + tuple(ATTRIBUTE_CLASSES["pattern_colour"])}
ATTRIBUTES: tuple[str, ...] = LOOK_ATTRIBUTES + SCENE_ATTRIBUTES


def labels_of(world: World, scenes: Sequence[Scene]) -> dict[str, Tensor]:
    """Integer class labels per attribute head."""
    rows = [scene_attributes(world, s) for s in scenes]
    return {a: torch.tensor([HEADS[a].index(r[a]) for r in rows]) for a in ATTRIBUTES}


class Judge(nn.Module):
    """64x64 RGB in [0, 1] -> logits per attribute (and ``FEATURE_DIM``-d features)."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(i: int, o: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        w = width
        self.body = nn.Sequential(block(3, w, 1), block(w, w, 2),            # 32x32
                                  block(w, 2 * w, 1), block(2 * w, 2 * w, 2),  # 16x16
                                  block(2 * w, 4 * w, 1), block(4 * w, 4 * w, 2),  # 8x8
                                  block(4 * w, 2 * w, 1))
        # Flattened (not pooled): position is one of the attributes.
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 64, FEATURE_DIM), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({a: nn.Linear(FEATURE_DIM, len(HEADS[a])) for a in ATTRIBUTES})

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations of images ``x`` (B, 3, 64, 64) in [0, 1]; other sizes are resized."""
        if x.shape[-1] != 64 or x.shape[-2] != 64:
            x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        return self.fc(self.body((x - 0.5) / 0.25))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.features(x)
        return {a: h(f) for a, h in self.heads.items()}

    @torch.no_grad()
    def read(self, x: Tensor, batch_size: int = 256) -> dict[str, list]:
        """The attribute values read from images ``x`` (B, 3, H, W) in [0, 1]."""
        self.eval()
        out: dict[str, list] = {a: [] for a in ATTRIBUTES}
        for i in range(0, x.shape[0], batch_size):
            logits = self(x[i:i + batch_size].float())
            for a in ATTRIBUTES:
                out[a] += [HEADS[a][j] for j in logits[a].argmax(1).tolist()]
        return out


@dataclass
class Verdict:
    """What the judge reads in one image, against what was asked."""

    look_ok: bool  # shape, body, pattern (and pattern colour if patterned) match the entity
    scene_ok: bool  # background, count, position match the prompt's scene
    readings: dict[str, object]

    @property
    def faithful(self) -> bool:
        return self.look_ok and self.scene_ok


def judged_attributes(truth: dict[str, object]) -> list[str]:
    """The attributes an image of a scene with ground truth ``truth`` (``scene_attributes``) is judged on: all of
    them, except the pattern colour of a plain entity, which has none."""
    return [a for a in ATTRIBUTES if not (a == "pattern_colour" and truth["pattern"] == "plain")]


def verdicts(judge: Judge, world: World, images: Tensor, scenes: Sequence[Scene]) -> list[Verdict]:
    """Judge ``images`` (B, 3, H, W in [0, 1]) against the scenes their prompts asked for (Sec. 4.2's faithfulness:
    the entity looks like its reference AND the scene is as the text says)."""
    reads = judge.read(images)
    out = []
    for i, s in enumerate(scenes):
        truth = scene_attributes(world, s)
        r = {a: reads[a][i] for a in ATTRIBUTES}
        ok = {a: r[a] == truth[a] for a in judged_attributes(truth)}
        look = all(v for a, v in ok.items() if a in LOOK_ATTRIBUTES)
        scene = all(v for a, v in ok.items() if a in SCENE_ATTRIBUTES)
        out.append(Verdict(look, scene, r))
    return out


@torch.no_grad()
def faithful_probability(judge: Judge, world: World, images: Tensor, scenes: Sequence[Scene]) -> Tensor:
    """The judge's P(faithful) per image: the product, over the judged attributes, of its probability for the value
    the entity and the prompt ask for. The toy world's VQA-style faithfulness score (VQAScore asks a VQA model for
    P("yes") to "does this figure show <text>?"; here the reader of every attribute answers)."""
    judge.eval()
    logits = judge(images.float())
    out = torch.ones(len(scenes))
    for i, s in enumerate(scenes):
        truth = scene_attributes(world, s)
        for a in judged_attributes(truth):
            out[i] *= logits[a][i].softmax(-1)[HEADS[a].index(truth[a])]
    return out


@torch.no_grad()
def feature_similarity(judge: Judge, images: Tensor, references: Tensor) -> Tensor:
    """Cosine similarity of the judge's features of each image and its reference image: the toy world's subject
    similarity, the role DINO plays for DreamBench (features that tell instances of a class apart)."""
    judge.eval()
    return F.cosine_similarity(judge.features(images.float()), judge.features(references.float()), dim=1)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Generic degradations (per image): blur or 32px down-up sampling, Gaussian noise, brightness/contrast."""
    b = x.shape[0]
    r = torch.rand(b, 4, generator=g)
    low = F.interpolate(F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False),
                        size=(64, 64), mode="bilinear", align_corners=False)
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).expand(3, 1, 3, 3)
    blur = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    x = torch.where((r[:, 0] < 0.3)[:, None, None, None], low, x)
    x = torch.where(((r[:, 0] >= 0.3) & (r[:, 0] < 0.5))[:, None, None, None], blur, x)
    sigma = (r[:, 1] * 0.06)[:, None, None, None]
    x = x + sigma * torch.randn(x.shape, generator=g)
    contrast = (0.85 + 0.3 * r[:, 2])[:, None, None, None]
    bright = (r[:, 3] - 0.5)[:, None, None, None] * 0.1
    return ((x - 0.5) * contrast + 0.5 + bright).clamp(0, 1)


def _random_scenes(world: World, n: int, key: str) -> list[Scene]:
    """Scenes of uniformly drawn entities (seen and unseen alike: the judge must know every look)."""
    from .world import _rng

    rng = _rng(world.spec.seed, "judge-scenes", key)
    return [World.random_scene(world.entities[int(i)].id, rng) for i in rng.integers(0, len(world.entities), n)]


def judge_data(world: World, n: int, key: str) -> tuple[Tensor, dict[str, Tensor]]:
    scenes = _random_scenes(world, n, key)
    imgs = torch.from_numpy(render_many(world, scenes, f"judge-{key}")).permute(0, 3, 1, 2).float() / 255
    return imgs, labels_of(world, scenes)


def accuracy(judge: Judge, images: Tensor, labels: dict[str, Tensor]) -> dict[str, float]:
    judge.eval()
    correct = {a: 0 for a in ATTRIBUTES}
    with torch.no_grad():
        for i in range(0, images.shape[0], 256):
            logits = judge(images[i:i + 256])
            for a in ATTRIBUTES:
                correct[a] += int((logits[a].argmax(1) == labels[a][i:i + 256]).sum())
    return {a: correct[a] / images.shape[0] for a in ATTRIBUTES}


def train_judge(world: World, n_train: int = 16_000, n_test: int = 3_000, epochs: int = 5, batch_size: int = 128,
                lr: float = 2e-3, seed: int = 0, progress: bool = True) -> tuple[Judge, dict]:
    """Train a judge on fresh renders; returns it and a report with per-attribute accuracy on new renders."""
    t0 = time.time()
    x, y = judge_data(world, n_train, "train")
    xt, yt = judge_data(world, n_test, "test")
    torch.manual_seed(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (n_train // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    step = 0
    for ep in range(epochs):
        judge.train()
        perm = torch.randperm(n_train, generator=g)
        total = 0.0
        for i in range(0, n_train - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            logits = judge(_augment(x[idx], g))
            loss = sum(F.cross_entropy(logits[a], y[a][idx]) for a in ATTRIBUTES)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total += float(loss.detach())
        if progress:
            acc = accuracy(judge, xt, yt)
            print(f"judge epoch {ep + 1}/{epochs}: loss {total / (n_train // batch_size):.4f}, "
                  f"min test accuracy {min(acc.values()):.4f} ({min(acc, key=acc.get)})", flush=True)
    acc = accuracy(judge, xt, yt)
    report = {"test_accuracy": acc, "n_train": n_train, "n_test": n_test, "epochs": epochs,
              "seconds": round(time.time() - t0, 1), "world": world.fingerprint()}
    return judge.eval(), report


def save_judge(judge: Judge, path: str | Path, report: dict) -> Path:
    """``path/judge.safetensors`` (fp16) + ``path/judge.json`` (the report), written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in judge.state_dict().items()}
    with replacing_path(path / "judge.safetensors") as tmp:
        save_file(sd, str(tmp))
    write_json(path / "judge.json", report, indent=2)
    return path


def judge_info(path: str | Path) -> dict:
    """What identifies a judge folder in results: its resolved path, the sha256 (16 hex digits) of its weights,
    and from its ``judge.json`` (if any) the world it was trained on and its minimum per-attribute test accuracy
    (None when unknown)."""
    import hashlib

    path = Path(path)
    h = hashlib.sha256()
    with open(path / "judge.safetensors", "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    report = json.loads((path / "judge.json").read_text()) if (path / "judge.json").is_file() else {}
    acc = report.get("test_accuracy") or {}
    return {"path": str(path.resolve()), "sha256": h.hexdigest()[:16], "world": report.get("world"),
            "min_test_accuracy": min(acc.values()) if acc else None}


def load_judge(path: str | Path) -> Judge:
    from safetensors.torch import load_file

    f = Path(path) / "judge.safetensors"
    if not f.is_file():
        raise FileNotFoundError(f"no judge weights at {f}; train one with `reimagen-eval toy judge --out {path}`")
    judge = Judge()
    sd = load_file(str(f))
    judge.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    return judge.eval()
