"""The network of one cascade stage and what defines it (Sec. 3.2, Fig. 3; Sec. 4 for the presets).

    config.py      UNetConfig and the paper's presets
    blocks.py      the U-Net's blocks: ResBlock, text attention with its layout map, neighbour attention
    unet.py        ReImagenUNet: DStack -> neighbour attention -> UStack
    text.py        frozen text encoders (T5, MiniLM) and a tiny trainable one
    checkpoint.py  a stage on disk: config.json + safetensors, load / save / grow / reduce
    memory.py      a stage's training memory per GPU, computed on fake tensors

Imports only ``reimagen.diffusion`` (the schedule of the low-resolution input's noise augmentation) and utils.
"""

from .config import PRESETS, UNetConfig, get_preset  # noqa: F401
from .unet import ReImagenUNet  # noqa: F401

__all__ = ["PRESETS", "UNetConfig", "get_preset", "ReImagenUNet"]
