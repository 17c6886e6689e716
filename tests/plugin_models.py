"""Python plug-in models for the tests (``--model python:plugin_models:FUNCTION``): generate(prompts, seeds,
**kwargs) -> list of PIL images, and ones that break the contract."""

from __future__ import annotations

import numpy as np
from PIL import Image

CALLS: list[dict] = []


def solid(prompts, seeds, size=16, **kwargs):
    """One noisy image per prompt, a function of its seed only (so resumes and batches do not change it)."""
    CALLS.append({"prompts": list(prompts), "seeds": list(seeds), "size": size, **kwargs})
    out = []
    for s in seeds:
        rng = np.random.default_rng(s)
        out.append(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))
    return out


def too_few(prompts, seeds, **kwargs):
    return solid(prompts, seeds)[:-1]


def wrong_size(prompts, seeds, **kwargs):
    return [im.resize((16, 12)) for im in solid(prompts, seeds)]


def broken(prompts, seeds, **kwargs):
    raise RuntimeError("the GPU caught fire")


NOT_CALLABLE = 3
