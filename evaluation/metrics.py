"""FID, KID and CLIP score with bounded memory, resumable feature extraction and cached reference statistics.

Features are streamed batch by batch from the backend's loader into a ``.npy`` file on disk (float32, a valid
header for the final shape written first, rows appended, so a killed extraction resumes at the last complete
row). Statistics are then accumulated over that file in chunks:

    mu    = mean of the rows
    sigma = sum_i (x_i - mu)(x_i - mu)^T / (n - 1)        (as ``np.cov(x, rowvar=False)``; float64, shifted sums)

FID = the backend's Frechet distance of (mu, sigma) against the reference's. KID draws ``subsets`` index sets
of ``m = min(subset_size, n_ref, n_gen)`` rows from each file with ``default_rng(seed)`` and averages the
backend's unbiased polynomial-kernel MMD^2 over them, reading only those rows (``os.pread``): memory is O(d^2 +
m d) whatever the number of images.

Reference statistics live in a user cache folder (``$REIMAGEN_CACHE/fid_stats`` or ``~/.cache/reimagen/
fid_stats``; never in site-packages), one folder per key naming dataset, split, backend, mode, feature
extractor, resolution, sample count and a fingerprint of the image list::

    coco-val2014__clean-fid-clean__inception-2015-12-05-1a2b3c4d5e6f__256px__n40504__<fingerprint>/
        features.npy   stats.npz (mu, sigma, n)   meta.json
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from reimagen.utils.atomic import save_npz, write_json

from .features import cache_root
from .protocol import PROTOCOL_VERSION, is_plain_file

FEATURES = "features.npy"
STATS = "stats.npz"
META = "meta.json"


# ----------------------------------------------------------------------------------------------
# Small file helpers
# ----------------------------------------------------------------------------------------------
#: The format of evaluation's JSON files (manifests, cache meta, cached metrics), for ``reimagen.utils.atomic.write_json``.
JSON_FORMAT: dict[str, Any] = {"indent": 2, "sort_keys": True, "default": str}


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive advisory lock (two sweeps filling the same cache entry wait for each other)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError):  # pragma: no cover - non-POSIX
            pass
        yield


def items_fingerprint(refs: Sequence[str], root: str | None = None, with_mtime: bool = False) -> str:
    """sha256 over the image references and their file sizes (and mtimes for generated images)."""
    h = hashlib.sha256(f"protocol-v{PROTOCOL_VERSION}\n".encode())
    containers: dict[str, str] = {}
    for ref in refs:
        if is_plain_file(ref):
            p = ref if (root is None or os.path.isabs(ref)) else os.path.join(root, ref)
            st = os.stat(p)
            h.update(f"{ref}\t{st.st_size}\t{st.st_mtime_ns if with_mtime else ''}\n".encode())
        else:
            h.update(f"{ref}\n".encode())
            container = ref.split("://", 1)[1].rpartition("#")[0]
            if container not in containers:
                p = container if (root is None or os.path.isabs(container)) else os.path.join(root, container)
                containers[container] = str(os.path.getsize(p)) if os.path.exists(p) else "?"
    for c, size in sorted(containers.items()):
        h.update(f"{c}\t{size}\n".encode())
    return h.hexdigest()[:16]


def stats_cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The reference-statistics cache: ``override``, else ``<cache root>/fid_stats``; never in site-packages."""
    p = Path(override).expanduser() if override else cache_root() / "fid_stats"
    resolved = p.resolve()
    if any(part in ("site-packages", "dist-packages") for part in resolved.parts):
        raise ValueError(f"refusing to cache FID statistics inside a Python installation ({resolved}); "
                         "set REIMAGEN_CACHE or --stats-cache to a user folder")
    return resolved


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", s).strip("-")


def reference_key(dataset: str, split: str, backend_key: str, resolution: int, n: int, fingerprint: str) -> str:
    return safe_name(f"{dataset}-{split}") + f"__{safe_name(backend_key)}__{resolution}px__n{n}__{fingerprint}"


# ----------------------------------------------------------------------------------------------
# Feature files
# ----------------------------------------------------------------------------------------------
def _header(n: int, d: int) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (int(n), int(d))})
    return buf.getvalue()


def read_header(path: str | os.PathLike) -> tuple[int, int, int]:
    """(rows, dim, data offset) of a float32 feature file written by ``extract_features``."""
    with open(path, "rb") as fh:
        np.lib.format.read_magic(fh)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        if fortran or dtype != np.dtype("<f4") or len(shape) != 2:
            raise ValueError(f"{path} is not a float32 (n, d) feature file")
        return int(shape[0]), int(shape[1]), fh.tell()


def _rows_done(partial: Path, n: int) -> tuple[int, int, int]:
    """(complete rows, dim, offset) of a partial feature file (0, 0, 0 without a header yet)."""
    size = partial.stat().st_size
    try:
        rows, d, off = read_header(partial)
    except (ValueError, OSError, EOFError):
        return 0, 0, 0
    if rows != n or d < 1:
        return 0, 0, 0
    return min(n, (size - off) // (4 * d)), d, off


def extract_features(backend, refs: Sequence[str], path: str | os.PathLike, root: str | None = None,
                     fingerprint: str = "", batch_size: int = 64, workers: int = 0, progress: bool = False,
                     description: str = "features") -> Path:
    """Features of ``refs`` (the backend's loader and extractor) into ``path`` (float32 .npy, row i = refs[i]).

    Resumable: rows go to ``<path>.partial`` as they are made, and a rerun with the same ``fingerprint`` and
    backend continues after the last complete row. An existing ``path`` whose recorded fingerprint matches is
    reused as it is."""
    import torch

    path = Path(path)
    meta_path = path.with_name(path.name + ".json")
    want = {"fingerprint": fingerprint, "backend": backend.key(), "resolution": backend.resolution, "n": len(refs),
            "protocol": PROTOCOL_VERSION}
    if path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == want:
        return path
    n = len(refs)
    if n < 2:
        raise ValueError(f"{description}: need at least 2 images for FID statistics, got {n}")
    partial = path.with_name(path.name + ".partial")
    pmeta = path.with_name(path.name + ".partial.json")
    done, d, off = 0, 0, 0
    if partial.is_file() and pmeta.is_file() and json.loads(pmeta.read_text()) == want:
        done, d, off = _rows_done(partial, n)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(b"")
        write_json(pmeta, want, **JSON_FORMAT)
    with open(partial, "r+b") as fh:
        fh.truncate(off + done * 4 * d if d else 0)
        fh.seek(0, os.SEEK_END)
        if done < n:
            ds = backend.dataset(list(refs[done:]), root)
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
            bar = _progress(progress, description, n, done)
            try:
                for batch in loader:
                    feats = np.ascontiguousarray(backend.extract(batch), dtype="<f4")
                    if feats.ndim != 2 or len(feats) != len(batch):
                        raise RuntimeError(f"feature extractor returned shape {feats.shape} for a batch of "
                                           f"{len(batch)}")
                    if not d:
                        d = feats.shape[1]
                        fh.write(_header(n, d))
                    elif feats.shape[1] != d:
                        raise RuntimeError(f"feature dimension changed from {d} to {feats.shape[1]}")
                    fh.write(feats.tobytes())  # a kill loses at most this batch (a torn row is cut on resume)
                    fh.flush()
                    bar(len(feats))
            finally:
                bar(None)
    os.replace(partial, path)
    write_json(meta_path, want, **JSON_FORMAT)
    pmeta.unlink(missing_ok=True)
    return path


def _progress(enabled: bool, description: str, total: int, done: int):
    if not enabled:
        return lambda k: None
    from rich.progress import Progress

    prog = Progress(transient=True)
    task = prog.add_task(description, total=total, completed=done)
    prog.start()

    def update(k):
        if k is None:
            prog.stop()
        else:
            prog.update(task, advance=k)

    return update


def iter_feature_chunks(path: str | os.PathLike, chunk: int = 512) -> Iterator[np.ndarray]:
    """The rows of a feature file as float32 arrays of at most ``chunk`` rows (plain reads, no memory map)."""
    n, d, off = read_header(path)
    with open(path, "rb") as fh:
        fh.seek(off)
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            yield np.frombuffer(fh.read(k * d * 4), dtype="<f4").reshape(k, d)


def feature_stats(path: str | os.PathLike, chunk: int = 512) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of a feature file, streamed; equals (x.mean(0), np.cov(x, rowvar=False)) in float64."""
    n, d, _ = read_header(path)
    if n < 2:
        raise ValueError(f"{path}: need at least 2 rows for a covariance, got {n}")
    from scipy.linalg import blas

    shift = None
    s1 = np.zeros(d)
    s2 = np.zeros((d, d), order="F")  # upper triangle of sum (x - shift)(x - shift)^T, updated in place
    for x in iter_feature_chunks(path, chunk):
        x = x.astype(np.float64)
        if shift is None:
            shift = x.mean(0)  # shifted sums: no cancellation when the mean is large against the spread
        x -= shift
        s1 += x.sum(0)
        s2 = blas.dsyrk(1.0, x.T, beta=1.0, c=s2, trans=0, lower=0, overwrite_c=1)  # symmetric: half the work
    mc = s1 / n
    sigma = np.triu(s2)
    del s2
    sigma += np.triu(sigma, 1).T
    sigma -= np.multiply.outer(mc * n, mc)
    sigma /= n - 1
    return shift + mc, np.ascontiguousarray(sigma), n


def read_rows(path: str | os.PathLike, rows: Sequence[int]) -> np.ndarray:
    """The given rows of a feature file (sorted reads with ``os.pread``; only those rows enter memory)."""
    n, d, off = read_header(path)
    rb = 4 * d
    out = np.empty((len(rows), d), dtype="<f4")
    fd = os.open(path, os.O_RDONLY)
    try:
        for j, r in enumerate(rows):
            if not 0 <= r < n:
                raise IndexError(f"row {r} outside {path} ({n} rows)")
            out[j] = np.frombuffer(os.pread(fd, rb, off + int(r) * rb), dtype="<f4")
    finally:
        os.close(fd)
    return out


def kid_values(backend, ref_path: str | os.PathLike, gen_path: str | os.PathLike, subsets: int = 100,
               subset_size: int = 1000, seed: int = 0) -> list[float]:
    """KID of each of ``subsets`` random subsets of m = min(subset_size, rows) rows of each file (see the module
    docstring)."""
    n_ref, d1, _ = read_header(ref_path)
    n_gen, d2, _ = read_header(gen_path)
    if d1 != d2:
        raise ValueError(f"feature dimensions differ: reference {d1}, generated {d2}")
    m = min(int(subset_size), n_ref, n_gen)
    if m < 2 or subsets < 1:
        raise ValueError(f"KID needs subsets >= 1 of at least 2 rows (got {subsets} of {m})")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        ri = np.sort(rng.choice(n_ref, m, replace=False))
        gi = np.sort(rng.choice(n_gen, m, replace=False))
        # float64 kernels: float32 matrix products depend on the BLAS path (alignment, threads) in the 7th digit
        vals.append(backend.kid(read_rows(ref_path, ri).astype(np.float64), read_rows(gen_path, gi).astype(np.float64)))
    return vals


def kid_from_files(backend, ref_path: str | os.PathLike, gen_path: str | os.PathLike, subsets: int = 100,
                   subset_size: int = 1000, seed: int = 0) -> tuple[float, float, int]:
    """(mean, std, m) of ``kid_values``."""
    vals = kid_values(backend, ref_path, gen_path, subsets, subset_size, seed)
    n_ref, _, _ = read_header(ref_path)
    n_gen, _, _ = read_header(gen_path)
    return float(np.mean(vals)), float(np.std(vals)), min(int(subset_size), n_ref, n_gen)


def read_all(path: str | os.PathLike) -> np.ndarray:
    """Every row of a feature file (the bootstrap and CMMD need them in memory: n x d floats)."""
    n, d, _ = read_header(path)
    return np.concatenate(list(iter_feature_chunks(path, 4096))) if n else np.zeros((0, d), np.float32)


def frechet_distance_scipy(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The textbook formula, ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), with scipy.linalg.sqrtm: the
    independent check of both backends."""
    from scipy import linalg

    covmean = linalg.sqrtm(np.asarray(sigma1) @ np.asarray(sigma2))
    covmean = np.real(covmean)
    diff = np.asarray(mu1) - np.asarray(mu2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------
# Reference statistics (cached) and one sweep point's metrics
# ----------------------------------------------------------------------------------------------
@dataclass
class Stats:
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: Path  # the feature file (KID reads subsets of it)
    folder: Path


def stats_for(backend, refs: Sequence[str], folder: str | os.PathLike, fingerprint: str, root: str | None = None,
              batch_size: int = 64, workers: int = 0, progress: bool = False, description: str = "features",
              meta: dict[str, Any] | None = None) -> Stats:
    """Features + statistics of ``refs`` in ``folder`` (computed once; resumable; reused while the fingerprint
    and the backend key match)."""
    folder = Path(folder)
    with file_lock(folder / ".lock"):
        feats = extract_features(backend, refs, folder / FEATURES, root, fingerprint, batch_size, workers, progress,
                                 description)
        want = {"fingerprint": fingerprint, "backend": backend.key(), "resolution": backend.resolution,
                "n": len(refs), "protocol": PROTOCOL_VERSION}
        meta_path = folder / META
        stats_path = folder / STATS
        if stats_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == want:
            z = np.load(stats_path)
            return Stats(z["mu"], z["sigma"], int(z["n"]), feats, folder)
        mu, sigma, n = feature_stats(feats)
        save_npz(stats_path, mu=mu, sigma=sigma, n=np.array(n))
        write_json(meta_path, {"key": want, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(meta or {})},
                   **JSON_FORMAT)
        return Stats(mu, sigma, n, feats, folder)


def reference_stats(backend, dataset_name: str, split: str, refs: Sequence[str], root: str | None = None,
                    cache: str | os.PathLike | None = None, batch_size: int = 64, workers: int = 0,
                    progress: bool = False) -> Stats:
    """Statistics of ALL reference images, cached under a key (see the module docstring)."""
    fp = items_fingerprint(refs, root)
    key = reference_key(dataset_name, split, backend.key(), backend.resolution, len(refs), fp)
    folder = stats_cache_dir(cache) / key
    meta = {"dataset": dataset_name, "split": split, "backend": backend.name, "mode": backend.mode,
            "feature_extractor": backend.extractor_name(), "feature_extractor_key": backend.extractor_key(),
            "weights": backend.weights_path, "resolution": backend.resolution, "n": len(refs),
            "protocol": PROTOCOL_VERSION, "root": root}
    return stats_for(backend, refs, folder, fp, root, batch_size, workers, progress,
                     f"reference features ({dataset_name} {split}, {len(refs)} images)", meta)


def unreadable_images(refs: Sequence[str], root: str | None = None, label: str = "images", workers: int = 2,
                      progress: bool = False, cache: str | os.PathLike | None = None) -> dict[str, str]:
    """``reimagen.retrieval.base.unreadable_images`` with a progress bar and, with ``cache`` (the statistics
    cache), the answer kept there under the list's fingerprint (sizes included), so a reference set is scanned
    once."""
    from reimagen.retrieval.base import unreadable_images as scan

    fp = items_fingerprint(refs, root)
    path = stats_cache_dir(cache) / "scans" / (safe_name(label) + f"__n{len(refs)}__{fp}.json") if cache else None
    if path is not None and path.is_file():
        return dict(json.loads(path.read_text())["unreadable"])
    bar = _progress(progress, f"checking {label} ({len(refs)} images)", len(refs), 0)
    try:
        bad = scan(refs, root, workers, on_done=bar)
    finally:
        bar(None)
    if path is not None:
        write_json(path, {"n": len(refs), "fingerprint": fp, "unreadable": bad}, **JSON_FORMAT)
    return bad


def clip_score(encoder, refs: Sequence[str], texts: Sequence[str], resolution: int = 256,
               batch_size: int = 32) -> float:
    """CLIP score: 100 * mean over images of max(cos(image, its prompt), 0), with the protocol preprocessing
    before CLIP's own; streamed in batches."""
    from .protocol import center_crop_resize, load_rgb

    total, n = 0.0, 0
    for start in range(0, len(refs), batch_size):
        ims = [center_crop_resize(load_rgb(r), resolution) for r in refs[start:start + batch_size]]
        img = encoder.encode_images(ims)
        txt = encoder.encode_texts(list(texts[start:start + batch_size]))
        total += float(np.maximum((img * txt).sum(1), 0).sum()) * 100
        n += len(ims)
    return total / max(n, 1)


__all__ = ["JSON_FORMAT", "file_lock", "items_fingerprint", "stats_cache_dir", "safe_name", "reference_key",
           "read_header", "extract_features", "iter_feature_chunks", "feature_stats", "read_rows", "kid_from_files",
           "kid_values", "read_all",
           "frechet_distance_scipy", "Stats", "stats_for", "reference_stats", "unreadable_images", "clip_score"]
