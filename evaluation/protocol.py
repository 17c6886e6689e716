"""The evaluation protocol of Sec. 4.1, in one place.

* **Prompts**: ``num_prompts`` captions drawn at random, without replacement, with ``numpy.random.default_rng
  (seed)``, from all captions of the validation split (COCO: 30K of the ~202K val2014 captions, so an image may
  contribute several; WikiImages: 20K of the 22K validation pairs). One image per prompt (sample index 0).
* **Reference**: ALL images of the validation split (COCO val2014: 40,504; the paper says "42K"), whatever the
  number of prompts.
* **Preprocessing, identical for real and generated images**: RGB, center crop to a square (the shorter side),
  resize to ``resolution`` (256) with PIL bicubic (antialiased when downsampling), round to uint8 -- then the
  backend's own Inception preprocessing (clean-fid: PIL bicubic to 299 in float; torch-fidelity: TF1-compatible
  bilinear to 299 inside its extractor).
* **Label**: "FID" when the retrieval database holds in-domain data (the dataset's own train split), otherwise
  "ZS-FID" (zero-shot: LAION, no database, any other collection) -- Table 1's two columns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

PROTOCOL_VERSION = 1  # bump when anything above changes what the features of an image are
FID, ZS_FID = "FID", "ZS-FID"


@dataclass(frozen=True)
class Prompt:
    prompt_id: str  # file-name safe; images are <prompt_id>__0.png
    text: str


def draw_prompts(ids: Sequence[str], texts: Sequence[str], num_prompts: int, seed: int,
                 what: str = "the validation split") -> list[Prompt]:
    """``num_prompts`` (id, text) pairs drawn without replacement with ``default_rng(seed)``, in collection order."""
    n = len(ids)
    if num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_prompts}")
    if num_prompts > n:
        raise ValueError(f"{what} has {n} captions, fewer than the {num_prompts} prompts requested; "
                         f"pass --num-prompts {n} or less")
    rows = np.sort(np.random.default_rng(seed).choice(n, size=num_prompts, replace=False))
    return [Prompt(str(ids[i]), str(texts[i])) for i in rows.tolist()]


def center_crop_resize(img, size: int):
    """RGB, center crop to a square, resize to ``size`` with PIL bicubic: the protocol's common step."""
    from PIL import Image

    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.BICUBIC)
    return img


def center_crop_resize_array(arr: np.ndarray, size: int) -> np.ndarray:
    """The same on an HWC uint8 array (clean-fid's ``custom_image_tranform`` hook); already-square images of the
    right size pass through untouched."""
    if arr.ndim == 3 and arr.shape[0] == arr.shape[1] == size and arr.shape[2] == 3:
        return arr
    from PIL import Image

    return np.asarray(center_crop_resize(Image.fromarray(arr), size))


def load_rgb(ref: str, root: str | None = None):
    """A PIL RGB image from a file path or a knowledge-base image reference (tsv://, tar://)."""
    if ref.startswith(("tsv://", "tar://")) or (root is not None and not os.path.isabs(ref)):
        from reimagen.retrieval.base import load_image

        return load_image(ref, root)
    from PIL import Image

    with Image.open(ref) as im:
        return im.convert("RGB")


def protocol_image(ref: str, size: int, root: str | None = None) -> np.ndarray:
    """Load + center crop + resize: the (size, size, 3) uint8 array every backend receives."""
    return np.asarray(center_crop_resize(load_rgb(ref, root), size))


def is_plain_file(ref: str) -> bool:
    return not ref.startswith(("tsv://", "tar://"))


__all__ = ["PROTOCOL_VERSION", "FID", "ZS_FID", "Prompt", "draw_prompts", "center_crop_resize",
           "center_crop_resize_array", "load_rgb", "protocol_image", "is_plain_file"]
