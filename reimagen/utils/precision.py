"""Numeric precision of training and sampling: fp32, or bf16 / fp16 autocast (matmuls and convolutions in the
low precision, reductions and the sampler's arithmetic in fp32)."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_WARNED: list[bool] = []


def check_precision(precision: str, device: str | torch.device, training: bool = False) -> str:
    """``precision`` if known and usable on ``device``; fp16 sampling on a CPU is refused (slow there, and
    bf16 has fp32's range), fp16 training is not (it runs, with the gradient scaler)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and torch.device(device).type == "cpu" and not training:
        raise ValueError("fp16 sampling needs a GPU (--device cuda); on a CPU pass --precision bf16 or --precision "
                         "fp32 (precision='bf16' in Python)")
    if precision == "bf16" and torch.device(device).type == "cpu" and not cpu_has_native_bf16() and not _WARNED:
        _WARNED.append(True)  # once per process: a command checks its stages at several places
        warnings.warn("bf16 on a CPU without native bf16 instructions (AVX512-BF16 / AMX) is emulated and slower than "
                      "fp32 here; pass --precision fp32", stacklevel=2)
    return precision


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (Linux: the avx512_bf16 or amx_bf16 flag; elsewhere assumed)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(precision: str, device: str | torch.device):
    """The autocast context of ``precision`` on ``device`` (nothing for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


__all__ = ["PRECISIONS", "check_precision", "autocast"]
