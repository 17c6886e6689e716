"""Stage checkpoints: ``<dir>/config.json`` (the stage's configuration, its text encoder's spec, the training
step and settings), ``model.safetensors``, ``ema.safetensors`` (the weights sampling uses), the trainable tiny
text encoder's ``text_encoder.safetensors``, and ``trainer_state.pt`` (optimiser, gradient scaler, data
position; only needed to resume). A checkpoint written under FSDP has no ``model.safetensors`` and no optimiser
in ``trainer_state.pt``: each rank's shards of them (and of the EMA) are in ``dcp/`` (torch.distributed.checkpoint).
Written atomically: to ``<dir>.tmp`` first, then swapped in."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..utils.atomic import disk_full_names
from .config import UNetConfig
from .text import TextEncoder, build_text_encoder
from .unet import ReImagenUNet, TextCond


# ----------------------------------------------------------------------------------------------
# Checkpoints: <dir>/config.json, model.safetensors, ema.safetensors, [text_encoder.safetensors],
# trainer_state.pt (optimiser, step; only needed to resume)
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, model: ReImagenUNet, text_encoder: TextEncoder | dict[str, Any],
                    ema: ReImagenUNet | None = None, train_config: Any = None, step: int = 0,
                    optimizer: torch.optim.Optimizer | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder of live modules (see ``write_checkpoint``)."""
    te = text_encoder if isinstance(text_encoder, dict) else None
    weights = {"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
               "text_encoder": None if te is not None or not getattr(text_encoder, "trainable", False)
               else text_encoder.state_dict()}  # type: ignore[union-attr]
    spec = te if te is not None else text_encoder.spec()  # type: ignore[union-attr]
    state = {"optimizer": optimizer.state_dict(), "step": step} if optimizer is not None else None
    return write_checkpoint(path, model.cfg, spec, weights, train_config, step, state, extra)


def write_checkpoint(path: str | Path, unet_cfg: UNetConfig, text_spec: dict[str, Any],
                     weights: dict[str, dict[str, torch.Tensor] | None], train_config: Any = None, step: int = 0,
                     trainer_state: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                     staged: bool = False) -> Path:
    """Write ``config.json``, ``{model,ema,text_encoder}.safetensors`` (the non-None ``weights``) and
    ``trainer_state.pt`` to ``<path>.tmp``, then swap it in: the old checkpoint survives until the new one is
    complete. ``staged``: ``<path>.tmp`` was made (by ``staging_dir``'s caller) and already holds files, e.g.
    the sharded state every rank wrote under FSDP."""
    path = Path(path)
    tmp = staging_dir(path)
    with disk_full_names(tmp):
        _write_staged(tmp, unet_cfg, text_spec, weights, train_config, step, trainer_state, extra, staged)
    if path.exists():
        old = path.with_name(path.name + ".old")
        _rmtree(old)
        os.replace(path, old)  # a kill between these two renames leaves old and tmp whole: recover_swap
        os.replace(tmp, path)
        _rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def _write_staged(tmp: Path, unet_cfg: UNetConfig, text_spec: dict[str, Any],
                  weights: dict[str, dict[str, torch.Tensor] | None], train_config: Any, step: int,
                  trainer_state: dict[str, Any] | None, extra: dict[str, Any] | None, staged: bool) -> None:
    if not staged:
        _rmtree(tmp)
        tmp.mkdir(parents=True)
    meta = {"unet": unet_cfg.to_dict(), "text_encoder": text_spec, "step": step,
            "train": asdict(train_config) if train_config is not None else None, **(extra or {})}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    for name, sd in weights.items():
        if sd is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / f"{name}.safetensors"))
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")  # last: a staged folder with it is complete


def recover_swap(path: str | Path) -> bool:
    """After a kill between ``write_checkpoint``'s two renames, ``path`` is missing while ``<path>.old`` (the
    previous checkpoint) and ``<path>.tmp`` (the new one, complete) exist: put the new one in place (or, if it
    is incomplete, the old one). True if something was recovered."""
    path = Path(path)
    old, tmp = path.with_name(path.name + ".old"), staging_dir(path)
    if path.exists() or not old.exists():
        return False
    os.replace(tmp if (tmp / "trainer_state.pt").is_file() else old, path)
    _rmtree(old)
    return True


def staging_dir(path: str | Path) -> Path:
    """Where a checkpoint is written before it is swapped in."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def refuse_other_config(path: str | Path, saved: UNetConfig, cfg: UNetConfig, hint: str = "") -> None:
    """ValueError naming the fields where a checkpoint's stage configuration differs from ``cfg``."""
    if saved == cfg:
        return
    diff = [f.name for f in fields(UNetConfig) if getattr(saved, f.name) != getattr(cfg, f.name)]
    raise ValueError(f"checkpoint {path} was saved with another stage configuration; differing fields: "
                     + ", ".join(f"{d} (checkpoint {getattr(saved, d)!r}, model {getattr(cfg, d)!r})" for d in diff)
                     + (f"; {hint}" if hint else ""))


def _rmtree(p: Path) -> None:
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
    refuse_other_config(path, UNetConfig.from_dict(meta["unet"]), model.cfg)
    model.load_state_dict(read_stage_weights(path, ema))


def read_stage_weights(path: str | Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """A checkpoint's EMA weights (``ema`` and present) or its raw ones, as a state dict."""
    f = Path(path) / ("ema.safetensors" if ema and (Path(path) / "ema.safetensors").exists() else "model.safetensors")
    if not f.is_file() and (Path(path) / "dcp").is_dir():
        raise FileNotFoundError(f"{path} is an FSDP checkpoint: its raw weights are sharded in dcp/ (resume training "
                                "from it); sample its EMA weights (ema.safetensors)")
    return read_safetensors(f)


def read_safetensors(f: Path) -> dict[str, torch.Tensor]:
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
        enc.load_state_dict(read_safetensors(te_file))  # type: ignore[attr-defined]
        enc.eval()  # type: ignore[attr-defined]
    return model.to(device).eval(), enc


def init_from(model: ReImagenUNet, path: str | Path) -> list[str]:
    """Start ``model`` from another stage's EMA weights (fine-tuning into a preset with new tensors).

    Every tensor of the old stage is copied; tensors it lacks (``text_layout``'s zero-initialised maps,
    ``attn_position_embedding``) keep their initial values. A tensor of another shape, or one this stage lacks,
    is refused. Returns the names of the new tensors."""
    meta = read_checkpoint_config(path)
    state = read_stage_weights(path)
    own = model.state_dict()
    extra = sorted(set(state) - set(own))
    if extra:
        raise ValueError(f"{path} has weights this stage lacks ({', '.join(extra[:3])}...): its configuration "
                         f"{meta['unet']} is not contained in this stage's")
    for name, w in state.items():
        if w.shape != own[name].shape:
            raise ValueError(f"{path}: {name} is {tuple(w.shape)} there but {tuple(own[name].shape)} in this stage; "
                             "fine-tuning can only add tensors")
        own[name] = w
    model.load_state_dict(own)
    return sorted(set(own) - set(state))


@torch.no_grad()
def reduce_layout_rank(model: ReImagenUNet, embeddings: torch.Tensor, mask: torch.Tensor,
                       rank: int) -> tuple[ReImagenUNet, float]:
    """``model`` with its full text layout maps (``text_layout_rank`` 0) replaced by rank-``rank`` ones, exact on the
    span of the pooled tokens of the given captions (text-encoder ``embeddings`` / ``mask``) and of the dropped text:
    each map W x + b becomes (W V)(V^T x) + b + W (m - V V^T m), V the top principal directions of the pooled x
    and m their mean. Returns the new model and the smallest share of the pooled variance kept by V."""
    from dataclasses import replace

    if model.cfg.text_layout_rank or not model.cfg.text_layout:
        raise ValueError("reduce_layout_rank needs a stage with full-rank text layout maps (text_layout > 0, "
                         "text_layout_rank = 0)")
    small = ReImagenUNet(replace(model.cfg, text_layout_rank=rank))
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("layout.weight")}
    small.load_state_dict(state, strict=False)
    text = model.project_text(embeddings.float(), mask)
    dropped = model.drop_text(text, torch.ones(len(mask), dtype=torch.bool))
    text = TextCond(*(torch.cat([getattr(text, f), getattr(dropped, f)]) for f in ("tokens", "mask", "pooled")))
    kept, bigs = 1.0, dict(model.named_modules())
    for name, att in small.named_modules():
        if getattr(att, "layout_down", None) is None:
            continue
        big = bigs[name]
        x = big.layout_pooled(text).double()
        m = x.mean(0)
        _, s, vh = torch.linalg.svd(x - m, full_matrices=False)
        kept = min(kept, float((s[:rank] ** 2).sum() / (s ** 2).sum().clamp(min=1e-30)))
        v = vh[:rank].T  # (in, rank)
        w = big.layout.weight.double()
        att.layout_down.weight.copy_(v.T)
        att.layout.weight.copy_(w @ v)
        att.layout.bias.copy_(big.layout.bias.double() + w @ (m - v @ (v.T @ m)))
    return small.eval(), kept
