"""A training run's checkpoints: save (atomically; FSDP ranks write their shards with
torch.distributed.checkpoint), keep the last N, and resume on any number of processes (the batch is global)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from ..models.checkpoint import (read_checkpoint_config, read_safetensors, refuse_other_config, staging_dir,
                                 write_checkpoint)
from ..models.config import UNetConfig
from ..utils.atomic import disk_full_names

Tensor = torch.Tensor


class CheckpointMixin:
    """Save and resume of ``Trainer`` (its attributes: model, module, opt, scaler, ema, dist, cfg, ...)."""

    # -- checkpoints ----------------------------------------------------------------------------
    # DDP: every rank holds everything; rank 0 writes the full state. FSDP: each rank writes its shards of the
    # weights, EMA and optimiser (torch.distributed.checkpoint, OUT/last/dcp/), so no rank ever holds the full
    # optimiser state; only the EMA (for sampling) is gathered to rank 0, one tensor at a time.
    def _weights(self) -> dict[str, dict[str, Tensor] | None]:
        from .distributed import full_tensors

        if self._ema_params is None:
            self._ema_init()
        keep = self.dist.is_main
        names = [n for n, _ in self.model.named_parameters()]
        buffers = full_tensors({k: v for k, v in self.model.state_dict().items() if k not in set(names)}, keep)
        ema = dict(buffers, **full_tensors(dict(zip(names, self._ema_params)), keep))  # type: ignore[arg-type]
        model = None if self.fsdp else full_tensors(self.model.state_dict(), keep)
        text = full_tensors(self.text_encoder.state_dict(), keep) if self.trainable_text else None  # type: ignore[union-attr]
        return {"model": model, "ema": ema, "text_encoder": text}

    def _ema_init(self) -> None:
        """FSDP: the EMA as copies of this rank's parameter shards."""
        self._ema_params = [p.detach().clone() for p in self.model.parameters()]

    def _sharded_state(self) -> dict[str, Any]:
        """Model, EMA and optimiser as this rank's shards (what torch.distributed.checkpoint saves and loads)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if self._ema_params is None:
            self._ema_init()
        model, optim = get_state_dict(self.module, self.opt)  # initialises an empty optimiser state (lr 0 step)
        names = [n for n, _ in self.model.named_parameters()]
        return {"module": model, "ema": dict(zip(names, self._ema_params)), "optim": optim}  # type: ignore[arg-type]

    def trainer_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opt = None if self.fsdp else get_optimizer_state_dict(
            self.module, self.opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"optimizer": opt, "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": self.step, "position": self.step * self.cfg.batch_size, "global_batch": self.cfg.batch_size,
                "world_size": self.dist.world_size, "seed": self.cfg.seed, "skipped": dict(self.skipped),
                "k": self.dataset.k}

    def save(self, path: str | Path) -> Path:
        """Rank 0 writes the checkpoint atomically (FSDP: every rank writes its shards into it first); all ranks
        take part in every collective and wait at the end, so none hangs."""
        path = Path(path)
        if self.fsdp:
            import torch.distributed.checkpoint as dcp

            tmp = staging_dir(path)
            if self.dist.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.dist.barrier()
            with disk_full_names(tmp / "dcp"):
                dcp.save(self._sharded_state(), checkpoint_id=str(tmp / "dcp"))
        weights, state = self._weights(), self.trainer_state()
        if self.dist.is_main:
            extra = {"data": {"position": self.step * self.cfg.batch_size, "k": self.dataset.k,
                              "skipped": dict(self.skipped)}}
            write_checkpoint(path, self.model.cfg, self.text_spec, weights, self.cfg, self.step, state, extra,
                             staged=self.fsdp)
            self._keep_last(path)
        self.dist.barrier()
        return path

    def _keep_last(self, last: Path) -> None:
        if not self.cfg.keep_last:
            return
        snap = last.with_name(f"step-{self.step:08d}")
        if not snap.exists():
            tmp = snap.with_name(snap.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(last, tmp)
            tmp.rename(snap)
        for old in sorted(last.parent.glob("step-????????"))[:-self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self, path: str | Path) -> None:
        """Restore weights, EMA, optimiser, scaler, step and data position from ``save``'s checkpoint (written
        by any number of processes, with FSDP or without: the batch is global, so the world size may differ)."""
        path = Path(path)
        meta = read_checkpoint_config(path)
        state = self._check_resumable(path, meta)
        if (path / "dcp").is_dir():
            self._load_sharded(path / "dcp")
        else:
            self._load_full(path, state)
        te = path / "text_encoder.safetensors"
        if self.trainable_text and te.exists() and not (path / "dcp").is_dir():
            self.text_encoder.load_state_dict(read_safetensors(te))  # type: ignore[union-attr]
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.skipped.update(state.get("skipped", {}))
        self.step = int(meta["step"])
        self._batches = None  # the loader restarts at position step * batch_size

    def _check_resumable(self, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint's trainer state, once its stage, text encoder, K and global batch match this run's."""
        refuse_other_config(path, UNetConfig.from_dict(meta["unet"]), self.model.cfg,
                            "another --preset or text encoder: use a new --out folder, or the checkpoint's settings")
        def arch(spec: Any) -> Any:  # the trainable encoder's seed only initialises weights the resume replaces
            return {k: v for k, v in spec.items() if k != "seed"} if isinstance(spec, dict) else spec

        if arch(meta.get("text_encoder")) != arch(self.text_spec):
            raise ValueError(f"checkpoint {path} was trained with the text encoder {meta.get('text_encoder')}, not "
                             f"{self.text_spec}: use a new --out folder, or the checkpoint's --text-encoder")
        k = meta.get("data", {}).get("k")
        if k is not None and k != self.dataset.k:
            raise ValueError(f"checkpoint {path} was trained with K = {k} neighbours per sample, the data have "
                             f"K = {self.dataset.k}: build the shards (or triples) with -k {k}, or use a new --out")
        try:
            state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as err:
            raise ValueError(f"{path / 'trainer_state.pt'} cannot be read ({str(err).splitlines()[0][:200]}); the "
                             "checkpoint is damaged: delete it to start over or resume from a copy") from None
        if state.get("global_batch", self.cfg.batch_size) != self.cfg.batch_size:
            raise ValueError(f"{path} was trained with a global batch of {state['global_batch']}, not "
                             f"{self.cfg.batch_size}: resume with --batch-size {state['global_batch']} (any world size)")
        return state

    def _load_sharded(self, folder: Path) -> None:
        """An FSDP checkpoint (torch.distributed.checkpoint), resharded to this run's ranks (or unsharded)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._sharded_state()
        dcp.load(state, checkpoint_id=str(folder))  # in place: into this rank's shards and the EMA's tensors
        set_state_dict(self.module, self.opt, model_state_dict=state["module"], optim_state_dict=state["optim"])
        if self.ema is not None:
            for be, bm in zip(self.ema.buffers(), self.model.buffers()):
                be.copy_(bm)

    def _load_full(self, path: Path, state: dict[str, Any]) -> None:
        """A checkpoint of full tensors (DDP or one process), loaded into plain or FSDP-sharded parameters."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from .distributed import load_full

        model, ema = read_safetensors(path / "model.safetensors"), read_safetensors(path / "ema.safetensors")
        for k, v in self.model.state_dict().items():
            load_full(v, model[k])
        self._ema_init()
        for (n, _), e in zip(self.model.named_parameters(), self._ema_params):  # type: ignore[arg-type]
            load_full(e, ema[n])
        if self.ema is not None:
            self.ema.load_state_dict(ema)
            self._ema_params = list(self.ema.parameters())
        if "position" in state:
            set_optimizer_state_dict(self.module, self.opt, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True, strict=False))
        else:  # written before the data position was recorded: a plain optimiser state dict
            self.opt.load_state_dict(state["optimizer"])
