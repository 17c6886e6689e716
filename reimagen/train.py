"""Training one stage on KNN-ImageText triples (Sec. 3.2 "Model Training", Sec. 4 "Training details").

Each example is (image x0, text c_p, K neighbour images, K neighbour texts). A step samples t ~ U([0, 1]),
noises x0 with Eq. 1, drops the text and the neighbours independently with probability 0.1 each (learned
null embeddings, so the guided predictions of Eq. 5 / Eq. 6 are one network), and minimises Eq. 2.
Super-resolution stages also get the downsampled image as c_x with a random noise-augmentation level.

The paper trains with Adafactor (64x64) and Adam with lr 1e-4 (256 SR); here AdamW or Adafactor, EMA
weights, gradient clipping and checkpoints (safetensors + JSON) that resume exactly: every random number
of step s (batch indices, t, noise, dropout) comes from a generator seeded by (seed, s).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .atomic import write_jsonl
from .config import UNetConfig
from .data import TripleData
from .diffusion import diffusion_loss, get_schedule, min_snr_weight, q_sample
from .sampling import sample_seed
from .text import TextEncoder, TextEncoding, build_text_encoder
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
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 500

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"optimizer must be adamw or adafactor, got {self.optimizer!r}")
        for name in ("p_drop_text", "p_drop_neighbours", "max_aug_level"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.min_snr_gamma < 0:
            raise ValueError(f"min_snr_gamma must be >= 0 (0 disables), got {self.min_snr_gamma}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")


# ----------------------------------------------------------------------------------------------
# Checkpoints: <dir>/config.json, model.safetensors, ema.safetensors, [text_encoder.safetensors],
# trainer_state.pt (optimiser, step; only needed to resume)
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, model: ReImagenUNet, text_encoder: TextEncoder, ema: ReImagenUNet | None = None,
                    train_config: TrainConfig | None = None, step: int = 0, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically (to ``<path>.tmp`` first, then renamed)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    _rmtree(tmp)
    tmp.mkdir(parents=True)
    meta = {"unet": model.cfg.to_dict(), "text_encoder": text_encoder.spec(), "step": step,
            "train": asdict(train_config) if train_config else None, **(extra or {})}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    if getattr(text_encoder, "trainable", False):
        save_file({k: v.detach().cpu().contiguous() for k, v in text_encoder.state_dict().items()},  # type: ignore[attr-defined]
                  str(tmp / "text_encoder.safetensors"))
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), "step": step}, tmp / "trainer_state.pt")
    if path.exists():  # swap: the old checkpoint survives until the new one is complete
        old = path.with_name(path.name + ".old")
        _rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a reimagen checkpoint folder (no config.json)")
    meta = read_config_json(cfg_file)
    if not isinstance(meta, dict) or "unet" not in meta:
        raise ValueError(f"{cfg_file} has no 'unet' entry: not a reimagen stage checkpoint")
    return meta


def read_config_json(cfg_file: Path) -> Any:
    """A checkpoint's config.json; a damaged one is refused by name."""
    try:
        return json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_file} is not valid JSON ({err}); the checkpoint is damaged: copy it again or "
                         "resume training from an earlier one") from None


def checkpoint_digest(path: str | Path) -> str:
    """A location-independent digest of a checkpoint: its config.json (configuration, text encoder, training
    step) and the names and sizes of its weight files. Moving or copying the folder keeps it."""
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes() if (path / "config.json").is_file() else b"")
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
    return h.hexdigest()[:16]


def load_weights(model: ReImagenUNet, path: str | Path, ema: bool = True) -> None:
    """Load a checkpoint's weights into ``model``; refuses a checkpoint saved under another config."""
    meta = read_checkpoint_config(path)
    saved = UNetConfig.from_dict(meta["unet"])
    if saved != model.cfg:
        diff = [f.name for f in fields(UNetConfig) if getattr(saved, f.name) != getattr(model.cfg, f.name)]
        raise ValueError(f"checkpoint {path} was saved with another stage configuration; differing fields: "
                         + ", ".join(f"{d} (checkpoint {getattr(saved, d)!r}, model {getattr(model.cfg, d)!r})" for d in diff))
    f = Path(path) / ("ema.safetensors" if ema and (Path(path) / "ema.safetensors").exists() else "model.safetensors")
    model.load_state_dict(_read_safetensors(f))


def _read_safetensors(f: Path) -> dict[str, torch.Tensor]:
    if not f.is_file():
        raise FileNotFoundError(f"{f} does not exist: the checkpoint folder is incomplete")
    try:
        return load_file(str(f))
    except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) on damaged files
        raise ValueError(f"{f} cannot be read as safetensors ({str(err).splitlines()[0][:200]}); the checkpoint is "
                         "damaged: copy it again or resume training from an earlier one") from None


def load_stage(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> tuple[ReImagenUNet, TextEncoder]:
    """A stage network (EMA weights by default) and the text encoder it was trained with."""
    meta = read_checkpoint_config(path)
    model = ReImagenUNet(UNetConfig.from_dict(meta["unet"]))
    load_weights(model, path, ema=ema)
    enc = build_text_encoder(meta["text_encoder"], device=device)
    te_file = Path(path) / "text_encoder.safetensors"
    if te_file.exists():
        enc.load_state_dict(_read_safetensors(te_file))  # type: ignore[attr-defined]
        enc.eval()  # type: ignore[attr-defined]
    return model.to(device).eval(), enc


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class Trainer:
    """Trains one stage. ``fit()`` runs to ``cfg.steps``, resuming from ``out_dir/last`` if it exists."""

    def __init__(self, model: ReImagenUNet, text_encoder: TextEncoder, data: TripleData, cfg: TrainConfig,
                 out_dir: str | Path | None = None, device: str | torch.device = "cpu"):
        if data.image_size != model.cfg.image_size:
            raise ValueError(f"training images are {data.image_size}px but the stage is {model.cfg.image_size}px")
        if text_encoder.dim != model.cfg.text_dim:
            raise ValueError(f"text encoder gives {text_encoder.dim}-d embeddings, the stage expects {model.cfg.text_dim}")
        if model.cfg.neighbour_attention and data.k < 1:
            raise ValueError("the stage attends to neighbours but the training data has K = 0 neighbours")
        self.model, self.text_encoder, self.data, self.cfg = model.to(device), text_encoder, data, cfg
        self.device = torch.device(device)
        self.out_dir = Path(out_dir) if out_dir else None
        self.ema = copy.deepcopy(self.model)  # no fresh initialisation: leaves the global RNG alone
        self.ema.requires_grad_(False).eval()
        self.trainable_text = bool(getattr(text_encoder, "trainable", False))
        params = list(model.parameters()) + (list(text_encoder.parameters()) if self.trainable_text else [])  # type: ignore[attr-defined]
        if cfg.optimizer == "adafactor":
            self.opt = torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.log_snr = get_schedule(model.cfg.schedule)
        self._text_cache: TextEncoding | None = None
        self.history: list[dict[str, float]] = []

    # -- text ---------------------------------------------------------------------------------
    def _encode(self, idx: Tensor) -> TextEncoding:
        """Text encodings of data rows ``idx``: frozen encoders run once over the whole corpus."""
        if self.trainable_text:
            return self.text_encoder.encode([self.data.texts[i] for i in idx.tolist()])
        if self._text_cache is None:
            self._text_cache = self.text_encoder.encode(self.data.texts)
        return self._text_cache.index(idx)

    # -- one step -----------------------------------------------------------------------------
    def batch_generator(self, step: int) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(sample_seed(self.cfg.seed, "train", step))
        return g

    def loss_on(self, idx: Tensor, g: torch.Generator) -> Tensor:
        """Eq. 2 on data rows ``idx`` with the randomness of generator ``g``."""
        m, cfg, dev = self.model, self.cfg, self.device
        b = idx.shape[0]
        x0 = self.data.images_at(idx).to(dev)
        t = torch.rand(b, generator=g).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        drop_text = (torch.rand(b, generator=g) < cfg.p_drop_text).to(dev)
        drop_nbr = (torch.rand(b, generator=g) < cfg.p_drop_neighbours).to(dev)
        lt = self.log_snr(t)
        x_t = q_sample(x0, lt, noise)  # Eq. 1
        enc = self._encode(idx)
        text = m.project_text(enc.embeddings.to(dev), enc.mask.to(dev))
        memory = None
        if m.neighbour_attn is not None:
            nidx = self.data.neighbours[idx]  # (B, K) row indices
            nimg = self.data.images_at(nidx.reshape(-1)).reshape(b, self.data.k, *x0.shape[1:]).to(dev)
            nenc = self._encode(nidx.reshape(-1))
            memory = m.encode_neighbours(nimg, m.project_text(nenc.embeddings.to(dev), nenc.mask.to(dev)))
        lowres = aug_t = None
        if m.cfg.is_super_resolution:
            low = F.interpolate(x0, size=(m.cfg.lowres_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
            aug_t = (torch.rand(b, generator=g) * cfg.max_aug_level).to(dev)
            lowres = m.lowres_input(low, aug_t, torch.randn(x0.shape, generator=g).to(dev))
        pred = m(x_t, t, text, memory, drop_text, drop_nbr, lowres, aug_t)
        weight = min_snr_weight(lt, cfg.min_snr_gamma, m.cfg.prediction) if cfg.min_snr_gamma > 0 else None
        return diffusion_loss(pred, x0, noise, lt, m.cfg.prediction, weight)  # Eq. 2

    def lr_at(self, step: int) -> float:
        if self.cfg.warmup_steps and step < self.cfg.warmup_steps:
            return self.cfg.lr * (step + 1) / self.cfg.warmup_steps
        return self.cfg.lr

    def ema_decay_at(self, step: int) -> float:
        d = self.cfg.ema_decay
        return min(d, (1 + step) / (10 + step)) if self.cfg.ema_warmup else d

    def train_step(self) -> float:
        # In-network dropout draws from the global RNG: seed it per step, without disturbing the caller's state.
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(sample_seed(self.cfg.seed, "dropout", self.step))
            return self._train_step()

    def _train_step(self) -> float:
        g = self.batch_generator(self.step)
        rows = self.data.train_rows
        idx = rows[torch.randint(len(rows), (self.cfg.batch_size,), generator=g)]
        self.model.train()
        if self.trainable_text:
            self.text_encoder.train()  # type: ignore[attr-defined]
        loss = self.loss_on(idx, g)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.step}; lower the learning rate")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            params = [p for grp in self.opt.param_groups for p in grp["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        for grp in self.opt.param_groups:
            grp["lr"] = self.lr_at(self.step)
        self.opt.step()
        with torch.no_grad():
            d = self.ema_decay_at(self.step)
            for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                pe.lerp_(pm, 1 - d)
            for be, bm in zip(self.ema.buffers(), self.model.buffers()):
                be.copy_(bm)
        self.step += 1
        return float(loss.detach())

    # -- checkpoints ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        return save_checkpoint(path, self.model, self.text_encoder, self.ema, self.cfg, self.step, self.opt)

    def resume(self, path: str | Path) -> None:
        """Restore weights, EMA, optimiser and step from a checkpoint written by ``save``."""
        path = Path(path)
        meta = read_checkpoint_config(path)
        load_weights(self.model, path, ema=False)
        self.ema.load_state_dict(_read_safetensors(path / "ema.safetensors"))
        te = path / "text_encoder.safetensors"
        if self.trainable_text and te.exists():
            self.text_encoder.load_state_dict(_read_safetensors(te))  # type: ignore[attr-defined]
        try:
            state = torch.load(path / "trainer_state.pt", map_location=self.device, weights_only=True)
        except (OSError, RuntimeError, EOFError) as err:
            raise ValueError(f"{path / 'trainer_state.pt'} cannot be read ({str(err).splitlines()[0][:200]}); the "
                             "checkpoint is damaged: delete it to start over or resume from a copy") from None
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(meta["step"])

    def _resume_log(self) -> float:
        """On a resumed run, drop the log rows written after the checkpoint being resumed (a run stopped between
        checkpoints logged steps it will now redo) and return the train-loop seconds logged up to it, so that
        ``seconds`` keeps counting across sessions instead of restarting at 0."""
        log = None if self.out_dir is None else self.out_dir / "log.jsonl"
        if log is None or not log.is_file():
            return 0.0
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        keep = [r for r in rows if r["step"] <= self.step]
        if len(keep) != len(rows):
            write_jsonl(log, keep)
        return float(keep[-1]["seconds"]) if keep and self.step else 0.0

    def fit(self, progress: bool = True, on_log: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        """Train to ``cfg.steps``; logs mean loss every ``log_every`` steps to ``out_dir/log.jsonl`` and
        checkpoints to ``out_dir/last`` every ``ckpt_every`` steps and at the end."""
        last = self.out_dir / "last" if self.out_dir else None
        if last is not None and (last / "trainer_state.pt").exists():
            self.resume(last)
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        cols = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn()]
        running, n, t0 = 0.0, 0, time.time()
        t0 -= self._resume_log()
        with Progress(*cols, disable=not progress, transient=False) as prog:
            task = prog.add_task("train", total=self.cfg.steps, completed=self.step, loss="-")
            while self.step < self.cfg.steps:
                running += self.train_step()
                n += 1
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    rec = {"step": self.step, "loss": running / n, "seconds": time.time() - t0}
                    self.history.append(rec)
                    if self.out_dir:
                        self.out_dir.mkdir(parents=True, exist_ok=True)
                        with open(self.out_dir / "log.jsonl", "a") as fh:
                            fh.write(json.dumps(rec) + "\n")
                    if on_log:
                        on_log(rec)
                    prog.update(task, loss=f"{rec['loss']:.4f}")
                    running, n = 0.0, 0
                prog.update(task, completed=self.step)
                if last is not None and (self.step % self.cfg.ckpt_every == 0 or self.step == self.cfg.steps):
                    self.save(last)
        return self.history

