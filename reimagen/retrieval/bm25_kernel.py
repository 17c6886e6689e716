"""The compiled query kernel of ``BM25Retriever`` (numba): term-at-a-time accumulation into a dense float32
buffer, touched documents only, top-k by (score desc, row asc).

Why by hand: measured on 200K Zipf captions, top-2, one thread (benchmarks/bm25.py), the scipy sparse product
(``csr_matmat``, the fallback without numba) gives 290-590 queries/s and bm25s 0.3.16's numba backend 1,140-3,000;
bm25s itself cannot be used as is (its idf has no epsilon floor, its scores no (k1 + 1) factor, its top-k breaks
ties arbitrarily). This kernel keeps our weight matrix (rank-bm25's scores) and our tie rule, and scans only the
query's posting lists and the documents they touch, where bm25s's selects the top k over every document.

Per document the float32 sum adds ``count * weight`` over the query's distinct terms in the query's order, the
same operations in the same order as the sparse product, so both paths give the same scores bit for bit.
"""

from __future__ import annotations

import os

import numpy as np

try:  # numba is optional: without it BM25Retriever uses the scipy sparse product
    import numba
except ImportError:  # pragma: no cover - depends on the install
    numba = None

if numba is not None and "NUMBA_THREADING_LAYER" not in os.environ:
    # numba's own thread pool, not OpenMP: its OpenMP layer sets the process's OpenMP thread count when it starts,
    # which is torch's too (seen: torch.get_num_threads() 1 -> 2 after one query), so that images sampled after a
    # retrieval came out with other float rounding than images sampled without one.
    numba.config.THREADING_LAYER = "workqueue"


def available() -> bool:
    return numba is not None


if numba is not None:

    @numba.njit(cache=True, nogil=True, inline="always")
    def _offer(s, d, k, n, best_r, best_s):
        """Insert (score s, row d) into the sorted best list of n <= k entries (higher score first, equal scores
        lower row first); returns the new n."""
        if n == k and (s < best_s[n - 1] or (s == best_s[n - 1] and d > best_r[n - 1])):
            return n
        p = n if n < k else k - 1  # a full list drops its last entry
        while p > 0 and (s > best_s[p - 1] or (s == best_s[p - 1] and d < best_r[p - 1])):
            best_s[p] = best_s[p - 1]
            best_r[p] = best_r[p - 1]
            p -= 1
        best_s[p] = s
        best_r[p] = d
        return n + 1 if n < k else n

    @numba.njit(cache=True, nogil=True)
    def _one_query(q_terms, q_counts, lo, hi, w_indptr, w_indices, w_data, dense_of, dense_rows, k, exclude, acc,
                   stamp, mark, touched, best_r, best_s):
        """Top k of one query into best_r / best_s (sorted); returns how many. A query whose posting lists
        cover more than a quarter of the documents is accumulated densely (the whole buffer zeroed, then
        scanned: no bookkeeping per posting), a shorter one sparsely (only the documents it touches). Zero
        scores (no shared term) are never returned."""
        n_docs = acc.shape[0]
        postings = 0
        for a in range(lo, hi):
            postings += w_indptr[q_terms[a] + 1] - w_indptr[q_terms[a]]
        n = 0
        thr = -np.inf  # the k-th best score once the list is full: a cheap first test for every candidate
        if postings * 4 > n_docs:
            acc[:] = 0.0
            for a in range(lo, hi):
                t = q_terms[a]
                c = q_counts[a]
                r = dense_of[t]
                if r >= 0:  # a common term's weights as a dense row: a sequential (SIMD) add, not a scatter
                    row = dense_rows[r]
                    for d in range(n_docs):
                        acc[d] += c * row[d]
                else:
                    for j in range(w_indptr[t], w_indptr[t + 1]):
                        acc[w_indices[j]] += c * w_data[j]
            for d in range(n_docs):  # (two scan loops, not one over "i if dense else touched[i]": that
                s = acc[d]              # branch in the loop cost ~30% of the kernel's time, measured)
                if s < thr or s == 0.0 or d == exclude:
                    continue
                n = _offer(s, d, k, n, best_r, best_s)
                if n == k:
                    thr = best_s[k - 1]
            return n
        nt = 0
        for a in range(lo, hi):
            t = q_terms[a]
            c = q_counts[a]
            for j in range(w_indptr[t], w_indptr[t + 1]):
                d = w_indices[j]
                if stamp[d] != mark:
                    stamp[d] = mark
                    acc[d] = 0.0
                    touched[nt] = d
                    nt += 1
                acc[d] += c * w_data[j]
        for i in range(nt):
            d = touched[i]
            s = acc[d]
            if s < thr or s == 0.0 or d == exclude:
                continue
            n = _offer(s, d, k, n, best_r, best_s)
            if n == k:
                thr = best_s[k - 1]
        return n

    @numba.njit(cache=True, nogil=True, parallel=True)
    def search_kernel(q_indptr, q_terms, q_counts, w_indptr, w_indices, w_data, dense_of, dense_rows, n_docs, k,
                      exclude, n_chunks):
        """(rows (Q, k) int64, scores (Q, k) float32, counts (Q,)) for Q queries given as CSR (term ids, counts);
        the queries are cut into ``n_chunks`` chunks run in parallel (numba threads), each with its own buffers."""
        nq = q_indptr.shape[0] - 1
        rows = np.full((nq, k), -1, np.int64)
        scores = np.zeros((nq, k), np.float32)
        counts = np.zeros(nq, np.int64)
        per = (nq + n_chunks - 1) // n_chunks
        for ch in numba.prange(n_chunks):
            acc = np.zeros(n_docs, np.float32)
            stamp = np.zeros(n_docs, np.int64)
            touched = np.empty(n_docs, np.int64)
            best_r = np.empty(k, np.int64)
            best_s = np.empty(k, np.float32)
            for qi in range(ch * per, min(nq, (ch + 1) * per)):
                n = _one_query(q_terms, q_counts, q_indptr[qi], q_indptr[qi + 1], w_indptr, w_indices, w_data,
                               dense_of, dense_rows, k, exclude[qi], acc, stamp, qi + 1, touched, best_r, best_s)
                counts[qi] = n
                for i in range(n):
                    rows[qi, i] = best_r[i]
                    scores[qi, i] = best_s[i]
        return rows, scores, counts


def dense_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_docs: int, min_df: float = 1 / 8,
               budget: float = 1.0, max_bytes: int = 512 << 20) -> tuple[np.ndarray, np.ndarray]:
    """(dense_of (n_terms,) int64: a term's row in ``rows`` or -1, rows (m, n_docs) float32): the weights of the
    commonest terms (in at least ``min_df`` of the documents), most common first, within ``budget`` times the
    bytes of the sparse weights and at most ``max_bytes`` (an index larger than RAM stays memory-mapped; these
    rows are the only copy). Adding a dense row (zeros where a document lacks the term: adding +0.0 leaves a
    sum's bits unchanged) is the same float32 arithmetic as adding the posting list, in a fraction of the time."""
    df = np.diff(indptr)
    order = np.argsort(-df, kind="stable")
    limit = int(min(budget * (data.nbytes + indices.nbytes), max_bytes) // max(1, 4 * n_docs))
    chosen = [int(t) for t in order[:limit] if df[t] >= min_df * n_docs]
    dense_of = np.full(df.shape[0], -1, np.int64)
    rows = np.zeros((len(chosen), n_docs), np.float32)
    for r, t in enumerate(chosen):
        dense_of[t] = r
        rows[r, indices[indptr[t]:indptr[t + 1]]] = data[indptr[t]:indptr[t + 1]]
    return dense_of, rows


def set_threads(n: int) -> None:
    """The numba threads the kernel's query chunks run on (1: one core)."""
    if numba is not None:
        numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


__all__ = ["available", "set_threads", "search_kernel", "dense_rows"]
