"""A training run's settings (Sec. 4 "Training details" for the paper's values)."""

from __future__ import annotations

from dataclasses import dataclass

from ..utils.precision import PRECISIONS
from .loader import parse_mirror_words


@dataclass
class TrainConfig:
    steps: int = 1000                 # optimiser steps in total
    batch_size: int = 16
    lr: float = 1e-4                  # the paper's learning rate
    optimizer: str = "adamw"          # adamw | adafactor (the paper's choice for the 64x64 stage)
    weight_decay: float = 0.0
    warmup_steps: int = 0             # linear learning-rate warm-up
    ema_decay: float = 0.999          # EMA of the weights; sampling uses the EMA weights
    ema_warmup: bool = True           # decay min(ema_decay, (1 + s) / (10 + s)) at step s: without it a short run's
                                      # EMA still holds 0.999^s of the initial weights (37% after 1000 steps)
    grad_clip: float = 1.0            # max global gradient norm (0 disables)
    p_drop_text: float = 0.1          # Sec. 3.2: drop c_p with 10% probability ...
    p_drop_neighbours: float = 0.1    # ... and c_n independently with 10%
    max_aug_level: float = 1.0        # SR stages: training augmentation level ~ U[0, max_aug_level]
    min_snr_gamma: float = 0.0        # 0: the paper's loss; > 0: Min-SNR-gamma weighting (diffusion.min_snr_weight)
    min_snr_plus_one: bool = False    # ... with x0 weight min(SNR, gamma) + 1: high-noise steps keep their weight
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 500
    keep_last: int = 0                # besides last/, keep the N most recent step-XXXXXXXX/ checkpoints
    grad_accum: int = 1               # micro-batches per optimiser step (batch_size is the global batch)
    precision: str = "fp32"           # fp32 | bf16 | fp16 (autocast; fp16 with a gradient scaler)
    grad_checkpointing: bool = False  # recompute each block's activations in the backward pass
    compile: bool = False             # torch.compile the stage network
    channels_last: bool = False       # NHWC memory layout for the convolutions (same maths, other kernels)
    fsdp: bool = False                # FSDP2 instead of DDP (with torchrun)
    workers: int = 0                  # DataLoader worker processes (decoding, crops, noise)
    random_crop: bool = False         # random square crops of the training images (Imagen's SR recipe)
    mirror_words: str = ""            # "left:right": mirror half the images, swapping these caption words
    shuffle_window: int = 4           # samples are shuffled within windows of this many shards

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"optimizer must be adamw or adafactor, got {self.optimizer!r}")
        for name in ("p_drop_text", "p_drop_neighbours", "max_aug_level"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.min_snr_gamma < 0:
            raise ValueError(f"min_snr_gamma must be >= 0 (0 disables), got {self.min_snr_gamma}")
        if self.min_snr_plus_one and not self.min_snr_gamma:
            raise ValueError("min_snr_plus_one modifies Min-SNR weighting: set min_snr_gamma > 0 too")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if self.workers < 0 or self.keep_last < 0:
            raise ValueError("workers and keep_last must be >= 0")
        parse_mirror_words(self.mirror_words)  # a malformed pair is refused before anything loads
