#!/usr/bin/env python
"""Quality against compute of the samplers, on the toy world's shipped cascade ([fast-sampling]).

Each condition is one ``reimagen-eval entitydraw --world`` run (interleaved guidance w = 3, eta = 0.5, k = 2,
``--per-split N`` entities per frequency split x 4 samples, judged by the world's judge): the faithful best-of-4
rate per split and the per-image scene rate, with 95% intervals clustered by prompt (entitydrawbench.world).
The reference (``--reference``) is by default the paper's EntityDrawBench setting, DDPM with 256 base / 128 SR
steps; the candidates are DDIM and the library solvers (reimagen.diffusion.solvers) at ``--steps`` base steps, with
SR steps = half (at least 4), or the ``--conditions`` given. A candidate is "within" where every metric's estimate
lies inside the reference's interval; the paired column compares it with the reference prompt by prompt (the same
scenes, references and seeds): the difference whose 95% interval reaches lowest, "a drop" if it lies below 0.

Network evaluations (NFE) are per image and stage: one guided evaluation per step (its branches run as one
batched forward). Seconds are the run's wall time on this machine, its threads given by OMP_NUM_THREADS.

With ``--fid-prompts N`` (default 500) each condition also runs ``reimagen-eval fid --dataset synthetic`` on N
held-out validation captions (retrieval from the world's corpus, w = 3 / 1, the judge's features, against all
2,000 validation images): FID and KID with their 95% bootstrap intervals over the generated images.

Every run folder resumes, so a stopped benchmark continues where it was (a folder may also be filled beforehand
by the same command under ``torchrun``: its images do not depend on the number of processes). Writes
OUT/results.json, OUT/results.md and OUT/quality_vs_compute.png.

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
FID_METRICS = ("fid", "kid")  # columns of the fid command's results.csv, with _lo / _hi bootstrap bounds


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


def run_fid(world: Path, out: Path, cond: tuple[str, int, int], prompts: int) -> dict:
    """FID and KID (judge features) of one condition on ``prompts`` validation captions, with intervals."""
    import csv

    sampler, steps, sr = cond
    run = out / "fid" / f"{sampler}-{steps}-{sr}"
    weights = REPO / "toyworld" / "weights"
    cmd = [sys.executable, "-m", "reimagen_eval.cli", "fid", "--dataset", "synthetic", "--dataset-root", str(world),
           "--model", str(weights / "base"), "--sr-model", str(weights / "sr"), "--num-prompts", str(prompts),
           "--guidance-64", "3", "--guidance-sr", "1", "--steps", str(steps), "--sr-steps", str(sr),
           "--sampler", sampler, "--feature-extractor", "judge", "--metrics", "fid,kid",
           "--kid-subset-size", str(min(100, prompts)), "--db", "synthetic-train", "--out", str(run)]
    if not (run / "results.csv").is_file():
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    with open(run / "results.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["source"] == "measured")
    return {f"{m}:all": {"mean": float(row[m]), "ci_lo": float(row[f"{m}_lo"]), "ci_hi": float(row[f"{m}_hi"]),
                         "n": int(row["n"])} for m in FID_METRICS}


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
           "n_images": len((run / "images.jsonl").read_text().splitlines()), "run": str(run)}
    for metric, selection, split in METRICS:
        rec = next(r for r in scores if r["metric"] == metric and r["selection"] == selection and r["split"] == split)
        res[f"{metric}:{split}"] = {k: rec[k] for k in ("mean", "ci_lo", "ci_hi", "n")}
    return res


def judge_keys(res: dict) -> list[str]:
    return [f"{m}:{s}" for m, _, s in METRICS if f"{m}:{s}" in res]


def fid_keys(res: dict) -> list[str]:
    return [f"{m}:all" for m in FID_METRICS if f"{m}:all" in res]


def within(res: dict, ref: dict, keys: list[str]) -> bool:
    return all(ref[k]["ci_lo"] <= res[k]["mean"] <= ref[k]["ci_hi"] for k in keys)


def find(results: list[dict], cond: tuple[str, int, int]) -> dict | None:
    return next((r for r in results if (r["sampler"], r["steps"], r["sr_steps"]) == cond), None)


def per_prompt(run: str) -> dict[str, dict[str, float]]:
    """Each prompt's value of every judge metric: faithful best of N (1 if any sample is), the scene rate."""
    from human_eval.ids import read_jsonl

    rows: dict[str, list[dict]] = {}
    for r in read_jsonl(Path(run) / "images.jsonl"):
        rows.setdefault(r["prompt_id"], []).append(r)
    out = {}
    for pid, rs in rows.items():
        vals = {}
        for metric, selection, split in METRICS:
            if split in ("all", rs[0]["split"]):
                hits = [bool(r[metric]) for r in rs]
                vals[f"{metric}:{split}"] = float(any(hits)) if selection == "best_of_n" else sum(hits) / len(hits)
        out[pid] = vals
    return out


def paired(res: dict, ref: dict) -> dict[str, tuple[float, float, float]]:
    """Candidate minus reference on the same prompts (same scenes, references and seeds), per judge metric: the
    mean difference over prompts and its 95% interval (a prompt's samples are one cluster)."""
    from entitydrawbench.summary import ci95, mean_sem

    a, b = per_prompt(ref["run"]), per_prompt(res["run"])
    out = {}
    for k in judge_keys(ref):
        m, sem, _ = mean_sem([b[p][k] - a[p][k] for p in a if k in a[p] and p in b])  # one value per prompt
        out[k] = (m, *ci95(m, sem))
    return out


def worst_paired(res: dict, ref: dict) -> str:
    """The paired difference whose interval reaches lowest, and whether any interval lies wholly below 0."""
    diffs = paired(res, ref)
    k, (m, lo, hi) = min(diffs.items(), key=lambda kv: kv[1][2])
    verdict = "a drop" if hi < 0 else "no drop"
    return f"{verdict}: {k} {m:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def markdown(results: list[dict], ref: dict, keys: list[str]) -> str:
    """One row per condition that has ``keys``; "within" = every estimate inside ``ref``'s interval."""
    pair = all("run" in r for r in results) and all(k.split(":")[0] not in FID_METRICS for k in keys)
    head = ("| sampler | base / SR steps | NFE | s | " + " | ".join(keys) + " | within the reference |"
            + (" paired, lowest-reaching difference |" if pair else ""))
    lines = [head, "|---" * (len(keys) + 5 + pair) + "|"]
    for r in (r for r in results if all(k in r for k in keys)):
        fmt = [".0f" if k.split(":")[0] in FID_METRICS else ".2f" for k in keys]
        cells = [f"{r[k]['mean']:{f}} [{r[k]['ci_lo']:{f}}, {r[k]['ci_hi']:{f}}]" for k, f in zip(keys, fmt)]
        ok = "reference" if r is ref else ("yes" if within(r, ref, keys) else "no")
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.0f}"
        lines.append(f"| {r['sampler']} | {r['steps']} / {r['sr_steps']} | {r['nfe']} | {secs} | "
                     + " | ".join(cells) + f" | {ok} |"
                     + ((" reference |" if r is ref else f" {worst_paired(r, ref)} |") if pair else ""))
    return "\n".join(lines) + "\n"


def report(results: list[dict], reference: tuple, fid_reference: tuple) -> str:
    ref, fref = find(results, reference), find(results, fid_reference)
    text = f"Judge metrics against {'/'.join(map(str, reference))}:\n\n" + markdown(results, ref, judge_keys(ref))
    if fref is not None and fid_keys(fref):
        text += (f"\nFID / KID (judge features) against {'/'.join(map(str, fid_reference))}:\n\n"
                 + markdown(results, fref, fid_keys(fref)))
    return text


def plot(results: list[dict], refs: dict[str, dict], path: Path) -> None:
    """One column per metric (``refs``: metric -> the run whose interval is its band), against NFE and seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(refs), figsize=(4 * len(refs), 6.5), squeeze=False)
    colour = {s: f"C{i}" for i, s in enumerate(sorted({r["sampler"] for r in results}))}  # one per sampler
    for col, (k, ref) in enumerate(refs.items()):
        others = [r for r in results if r is not ref and k in r]
        for row, xkey in enumerate(("nfe", "seconds")):
            ax = axes[row][col]
            ax.axhspan(ref[k]["ci_lo"], ref[k]["ci_hi"], color="0.85",
                       label=f"{ref['sampler']} {ref['steps']}/{ref['sr_steps']}, 95% CI")
            if ref[xkey] is not None:
                ax.plot([ref[xkey]], [ref[k]["mean"]], "kx", label="reference")
            for j, sampler in enumerate(sorted({r["sampler"] for r in others})):
                rs = sorted((r for r in others if r["sampler"] == sampler and r[xkey] is not None),
                            key=lambda r: r[xkey])
                jitter = 1 + 0.02 * (j - 1) if xkey == "nfe" else 1  # samplers at one NFE side by side
                ax.errorbar([r[xkey] * jitter for r in rs], [r[k]["mean"] for r in rs],
                            yerr=[[r[k]["mean"] - r[k]["ci_lo"] for r in rs],
                                  [r[k]["ci_hi"] - r[k]["mean"] for r in rs]],
                            marker="o", capsize=2, label=sampler, color=colour[sampler])
            ax.set_xscale("log")
            ticks = sorted({round(r[xkey]) for r in [ref, *others] if r[xkey] is not None})
            ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
            ax.minorticks_off()
            ax.set_xlabel("network evaluations per image (base + SR)" if xkey == "nfe" else "seconds per run")
            ax.set_title(k + (" (lower is better)" if k.split(":")[0] in FID_METRICS else ""), fontsize=9)
            ax.legend(fontsize=6)
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
    ap.add_argument("--conditions", default=None, help="SAMPLER:STEPS:SR_STEPS,... exactly these candidates "
                    "(instead of --samplers x --steps)")
    ap.add_argument("--reference", default=PAPER_REFERENCE, help="SAMPLER:STEPS:SR_STEPS the candidates are held "
                    "against (default: the paper's EntityDrawBench setting; ~1.5 h of one core here at 48 per split)")
    ap.add_argument("--fid-prompts", type=int, default=500, help="FID / KID on this many validation captions per "
                    "condition (judge features; 0 skips them)")
    ap.add_argument("--fid-reference", default=None, help="SAMPLER:STEPS:SR_STEPS the FID / KID columns are held "
                    "against (default: --reference; DDPM 256 / 128 at n = 500 is ~1.5 h of 2 cores here)")
    ap.add_argument("--fid-conditions", default=None, help="SAMPLER:STEPS:SR_STEPS,... the candidates that get FID "
                    "(default: every candidate)")
    args = ap.parse_args(argv)
    if not (args.world / "world.json").is_file() and not args.world.is_dir():
        sys.exit(f"--world {args.world} is not a built toy world: run `reimagen-eval toy build --out {args.world}`")
    args.out.mkdir(parents=True, exist_ok=True)
    reference = parse_reference(args.reference)
    fid_reference = parse_reference(args.fid_reference or args.reference)
    if args.conditions:
        conds = list(dict.fromkeys([reference] + [parse_reference(c) for c in args.conditions.split(",")]))
    else:
        conds = list(dict.fromkeys(conditions(args.samplers.split(","), [int(s) for s in args.steps.split(",")],
                                              reference)))  # a candidate that is the reference runs once
    if fid_reference not in conds:
        conds.insert(1, fid_reference)
    fid_conds = [parse_reference(c) for c in args.fid_conditions.split(",")] if args.fid_conditions else None
    results = []
    for cond in conds:
        res = run_condition(args.world, args.out, cond, args.per_split, args.samples)
        if args.fid_prompts and (cond == fid_reference or (cond != reference and cond in (fid_conds or [cond]))):
            res.update(run_fid(args.world, args.out, cond, args.fid_prompts))
        results.append(res)
        results.sort(key=lambda r: (r["sampler"], r["steps"], r["sr_steps"]) != reference)  # the reference first
        if (results[0]["sampler"], results[0]["steps"], results[0]["sr_steps"]) != reference:
            continue  # the table compares with the reference: wait for it
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        text = report(results, reference, fid_reference)
        (args.out / "results.md").write_text(text)
        print(text, flush=True)
        fref = find(results, fid_reference)
        refs = {k: results[0] for k in judge_keys(results[0])}
        refs.update({k: fref for k in (fid_keys(fref) if fref is not None else [])})
        plot(results, refs, args.out / "quality_vs_compute.png")


if __name__ == "__main__":
    main()
