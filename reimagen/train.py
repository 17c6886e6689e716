"""Training one stage on KNN-ImageText triples (Sec. 3.2 "Model Training", Sec. 4 "Training details").

Each example is (image x0, text c_p, K neighbour images, K neighbour texts). A step samples t ~ U([0, 1]),
noises x0 with Eq. 1, drops the text and the neighbours independently with probability 0.1 each (learned
null embeddings, so the guided predictions of Eq. 5 / Eq. 6 are one network), and minimises Eq. 2.
Super-resolution stages also get the downsampled image as c_x with a random noise-augmentation level.

The paper trains with Adafactor (64x64) and Adam with lr 1e-4 (256 SR); here AdamW or Adafactor, EMA
weights and gradient clipping. Data come from RAM (a ``TripleData``) or from training shards
(``reimagen.shards``) through one loader (``reimagen.loader``): a global sample order cut into per-rank,
per-micro-batch slices, with each sample's randomness a function of (seed, stream position). So a run
resumes exactly, and 1 rank x B, 2 ranks x B/2 and 2 micro-batches of B/2 train on the same samples with the
same noise. ``torchrun`` runs it on many GPUs or nodes (DDP, or FSDP2 for stages that do not fit one GPU), in
fp32, bf16 or fp16 (with a gradient scaler that skips non-finite steps).
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import write_jsonl
from .checkpoint import read_checkpoint_config, read_safetensors, refuse_other_config, staging_dir, write_checkpoint
from .config import UNetConfig
from .data import TripleData
from .diffusion import diffusion_loss, get_schedule, min_snr_weight, q_sample
from .distributed import init_distributed, shardable_blocks, wrap_model
from .precision import PRECISIONS, autocast
from .loader import (MemorySamples, Randomness, ShardSamples, Slicing, StreamOrder, make_loader, parse_mirror_words,
                     swap_words, to_unit)
from .sampling import sample_seed
from .text import TextEncoder, TextEncoding
from .unet import ReImagenUNet

Tensor = torch.Tensor


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


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
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


class Trainer:
    """Trains one stage. ``fit()`` runs to ``cfg.steps``, resuming from ``out_dir/last`` if it exists.

    ``data``: a ``TripleData`` in RAM, or a shard folder (``reimagen.shards``); ``text_store``: its precomputed
    text embeddings (``reimagen.text_store.TextStore``), required for shards with a frozen encoder.
    ``text_encoder`` may then be just the encoder's spec (a dict): it is never loaded. Under ``torchrun`` each
    process trains its slice of every batch (``cfg.batch_size`` is the global batch).
    """

    def __init__(self, model: ReImagenUNet, text_encoder: TextEncoder | dict[str, Any], data: TripleData | str | Path,
                 cfg: TrainConfig, out_dir: str | Path | None = None, device: str | torch.device = "cpu",
                 text_store: Any = None):
        self.dist, self.device = init_distributed(str(device))
        self.trainable_text = bool(getattr(text_encoder, "trainable", False))
        self.text_spec = text_encoder if isinstance(text_encoder, dict) else text_encoder.spec()
        dim = text_store.dim if text_store is not None else getattr(text_encoder, "dim", None)
        if dim is not None and dim != model.cfg.text_dim:
            raise ValueError(f"text encoder gives {dim}-d embeddings, the stage expects {model.cfg.text_dim}")
        self.model, self.text_encoder, self.cfg = model.to(self.device), text_encoder, cfg
        self.out_dir = Path(out_dir) if out_dir else None
        self.slicing = Slicing(cfg.batch_size, self.dist.world_size, self.dist.rank, cfg.grad_accum)
        self.data, self.dataset = data, self._dataset(data, text_store)
        if model.cfg.neighbour_attention and self.dataset.k < 1:
            raise ValueError("the stage attends to neighbours but the training data has K = 0 neighbours")
        self.order = StreamOrder(self.dataset.lengths, cfg.seed, cfg.shuffle_window)
        self.fsdp = cfg.fsdp
        self._ema_setup()
        if cfg.grad_checkpointing:
            enable_grad_checkpointing(self.model)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        loss = StageLoss(self.model, text_encoder if self.trainable_text else None, cfg)  # type: ignore[arg-type]
        self.module = wrap_model(loss, self.dist, self.device, fsdp=cfg.fsdp, param_dtype=PRECISIONS[cfg.precision])
        self.loss_fn = torch.compile(self.module) if cfg.compile else self.module
        params = [p for p in self.module.parameters() if p.requires_grad]
        opt_cls = torch.optim.Adafactor if cfg.optimizer == "adafactor" else torch.optim.AdamW
        self.opt = opt_cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.step = 0
        self.skipped: dict[str, int] = {"unreadable samples": 0, "non-finite fp16 steps": 0}
        self.history: list[dict[str, float]] = []
        self._batches: Iterator[dict[str, Any]] | None = None

    # -- data -----------------------------------------------------------------------------------
    def _dataset(self, data: Any, text_store: Any):
        pairs = parse_mirror_words(self.cfg.mirror_words)
        rnd = Randomness(self.model.cfg.image_size, self.cfg.seed, self.cfg.p_drop_text, self.cfg.p_drop_neighbours,
                         self.cfg.max_aug_level, self.cfg.random_crop, pairs)
        if isinstance(data, TripleData):
            if data.image_size != self.model.cfg.image_size:
                raise ValueError(f"training images are {data.image_size}px but the stage is {self.model.cfg.image_size}px")
            encoding = mirrored = None
            if not self.trainable_text:  # a frozen encoder runs once over the corpus (and its swapped captions)
                texts = list(data.texts) + ([swap_words(x, pairs) for x in data.texts] if pairs else [])
                with torch.no_grad():
                    encoding = self.text_encoder.encode(texts)  # type: ignore[union-attr]
                if pairs:
                    n = len(data.texts)
                    encoding, mirrored = encoding.index(list(range(n))), encoding.index(list(range(n, 2 * n)))
            return MemorySamples(data, rnd, encoding, mirrored)
        if pairs and not self.trainable_text:
            raise ValueError("--mirror-words on shards needs a trainable text encoder: the text store holds each "
                             "caption as written, not swapped; train from --triples (encoded in RAM) instead")
        if not self.trainable_text and text_store is None:
            raise ValueError(f"training on shards with the frozen {self.text_spec.get('name')} encoder needs its "
                             "precomputed embeddings: run `reimagen-eval embed-text --shards ...` and pass --text-store")
        if text_store is not None and text_store.encoder_spec != self.text_spec:
            raise ValueError(f"the text store {text_store.store} was made with {text_store.encoder_spec}, not with "
                             f"the chosen encoder {self.text_spec}")
        samples = ShardSamples(data, rnd, text_store if not self.trainable_text else None)
        if samples.text_store is not None:
            samples.text_store.check(samples.manifest)
        return samples

    def _loader(self) -> Iterator[dict[str, Any]]:
        return iter(make_loader(self.dataset, self.order, self.slicing, self.step, self.cfg.workers,
                                pin_memory=self.device.type == "cuda"))

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
                    loss = self.loss_fn(batch)
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

    def _resume_log(self) -> float:
        """On a resumed run, drop the log rows written after the checkpoint being resumed (a run stopped between
        checkpoints logged steps it will now redo) and return the train-loop seconds logged up to it, so that
        ``seconds`` keeps counting across sessions instead of restarting at 0."""
        log = None if self.out_dir is None else self.out_dir / "log.jsonl"
        if log is None or not log.is_file():
            return 0.0
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        keep = [r for r in rows if r["step"] <= self.step]
        if len(keep) != len(rows) and self.dist.is_main:
            write_jsonl(log, keep)
        return float(keep[-1]["seconds"]) if keep and self.step else 0.0

    def _log(self, rec: dict[str, float], on_log: Callable[[dict[str, float]], None] | None) -> None:
        self.history.append(rec)
        if self.out_dir and self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if on_log:
            on_log(rec)

    def fit(self, progress: bool = True, on_log: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Train to ``cfg.steps``; logs the mean loss (over steps and ranks) every ``log_every`` steps to
        ``out_dir/log.jsonl`` and checkpoints to ``out_dir/last`` every ``ckpt_every`` steps and at the end."""
        last = self.out_dir / "last" if self.out_dir else None
        if last is not None and (last / "trainer_state.pt").exists():
            self.resume(last)
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        cols = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn()]
        running, n, t0 = 0.0, 0, time.time()
        t0 -= self._resume_log()
        with Progress(*cols, disable=not progress or not self.dist.is_main, transient=False) as prog:
            task = prog.add_task("train", total=self.cfg.steps, completed=self.step, loss="-")
            while self.step < self.cfg.steps:
                running += self.train_step()
                n += 1
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    rec = {"step": self.step, "loss": self.dist.mean(running / n), "seconds": time.time() - t0,
                           "samples": self.step * self.cfg.batch_size}
                    bad = self.dist.sum_int(self.skipped["unreadable samples"])
                    if bad:
                        rec["unreadable_samples"] = bad
                    self._log(rec, on_log)
                    prog.update(task, loss=f"{rec['loss']:.4f}")
                    running, n = 0.0, 0
                prog.update(task, completed=self.step)
                if last is not None and (self.step % self.cfg.ckpt_every == 0 or self.step == self.cfg.steps):
                    self.save(last)
        return self.history
