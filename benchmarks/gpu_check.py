#!/usr/bin/env python
"""The prepared accelerator check ([fast-sampling]): one table of what sampling and training cost on a GPU.

Random weights of the paper's small cascade (``paper-64-small`` 64 px base + ``paper-sr256`` SR, T5-XXL-sized
text width), batch ``--batch`` prompts, K = 2 neighbours, interleaved guidance:

* one guided step of the base stage (two guidance rows per prompt in one forward) in fp32, bf16 autocast, and
  bf16 compiled (``torch.compile``; its compile time is reported apart);
* a whole cascade sample (DPM-Solver++ 2M, ``--steps`` base + ``--steps`` SR steps) in fp32 and bf16;
* a few bf16 training steps of the base stage (AdamW, micro-batch ``--train-batch``).

``--device cpu --tiny`` runs the same code on ``tiny-16`` + ``tiny-sr32`` in seconds (the test suite does, so
that this script does not rot). Run: ``bash benchmarks/gpu_check.sh`` (well under 8 minutes on one H100).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reimagen import Cascade, InterleavedGuidance, JointGuidance, SamplerSettings, Stage, get_preset  # noqa: E402
from reimagen.models.text import TinyTextEncoder  # noqa: E402
from reimagen.models.unet import ReImagenUNet  # noqa: E402
from reimagen.pipelines.cascade import Neighbours  # noqa: E402
from reimagen.pipelines.sampling import guided_eps  # noqa: E402
from reimagen.utils.precision import autocast  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(preset: str, device: torch.device) -> ReImagenUNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ReImagenUNet(get_preset(preset))
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised output layers would make every prediction 0
            if p.dim() > 1 and float(p.abs().sum()) == 0.0:
                torch.nn.init.normal_(p, std=0.02)
    return model.to(device).eval()


def step_inputs(model: ReImagenUNet, enc: TinyTextEncoder, b: int, device: torch.device):
    s = model.cfg.image_size
    e = enc.encode([f"prompt {i}" for i in range(b)]).to(device)
    ne = enc.encode([f"neighbour {i}" for i in range(2 * b)]).to(device)
    with torch.no_grad():
        text = model.project_text(e.embeddings, e.mask)
        memory = model.encode_neighbours(torch.rand(b, 2, 3, s, s, device=device) * 2 - 1,
                                         model.project_text(ne.embeddings, ne.mask))
    g = InterleavedGuidance(w_p=3.0, w_n=3.0, eta=0.5)
    codes = g.plan(torch.rand(b, device=device))
    rep = torch.arange(b, device=device).repeat(g.num_branches)
    x, t = torch.randn(b, 3, s, s, device=device), torch.full((b,), 0.5, device=device)
    lt = torch.zeros(b, device=device)
    return lambda m: guided_eps(m, x, t, lt, text.index(rep), memory.index(rep), g, codes)


def train_steps(model: ReImagenUNet, b: int, device: torch.device, precision: str, steps: int = 3) -> float:
    from reimagen.training.config import TrainConfig
    from reimagen.training.step import StageLoss

    cfg = model.cfg
    loss_fn = StageLoss(model.train(), None, TrainConfig(precision=precision, batch_size=b))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    s, n = cfg.image_size, 16
    batch = {"x0": torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8), "t": torch.rand(b),
             "noise": torch.randn(b, 3, s, s), "drop_text": torch.zeros(b, dtype=torch.bool),
             "drop_nbr": torch.zeros(b, dtype=torch.bool), "nimg": torch.randint(0, 256, (b, 2, 3, s, s), dtype=torch.uint8),
             "text_emb": torch.randn(b, 3, n, cfg.text_dim), "text_len": torch.full((b, 3), n)}

    def one():
        with autocast(precision, device):
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(one, device, steps)


def main(argv: list[str] | None = None) -> list[tuple[str, str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny-16 + tiny-sr32 instead of the paper's small cascade")
    ap.add_argument("--batch", type=int, default=8, help="prompts per sample / guided step")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="solver steps per stage of the cascade sample")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: pass --device cpu --tiny for the smoke run")
    base_name, sr_name = ("tiny-16", "tiny-sr32") if args.tiny else ("paper-64-small", "paper-sr256")
    base, sr = build(base_name, device), build(sr_name, device)
    enc = TinyTextEncoder(dim=base.cfg.text_dim, seed=0).to(device).eval()
    rows: list[tuple[str, str]] = [("device", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                                   ("stages", f"{base_name} + {sr_name}, batch {args.batch}, K = 2")]
    step = step_inputs(base, enc, args.batch, device)
    with torch.no_grad():
        for precision in ("fp32", "bf16"):
            with autocast(precision, device):
                rows.append((f"guided step, {precision}", f"{timed(lambda: step(base), device, args.repeats) * 1e3:.1f} ms"))
        if not args.no_compile:
            compiled = torch.compile(base)
            t0 = time.perf_counter()
            with autocast("bf16", device):
                step(compiled)
                _sync(device)
                compile_s = time.perf_counter() - t0
                ms = timed(lambda: step(compiled), device, args.repeats) * 1e3
            rows.append(("guided step, bf16 compiled", f"{ms:.1f} ms (compile {compile_s:.0f} s)"))
    prompts = [f"a prompt number {i}" for i in range(args.batch)]
    nbrs = Neighbours(torch.rand(args.batch, 2, 3, base.cfg.image_size, base.cfg.image_size) * 2 - 1,
                      [[f"n{i}", f"m{i}"] for i in range(args.batch)])
    for precision in ("fp32", "bf16"):
        settings = SamplerSettings(steps=args.steps, sampler="dpmpp-2m")
        cascade = Cascade([Stage(base, InterleavedGuidance(), settings, precision=precision),
                           Stage(sr, JointGuidance(w=3.0), settings, precision=precision)], enc)
        secs = timed(lambda: cascade.sample(prompts, nbrs, seed=0, progress=False), device, 1)
        rows.append((f"cascade sample, {precision}", f"{secs:.2f} s ({args.batch / secs:.2f} images/s)"))
    rows.append(("train step, bf16", f"{train_steps(base, args.train_batch, device, 'bf16') * 1e3:.0f} ms "
                                     f"(micro-batch {args.train_batch})"))
    width = max(len(k) for k, _ in rows)
    print("| what | measured |\n| --- | --- |")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    return rows


if __name__ == "__main__":
    main()
