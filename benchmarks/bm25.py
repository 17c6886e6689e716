#!/usr/bin/env python
"""BM25 retrieval speed and agreement (Sec. 3.2: text-to-text BM25 for the KNN-ImageText triples).

A synthetic collection: ``--docs`` captions of 5-15 words drawn from a ``--vocab``-word vocabulary with Zipf
(exponent ``--zipf``) frequencies, seeded; ``--queries`` queries drawn the same way (another seed). Measured
in the same run:

* build          tokenizing + indexing time; RSS growth per document (VmRSS from /proc/self/status) right
                 after the build and after gc + malloc_trim (memory still held: index arrays, ids, vocabulary,
                 and for rank-bm25 its per-document dicts), bytes of the index arrays per document, the saved
                 index's size on disk per document, and the RSS growth of loading it (RAM / memory-mapped),
                 right after loading and after 1,000 queries;
* search, ours   ``BM25Retriever.search_rows`` on all queries, top ``--k``: queries per second on one thread
                 and on ``--threads`` (the numba kernel), and on the scipy sparse-product fallback (same rows);
* bm25s          bm25s 0.3.16, ``BM25(k1=1.5, b=0.75)``, ``retrieve(..., n_threads=1)``, numpy and numba
                 backends, its own tokenizer: queries per second, ours / bm25s, same top-k sets as ours;
* search, ref    rank-bm25 ``BM25Okapi`` (via ``RankBM25Retriever``: ``get_scores`` + top-k, the identical
                 code path of its ``search_rows``) on the first ``--rank-queries`` queries only -- it scores
                 every document in Python per query (0.1-0.4 s per query on 200K captions);
* speed-up       ours / ref in queries per second, on the same subset (and ours on all queries / ref);
* agreement      same top-k set as rank-bm25 on the queries whose reference top-k is not tied (the k-th and
                 (k+1)-th reference scores differ by more than 1e-9), and the same ordered top-k on all;
* triples        ``build_triples`` for the whole collection (k, every pair queried, itself excluded) with the
                 index built above, images being dummy references.

Run: ``.venv/bin/python benchmarks/bm25.py [--docs 200000 --queries 1000 --rank-queries 100 --k 2]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reimagen.retrieval.base import KnowledgeBase, load_retriever  # noqa: E402
from reimagen.retrieval.bm25 import BM25Retriever, RankBM25Retriever, _topk  # noqa: E402
from reimagen.retrieval.triples import build_triples, triples_report  # noqa: E402


def synthetic_captions(n: int, vocab: int, zipf: float, lo: int, hi: int, seed: int) -> list[str]:
    """n captions of lo..hi words; word r (0-based rank) has probability proportional to 1 / (r + 1)^zipf."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1) ** zipf
    p /= p.sum()
    lens = rng.integers(lo, hi + 1, size=n)
    words = rng.choice(vocab, size=int(lens.sum()), p=p)
    names = np.array([f"w{r}" for r in range(vocab)], dtype=object)
    ends = np.cumsum(lens)
    return [" ".join(names[words[e - m:e]]) for e, m in zip(ends.tolist(), lens.tolist())]


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def trimmed_rss_bytes() -> int:
    """RSS after a garbage collection and glibc's malloc_trim (returns freed heap pages to the system, so that
    memory freed after a build is not counted as held)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_bytes()


def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--rank-queries", type=int, default=100, help="queries timed with rank-bm25 (slow)")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=50_000)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--min-words", type=int, default=5)
    ap.add_argument("--max-words", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=256, help="BM25Retriever query batch")
    ap.add_argument("--triples-chunk", type=int, default=8192, help="build_triples chunk size")
    ap.add_argument("--no-triples", action="store_true", help="skip the whole-collection triples")
    ap.add_argument("--threads", type=int, default=2, help="the multi-threaded run's threads (numba kernel)")
    ap.add_argument("--no-bm25s", action="store_true", help="skip the bm25s baselines")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)

    res: dict = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
                 "python": platform.python_version(), "cpus": os.cpu_count(),
                 "loadavg_start": os.getloadavg()[0], "args": {k: str(v) for k, v in vars(args).items()}}
    t = time.perf_counter()
    docs = synthetic_captions(args.docs, args.vocab, args.zipf, args.min_words, args.max_words, args.seed)
    queries = synthetic_captions(args.queries, args.vocab, args.zipf, args.min_words, args.max_words, args.seed + 1)
    ids = [f"d{i}" for i in range(len(docs))]
    res["generate_s"] = time.perf_counter() - t
    fast = measure_ours(res, args, docs, ids, queries)
    ours_rows = measure_threads(res, args, fast, queries)
    measure_rank_bm25(res, args, docs, ids, queries, ours_rows)
    if not args.no_bm25s:
        measure_bm25s(res, args, docs, queries, ours_rows)
    if not args.no_triples:
        measure_triples(res, args, docs, ids, fast)
    res["loadavg_end"] = os.getloadavg()[0]
    print_table(res, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return res


def _qps(fn, n: int) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def measure_ours(res: dict, args, docs, ids, queries) -> BM25Retriever:
    """Build (time, RSS), the saved index (disk, RSS loaded into RAM / memory-mapped, after 1,000 queries)."""
    rss0 = trimmed_rss_bytes()
    t = time.perf_counter()
    fast = BM25Retriever.build(docs, ids, progress=False, batch_size=args.batch_size)
    res["ours_build_s"] = time.perf_counter() - t
    res["ours_rss_delta_per_doc"] = (rss_bytes() - rss0) / len(docs)
    res["ours_rss_held_per_doc"] = (trimmed_rss_bytes() - rss0) / len(docs)
    res["ours_index_bytes_per_doc"] = fast.index_nbytes() / len(docs)
    res["ours_nnz"] = fast.params["nnz"]
    res["vocab_seen"] = fast.params["n_terms"]
    res["ours_backend"] = fast.backend
    with tempfile.TemporaryDirectory() as tmp:
        folder = fast.save(Path(tmp) / "bm25")
        res["ours_disk_bytes_per_doc"] = dir_bytes(folder) / len(docs)
        for mmap in (False, True):  # a saved index loaded into memory / memory-mapped
            key = "mmap" if mmap else "ram"
            rss0 = trimmed_rss_bytes()
            t = time.perf_counter()
            loaded = load_retriever(folder, mmap=mmap)
            res[f"ours_load_{key}_s"] = time.perf_counter() - t
            res[f"ours_load_{key}_rss_per_doc"] = (trimmed_rss_bytes() - rss0) / len(docs)
            loaded.search_rows(queries[:1000], args.k)
            res[f"ours_load_{key}_rss_1000q_per_doc"] = (trimmed_rss_bytes() - rss0) / len(docs)
            del loaded
    return fast


def measure_threads(res: dict, args, fast: BM25Retriever, queries) -> list:
    """Queries per second on one thread and on ``--threads`` (the compiled kernel), and the scipy path's; the
    three give the same rows (checked)."""
    fast.threads = 1
    fast.search_rows(queries[:20], args.k)  # warm-up (and the kernel's compilation)
    out = {}
    res["ours_qps"] = _qps(lambda: out.setdefault("rows", fast.search_rows(queries, args.k)[0]), len(queries))
    nr = min(args.rank_queries, len(queries))
    res["ours_qps_subset"] = _qps(lambda: fast.search_rows(queries[:nr], args.k), nr)
    fast.threads = args.threads
    fast.search_rows(queries[:20], args.k)
    res["ours_qps_threads"] = _qps(lambda: out.setdefault("threads", fast.search_rows(queries, args.k)[0]),
                                   len(queries))
    res["thread_scaling"] = res["ours_qps_threads"] / res["ours_qps"]
    fast.threads, backend = 1, fast.backend
    fast.backend = "scipy"
    res["scipy_qps"] = _qps(lambda: out.setdefault("scipy", fast.search_rows(queries, args.k)[0]), len(queries))
    fast.backend = backend
    res["kernel_over_scipy"] = res["ours_qps"] / res["scipy_qps"]
    res["paths_agree"] = all(np.array_equal(a, b) and np.array_equal(a, c)
                             for a, b, c in zip(out["rows"], out["threads"], out["scipy"]))
    return out["rows"]


def measure_rank_bm25(res: dict, args, docs, ids, queries, ours_rows) -> None:
    """rank-bm25 on the first --rank-queries queries: speed, and top-k agreement on its untied queries."""
    rss0 = trimmed_rss_bytes()
    t = time.perf_counter()
    ref = RankBM25Retriever.build(docs, ids)
    res["ref_build_s"] = time.perf_counter() - t
    res["ref_rss_delta_per_doc"] = (rss_bytes() - rss0) / len(docs)
    res["ref_rss_held_per_doc"] = (trimmed_rss_bytes() - rss0) / len(docs)
    nr = min(args.rank_queries, len(queries))
    elapsed = 0.0
    ref_rows, tied = [], []
    for q in queries[:nr]:
        t = time.perf_counter()
        s = ref.scores(q)  # what RankBM25Retriever.search_rows does per query
        nz = np.flatnonzero(s)
        r, _ = _topk(nz, s[nz], args.k)
        elapsed += time.perf_counter() - t
        ref_rows.append(r.tolist())
        top = np.sort(np.partition(s, len(s) - args.k - 1)[len(s) - args.k - 1:])[::-1] if len(s) > args.k else s
        tied.append(len(top) > args.k and abs(top[args.k - 1] - top[args.k]) <= 1e-9)
    res["ref_qps"] = nr / elapsed
    res["rank_queries"] = nr
    res["speedup_same_queries"] = res["ours_qps_subset"] / res["ref_qps"]
    res["speedup_all_queries"] = res["ours_qps"] / res["ref_qps"]
    non_tied = [i for i in range(nr) if not tied[i]]
    agree = sum(set(ours_rows[i].tolist()) == set(ref_rows[i]) for i in non_tied)
    res["non_tied_queries"] = len(non_tied)
    res["agreement_non_tied_pct"] = 100.0 * agree / max(1, len(non_tied))
    res["exact_same_ordered_topk_pct"] = 100.0 * sum(ours_rows[i].tolist() == ref_rows[i] for i in range(nr)) / nr


def measure_bm25s(res: dict, args, docs, queries, ours_rows) -> None:
    """bm25s 0.3.16 with the settings of the issue that asked for this comparison (BM25(k1=1.5, b=0.75),
    retrieve(..., n_threads=1)), its default numpy backend and its numba backend, on the same documents tokenized
    by its own tokenizer (which drops one-letter words); agreement of its top-k sets with ours (its scoring
    differs from rank-bm25's: no epsilon floor, no (k1 + 1) factor, arbitrary ties)."""
    try:
        import bm25s
    except ImportError:
        res["bm25s"] = "not installed"
        return
    corpus = bm25s.tokenize(docs, stopwords=None, show_progress=False)
    for backend in ("numpy", "numba"):
        model = bm25s.BM25(k1=1.5, b=0.75, backend=backend)
        model.index(corpus, show_progress=False)
        model.retrieve(bm25s.tokenize(queries[:20], stopwords=None, show_progress=False), k=args.k, n_threads=1,
                       show_progress=False)  # warm-up (numba compiles)
        got = {}

        def go():
            q = bm25s.tokenize(queries, stopwords=None, show_progress=False)
            got["rows"], _ = model.retrieve(q, k=args.k, n_threads=1, show_progress=False)

        res[f"bm25s_{backend}_qps"] = _qps(go, len(queries))
        res[f"ours_over_bm25s_{backend}"] = res["ours_qps"] / res[f"bm25s_{backend}_qps"]
        res[f"bm25s_{backend}_same_topk_pct"] = 100.0 * float(np.mean(
            [set(np.asarray(a).tolist()) == set(b.tolist()) for a, b in zip(got["rows"], ours_rows)]))


def measure_triples(res: dict, args, docs, ids, fast: BM25Retriever) -> None:
    kb = KnowledgeBase(ids, docs, [f"img/{i}.jpg" for i in range(len(docs))], name="synthetic", root="/data")
    for threads in (1, args.threads):
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            out = build_triples(kb, Path(tmp) / "triples.parquet", k=args.k, retriever=fast,
                                batch_size=args.triples_chunk, progress=False, threads=threads)
            key = "triples_s" if threads == 1 else "triples_threads_s"
            res[key] = time.perf_counter() - t
            rep = triples_report(out)
    res["triples_rows_written"] = rep.rows_written
    res["triples_dropped"] = rep.dropped_too_few + rep.dropped_after_requery
    res["triples_requeried"] = rep.requeried
    res["triples_qps"] = len(docs) / res["triples_s"]
    res["triples_thread_scaling"] = res["triples_s"] / res["triples_threads_s"]


def print_table(res: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    tab = Table(title=f"BM25, {args.docs:,} synthetic captions (Zipf {args.zipf}, {args.vocab:,} words), "
                      f"top-{args.k}")
    tab.add_column("measure")
    tab.add_column("BM25Retriever (ours)", justify="right")
    tab.add_column("rank-bm25 BM25Okapi", justify="right")
    tab.add_row("build (s)", f"{res['ours_build_s']:.2f}", f"{res['ref_build_s']:.2f}")
    tab.add_row("RSS growth per doc, build (bytes)", f"{res['ours_rss_delta_per_doc']:.0f}",
                f"{res['ref_rss_delta_per_doc']:.0f}")
    tab.add_row("  held after build (gc + malloc_trim)", f"{res['ours_rss_held_per_doc']:.0f}",
                f"{res['ref_rss_held_per_doc']:.0f}")
    tab.add_row("  saved index loaded: RAM / mmap", f"{res['ours_load_ram_rss_per_doc']:.0f} / "
                f"{res['ours_load_mmap_rss_per_doc']:.0f}", "")
    tab.add_row("    after 1,000 queries: RAM / mmap", f"{res['ours_load_ram_rss_1000q_per_doc']:.0f} / "
                f"{res['ours_load_mmap_rss_1000q_per_doc']:.0f}", "")
    tab.add_row("index arrays per doc (bytes)", f"{res['ours_index_bytes_per_doc']:.1f}", "")
    tab.add_row("saved index per doc (bytes)", f"{res['ours_disk_bytes_per_doc']:.1f}", "")
    tab.add_row(f"queries/s (first {res['rank_queries']} queries)", f"{res['ours_qps_subset']:.1f}",
                f"{res['ref_qps']:.2f}")
    tab.add_row(f"queries/s (all {args.queries} queries), 1 thread [{res['ours_backend']}]", f"{res['ours_qps']:.1f}", "")
    tab.add_row(f"  {args.threads} threads (scaling)", f"{res['ours_qps_threads']:.1f} ({res['thread_scaling']:.2f}x)", "")
    tab.add_row("  scipy sparse-product path (kernel / scipy)", f"{res['scipy_qps']:.1f} "
                f"({res['kernel_over_scipy']:.1f}x); same rows: {res['paths_agree']}", "")
    for backend in ("numpy", "numba"):
        if f"bm25s_{backend}_qps" in res:
            tab.add_row(f"bm25s 0.3.16 ({backend} backend), 1 thread: q/s; ours / bm25s",
                        f"{res[f'bm25s_{backend}_qps']:.1f}; {res[f'ours_over_bm25s_{backend}']:.2f}x",
                        f"same top-{args.k} set {res[f'bm25s_{backend}_same_topk_pct']:.1f}%")
    tab.add_row("speed-up, same queries / all queries",
                f"{res['speedup_same_queries']:.0f}x / {res['speedup_all_queries']:.0f}x", "1x")
    tab.add_row(f"same top-{args.k} set, non-tied queries",
                f"{res['agreement_non_tied_pct']:.1f}% of {res['non_tied_queries']}", "(reference)")
    tab.add_row("same ordered top-k, all compared", f"{res['exact_same_ordered_topk_pct']:.1f}%", "")
    if "triples_s" in res:
        tab.add_row(f"build_triples, all {args.docs:,} pairs (s)",
                    f"{res['triples_s']:.1f} ({res['triples_qps']:.0f} q/s)",
                    f"~{args.docs / res['ref_qps']:.0f} (est.)")
        tab.add_row(f"  with {args.threads} threads (s, scaling)",
                    f"{res['triples_threads_s']:.1f} ({res['triples_thread_scaling']:.2f}x)", "")
        tab.add_row("triples rows written / dropped",
                    f"{res['triples_rows_written']:,} / {res['triples_dropped']}", "")
    tab.caption = f"load average {res['loadavg_start']:.1f} -> {res['loadavg_end']:.1f} on {res['cpus']} CPUs"
    Console().print(tab)


if __name__ == "__main__":
    main()
