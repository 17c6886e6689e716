"""Shipping a trained stage inside the package: small, with its provenance.

A shipped stage folder holds ``config.json`` (the checkpoint's own, with the training settings), ``ema.safetensors``
(the EMA weights in fp16: what sampling uses; ``load_weights`` casts them back to fp32) or, when the EMA is not
usable (see ``weights``), ``model.safetensors`` (the training weights, which ``load_weights`` then falls back to), ``log.jsonl`` (the loss
curve), ``loss.png`` and ``provenance.json`` (the command that reproduces it, the measured wall time and peak memory).
Optimiser state and raw weights are not shipped: they are only needed to resume training.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from reimagen.utils.atomic import replacing_path

REPRODUCE = {  # the documented commands; a shipped stage records the command that really ran (its time log)
    # the earlier base stage (toy-32), then the layout fine-tune from its shipped weights (commit f59fdce's
    # toyworld/weights/base), then the reduction of its layout maps at shipping, then (v4) more steps of the
    # reduced stage from its shipped weights (commit 3c532db's toyworld/weights/base)
    "base": "reimagen-eval train --triples runs/toyworld/triples.parquet --preset toy-32 --text-encoder minilm "
            "--out runs/toy-train/base --steps 3750 --batch-size 32 --lr 8e-4 --warmup-steps 200 --ckpt-every 250 "
            "--seed 0 --min-snr-gamma 5\n"
            "reimagen-eval train --triples runs/toyworld/triples.parquet --preset toy-32-layout --text-encoder minilm "
            "--init-from EARLIER_SHIPPED_BASE --out runs/toy-train/layout-q4 --steps 1500 --batch-size 32 --lr 8e-4 "
            "--warmup-steps 50 --seed 1 --min-snr-gamma 5 --min-snr-plus-one --ckpt-every 250\n"
            "reimagen-eval toy ship --base runs/toy-train/layout-q4/step-00001500 --layout-rank 128 --keep-sr\n"
            "reimagen-eval train --triples runs/toyworld/triples.parquet --preset V3_SHIPPED_BASE --init-from "
            "V3_SHIPPED_BASE --text-encoder minilm --out runs/toy-train/v4 --steps 3250 --batch-size 32 --lr 8e-4 "
            "--warmup-steps 50 --seed 2 --min-snr-gamma 5 --min-snr-plus-one --ckpt-every 250\n"
            "reimagen-eval toy ship --base runs/toy-train/v4/last --keep-sr",
    "sr": "reimagen-eval train --triples runs/toyworld/triples.parquet --preset toy-sr64 --prediction v "
          "--max-aug-level 0.25 --text-encoder minilm --out runs/toy-train/sr --steps 2500 --batch-size 16 --lr 8e-4 "
          "--warmup-steps 100 --ckpt-every 250 --seed 0",
}
PREPARE = ("reimagen-eval toy build --out runs/toyworld   # the world, its knowledge bases and BM25 triples (k = 2)\n"
           "# each stage trained with OMP_NUM_THREADS=1 on one core of a 2-core CPU while another run used the other\n"
           "# core (the wall times include that contention)")


def _time_log(path: Path | None) -> dict:
    """The command, wall time and peak RSS from ``/usr/bin/time -v`` output, if given."""
    if path is None or not path.is_file():
        return {}
    text = path.read_text(errors="replace")
    out: dict = {}
    m = re.search(r'Command being timed: "(.*)"', text)
    if m:
        out["command"] = m.group(1)
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        parts = [float(p) for p in m.group(1).split(":")]
        out["wall_seconds"] = round(sum(p * 60 ** i for i, p in enumerate(reversed(parts))), 1)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["peak_rss_mb"] = round(int(m.group(1)) / 1024, 1)
    return out


def plot_loss(log: Path, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (Eq. 2, mean per log interval)")
    ax.set_yscale("log")
    ax.set_title(title)
    fig.tight_layout()
    with replacing_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
    return out


def reduce_stage(src: Path, rank: int, captions: Path, limit: int = 5000) -> tuple[Path, float]:
    """A copy of checkpoint ``src`` (EMA weights) beside it, ``<src>-rank<R>``, with its text layout maps reduced
    to rank ``rank`` on the span of the first ``limit`` captions of ``captions`` (a triples or corpus table;
    ``reimagen.models.checkpoint.reduce_layout_rank``). Returns the folder and the share of pooled variance kept."""
    import pandas as pd

    from reimagen.models.checkpoint import load_stage, read_checkpoint_config, reduce_layout_rank, write_checkpoint

    src = Path(src)
    meta = read_checkpoint_config(src)
    texts = pd.read_parquet(captions, columns=["text"]).text.astype(str).tolist()[:limit]
    model, enc = load_stage(src)
    e = enc.encode(texts)
    small, kept = reduce_layout_rank(model, e.embeddings, e.mask, rank)
    dst = src.with_name(f"{src.name}-rank{rank}")
    write_checkpoint(dst, small.cfg, meta["text_encoder"], {"ema": small.state_dict()}, step=meta.get("step", 0),
                     extra={"train": meta.get("train"), "layout_rank": {"from": str(src), "captions": str(captions),
                                                                          "n": len(texts), "variance_kept": kept}})
    return dst, kept


def ship_stage(src: Path, dst: Path, time_log: Path | None = None, weights: str = "ema") -> Path:
    """Copy checkpoint ``src`` to ``dst``; ``weights`` is ``ema`` (ema.safetensors) or ``raw`` (model.safetensors:
    the training weights, for runs whose EMA has not forgotten its initialisation yet)."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be ema or raw, got {weights!r}")
    fname = "ema.safetensors" if weights == "ema" else "model.safetensors"
    if not (src / fname).is_file():
        raise FileNotFoundError(f"{src} is not a trained checkpoint (no {fname})")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(src / "config.json", tmp / "config.json")
    sd = load_file(str(src / fname))
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}, str(tmp / fname))
    log = src.parent / "log.jsonl"  # (a reduce_stage copy sits beside its source: the same run folder)
    meta = json.loads((src / "config.json").read_text())
    if log.is_file():
        shutil.copy(log, tmp / "log.jsonl")
        plot_loss(log, tmp / "loss.png", f"{dst.name}: {meta['unet']['image_size']}px stage")
        rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        train_seconds = rows[-1]["seconds"] if rows else None
    else:
        train_seconds = None
    # the command that ran (from the time log), else the documented one
    prov = {"stage": dst.name, "step": meta.get("step"), "weights": weights, "prepare": PREPARE,
            "command": REPRODUCE.get(dst.name), "train_loop_seconds_last_session": train_seconds, **_time_log(time_log)}
    (tmp / "provenance.json").write_text(json.dumps(prov, indent=2))
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst
