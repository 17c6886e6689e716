"""One model grammar for every generating command (``sample``, ``fid``, ``entitydraw``, ``entitydraw-sweep``) and
the Python API: ``--model KIND:TARGET`` plus ``--model-arg KEY=VALUE``.

    reimagen:PATH            Re-Imagen stage checkpoints (repeat --model per stage, base first)
    diffusers:ID_OR_PATH     a diffusers text-to-image pipeline; args steps, guidance, size, scheduler, dtype
    folder:PATH              images made elsewhere, <prompt_id>__<i>.png; arg size
    python:MODULE:FUNCTION   your ``generate(prompts, seeds, **kwargs) -> list of PIL images``; every arg is a kwarg

A bare PATH is read as before: a checkpoint folder is Re-Imagen; a diffusers folder or hub id and an image folder
still work, with a warning naming the explicit spelling (until 0.3).
"""

from __future__ import annotations

import importlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .generate import DiffusersGenerator, FolderGenerator, ImageGenerator, Job

KINDS = ("reimagen", "diffusers", "folder", "python")
# --model-arg keys each kind takes (python: any, passed to the function as keyword arguments)
MODEL_ARGS: dict[str, tuple[str, ...]] = {"reimagen": (), "diffusers": ("steps", "guidance", "size", "scheduler",
                                                                        "dtype"), "folder": ("size",)}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    target: str
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.target}"


def infer_kind(path: str) -> str:
    """The kind of a bare ``--model PATH``: "reimagen" (config.json with a U-Net), "diffusers" (model_index.json,
    or a hub id ORG/NAME that is not a path here), or "folder" (any other folder: images by prompt id)."""
    p = Path(path)
    if p.is_dir():
        if (p / "pipeline.json").is_file():  # ReImagenPipeline.save_pretrained
            return "reimagen"
        if (p / "config.json").is_file():
            from ..models.checkpoint import read_config_json

            meta = read_config_json(p / "config.json")  # names a damaged config.json
            if isinstance(meta, dict) and meta.get("unet") is not None:
                return "reimagen"
        if (p / "model_index.json").is_file():
            return "diffusers"
        return "folder"
    if p.exists():
        raise ValueError(f"--model {path} is a file; give a checkpoint folder, an image folder or a diffusers "
                         "pipeline id/folder")
    parts = path.split("/")
    if path.startswith((".", "/", "~")) or len(parts) != 2 or not all(parts):
        raise FileNotFoundError(f"--model {path} does not exist (and is not a diffusers hub id such as "
                                "stabilityai/stable-diffusion-2-1)")
    return "diffusers"


def parse_model(spec: str, model_args: Sequence[str] = (), warn: bool = True) -> ModelSpec:
    """``KIND:TARGET`` (or a bare path, see the module) and its ``--model-arg KEY=VALUE`` items, checked: an unknown
    kind, a missing path or an argument the kind does not take is refused here, before anything loads."""
    kind, sep, target = str(spec).partition(":")
    if sep and kind in KINDS:
        if not target:
            raise ValueError(f"--model {spec}: nothing after '{kind}:'")
    elif sep and len(kind) > 1 and "/" not in kind and not Path(spec).exists():
        raise ValueError(f"--model {spec}: unknown model kind {kind!r}; use one of "
                         + ", ".join(f"{k}:" for k in KINDS))
    else:
        kind, target = infer_kind(spec), str(spec)
        if warn and kind != "reimagen":
            warnings.warn(f"--model {spec} is read as {kind}:{spec}; write --model {kind}:{spec} (the bare form "
                          "for non-Re-Imagen models goes in 0.3)", FutureWarning, stacklevel=2)
    if kind in ("reimagen", "folder") and not Path(target).is_dir():
        raise FileNotFoundError(f"--model {kind}:{target}: no such folder")
    if kind == "python" and target.count(":") != 1:
        raise ValueError(f"--model python:{target}: write python:MODULE:FUNCTION (e.g. python:my_models:generate)")
    return ModelSpec(kind, target, parse_model_args(model_args, kind, f"{kind}:{target}"))


def parse_models(specs: Sequence[str], model_args: Sequence[str] = ()) -> list[ModelSpec]:
    """Every ``--model`` of a command: several only for a Re-Imagen cascade's stages (base first)."""
    parsed = [parse_model(s, model_args) for s in specs]
    if len(parsed) > 1 and any(p.kind != "reimagen" for p in parsed):
        raise ValueError(f"--model given {len(parsed)} times: only Re-Imagen takes several (its stages); "
                         f"{', '.join(p.label for p in parsed)}")
    return parsed


def refuse_cascade_options(given: Sequence[str], spec: ModelSpec) -> None:
    """Options the user set that only a Re-Imagen cascade has, refused by name for another kind of model."""
    if given and spec.kind != "reimagen":
        raise ValueError(f"{', '.join(given)} only apply to a Re-Imagen cascade, not to {spec.label} (its own "
                         "settings: --model-arg KEY=VALUE)")


def parse_model_args(items: Sequence[str], kind: str, label: str) -> dict[str, Any]:
    args: dict[str, Any] = {}
    allowed = MODEL_ARGS.get(kind)
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--model-arg {item!r}: write KEY=VALUE")
        if allowed is not None and key not in allowed:
            takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none (use the command's own options)"
            raise ValueError(f"--model-arg {key} does not apply to {label}: {kind} models ignore it; {takes}")
        args[key] = _typed(key, value.strip(), kind)
    return args


def _typed(key: str, value: str, kind: str) -> Any:
    try:
        if key in ("steps", "size"):
            n = int(value)
            if n < 1:
                raise ValueError
            return n
        if key == "guidance":
            return float(value)
    except ValueError:
        raise ValueError(f"--model-arg {key}={value}: {key} must be a "
                         f"{'positive integer' if key != 'guidance' else 'number'}") from None
    if key == "dtype" and value not in DTYPES:
        raise ValueError(f"--model-arg dtype={value}: use one of {', '.join(DTYPES)}")
    if kind == "python":
        try:
            return json.loads(value)  # numbers, booleans, lists; anything else stays a string
        except json.JSONDecodeError:
            return value
    return value


def build_generator(spec: ModelSpec, device: str = "cpu") -> ImageGenerator:
    """The generator of a diffusers, folder or python model (Re-Imagen cascades need their guidance and sampler
    settings: ``Cascade.from_checkpoints``)."""
    a = spec.args
    if spec.kind == "diffusers":
        return DiffusersGenerator(spec.target, device=device, num_inference_steps=a.get("steps", 50),
                                  guidance_scale=a.get("guidance", 7.5), size=a.get("size"),
                                  dtype=DTYPES[a.get("dtype", "float32")], scheduler=a.get("scheduler"))
    if spec.kind == "folder":
        return FolderGenerator(spec.target, size=a.get("size"))
    if spec.kind == "python":
        return PythonGenerator(spec.target, a)
    raise ValueError(f"{spec.label}: Re-Imagen checkpoints are built with Cascade.from_checkpoints")


class PythonGenerator(ImageGenerator):
    """A user's function ``generate(prompts, seeds, **kwargs) -> list of PIL images`` (one image per prompt; the
    seed of each is ``sample_seed(seed, prompt id, sample index)``, so images do not depend on batching)."""

    def __init__(self, target: str, kwargs: Optional[dict[str, Any]] = None):
        module, _, name = target.partition(":")
        self.label = f"python:{target}"
        try:
            fn = getattr(importlib.import_module(module), name)
        except ImportError as err:
            raise ValueError(f"{self.label}: cannot import {module!r} ({err}); put it on PYTHONPATH") from None
        except AttributeError:
            raise ValueError(f"{self.label}: module {module!r} has no {name!r}") from None
        if not callable(fn):
            raise ValueError(f"{self.label}: {name!r} is not callable")
        self.fn: Callable = fn
        self.kwargs = dict(kwargs or {})
        self.size: Optional[int] = self.kwargs.get("size")

    def generate(self, jobs: Sequence[Job], neighbours, seed: int) -> Tensor:
        from ..utils.seeding import sample_seed

        seeds = [sample_seed(seed, j.prompt_id, j.sample_index) for j in jobs]
        try:
            images = self.fn([j.prompt for j in jobs], seeds, **self.kwargs)
        except Exception as err:  # the user's code: name it, keep its message, no traceback
            raise RuntimeError(f"{self.label} raised {type(err).__name__}: {err}") from err
        images = list(images) if images is not None else []
        if len(images) != len(jobs):
            raise ValueError(f"{self.label} returned {len(images)} images for {len(jobs)} prompts")
        return torch.stack([self._tensor(im, i) for i, im in enumerate(images)])

    def _tensor(self, image: Any, i: int) -> Tensor:
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise ValueError(f"{self.label} returned a {type(image).__name__} as image {i}; return PIL images")
        w, h = image.size
        if w != h or (self.size is not None and w != self.size):
            want = f"{self.size}x{self.size}" if self.size is not None else "square"
            raise ValueError(f"{self.label} returned a {w}x{h} image ({want} expected)")
        if self.size is None:
            self.size = w  # every later image must match the first
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def describe(self) -> dict[str, Any]:
        return {"generator": "python", "function": self.label, "kwargs": self.kwargs}

    def record(self) -> dict[str, Any]:
        return {"kind": "python", "model": self.label, "scheduler": self.kwargs.get("scheduler", "its own"),
                "steps": self.kwargs.get("steps"), "guidance": self.kwargs.get("guidance"), "size": self.size}


__all__ = ["KINDS", "MODEL_ARGS", "ModelSpec", "infer_kind", "parse_model", "parse_models", "parse_model_args",
           "refuse_cascade_options", "build_generator", "PythonGenerator"]
