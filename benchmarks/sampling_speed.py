#!/usr/bin/env python
"""Cheaper evaluations ([fast-sampling] item 3): images/s of the shipped toy cascade (toyworld/weights, real
weights) under fp32 eager, bf16 autocast, channels-last and ``torch.compile``, as ratios against fp32 eager
measured in the same run, and how far each one's images move from fp32 eager's (same seeds).

A whole cascade sample of ``--batch`` prompts with K = 2 neighbours, interleaved guidance (the toy world's
entitydraw defaults: w_p = w_n = 3, eta = 0.5, SR guidance 3), ``--sampler`` with ``--steps`` / ``--sr-steps``;
median of ``--repeats`` interleaved rounds after a warm-up (compiled variants: the compile time is reported apart).
Pixel differences are a first check only: a default changes after the EntityDrawBench measurement of
benchmarks/sampling.py shows the quality holds.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sampling_speed.py            # ~10 minutes on 2 cores
    .venv/bin/python benchmarks/sampling_speed.py --device cuda --batch 64     # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reimagen import Cascade, InterleavedGuidance, JointGuidance, SamplerSettings  # noqa: E402
from reimagen.pipelines.cascade import Neighbours  # noqa: E402
from toyworld import WEIGHTS  # noqa: E402

VARIANTS = ("fp32", "bf16", "fp32-channels-last", "bf16-channels-last", "fp32-compiled", "bf16-compiled")


def cascade(variant: str, device: str, sampler: str, steps: int, sr_steps: int) -> Cascade:
    precision = variant.split("-")[0]
    c = Cascade.from_checkpoints([WEIGHTS / "base", WEIGHTS / "sr"],
                                 [InterleavedGuidance(w_p=3.0, w_n=3.0, eta=0.5), JointGuidance(w=3.0)],
                                 [SamplerSettings(steps=steps, sampler=sampler),
                                  SamplerSettings(steps=sr_steps, sampler=sampler)], device=device,
                                 precision=precision)
    for st in c.stages:
        if variant.endswith("channels-last"):
            st.model.to(memory_format=torch.channels_last)
        if variant.endswith("compiled"):
            st.model = torch.compile(st.model)  # OptimizedModule passes .cfg and the methods through
    return c


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(variants: list[str], args, prompts, nbrs) -> list[dict]:
    """Every variant warmed up (compiled: the compilation), then timed in interleaved rounds (A B C A B C ...), so
    that a machine speeding up or slowing down touches every variant alike."""
    runs, rows = {}, {}
    for v in variants:
        c = cascade(v, args.device, args.sampler, args.steps, args.sr_steps)
        runs[v] = (lambda c=c: c.sample(prompts, nbrs, seed=0, progress=False).images)
        t0 = time.perf_counter()
        first = runs[v]()
        _sync(args.device)
        rows[v] = {"variant": v, "warm_up_s": time.perf_counter() - t0, "images": first.float().cpu(), "times": []}
        print(f"  {v}: warmed up in {rows[v]['warm_up_s']:.1f} s", flush=True)
    for _ in range(args.repeats):
        for v in variants:
            _sync(args.device)
            t0 = time.perf_counter()
            runs[v]()
            _sync(args.device)
            rows[v]["times"].append(time.perf_counter() - t0)
    for r in rows.values():
        r["seconds"] = statistics.median(r["times"])
        r["images_per_s"] = len(prompts) / r["seconds"]
    return [rows[v] for v in variants]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8, help="prompts per cascade sample")
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--sr-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ", ".join(VARIANTS))
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad or variants[0] != "fp32":
        sys.exit(f"--variants: {bad or variants[0]}; the first must be fp32 (the baseline), the rest from {VARIANTS}")
    if args.device == "cpu" and "bf16" in args.variants:
        from reimagen.utils.precision import cpu_has_native_bf16

        print(f"CPU bf16: {'native' if cpu_has_native_bf16() else 'EMULATED (no AVX-512 BF16 / AMX): slow'}")
    size = 32
    prompts = [f"a Feshi on the beach, on the {'left' if i % 2 else 'right'}." for i in range(args.batch)]
    g = torch.Generator().manual_seed(0)
    nbrs = Neighbours(torch.rand(args.batch, 2, 3, size, size, generator=g) * 2 - 1,
                      [["a photo of a Feshi.", "a photo of a Feshi."] for _ in range(args.batch)])
    rows = measure(variants, args, prompts, nbrs)
    base = rows[0]
    print(f"\nshipped toy cascade, {args.sampler} {args.steps} + {args.sr_steps} steps, batch {args.batch}, K = 2, "
          f"{args.device}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds\n")
    print("| variant | s per batch | images/s | vs fp32 eager | warm-up s | mean abs pixel diff vs fp32 (0-255) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        diff = float((r["images"] - base["images"]).abs().mean()) * 255
        print(f"| {r['variant']} | {r['seconds']:.2f} | {r['images_per_s']:.2f} | "
              f"{base['seconds'] / r['seconds']:.2f}x | {r['warm_up_s']:.1f} | {diff:.2f} |")
    return rows


if __name__ == "__main__":
    main()
