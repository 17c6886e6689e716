"""Training memory per GPU of a stage, computed without memory: parameters on the meta device, activations from
one forward pass on fake tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no data).

* States, per parameter: fp32 weights 4 B, fp32 gradients 4 B, the optimiser (AdamW: two fp32 moments, 8 B;
  Adafactor: factored second moments, ~0 B per parameter of a matrix), the EMA 4 B. Under FSDP every rank
  keeps 1/N of them; DDP keeps all on every rank.
* Activations: the bytes autograd saves for the backward pass of one sample (the sample, its K neighbours
  through the DStack at t = 0, its text), measured with ``saved_tensors_hooks`` at the run's precision.
  Weights saved for the backward pass are not counted as activations. bf16 / fp16 under DDP keep autocast's
  low-precision copies of the weights for the backward pass (2 B per parameter); FSDP gathers the weights in
  the low precision already (``wrap_model``'s ``param_dtype``) and frees them after each block.

Not counted: the CUDA context and allocator fragmentation (add ~1-3 GB), FSDP's transient all-gather of the
largest block, and temporary buffers inside a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import UNetConfig
from .unet import ReImagenUNet

GiB = 2 ** 30
OPTIMISER_BYTES = {"adamw": 8, "adafactor": 0}


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    states_bytes: float          # weights, gradients, optimiser and EMA held by one rank
    weight_copy_bytes: float     # autocast's low-precision weight copies (DDP with bf16 / fp16)
    activation_bytes: float      # per sample of the micro-batch

    def per_gpu(self, micro_batch: int) -> float:
        return self.states_bytes + self.weight_copy_bytes + micro_batch * self.activation_bytes

    def max_micro_batch(self, gpu_bytes: float, reserve: float = 2 * GiB) -> int:
        """The largest micro-batch that fits ``gpu_bytes`` (0 when even the states do not)."""
        free = gpu_bytes - reserve - self.states_bytes - self.weight_copy_bytes
        return max(0, int(free // self.activation_bytes))


def parameter_count(cfg: UNetConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in ReImagenUNet(cfg).parameters())


def activation_bytes(cfg: UNetConfig, precision: str = "fp32", k: int = 2, text_len: int = 64) -> int:
    """Bytes autograd saves in one training forward of one sample (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..utils.precision import PRECISIONS

    dtype = PRECISIONS[precision]
    saved: dict[int, int] = {}
    with FakeTensorMode():
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype or default)  # low-precision weights, as FSDP gathers them: no autocast copies
        try:
            m = ReImagenUNet(cfg)
        finally:
            torch.set_default_dtype(default)
        params = {id(p.untyped_storage()) for p in m.parameters()}
        # pack keeps the storage alive until the pass ends, so ids stay unique
        keep: list[torch.UntypedStorage] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            keep.append(st)
            if id(st) not in params:
                saved[id(st)] = st.nbytes()
            return t

        s, b = cfg.image_size, 1
        emb = torch.randn(b * (k + 1), text_len, cfg.text_dim)
        mask = torch.ones(b * (k + 1), text_len, dtype=torch.bool)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            text = m.project_text(emb[:b], mask[:b])
            memory = None
            if cfg.neighbour_attention and k:
                memory = m.encode_neighbours(torch.randn(b, k, 3, s, s), m.project_text(emb[b:], mask[b:]))
            sr = cfg.is_super_resolution
            m(torch.randn(b, 3, s, s), torch.rand(b), text, memory, lowres=torch.randn(b, 3, s, s) if sr else None,
              aug_t=torch.rand(b) if sr else None)
    return sum(saved.values())


def estimate(cfg: UNetConfig, precision: str = "fp32", world_size: int = 1, fsdp: bool = False,
             optimizer: str = "adamw", k: int = 2, text_len: int = 64) -> MemoryEstimate:
    """Memory of one rank training ``cfg`` (see the module docstring)."""
    n = parameter_count(cfg)
    per_param = 4 + 4 + OPTIMISER_BYTES[optimizer] + 4
    states = n * per_param / (world_size if fsdp else 1)
    copies = 0.0 if (fsdp or precision == "fp32") else 2.0 * n
    return MemoryEstimate(n, states, copies, float(activation_bytes(cfg, precision, k, text_len)))


__all__ = ["MemoryEstimate", "estimate", "activation_bytes", "parameter_count", "GiB"]
