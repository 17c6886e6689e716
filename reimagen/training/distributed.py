"""torch.distributed for training (``torchrun``, single or multi-node): the process group from the launcher's
environment (nccl on GPU, gloo on CPU), DDP or FSDP2 (``fully_shard``) wrapping, and rank-0-only work with
barriers, so that no rank waits for a save or a log that only rank 0 does."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..utils.launch import shard_from_env


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
        timeout = datetime.timedelta(minutes=30)
        store = _attempt_store(env, world, timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return DistContext(rank, world, local), dev


def _attempt_store(env: Mapping[str, str], world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun, the agent's store with a prefix per restart attempt (None elsewhere: env://).

    torchrun's static rendezvous (``--master-port``) keeps one store across ``--max-restarts``, and the process
    group of a restarted attempt would read the previous attempt's peer addresses from it and fail to connect
    ("Gloo connectFullMesh failed ... Connection refused", seen in 1 of 3 restarts here; PyTorch issue 167288)."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"reimagen/attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)


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
    from ..models.unet import NeighbourAttention, ResBlock, TextAttention

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


__all__ = ["shard_from_env", "DistContext", "init_distributed", "shutdown_distributed", "wrap_model", "unwrap",
           "shardable_blocks", "full_tensors", "load_full"]
