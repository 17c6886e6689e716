"""Training one stage on KNN-ImageText triples (Sec. 3.2 "Model Training", Sec. 4 "Training details").

Each example is (image x0, text c_p, K neighbour images, K neighbour texts). A step samples t ~ U([0, 1]),
noises x0 with Eq. 1, drops the text and the neighbours independently with probability 0.1 each (learned
null embeddings, so the guided predictions of Eq. 5 / Eq. 6 are one network), and minimises Eq. 2.
Super-resolution stages also get the downsampled image as c_x with a random noise-augmentation level.

The paper trains with Adafactor (64x64) and Adam with lr 1e-4 (256 SR); here AdamW or Adafactor, EMA
weights and gradient clipping. Data come from RAM (a ``TripleData``) or from training shards
(``reimagen.training.shards``) through one loader (``reimagen.training.loader``): a global sample order cut into per-rank,
per-micro-batch slices, with each sample's randomness a function of (seed, stream position). So a run
resumes exactly, and 1 rank x B, 2 ranks x B/2 and 2 micro-batches of B/2 train on the same samples with the
same noise. ``torchrun`` runs it on many GPUs or nodes (DDP, or FSDP2 for stages that do not fit one GPU), in
fp32, bf16 or fp16 (with a gradient scaler that skips non-finite steps).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..models.checkpoint import recover_swap
from ..models.text import TextEncoder
from ..models.unet import ReImagenUNet
from ..utils.atomic import disk_full_names, write_jsonl
from ..utils.precision import PRECISIONS
from ..utils.runlock import run_lock
from .config import TrainConfig
from .data import TripleData
from .distributed import init_distributed, wrap_model
from .loader import (MemorySamples, Randomness, ShardSamples, Slicing, StreamOrder, make_loader, parse_mirror_words,
                     swap_words)
from .preemption import Preempted, PreemptionGuard
from .state import CheckpointMixin
from .step import StageLoss, StepMixin, enable_grad_checkpointing

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class Trainer(StepMixin, CheckpointMixin):
    """Trains one stage. ``fit()`` runs to ``cfg.steps``, resuming from ``out_dir/last`` if it exists.

    ``data``: a ``TripleData`` in RAM, or a shard folder (``reimagen.training.shards``); ``text_store``: its precomputed
    text embeddings (``reimagen.training.text_store.TextStore``), required for shards with a frozen encoder.
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
        if cfg.channels_last:  # the same weights and maths, NHWC tensors for the convolutions
            self.model.to(memory_format=torch.channels_last)
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
        if cfg.compile:  # the U-Net only: the loss around it may tokenize text (Python strings), a graph that
            self.model.compile()  # recompiled on every batch's captions (measured 0.08x; benchmarks/README.md)
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
            with disk_full_names(self.out_dir / "log.jsonl"), open(self.out_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if on_log:
            on_log(rec)

    def fit(self, progress: bool = True, on_log: Callable[[dict[str, float]], None] | None = None,
            wait: bool = False) -> list[dict[str, float]]:
        """Train to ``cfg.steps``; logs the mean loss (over steps and ranks) every ``log_every`` steps to
        ``out_dir/log.jsonl`` and checkpoints to ``out_dir/last`` every ``ckpt_every`` steps and at the end.

        Each rank holds the output folder's lock (``utils.runlock``; ``wait``: wait for another run's instead of
        refusing). A SIGTERM or SIGUSR1 ends the run after the step in flight, with a checkpoint
        (``preemption.Preempted``)."""
        if self.out_dir is None:
            return self._fit(None, progress, on_log)
        with run_lock(self.out_dir, self.dist.rank, wait=wait):
            return self._fit(self.out_dir / "last", progress, on_log)

    def _fit(self, last: Path | None, progress: bool, on_log) -> list[dict[str, float]]:
        if last is not None and self.dist.is_main and recover_swap(last):
            self._log_note(f"recovered {last} from a checkpoint swap that a kill interrupted")
        self.dist.barrier()
        if last is not None and (last / "trainer_state.pt").exists():
            self.resume(last)
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        cols = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn()]
        running, n, t0 = 0.0, 0, time.time()
        t0 -= self._resume_log()
        with PreemptionGuard() as guard, Progress(*cols, disable=not progress or not self.dist.is_main,
                                                  transient=False) as prog:
            task = prog.add_task("train", total=self.cfg.steps, completed=self.step, loss="-")
            while self.step < self.cfg.steps:
                running += self.train_step()
                n += 1
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    self._log_step(running / n, t0, on_log)
                    prog.update(task, loss=f"{self.history[-1]['loss']:.4f}")
                    running, n = 0.0, 0
                prog.update(task, completed=self.step)
                stop = self._stop_requested(guard)
                if last is not None and (self.step % self.cfg.ckpt_every == 0 or self.step == self.cfg.steps or stop):
                    self.save(last)
                if stop:
                    raise Preempted(guard.signame or "a signal on another rank", self.step,
                                    None if last is None else str(last))
        return self.history

    def _log_step(self, mean_loss: float, t0: float, on_log) -> None:
        rec = {"step": self.step, "loss": self.dist.mean(mean_loss), "seconds": time.time() - t0,
               "samples": self.step * self.cfg.batch_size}
        bad = self.dist.sum_int(self.skipped["unreadable samples"])
        if bad:
            rec["unreadable_samples"] = bad
        self._log(rec, on_log)

    def _stop_requested(self, guard: PreemptionGuard) -> bool:
        """Whether any rank got a pre-emption signal (one all-reduce of a flag per step on several ranks)."""
        return self.dist.sum_int(int(guard.signame is not None)) > 0  # (no collective on one process)

    def _log_note(self, note: str) -> None:
        from rich.console import Console

        Console(stderr=True).print(note, highlight=False)


__all__ = ["TrainConfig", "Trainer", "StageLoss", "enable_grad_checkpointing"]
