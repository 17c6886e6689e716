#!/usr/bin/env python
"""Quality against compute of the samplers, on the toy world's shipped cascade ([fast-sampling]).

Each condition is one ``reimagen-eval entitydraw --world`` run (interleaved guidance w = 3, eta = 0.5, k = 2,
``--per-split N`` entities per frequency split x 4 samples, judged by the world's judge): the faithful best-of-4
rate per split and the per-image scene rate, with 95% intervals clustered by prompt (entitydrawbench.world).
The reference (``--reference``) is by default the paper's EntityDrawBench setting, DDPM with 256 base / 128 SR
steps; the candidates are DDIM and the library solvers (reimagen.diffusion.solvers) at ``--steps`` base steps, with SR steps = half
(at least 4). A candidate passes where every metric's estimate lies inside the reference's interval.

Network evaluations (NFE) are per image and stage: one guided evaluation per step (its branches run as one
batched forward). Seconds are the run's wall time on this machine, its threads given by OMP_NUM_THREADS.

Every run folder resumes, so a stopped benchmark continues where it was. Writes OUT/results.json,
OUT/results.md and OUT/quality_vs_compute.png.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampling.py --world runs/bench/world --per-split 48``
(the world from ``reimagen-eval toy build --out runs/bench/world``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPER_REFERENCE = "ddpm:256:128"  # EntityDrawBench's setting (Sec. 4.2)
SPLITS = ("frequent", "infrequent", "unseen")
# (metric, selection): faithful best of 4 per split, the scene rate per image over all splits
METRICS = [("faithful", "best_of_n", s) for s in SPLITS] + [("scene_ok", "per_image", "all")]


def sr_steps_for(steps: int) -> int:
    return max(4, steps // 2)


def parse_reference(text: str) -> tuple[str, int, int]:
    sampler, steps, sr = text.split(":")
    return sampler, int(steps), int(sr)


def conditions(samplers: list[str], steps: list[int], reference: tuple[str, int, int]) -> list[tuple[str, int, int]]:
    """Run order: every sampler at the first step count (minutes: a broken solver shows at once), then the
    reference (the long run), then the other step counts, step-major."""
    cands = [(s, n, sr_steps_for(n)) for n in steps for s in samplers]
    return cands[:len(samplers)] + [reference] + cands[len(samplers):]


def run_condition(world: Path, out: Path, cond: tuple[str, int, int], per_split: int, samples: int) -> dict:
    sampler, steps, sr = cond
    run = out / f"{sampler}-{steps}-{sr}"
    weights = REPO / "toyworld" / "weights"
    cmd = [sys.executable, "-m", "reimagen_eval.cli", "entitydraw", "--world", str(world),
           "--model", str(weights / "base"), "--model", str(weights / "sr"), "--per-split", str(per_split),
           "--samples-per-prompt", str(samples), "--k", "2", "--eta", "0.5", "--sampler", sampler,
           "--steps", str(steps), "--sr-steps", str(sr), "--out", str(run)]
    timing = run / "bench_seconds.json"
    if not (run / "scores.json").is_file():
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        timing.write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    scores = json.loads((run / "scores.json").read_text())["summary"]
    seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
    res = {"sampler": sampler, "steps": steps, "sr_steps": sr, "nfe": steps + sr, "seconds": seconds,
           "n_images": len((run / "images.jsonl").read_text().splitlines())}
    for metric, selection, split in METRICS:
        rec = next(r for r in scores if r["metric"] == metric and r["selection"] == selection and r["split"] == split)
        res[f"{metric}:{split}"] = {k: rec[k] for k in ("mean", "ci_lo", "ci_hi", "n")}
    return res


def within(res: dict, ref: dict) -> bool:
    return all(ref[k]["ci_lo"] <= res[k]["mean"] <= ref[k]["ci_hi"] for k in ref if ":" in k)


def markdown(results: list[dict]) -> str:
    ref = results[0]
    keys = [k for k in ref if ":" in k]
    head = "| sampler | base / SR steps | NFE | s | " + " | ".join(keys) + " | within the reference |"
    lines = [head, "|---" * (len(keys) + 5) + "|"]
    for r in results:
        cells = [f"{r[k]['mean']:.2f} [{r[k]['ci_lo']:.2f}, {r[k]['ci_hi']:.2f}]" for k in keys]
        ok = "reference" if r is ref else ("yes" if within(r, ref) else "no")
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['sampler']} | {r['steps']} / {r['sr_steps']} | {r['nfe']} | {secs} | "
                     + " | ".join(cells) + f" | {ok} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in results[0] if ":" in k]
    fig, axes = plt.subplots(2, len(keys), figsize=(4 * len(keys), 6.5), squeeze=False)
    ref = results[0]
    for col, k in enumerate(keys):
        for row, xkey in enumerate(("nfe", "seconds")):
            ax = axes[row][col]
            ax.axhspan(ref[k]["ci_lo"], ref[k]["ci_hi"], color="0.85",
                       label=f"{ref['sampler']} {ref['steps']}/{ref['sr_steps']}, 95% CI")
            if ref[xkey] is not None:
                ax.plot([ref[xkey]], [ref[k]["mean"]], "kx", label="reference")
            for j, sampler in enumerate(sorted({r["sampler"] for r in results[1:]})):
                rs = sorted((r for r in results[1:] if r["sampler"] == sampler and r[xkey] is not None),
                            key=lambda r: r[xkey])
                jitter = 1 + 0.02 * (j - 1) if xkey == "nfe" else 1  # samplers at one NFE side by side
                ax.errorbar([r[xkey] * jitter for r in rs], [r[k]["mean"] for r in rs],
                            yerr=[[r[k]["mean"] - r[k]["ci_lo"] for r in rs], [r[k]["ci_hi"] - r[k]["mean"] for r in rs]],
                            marker="o", capsize=2, label=sampler)
            ax.set_xscale("log")
            ticks = sorted({round(r[xkey]) for r in results if r[xkey] is not None})
            ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
            ax.minorticks_off()
            ax.set_xlabel("network evaluations per image (base + SR)" if xkey == "nfe" else "seconds per run")
            ax.set_title(k, fontsize=9)
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=Path, required=True, help="a built toy world (reimagen-eval toy build)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-sampling"))
    ap.add_argument("--per-split", type=int, default=48, help="entities per frequency split (36 frequent exist)")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt (best of N)")
    ap.add_argument("--samplers", default="dpmpp-2m,unipc,ddim")
    ap.add_argument("--steps", default="16,12,25,8,50", help="base steps of the candidates, in run order")
    ap.add_argument("--reference", default=PAPER_REFERENCE, help="SAMPLER:STEPS:SR_STEPS the candidates are held "
                    "against (default: the paper's EntityDrawBench setting; ~1.5 h of one core here at 48 per split)")
    args = ap.parse_args(argv)
    if not (args.world / "world.json").is_file() and not args.world.is_dir():
        sys.exit(f"--world {args.world} is not a built toy world: run `reimagen-eval toy build --out {args.world}`")
    args.out.mkdir(parents=True, exist_ok=True)
    reference = parse_reference(args.reference)
    conds = list(dict.fromkeys(conditions(args.samplers.split(","), [int(s) for s in args.steps.split(",")],
                                          reference)))  # a candidate that is the reference runs once
    results = []
    for cond in conds:
        results.append(run_condition(args.world, args.out, cond, args.per_split, args.samples))
        results.sort(key=lambda r: (r["sampler"], r["steps"], r["sr_steps"]) != reference)  # the reference first
        if (results[0]["sampler"], results[0]["steps"], results[0]["sr_steps"]) != reference:
            continue  # the table compares with the reference: wait for it
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        (args.out / "results.md").write_text(markdown(results))
        print(markdown(results), flush=True)
        plot(results, args.out / "quality_vs_compute.png")


if __name__ == "__main__":
    main()
