#!/usr/bin/env python
"""Training input and scaling ([scale-train]): ratios measured in one run, against baselines of the same run.

* loader        samples/s of the streaming loader (shards through wids, ``--workers`` DataLoader workers: decode,
                resize, per-sample noise) against the in-RAM path (a ``TripleData`` in memory, through the same
                loader with no workers) and against the old in-RAM gather (one uint8 index + one batched randn),
                at the same batch; the issue's goal: >= 0.9x the in-RAM path with 2 workers. Also from 256 px
                JPEG shards (the img2dataset / LAION layout, decoded at a reduced DCT scale). One training step
                of ``--preset`` at that batch is timed too, so the loader's rate reads against what training needs.
* end-to-end    training samples/s of one process on the in-RAM table vs on the shards with 2 workers (which share
                the cores with the step): what the loader's speed means for a run; goal >= 0.9x.
* memory        peak RSS of a process that streams 60 batches from shards of ``--small`` vs ``--large`` samples
                (each in its own subprocess); goal flat, < 1.2x.
* ddp           steps/s of ``torchrun`` with 2 processes (gloo, 1 thread each) against 1 process with 2
                threads, the same global batch (the train loop's own clock, from log.jsonl).
* gpu           bf16 vs fp32 step time, and FSDP memory: printed only when CUDA is available.
* variants      ([toy-v4]) one training step of ``--variant-preset`` (default toy-32, the toy base stage) at
                ``--batch`` under fp32 eager, bf16 autocast, channels-last and ``torch.compile`` (compile time apart),
                as ratios against fp32 eager; then each variant's loss curve over ``--curve-steps`` steps of
                ``--curve-preset`` on the same data and seeds, compared with fp32's (``--only variants`` runs this
                section alone).

Run: ``.venv/bin/python benchmarks/train_throughput.py [--batch 32 --size 64 --small 2000 --large 20000]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_table(folder: Path, n: int, size: int, seed: int = 0, fmt: str = "png") -> Path:
    """n pairs with PNG (or JPEG) images of ``size`` px (a textured background and a square), K = 2 neighbours."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        img = (rng.integers(0, 256, 3) + rng.integers(-20, 20, (size, size, 3))).clip(0, 255).astype(np.uint8)
        s = size // 4
        y, x = rng.integers(0, size - s, 2)
        img[y:y + s, x:x + s] = rng.integers(128, 256, 3)
        Image.fromarray(img).save(folder / f"{i}.{fmt}", quality=90)
        rows.append({"id": str(i), "text": f"thing {i % 97} in place {i % 13}", "image": f"{i}.{fmt}",
                     "neighbor_ids": [str((i + 1) % n), str((i + 2) % n)]})
    pd.DataFrame(rows).to_parquet(folder / "triples.parquet")
    return folder / "triples.parquet"


def shards_of(root: Path, n: int, size: int, fmt: str = "png") -> Path:
    from reimagen.training.shards import ShardSettings, write_shards

    tag = f"{n}" if fmt == "png" else f"{n}-{fmt}{size}"
    out = root / f"shards-{tag}"
    if not (out / "manifest.json").is_file():
        write_shards(make_table(root / f"data-{tag}", n, size, fmt=fmt), out, ShardSettings(samples_per_shard=500),
                     progress=False)
    return out


def rate(loader_iter, batches: int, batch: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        next(loader_iter)
    t = time.perf_counter()
    for _ in range(batches):
        next(loader_iter)
    return batches * batch / (time.perf_counter() - t)


def bench_loader(root: Path, args) -> dict:
    from reimagen.training.data import TripleData
    from reimagen.training.loader import MemorySamples, Randomness, ShardSamples, Slicing, StreamOrder, make_loader

    shards = shards_of(root, args.small, args.size)
    rnd = Randomness(args.size, 0, 0.1, 0.1, 1.0)
    data = TripleData.from_table(root / f"data-{args.small}" / "triples.parquet", args.size, progress=False)
    mem = MemorySamples(data, rnd)
    streamed = ShardSamples(shards, rnd)
    b = args.batch
    out = {}
    order = StreamOrder(mem.lengths, 0)
    out["in_ram"] = rate(iter(make_loader(mem, order, Slicing(b), 0, 0)), args.batches, b)
    g = torch.Generator().manual_seed(0)

    def old_gather():
        while True:
            idx = torch.randint(len(data), (b,), generator=g)
            x0 = data.images_at(idx)
            nimg = data.images_at(data.neighbours[idx].reshape(-1))
            yield x0, nimg, torch.randn(x0.shape, generator=g), torch.rand(b, generator=g)

    out["old_gather"] = rate(old_gather(), args.batches, b)
    sorder = StreamOrder(streamed.lengths, 0)
    for w in (0, args.workers):
        out[f"streamed_{w}w"] = rate(iter(make_loader(streamed, sorder, Slicing(b), 0, w)), args.batches, b)
    # img2dataset / LAION-style shards: 256 px JPEGs for a stage of --size px (decoded at a reduced DCT scale)
    jpeg = ShardSamples(shards_of(root, args.small, 256, "jpg"), rnd)
    out[f"streamed_jpeg256_{args.workers}w"] = rate(iter(make_loader(jpeg, StreamOrder(jpeg.lengths, 0), Slicing(b), 0,
                                                                     args.workers)), args.batches, b)
    out["train_step_samples_per_s"] = train_step_rate(args)
    return out


def bench_end_to_end(root: Path, args) -> dict:
    """Training samples/s of one process: the in-RAM table vs the shards with ``--workers`` workers (same preset,
    batch and steps; the workers share the machine's cores with the training step)."""
    from reimagen.models.config import get_preset
    from reimagen.training.data import TripleData
    from reimagen.models.text import TinyTextEncoder
    from reimagen.training.train import TrainConfig, Trainer
    from reimagen.models.unet import ReImagenUNet

    cfg = get_preset(args.preset, text_dim=32)
    shards = shards_of(root, args.small, args.size)
    ram = TripleData.from_table(root / f"data-{args.small}" / "triples.parquet", cfg.image_size, progress=False)
    out = {}
    for name, data, workers in (("in_ram", ram, 0), (f"streamed_{args.workers}w", shards, args.workers)):
        torch.manual_seed(0)
        tr = Trainer(ReImagenUNet(cfg), TinyTextEncoder(dim=32), data,
                     TrainConfig(steps=100, batch_size=args.batch, workers=workers))
        for _ in range(2):
            tr.train_step()
        t = time.perf_counter()
        for _ in range(args.e2e_steps):
            tr.train_step()
        out[f"{name}_samples_per_s"] = args.e2e_steps * args.batch / (time.perf_counter() - t)
        tr._batches = None  # stop the workers
    return out


def train_step_rate(args) -> float:
    from reimagen.models.config import get_preset
    from reimagen.training.data import TripleData
    from reimagen.models.text import TinyTextEncoder
    from reimagen.training.train import TrainConfig, Trainer
    from reimagen.models.unet import ReImagenUNet

    cfg = get_preset(args.preset, text_dim=64)
    n = 64
    rng = np.random.default_rng(0)
    data = TripleData.from_arrays(rng.integers(0, 256, (n, cfg.image_size, cfg.image_size, 3), dtype=np.uint8),
                                  [f"t {i}" for i in range(n)], np.stack([(np.arange(n) + j) % n for j in (1, 2)], 1))
    tr = Trainer(ReImagenUNet(cfg), TinyTextEncoder(dim=64), data, TrainConfig(steps=10, batch_size=args.batch))
    tr.train_step()
    t = time.perf_counter()
    for _ in range(3):
        tr.train_step()
    return 3 * args.batch / (time.perf_counter() - t)


# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child would report its parent's peak.
STREAM = """
import sys
sys.path.insert(0, {root!r})
from reimagen.training.loader import Randomness, ShardSamples, Slicing, StreamOrder, make_loader
ds = ShardSamples({shards!r}, Randomness({size}, 0, 0.1, 0.1, 1.0))
it = iter(make_loader(ds, StreamOrder(ds.lengths, 0), Slicing({batch}), 0, 0))
for _ in range(60):
    next(it)
print([int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")][0])
"""


def bench_memory(root: Path, args) -> dict:
    out = {}
    for n in (args.small, args.large):
        shards = shards_of(root, n, 32)
        code = STREAM.format(root=str(ROOT), shards=str(shards), size=32, batch=args.batch)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out[f"peak_rss_mb_{n}"] = int(res.stdout.strip().splitlines()[-1]) / 1024
    return out


def bench_ddp(root: Path, args) -> dict:
    shards = shards_of(root, args.small, 32)
    steps = args.ddp_steps
    out = {}
    for nproc in (1, 2):
        run = root / f"ddp-{nproc}"
        cmd = ["-m", "reimagen_eval.cli", "train", "--shards", str(shards), "--preset", "small-32", "--out", str(run),
               "--steps", str(steps), "--batch-size", str(args.batch), "--log-every", "2", "--ckpt-every", "100000"]
        env = dict(os.environ, OMP_NUM_THREADS=str(2 // nproc), HF_HUB_OFFLINE="1")
        launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                        "--nproc-per-node", "2", "--master-port", "29731"]
        subprocess.run([*launcher, *cmd], check=True, env=env, capture_output=True)
        log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        # steps/s after the first logged point (excludes start-up and the first steps' warm-up)
        out[f"steps_per_s_{nproc}proc"] = (log[-1]["step"] - log[0]["step"]) / (log[-1]["seconds"] - log[0]["seconds"])
    return out


VARIANTS = {"fp32": {}, "bf16": {"precision": "bf16"}, "fp32-channels-last": {"channels_last": True},
            "fp32-compiled": {"compile": True}}


def _variant_trainer(preset: str, batch: int, variant: str, n: int = 256):
    """A Trainer of ``preset`` on n structured pairs (a coloured square on a coloured ground, its text naming
    both), K = 2, the same data, weights and noise for every variant."""
    from reimagen.models.config import get_preset
    from reimagen.models.text import TinyTextEncoder
    from reimagen.models.unet import ReImagenUNet
    from reimagen.training.data import TripleData
    from reimagen.training.train import TrainConfig, Trainer

    opts = dict(VARIANTS[variant])
    cfg = get_preset(preset, text_dim=64)
    s, rng = cfg.image_size, np.random.default_rng(0)
    colours = rng.integers(0, 256, (8, 3))
    images, texts = np.empty((n, s, s, 3), np.uint8), []
    for i in range(n):
        bg, fg = rng.integers(0, 8, 2)
        images[i] = colours[bg]
        y, x = rng.integers(0, s - s // 3, 2)
        images[i, y:y + s // 3, x:x + s // 3] = colours[fg]
        texts.append(f"square {fg} on ground {bg}")
    data = TripleData.from_arrays(images, texts, np.stack([(np.arange(n) + j) % n for j in (1, 2)], 1))
    torch.manual_seed(0)
    model = ReImagenUNet(cfg)
    return Trainer(model, TinyTextEncoder(dim=64), data, TrainConfig(steps=10 ** 6, batch_size=batch, lr=8e-4,
                                                                     warmup_steps=50, seed=0, **opts))


def bench_variants(args) -> dict:
    out: dict = {"timing": {}, "curves": {}}
    variants = args.variants.split(",")
    trainers, warm, times = {}, {}, {v: [] for v in variants}
    for v in variants:
        trainers[v] = _variant_trainer(args.variant_preset, args.batch, v)
        t0 = time.perf_counter()
        trainers[v].train_step()  # warm-up (compiled: the compilation)
        trainers[v].train_step()
        warm[v] = time.perf_counter() - t0
    # interleaved rounds (A B C A B C ...): a machine that speeds up or slows down touches every variant alike
    for _ in range(args.variant_steps):
        for v in variants:
            t0 = time.perf_counter()
            trainers[v].train_step()
            times[v].append(time.perf_counter() - t0)
    for v in variants:
        step = float(np.median(times[v]))
        out["timing"][v] = {"step_s": step, "first_steps_s": warm[v]}
        print(f"  {args.variant_preset} batch {args.batch} {v:20s} {step * 1e3:8.0f} ms/step "
              f"({out['timing'][variants[0]]['step_s'] / step:.2f}x {variants[0]}; first two steps {warm[v]:.1f} s; "
              f"median of {args.variant_steps} interleaved)", flush=True)
    del trainers
    for v in variants if args.curve_steps else []:
        tr = _variant_trainer(args.curve_preset, 16, v)
        out["curves"][v] = [tr.train_step() for _ in range(args.curve_steps)]
    if not args.curve_steps:
        return out
    base = np.asarray(out["curves"][variants[0]])
    w = max(1, args.curve_steps // 10)
    smooth = lambda c: np.convolve(np.asarray(c), np.ones(w) / w, mode="valid")  # noqa: E731
    for v, curve in out["curves"].items():
        c = np.asarray(curve)
        rel = float(np.max(np.abs(smooth(c) - smooth(base)) / smooth(base)))
        out["curves"][v] = {"first": float(c[:w].mean()), "last": float(c[-w:].mean()), "max_rel_gap": rel}
        print(f"  loss, {args.curve_preset} batch 16, {args.curve_steps} steps, {v:20s} first {c[:w].mean():.4f} "
              f"last {c[-w:].mean():.4f}; {w}-step means at most {rel * 100:.1f}% from fp32's", flush=True)
    return out


def bench_gpu(args) -> dict:
    if not torch.cuda.is_available():
        return {"gpu": "no CUDA device: bf16 vs fp32 and FSDP memory not measured"}
    from reimagen.models.config import get_preset
    from reimagen.models.unet import ReImagenUNet

    cfg = get_preset(args.preset, text_dim=64)
    out = {}
    for prec in ("fp32", "bf16"):
        model = ReImagenUNet(cfg).cuda()
        x = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size, device="cuda")
        text = model.project_text(torch.randn(args.batch, 8, 64, device="cuda"),
                                  torch.ones(args.batch, 8, dtype=torch.bool, device="cuda"))
        t = torch.rand(args.batch, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec == "bf16"):
            for i in range(6):
                if i == 1:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                model(x, t, text).float().pow(2).mean().backward()
        torch.cuda.synchronize()
        out[f"{prec}_step_s"] = (time.perf_counter() - t0) / 5
    out["bf16_over_fp32"] = out["bf16_step_s"] / out["fp32_step_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64, help="image size of the loader comparison")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--small", type=int, default=2000)
    p.add_argument("--large", type=int, default=20000)
    p.add_argument("--preset", default="small-32")
    p.add_argument("--ddp-steps", type=int, default=12)
    p.add_argument("--e2e-steps", type=int, default=8, help="timed training steps of the end-to-end comparison")
    p.add_argument("--work", type=Path, default=None, help="folder for the shards (kept; default a temp dir)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--only", choices=["variants"], default=None, help="run one section")
    p.add_argument("--variant-preset", default="toy-32")
    p.add_argument("--variant-steps", type=int, default=10, help="timed steps per variant (interleaved rounds)")
    p.add_argument("--curve-preset", default="tiny-16")
    p.add_argument("--curve-steps", type=int, default=1000)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, fp32 first, from "
                   + ", ".join(VARIANTS))
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.only == "variants":
        print(f"training variants ({torch.get_num_threads()} threads):")
        res = {"variants": bench_variants(args)}
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return
    root = args.work or Path(tempfile.mkdtemp(prefix="train-bench-"))
    res = {"loader": bench_loader(root, args)}
    lo = res["loader"]
    print(f"loader, batch {args.batch} at {args.size}px (samples/s):")
    for k, v in lo.items():
        print(f"  {k:26s} {v:10.1f}")
    print(f"  streamed {args.workers} workers / in-RAM path: {lo[f'streamed_{args.workers}w'] / lo['in_ram']:.2f}x "
          f"(the issue's goal >= 0.9x); / old gather: {lo[f'streamed_{args.workers}w'] / lo['old_gather']:.2f}x; "
          f"/ one {args.preset} train step: {lo[f'streamed_{args.workers}w'] / lo['train_step_samples_per_s']:.1f}x")
    print(f"  streamed {args.workers} workers, 256 px JPEG shards / in-RAM path: "
          f"{lo[f'streamed_jpeg256_{args.workers}w'] / lo['in_ram']:.2f}x")
    res["end_to_end"] = e2e = bench_end_to_end(root, args)
    print(f"{args.preset} training, batch {args.batch}, one process: in-RAM {e2e['in_ram_samples_per_s']:.1f} samples/s, "
          f"streamed with {args.workers} workers {e2e[f'streamed_{args.workers}w_samples_per_s']:.1f}: "
          f"{e2e[f'streamed_{args.workers}w_samples_per_s'] / e2e['in_ram_samples_per_s']:.2f}x (goal >= 0.9x)")
    res["memory"] = bench_memory(root, args)
    m = res["memory"]
    print(f"peak RSS streaming 60 batches: {args.small} samples {m[f'peak_rss_mb_{args.small}']:.0f} MB, "
          f"{args.large} samples {m[f'peak_rss_mb_{args.large}']:.0f} MB: "
          f"{m[f'peak_rss_mb_{args.large}'] / m[f'peak_rss_mb_{args.small}']:.2f}x (goal < 1.2x)")
    res["ddp"] = bench_ddp(root, args)
    d = res["ddp"]
    print(f"small-32 training, global batch {args.batch}: 1 process (2 threads) {d['steps_per_s_1proc']:.2f} steps/s, "
          f"2 processes DDP (1 thread each) {d['steps_per_s_2proc']:.2f} steps/s: "
          f"{d['steps_per_s_2proc'] / d['steps_per_s_1proc']:.2f}x")
    res["gpu"] = bench_gpu(args)
    print(res["gpu"])
    res["peak_rss_self_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
