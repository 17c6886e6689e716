"""torch.distributed for training (``torchrun``, single or multi-node): the process group from the launcher's
environment (nccl on GPU, gloo on CPU), DDP or FSDP2 (``fully_shard``) wrapping, and rank-0-only work with
barriers, so that no rank waits for a save or a log that only rank 0 does."""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.distributed as dist
from torch import nn


def shard_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) from the RANK and WORLD_SIZE that torchrun / accelerate launch set, else (0, 1).
    A half-set launcher environment (one of the two) or a value that is not an integer is refused."""
    env = os.environ if environ is None else environ
    given = [k for k in ("RANK", "WORLD_SIZE") if k in env]
    if not given:
        return 0, 1
    if len(given) == 1:
        other = "WORLD_SIZE" if given[0] == "RANK" else "RANK"
        raise ValueError(f"{given[0]}={env[given[0]]} is set but {other} is not: a launcher (torchrun, accelerate "
                         "launch) sets both; set both or neither")
    values = {}
    for k in given:
        try:
            values[k] = int(env[k])
        except ValueError:
            raise ValueError(f"{k}={env[k]!r} is not an integer") from None
    rank, world = values["RANK"], values["WORLD_SIZE"]
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} outside WORLD_SIZE {world}")
    return rank, world


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def _sum(self, value: float | int, dtype: torch.dtype) -> float | int:
        t = torch.tensor([value], dtype=dtype)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.item()

    def mean(self, value: float) -> float:
        """The mean of a float over the ranks (every rank gets it)."""
        return value if not self.active else float(self._sum(value, torch.float64)) / self.world_size

    def sum_int(self, value: int) -> int:
        return value if not self.active else int(self._sum(value, torch.int64))


def init_distributed(device: str, environ: Mapping[str, str] | None = None) -> tuple[DistContext, torch.device]:
    """The process group of a ``torchrun`` launch (or (rank 0 of 1, ``device``) without one). On CUDA each
    process takes the GPU LOCAL_RANK. A launch environment lacking MASTER_ADDR / MASTER_PORT is refused."""
    env = os.environ if environ is None else environ
    rank, world = shard_from_env(env)
    if world == 1:
        return DistContext(), torch.device(device)
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ValueError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not: launch with torchrun "
                         "(`torchrun --nproc-per-node N -m reimagen_eval.cli train ...`), which sets all of them")
    local = int(env.get("LOCAL_RANK", rank))
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
    return DistContext(rank, world, local), dev


def shutdown_distributed() -> None:
    """Leave the process group: a barrier, then ``destroy_process_group`` (PyTorch's documented teardown). A
    rank that exits with the group's threads alive can abort at exit ("terminate called without an active
    exception"), failing a launch whose training had finished."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_model(module: nn.Module, ctx: DistContext, device: torch.device, fsdp: bool = False,
               param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP across the ranks, or FSDP2: each of the U-Net's blocks sharded on its own, then the root (parameters,
    gradients and optimiser state split over the ranks: the paper-64 stages do not fit one GPU with AdamW).
    ``param_dtype`` (bf16 / fp16 training): FSDP gathers the weights in it and reduces gradients in fp32, so
    that autocast finds them cast already and keeps no full-size low-precision copy for the backward pass."""
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        if not dist.is_initialized():
            raise ValueError("--fsdp needs a torchrun launch (a process group); one process has nothing to shard")
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for block in shardable_blocks(module):
            fully_shard(block, mp_policy=mp)
            for method in ("attend", "memory"):  # NeighbourAttention is also called through these
                if hasattr(block, method):
                    register_fsdp_forward_method(block, method)
        fully_shard(module, mp_policy=mp)
        return module
    if not ctx.active:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None)


def shardable_blocks(module: nn.Module) -> list[nn.Module]:
    """The U-Net's residual and attention blocks, each one FSDP unit (all-gathered just before it runs)."""
    from .unet import NeighbourAttention, ResBlock, TextAttention

    return [m for m in module.modules() if isinstance(m, (ResBlock, TextAttention, NeighbourAttention))]


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def full_tensors(tensors: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies (FSDP's DTensors are gathered: a collective, every rank must call it), kept only where
    ``keep`` (rank 0): a gathered tensor is dropped at once elsewhere, so other ranks never hold the full set."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in tensors.items():
        full = v.full_tensor() if isinstance(v, DTensor) else v
        if keep:
            out[k] = full.detach().cpu()
    return out


@torch.no_grad()
def load_full(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into ``target``, taking only this rank's shard when it is an FSDP DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        target.copy_(distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements))
    else:
        target.copy_(full.to(target.device, target.dtype))


def wait_for_others(missing: Callable[[], int], what: str, timeout: float, world_size: int,
                    log: Callable[[str], None] | None = None) -> None:
    """Rank 0 of a file-sharded job (no process group: each rank writes its part, rank 0 combines): poll until
    ``missing()`` is 0. Nothing missing with one process is an error at once; a timeout says how to resume."""
    start, delay, last_log = time.monotonic(), 0.2, -1e9
    while True:
        n = missing()
        if not n:
            return
        if world_size == 1:
            raise RuntimeError(f"{n} {what} are missing after this process's work")
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{n} {what} of the other processes are still missing after {timeout:.0f} s; rerun "
                               "the same command (one process resumes what is missing)")
        if log is not None and time.monotonic() - last_log > 60:
            log(f"rank 0: waiting for {n} {what} from the other {world_size - 1} processes")
            last_log = time.monotonic()
        time.sleep(delay)
        delay = min(delay * 1.5, 5.0)


__all__ = ["shard_from_env", "DistContext", "init_distributed", "shutdown_distributed", "wrap_model", "unwrap",
           "shardable_blocks", "full_tensors", "load_full", "wait_for_others"]
