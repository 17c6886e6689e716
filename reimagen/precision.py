"""Numeric precision of training and sampling: fp32, or bf16 / fp16 autocast (matmuls and convolutions in the
low precision, reductions and the sampler's arithmetic in fp32)."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: str | torch.device, training: bool = False) -> str:
    """``precision`` if known and usable on ``device``; fp16 sampling on a CPU is refused (slow there, and
    bf16 has fp32's range), fp16 training is not (it runs, with the gradient scaler)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and torch.device(device).type == "cpu" and not training:
        raise ValueError("fp16 sampling needs a GPU (--device cuda); on a CPU use bf16 or fp32")
    return precision


def autocast(precision: str, device: str | torch.device):
    """The autocast context of ``precision`` on ``device`` (nothing for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


__all__ = ["PRECISIONS", "check_precision", "autocast"]
