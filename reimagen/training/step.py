"""One optimiser step of a stage (Sec. 3.2 "Model Training"): Eq. 2 on a micro-batch with the text and the
neighbours dropped independently (p = 0.1 each), gradient accumulation and synchronisation, fp16 loss scaling,
clipping, the learning-rate warm-up and the EMA of the weights that sampling uses."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion.gaussian import diffusion_loss, get_schedule, min_snr_weight, q_sample
from ..models.text import TextEncoder, TextEncoding
from ..models.unet import ReImagenUNet
from ..utils.precision import autocast
from ..utils.seeding import sample_seed
from .config import TrainConfig
from .distributed import shardable_blocks
from .loader import to_unit

Tensor = torch.Tensor


class StageLoss(nn.Module):
    """Eq. 2 on a micro-batch: the stage network plus, when it is trained, the tiny text encoder, as one module
    so that DDP / FSDP synchronise the gradients of both."""

    def __init__(self, unet: ReImagenUNet, text_encoder: TextEncoder | None, cfg: TrainConfig):
        super().__init__()
        self.unet, self.cfg = unet, cfg
        self.text_encoder = text_encoder if isinstance(text_encoder, nn.Module) else None
        self.log_snr = get_schedule(unet.cfg.schedule)

    def _texts(self, batch: dict[str, Any], dev: torch.device) -> tuple[TextEncoding, TextEncoding | None]:
        b = batch["x0"].shape[0]
        if "text_emb" in batch:  # precomputed: (B, K + 1, L, d) and lengths (B, K + 1)
            emb, n = batch["text_emb"].to(dev), batch["text_len"].to(dev)
            mask = torch.arange(emb.shape[2], device=dev) < n.unsqueeze(-1)
            own = TextEncoding(emb[:, 0], mask[:, 0])
            k = emb.shape[1] - 1
            nbr = TextEncoding(emb[:, 1:].flatten(0, 1), mask[:, 1:].flatten(0, 1)) if k else None
            return own, nbr
        enc = self.text_encoder
        if enc is None:
            raise RuntimeError("the batch carries texts but no trainable text encoder is attached")
        own = enc.encode(batch["text"]).to(dev)
        nbr = enc.encode([t for row in batch["nbr_text"] for t in row]).to(dev) if batch["nbr_text"][0] else None
        assert own.embeddings.shape[0] == b
        return own, nbr

    def forward(self, batch: dict[str, Any]) -> Tensor:
        m, cfg = self.unet, self.cfg
        dev = next(m.parameters()).device
        x0, t, noise = to_unit(batch["x0"].to(dev)), batch["t"].to(dev), batch["noise"].to(dev)
        b = x0.shape[0]
        lt = self.log_snr(t)
        x_t = q_sample(x0, lt, noise)  # Eq. 1
        own, nbr = self._texts(batch, dev)
        text = m.project_text(own.embeddings, own.mask)
        memory = None
        if m.neighbour_attn is not None:
            nimg = to_unit(batch["nimg"].to(dev))  # (B, K, 3, S, S)
            memory = m.encode_neighbours(nimg, m.project_text(nbr.embeddings, nbr.mask))  # type: ignore[union-attr]
        lowres = aug_t = None
        if m.cfg.is_super_resolution:
            low = F.interpolate(x0, size=(m.cfg.lowres_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
            aug_t = batch["aug_t"].to(dev)
            lowres = m.lowres_input(low, aug_t, batch["aug_noise"].to(dev))
        drop_text, drop_nbr = batch["drop_text"].to(dev).bool(), batch["drop_nbr"].to(dev).bool()
        pred = m(x_t, t, text, memory, drop_text, drop_nbr, lowres, aug_t)
        weight = (min_snr_weight(lt, cfg.min_snr_gamma, m.cfg.prediction, cfg.min_snr_plus_one)
                  if cfg.min_snr_gamma > 0 else None)
        assert pred.shape[0] == b
        # A batch without a dropped text skips null_text; a zero term gives it a zero gradient instead of none, so
        # that DDP needs no unused-parameter search and AdamW treats it alike on 1 or N ranks.
        return diffusion_loss(pred, x0, noise, lt, m.cfg.prediction, weight) + 0.0 * m.null_text.sum()  # Eq. 2


def enable_grad_checkpointing(unet: nn.Module) -> None:
    """Recompute each residual / attention block in the backward pass (activation memory of one block)."""
    from torch.utils.checkpoint import checkpoint

    for block in shardable_blocks(unet):
        fwd = block.forward
        block.forward = lambda *a, _f=fwd, **kw: checkpoint(_f, *a, use_reentrant=False, **kw)  # type: ignore[method-assign]


class StepMixin:
    """The optimiser step and the EMA of ``Trainer`` (its attributes: model, module, opt, scaler, cfg, ...)."""

    # -- EMA --------------------------------------------------------------------------------------
    def _ema_setup(self) -> None:
        # deepcopy, not a fresh model: leaves the global RNG alone. Under FSDP the EMA is kept as shards
        # (copies of the sharded parameters, made after wrapping, in fit's first step).
        self.ema = None if self.fsdp else copy.deepcopy(self.model).requires_grad_(False).eval()
        self._ema_params: list[Tensor] | None = None if self.fsdp else list(self.ema.parameters())  # type: ignore[union-attr]

    def ema_decay_at(self, step: int) -> float:
        d = self.cfg.ema_decay
        return min(d, (1 + step) / (10 + step)) if self.cfg.ema_warmup else d

    @torch.no_grad()
    def _ema_update(self) -> None:
        if self._ema_params is None:
            self._ema_init()
        d = self.ema_decay_at(self.step)
        for pe, pm in zip(self._ema_params, self.model.parameters()):
            pe.lerp_(pm.detach(), 1 - d)
        if self.ema is not None:
            for be, bm in zip(self.ema.buffers(), self.model.buffers()):
                be.copy_(bm)

    def lr_at(self, step: int) -> float:
        if self.cfg.warmup_steps and step < self.cfg.warmup_steps:
            return self.cfg.lr * (step + 1) / self.cfg.warmup_steps
        return self.cfg.lr

    # -- one step -------------------------------------------------------------------------------
    def train_step(self) -> float:
        """One optimiser step over ``grad_accum`` micro-batches; returns this rank's mean loss."""
        # In-network dropout draws from the global RNG: seed it per step, without disturbing the caller's state.
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(sample_seed(self.cfg.seed, "dropout", self.step))
            return self._train_step()

    def _sync(self, on: bool):
        if self.fsdp:
            self.module.set_requires_gradient_sync(on)  # type: ignore[operator]
            return contextlib.nullcontext()
        return self.module.no_sync() if (not on and hasattr(self.module, "no_sync")) else contextlib.nullcontext()

    def _train_step(self) -> float:
        if self._batches is None:
            self._batches = self._loader()
        self.model.train()
        if self.trainable_text:
            self.text_encoder.train()  # type: ignore[union-attr]
        a = self.cfg.grad_accum
        total = 0.0
        for m in range(a):
            batch = next(self._batches)
            self.skipped["unreadable samples"] += len(batch["skipped"])
            with self._sync(m == a - 1):
                with autocast(self.cfg.precision, self.device):
                    loss = self.module(batch)
                if not torch.isfinite(loss) and self.scaler is None:
                    raise FloatingPointError(f"non-finite loss at step {self.step}; lower the learning rate")
                scaled = loss / a
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += float(loss.detach()) / a
        if self.scaler is not None:
            self.scaler.unscale_(self.opt)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], self.cfg.grad_clip)
        for grp in self.opt.param_groups:
            grp["lr"] = self.lr_at(self.step)
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.opt)  # skipped when a gradient is not finite
            self.scaler.update()
            self.skipped["non-finite fp16 steps"] += int(self.scaler.get_scale() < scale)
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._ema_update()
        self.step += 1
        return total
