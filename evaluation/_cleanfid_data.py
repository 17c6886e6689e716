"""clean-fid's dataset with the protocol step, importable (and so picklable for DataLoader workers) by name.
Imports clean-fid at import time; ``evaluation.backends`` imports this module only when clean-fid is used."""

from __future__ import annotations

import os

import numpy as np

from reimagen.utils.compat import patch_torchvision_if_broken

patch_torchvision_if_broken()

from cleanfid.utils import ResizeDataset  # noqa: E402

from .protocol import center_crop_resize_array, is_plain_file, load_rgb  # noqa: E402


class ProtocolTransform:
    """clean-fid ``custom_image_tranform``: HWC uint8 -> center crop + PIL bicubic resize to ``resolution``."""

    def __init__(self, resolution: int):
        self.resolution = int(resolution)

    def __call__(self, arr: np.ndarray) -> np.ndarray:
        return center_crop_resize_array(arr, self.resolution)


class CleanFidImages(ResizeDataset):
    """clean-fid's ResizeDataset with the protocol step as its ``custom_image_tranform``. Plain files go through
    ``ResizeDataset.__getitem__`` itself; knowledge-base references (tsv://, tar://) are decoded by reimagen
    and then take exactly its remaining steps (custom transform, clean-fid's resizer for the mode, ToTensor)."""

    def __init__(self, files, mode: str, resolution: int, root: str | None = None):
        super().__init__(list(files), mode=mode)
        self.root = root
        self.custom_image_tranform = ProtocolTransform(resolution)

    def __getitem__(self, i):
        ref = str(self.files[i])
        if is_plain_file(ref) and (self.root is None or os.path.isabs(ref)):
            return super().__getitem__(i)
        img_np = self.custom_image_tranform(np.array(load_rgb(ref, self.root)))
        img_resized = self.fn_resize(img_np)
        if img_resized.dtype == "uint8":
            return self.transforms(np.array(img_resized)) * 255
        return self.transforms(img_resized)
