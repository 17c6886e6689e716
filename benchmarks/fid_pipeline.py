#!/usr/bin/env python
"""FID-pipeline throughput and peak memory (evaluation/metrics.py) against a bare clean-fid call.

A folder of N generated-looking 256x256 PNGs (``--unique`` distinct images, hard-linked up to N names) is
measured against cached reference statistics two ways with the same injected
offline feature extractor (``random-conv-2048``: 2048-d like Inception's pool3, so the statistics have
Inception's size; clean-fid receives it as ``custom_feat_extractor``), ``mode="clean"``, ``device="cpu"``,
``num_workers=0``, batch size 64:

* ours   ``evaluation.metrics.stats_for`` (file fingerprint, clean-fid's ResizeDataset + the protocol step,
         ``get_batch_features``, features streamed to disk, statistics accumulated in chunks) +
         ``CleanFidBackend.frechet``;
* bare   ``cleanfid.fid.compute_fid(fdir1=folder, custom_feat_extractor=..., mode="clean", device="cpu",
         num_workers=0)`` with ``get_reference_statistics`` returning the same reference statistics (clean-fid
         would otherwise download them, or read custom ones from its site-packages folder).

Reported:

* throughput: images per second at N = ``--throughput-n``, both paths run alternately in ONE subprocess (same
  warm-up, page cache and machine load; the machine is shared), best of ``--repeat`` rounds; the final Frechet
  distance (scipy sqrtm of the same 2048 x 2048 statistics, 10-20 s here, identical work in both) is computed
  once per path outside the timings and the two FIDs must agree. The images are already 256x256, so the
  protocol's crop/resize is a no-op check, as for a Re-Imagen 256 output. Target: ours / bare >= 0.9x.
* memory: for each N in ``--sizes``, each path in its own subprocess, the peak RSS
  (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after imports, after features + statistics, after the Frechet
  distance and (ours) after KID. Ours must not grow with N beyond the statistics (2048^2 float64 = 32 MiB at
  any N); bare clean-fid holds all N features (N x 2048 float32) plus np.cov's float64 copies.

Run: ``.venv/bin/python benchmarks/fid_pipeline.py [--sizes 1000,10000 --throughput-n 1000 --repeat 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EXTRACTOR = "random-conv-2048"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_images(folder: Path, n: int, unique: int, size: int = 256, seed: int = 0) -> Path:
    """``n`` PNG names (``<i>__0.png``) over ``unique`` distinct images (hard links): coloured backgrounds with
    a few rectangles and a little noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    src = folder.parent / f"{folder.name}-unique"
    src.mkdir(exist_ok=True)
    for u in range(unique):
        p = src / f"u{u:05d}.png"
        if p.exists():
            continue
        arr = np.empty((size, size, 3), np.uint8)
        arr[:] = rng.integers(0, 256, 3)
        for _ in range(3):
            y, x, h, w = rng.integers(0, size - 32, 4)
            arr[y:y + 16 + h // 4, x:x + 16 + w // 4] = rng.integers(0, 256, 3)
        arr = np.clip(arr.astype(np.int16) + rng.integers(-8, 8, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(p, compress_level=1)
    for i in range(n):
        dst = folder / f"p{i:06d}__0.png"
        if not dst.exists():
            os.link(src / f"u{i % unique:05d}.png", dst)
    return folder


# ----------------------------------------------------------------------------------------------
# Children (one measurement per process)
# ----------------------------------------------------------------------------------------------
def _child_setup(folder: str, ref: str):
    """What every child measures with: the clean-fid backend with the offline extractor, the reference
    statistics and the folder's files (threads set, OpenMP waiting passive)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from evaluation import backends as bk  # imports reimagen first: the torchvision workaround
    from evaluation import features as fx

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    backend = bk.make_backend("clean-fid", fx.resolve_extractor(EXTRACTOR), mode="clean", resolution=256).load()
    z = np.load(Path(ref) / "stats.npz")
    return backend, z["mu"], z["sigma"], sorted(str(p) for p in Path(folder).glob("*.png"))


def child(kind: str, folder: str, ref: str, work: str, batch: int) -> dict:
    import torch

    from evaluation import metrics as mt

    backend, ref_mu, ref_sigma, files = _child_setup(folder, ref)
    rss0 = peak_rss_mib()
    frechet_s = [0.0]
    rss_features = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            rss_features[0] = peak_rss_mib()  # high-water mark of the features + statistics part
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                frechet_s[0] += time.perf_counter() - t
        return wrapper

    t0 = time.perf_counter()
    if kind == "ours":
        fp = mt.items_fingerprint(files, with_mtime=True)
        st = mt.stats_for(backend, files, Path(work) / "ours", fp, batch_size=batch)
        fid = timed(backend.frechet)(st.mu, st.sigma, ref_mu, ref_sigma)
        n = st.n
    else:
        from cleanfid import fid as cfid

        cfid.get_reference_statistics = lambda *a, **k: (ref_mu, ref_sigma)  # instead of a download
        cfid.frechet_distance = timed(cfid.frechet_distance)  # fid_folder looks it up in the module: timed apart
        fid = float(cfid.compute_fid(folder, dataset_name="bench", dataset_res=256, dataset_split="custom",
                                     mode="clean", custom_feat_extractor=backend.feat_model(),
                                     device=torch.device("cpu"), num_workers=0, batch_size=batch, verbose=False))
        n = len(files)
    seconds = time.perf_counter() - t0
    pipeline = seconds - frechet_s[0]
    out = {"kind": kind, "n": n, "seconds": seconds, "frechet_seconds": frechet_s[0], "pipeline_seconds": pipeline,
           "images_per_s": n / pipeline, "fid": fid, "rss_before_mib": rss0, "rss_features_mib": rss_features[0],
           "rss_peak_mib": peak_rss_mib()}
    if kind == "ours":
        t1 = time.perf_counter()
        kid = mt.kid_from_files(backend, Path(ref) / "features.npy", st.features, subsets=100, subset_size=1000)
        out.update(kid=kid[0], kid_seconds=time.perf_counter() - t1, rss_peak_with_kid_mib=peak_rss_mib())
    return out


def throughput_child(folder: str, ref: str, work: str, batch: int, repeat: int) -> dict:
    """Both paths alternately in one process (same warm-up, same page cache, same load), ``repeat`` rounds;
    the Frechet distance (identical in both: scipy sqrtm of the same 2048 x 2048 statistics) is computed once
    per path at the end, outside the timings, and the two FIDs must agree."""
    backend, ref_mu, ref_sigma, files = _child_setup(folder, ref)
    import torch
    from cleanfid import fid as cfid

    from evaluation import metrics as mt
    real_frechet = cfid.frechet_distance
    cfid.get_reference_statistics = lambda *a, **k: (ref_mu, ref_sigma)  # instead of a download
    seen: dict[str, tuple] = {}

    def deferred_frechet(mu, sigma, mu2, sigma2):  # compute_fid's last step, moved out of the timing
        seen["bare"] = (mu, sigma)
        return 0.0

    def ours(r):
        fp = mt.items_fingerprint(files, with_mtime=True)
        st = mt.stats_for(backend, files, Path(work) / f"ours{r}", fp, batch_size=batch)
        seen["ours"] = (st.mu, st.sigma)

    def bare(r):
        cfid.frechet_distance = deferred_frechet
        try:
            cfid.compute_fid(folder, dataset_name="bench", dataset_res=256, dataset_split="custom", mode="clean",
                             custom_feat_extractor=backend.feat_model(), device=torch.device("cpu"), num_workers=0,
                             batch_size=batch, verbose=False)
        finally:
            cfid.frechet_distance = real_frechet

    times: dict[str, list[float]] = {"bare": [], "ours": []}
    for r in range(repeat):
        for kind in (("bare", "ours") if r % 2 == 0 else ("ours", "bare")):
            t = time.perf_counter()
            (ours if kind == "ours" else bare)(r)
            times[kind].append(time.perf_counter() - t)
    fids = {k: float(real_frechet(*seen[k], ref_mu, ref_sigma)) for k in ("bare", "ours")}
    return {"n": len(files), "times": times, "fid": fids}


def run_child(kind: str, folder: Path, ref: Path, batch: int, repeat: int = 1) -> dict:
    work = tempfile.mkdtemp(prefix="fidbench-")
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, __file__, "--child", kind, "--folder", str(folder), "--ref", str(ref),
                               "--work", work, "--batch", str(batch), "--repeat", str(repeat)], capture_output=True,
                              text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000", help="N for the memory comparison")
    ap.add_argument("--throughput-n", type=int, default=1000)
    ap.add_argument("--unique", type=int, default=1000, help="distinct images (the rest are hard links)")
    ap.add_argument("--ref-n", type=int, default=500, help="reference images")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    ap.add_argument("--child", choices=("ours", "bare", "throughput"))
    ap.add_argument("--folder")
    ap.add_argument("--ref")
    ap.add_argument("--work")
    args = ap.parse_args()
    if args.child == "throughput":
        print(json.dumps(throughput_child(args.folder, args.ref, args.work, args.batch, args.repeat)))
        return
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.ref, args.work, args.batch)))
        return

    from evaluation import backends as bk
    from evaluation import features as fx
    from evaluation import metrics as mt

    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(tempfile.mkdtemp(prefix="fidbench-data-"))
    try:
        t = time.perf_counter()
        ref_folder = make_images(root / "ref", args.ref_n, args.ref_n, seed=1)
        folders = {n: make_images(root / f"gen{n}", n, min(args.unique, n), seed=0)
                   for n in sorted(set(sizes) | {args.throughput_n})}
        backend = bk.make_backend("clean-fid", fx.resolve_extractor(EXTRACTOR), resolution=256).load()
        refs = sorted(str(p) for p in ref_folder.glob("*.png"))
        ref = mt.stats_for(backend, refs, root / "refstats", mt.items_fingerprint(refs), batch_size=args.batch)
        print(f"setup (images + reference statistics of {len(refs)}): {time.perf_counter() - t:.1f} s", flush=True)

        tp = run_child("throughput", folders[args.throughput_n], ref.folder, args.batch, args.repeat)
        best = {k: min(v) for k, v in tp["times"].items()}
        ratio = best["bare"] / best["ours"]
        print(f"\nThroughput at N = {tp['n']}: both paths alternately in one process, best of {args.repeat} "
              "(the Frechet distance, identical in both, outside the timing):")
        print(f"{'path':<8}{'images/s':>10}{'best s':>9}{'all runs (s)':>28}{'FID':>12}")
        for k in ("bare", "ours"):
            runs_s = ", ".join(f"{t:.2f}" for t in tp["times"][k])
            print(f"{k:<8}{tp['n'] / best[k]:>10.1f}{best[k]:>9.2f}{runs_s:>28}{tp['fid'][k]:>12.5f}")
        print(f"ours / bare = {ratio:.3f}x (target >= 0.9x)")
        if args.no_memory:
            return
        mem = {}
        for n in sizes:
            for kind in ("ours", "bare"):
                mem[(kind, n)] = run_child(kind, folders[n], ref.folder, args.batch)
        print("\nPeak RSS of each subprocess (MiB, ru_maxrss): 'start' after imports and the extractor; 'features' "
              "the high-water mark after features + statistics; 'FID' after the Frechet distance (scipy sqrtm of "
              "2048 x 2048); 'KID' after KID (ours):")
        print(f"{'path':<8}{'N':>8}{'start':>8}{'features':>10}{'FID':>8}{'KID':>8}{'images/s':>10}")
        for (kind, n), r in sorted(mem.items()):
            print(f"{kind:<8}{n:>8}{r['rss_before_mib']:>8.0f}{r['rss_features_mib']:>10.0f}{r['rss_peak_mib']:>8.0f}"
                  f"{r.get('rss_peak_with_kid_mib', float('nan')):>8.0f}{r['images_per_s']:>10.1f}")
        for kind in ("ours", "bare"):
            lo, hi = mem[(kind, min(sizes))], mem[(kind, max(sizes))]
            print(f"{kind}: {max(sizes)} vs {min(sizes)} images: features part "
                  f"{hi['rss_features_mib'] - lo['rss_features_mib']:+.0f} MiB, whole metric "
                  f"{hi['rss_peak_mib'] - lo['rss_peak_mib']:+.0f} MiB")
        kid = mem[("ours", max(sizes))]
        print(f"KID (ours, 100 subsets of {min(1000, args.ref_n, max(sizes))}, float64): {kid['kid_seconds']:.1f} s, "
              f"peak RSS {kid['rss_peak_with_kid_mib']:.0f} MiB")
        if args.json:
            Path(args.json).write_text(json.dumps({"throughput": tp, "ratio": ratio,
                                                   "memory": {f"{k}-{n}": v for (k, n), v in mem.items()}}, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
