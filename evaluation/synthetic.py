"""``--dataset synthetic``: FID with in-domain retrieval (Sec. 4.1) on the toy world's long tail.

The paper measures FID on COCO / WikiImages with each dataset's own train split as the retrieval database
("FID"), or with an out-of-domain / no database ("ZS-FID"), Table 1. This module gives the synthetic world the
same protocol, registered as a plugin of :mod:`evaluation.datasets`::

    reimagen-eval fid --dataset synthetic --dataset-root runs/toyworld --db synthetic-train \
        --model runs/toy-train/base/last --sr-model runs/toy-train/sr/last --num-prompts 64 \
        --guidance-64 1.0,3.0 --guidance-sr 1 --steps 16 --sr-steps 8 --sampler dpmpp-2m \
        --feature-extractor judge --metrics fid --out runs/fid-toy

* **Prompts**: ``--num-prompts`` (default 500: this runs on a CPU) captions drawn with ``--seed`` from the
  world's held-out validation scenes (``validation.parquet``, ids ``v00000`` ...).
* **Reference**: ALL validation images (2,000 for the default world), whatever the number of prompts.
* **In-domain database** ``synthetic-train``: the world's training collection (``corpus.parquet``), so
  ``--db synthetic-train`` gives the label FID and ``--db none`` the text-only ZS-FID row.
* **Resolution**: the world is drawn at 64x64, so ``--resolution`` defaults to 64 for this dataset.
* **Features**: Inception was trained on photographs; ``--feature-extractor judge``
  uses the world's judge CNN (``toyworld/judge.py``, 256-d penultimate features) instead. Its cache key
  carries the sha256 of the weights file, so judge statistics never collide with Inception ones (or with those
  of another judge). ``$REIMAGEN_TOY_JUDGE`` points at another judge folder (tests use an untrained one).

``--dataset-root`` is a world folder written by ``reimagen-eval toy build --out ROOT``. A folder that does not
exist yet (or is empty) is built on the spot, deterministically (the world is a pure function of its spec):
the validation split only (~10 s for the default world); the 20K-image corpus (~2 min) only when
``--db synthetic-train`` asks for it. Dataset options (``-O KEY=VALUE``):

    world_seed=S        the world's seed (default: the folder's own, 0 when building)
    build=false         never build: a missing world is an error naming ``reimagen-eval toy build``
    n_entities=, n_unseen=, corpus_size=, validation_size=, n_references=, zipf_s=, zipf_q=
                        other ``WorldSpec`` fields, for building a non-default world (checked against an
                        existing folder's ``world.json``)
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .datasets import FidDataset, register_dataset
from .features import CustomExtractor, file_digest
from .protocol import draw_prompts

NAME = "synthetic"
IN_DOMAIN_DB = "synthetic-train"
DEFAULT_NUM_PROMPTS = 500
RESOLUTION = 64  # the world's native size (toyworld.world.IMAGE_SIZE)
JUDGE_ENV = "REIMAGEN_TOY_JUDGE"
LOCK = ".synthetic-build.lock"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The world folder
# ----------------------------------------------------------------------------------------------
def _build_hint(root: Path, spec) -> str:
    extra = "" if spec is None or spec.seed == 0 else f" --seed {spec.seed}"
    return f"build it with `reimagen-eval toy build --out {root}{extra}`"


def _parse_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"dataset {NAME}: {what}={value!r} is not a boolean (true/false)")


def _spec_overrides(world_seed: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``WorldSpec`` fields given as dataset options, converted to their types (unknown keys: TypeError, which
    ``open_dataset`` reports as a bad --dataset-option)."""
    from toyworld.world import WorldSpec

    types = {f.name: type(f.default) for f in fields(WorldSpec) if f.name != "seed"}
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in types:
            raise TypeError(f"unexpected option {key!r}; known: world_seed, build, {', '.join(sorted(types))}")
        try:
            out[key] = types[key](value)
        except ValueError:
            raise ValueError(f"dataset {NAME}: {key}={value!r} is not a {types[key].__name__}") from None
    if world_seed is not None:
        try:
            out["seed"] = int(world_seed)
        except ValueError:
            raise ValueError(f"dataset {NAME}: world_seed={world_seed!r} is not an integer") from None
    return out


class WorldFolder:
    """A world folder on disk: which files it holds, the spec it was built with, building what is missing."""

    def __init__(self, root: Path, overrides: dict[str, Any], build: bool):
        from toyworld.world import WorldSpec

        self.root, self.build, self.overrides = root, build, overrides
        self.manifest: dict[str, Any] | None = None
        mf = root / "world.json"
        if mf.is_file():
            self.manifest = json.loads(mf.read_text())
            on_disk = WorldSpec(**self.manifest["spec"])
            differ = {k: (getattr(on_disk, k), v) for k, v in overrides.items() if getattr(on_disk, k) != v}
            if differ:
                what = ", ".join(f"{k}={v!r} (the folder's: {d!r})" for k, (d, v) in sorted(differ.items()))
                raise ValueError(f"{root} holds another world than the --dataset-option values ask for: {what}; "
                                 "drop those options or use another --dataset-root")
            self.spec = on_disk
        else:
            self.spec = replace(WorldSpec(), **overrides)
        self._world = None

    @property
    def world(self):
        if self._world is None:
            from toyworld.world import World

            self._world = World(self.spec)
        return self._world

    def has(self, split: str) -> bool:
        return (self.root / f"{split}.parquet").is_file() and (self.root / f"{split}.tar").is_file()

    def _check_buildable(self, split: str) -> None:
        r = self.root
        if not self.build:
            raise FileNotFoundError(f"{r} holds no synthetic world ({split}.parquet / {split}.tar missing); "
                                    f"{_build_hint(r, self.spec)}, or drop --dataset-option build=false to build "
                                    "it on the spot")
        if r.exists() and not r.is_dir():
            raise FileNotFoundError(f"--dataset-root {r} is a file, not a synthetic world folder")
        if (r / f"{split}.parquet").is_file():  # (a lone .tar is an interrupted build: it is simply redone)
            raise FileNotFoundError(f"{r} has {split}.parquet but not {split}.tar: a damaged world folder; delete "
                                    f"{split}.parquet to let it be rebuilt, or {_build_hint(r, self.spec)} into a "
                                    "fresh folder")
        toy = any((r / f).exists() for f in ("world.json", "validation.parquet", "validation.tar", "corpus.parquet",
                                             "corpus.tar", "kb.parquet"))
        if r.is_dir() and not toy and any(f.name != LOCK for f in r.iterdir()):
            raise FileNotFoundError(f"--dataset-root {r} is not a synthetic world (no world.json or "
                                    "validation.parquet) and is not empty, so nothing is built into it; pass a "
                                    "world folder made by `reimagen-eval toy build --out ROOT`, or a new folder "
                                    "to build one there")

    def ensure_validation(self) -> None:
        if self.has("validation"):
            return
        self._check_buildable("validation")
        from toyworld.build import build_split  # the same writer as build_world_files, validation only

        from .metrics import file_lock

        with file_lock(self.root / LOCK):
            if self.has("validation"):  # another process built it meanwhile
                return
            self.root.mkdir(parents=True, exist_ok=True)
            w = self.world
            _log(f"dataset {NAME}: building the validation split of world seed {self.spec.seed} "
                 f"({len(w.validation)} images) into {self.root}")
            build_split(w, self.root, "validation", progress=False)

    def ensure_corpus(self) -> None:
        if self.has("corpus"):
            return
        self._check_buildable("corpus")
        from toyworld.build import build_world_files

        from .metrics import file_lock

        with file_lock(self.root / LOCK):
            if self.has("corpus"):
                return
            _log(f"dataset {NAME}: --db {IN_DOMAIN_DB} needs the training corpus; building the rest of world seed "
                 f"{self.spec.seed} ({self.spec.corpus_size} images, references, triples) into {self.root}")
            build_world_files(self.world, self.root, progress=False)

    def open(self, split: str):
        """The split's knowledge base, with its root set to this folder (the stored root may be relative)."""
        from reimagen.retrieval.base import KnowledgeBase

        kb = KnowledgeBase.from_parquet(self.root / f"{split}.parquet")
        kb.root = str(self.root)
        fp = kb.meta.get("world")
        if not fp or kb.meta.get("split") != split:
            raise ValueError(f"{self.root / (split + '.parquet')} is not the {split} split of a synthetic world "
                             f"(meta split={kb.meta.get('split')!r}); {_build_hint(self.root, self.spec)}")
        expected = self.manifest["fingerprint"] if self.manifest else self.world.fingerprint()
        if fp != expected:
            raise ValueError(f"{self.root / (split + '.parquet')} belongs to world {fp}, not to world {expected} "
                             f"(WorldSpec {self.spec}); the folder mixes two worlds or the -O world options "
                             "differ from the ones it was built with")
        return kb


def synthetic(root: str | None, *, num_prompts: int | None = None, seed: int = 0, world_seed: Any = None,
              build: Any = True, **spec_options: Any) -> FidDataset:
    """The toy world's FID dataset (Sec. 4.1's protocol; see the module docstring)."""
    if root is None:
        raise ValueError(f"--dataset {NAME} needs --dataset-root: a world folder made by `reimagen-eval toy build "
                         "--out ROOT` (a new folder is built on the spot)")
    folder = WorldFolder(Path(root).expanduser().resolve(), _spec_overrides(world_seed, spec_options),
                         _parse_bool(build, "build"))
    folder.ensure_validation()
    val = folder.open("validation")
    fp = val.meta["world"]
    if num_prompts is None:
        n = min(DEFAULT_NUM_PROMPTS, len(val))
    else:
        n = int(num_prompts)
    prompts = draw_prompts(val.ids, val.texts, n, seed, what=f"the synthetic world's validation split ({folder.root})")

    def open_in_domain():
        folder.ensure_corpus()
        return folder.open("corpus")

    # The world fingerprint is part of the split name, so the reference-statistics cache key (which fingerprints
    # tar:// references by container size only) never mixes two worlds of equal size.
    return FidDataset(NAME, f"validation-{fp}", prompts, list(val.image_refs), IN_DOMAIN_DB, open_in_domain,
                      root=str(folder.root), reference_root=str(folder.root),
                      meta={"world": fp, "world_seed": folder.spec.seed, "validation_size": len(val),
                            "train_split": "corpus"})


register_dataset(NAME, synthetic, default_num_prompts=DEFAULT_NUM_PROMPTS, default_resolution=RESOLUTION)


# ----------------------------------------------------------------------------------------------
# The judge as FID feature extractor
# ----------------------------------------------------------------------------------------------
def judge_dir() -> Path:
    """``$REIMAGEN_TOY_JUDGE``, else the shipped ``toyworld/weights/judge``."""
    env = os.environ.get(JUDGE_ENV)
    if env:
        return Path(env).expanduser()
    from toyworld import WEIGHTS

    return WEIGHTS / "judge"


class JudgeFeatures(nn.Module):
    """The backends' custom-extractor contract -- float (B, 3, H, W) in [0, 255] (H = W = 299 from clean-fid)
    -> (B, 256) -- around ``Judge.features`` (which takes [0, 1] and resizes to its 64x64 itself)."""

    def __init__(self, judge: nn.Module):
        super().__init__()
        from toyworld.judge import FEATURE_DIM

        self.judge = judge.eval()
        self.feature_dim = FEATURE_DIM
        self.requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge.features(x.float() / 255.0)


def judge_features(path: str | os.PathLike | None = None) -> CustomExtractor:
    """``--feature-extractor evaluation.synthetic:judge_features``: the toy world's judge (FID on the synthetic
    world, Sec. 4.1's protocol with a world-specific network in place of Inception). The cache key is the sha256
    of the weights, so statistics of different judges (or of Inception) never mix."""
    from toyworld.judge import FEATURE_DIM, load_judge

    folder = Path(path).expanduser() if path is not None else judge_dir()
    weights = folder / "judge.safetensors"
    if not weights.is_file():
        via = f"${JUDGE_ENV}" if os.environ.get(JUDGE_ENV) and path is None else "the shipped location"
        raise FileNotFoundError(f"no toy-world judge weights at {weights} ({via}); train one with "
                                f"`reimagen-eval toy judge --out {folder}` or set {JUDGE_ENV}=FOLDER to a folder "
                                "holding judge.safetensors")
    digest = file_digest(weights)
    return CustomExtractor("toy-judge", FEATURE_DIM, lambda: JudgeFeatures(load_judge(folder)),
                           key=f"toy-judge-{digest}", params={"path": str(weights.resolve()), "sha256": digest})


__all__ = ["NAME", "IN_DOMAIN_DB", "DEFAULT_NUM_PROMPTS", "RESOLUTION", "JUDGE_ENV", "WorldFolder", "synthetic",
           "judge_dir", "JudgeFeatures", "judge_features"]
