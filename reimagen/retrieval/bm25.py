"""Text-to-text BM25 (Sec. 3.2): the retriever of the KNN-ImageText training triples and of the IND / LAION
knowledge bases.

Two retrievers that rank identically, sharing one tokenizer (``tokenize``):

    RankBM25Retriever  kind "bm25-rank"  the reference: ``rank_bm25.BM25Okapi`` scoring every document in
                                         Python per query (0.1-0.4 s per query on 200K captions).
    BM25Retriever      kind "bm25"       the fast default: the same scores from a precomputed sparse
                                         term x document weight matrix, summed per query by a compiled
                                         kernel (``bm25_kernel``, numba; ``threads`` of them) or, without
                                         numba, by one sparse matrix product per batch of queries.

Scoring (both): Robertson / Okapi BM25 exactly as ``rank_bm25.BM25Okapi`` (rank-bm25 0.2.2) computes it::

    score(q, d) = sum over query tokens t (repeated tokens count repeatedly) of
                  idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = log(N - n_t + 0.5) - log(n_t + 0.5)               (n_t: documents containing t)
                  replaced by epsilon * mean_t idf(t) where it is negative (t in more than half of the
                  documents; the mean is over the whole vocabulary, before flooring)

with k1 = 1.5, b = 0.75, epsilon = 0.25 by default, |d| the document's token count and avgdl its mean. Note
the (k1 + 1) factor and the epsilon floor: bm25s's default ("lucene") variant differs (idf
log(1 + (N - n + 0.5) / (n + 0.5)), never negative), so its rankings disagree on a few queries.

Results (both retrievers): only documents with a nonzero score are returned (those sharing at least one
token with the query, unless contributions vanish), best first; a query gets fewer than k -- or no --
neighbours when fewer documents match (an empty query, or one whose tokens are all unknown, gets an empty
row). Ties are broken deterministically: equal scores rank the lower row (the earlier document of the
collection) first.

Numerics: ``BM25Retriever`` computes the weights in float64 exactly as rank-bm25 does (same idf, same average
idf summed in the same order, same expression order) and stores them as float32; a query's scores are
float32 sums, equal to rank-bm25's to ~1e-7 relative. Documents that tie exactly under rank-bm25 (same
matching term counts and length) tie exactly here too; only near-ties (differences below float32 precision)
can order differently.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .base import KnowledgeBase, Retriever, SearchResult, register_retriever

# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------
TOKENIZER_VERSION = 1

# A small built-in English stopword list (function words; no domain words such as "photo" or "image").
ENGLISH_STOPWORDS = frozenset("""
a an the and or but nor so yet if then else of in on at to from by for with without within into onto
upon over under above below between among through during before after about against along around
across behind beyond near off out up down as than too very just also not no only own same such
is are was were be been being am do does did doing has have had having will would shall should can
could may might must i me my mine myself we us our ours ourselves you your yours yourself yourselves
he him his himself she her hers herself it its itself they them their theirs themselves this that
these those there here what which who whom whose when where why how all any both each few more most
other some again further once s t
""".split())

_TOKEN_RE = None


def _token_re():
    global _TOKEN_RE
    if _TOKEN_RE is None:
        import regex  # a dependency of transformers; supports Unicode categories (\p{..})

        # letters, numbers and combining marks (so that e.g. Devanagari vowel signs stay inside their word)
        _TOKEN_RE = regex.compile(r"[\p{L}\p{N}\p{M}]+")
    return _TOKEN_RE


def tokenize(text: str, stopwords: bool = False) -> list[str]:
    """The tokenizer shared by every BM25 retriever: NFKC-normalise, lower-case, split on anything that is not
    a letter, number or combining mark (Unicode aware: "Straße", "東京タワー", "हिन्दी" are single tokens;
    "_" and punctuation separate), and with ``stopwords=True`` drop ``ENGLISH_STOPWORDS``. No stemming
    ("dogs" and "dog" are different tokens), as in the paper's plain BM25."""
    if not text:
        return []
    text = unicodedata.normalize("NFKC", text).lower()
    toks = _token_re().findall(text)
    if stopwords:
        toks = [t for t in toks if t not in ENGLISH_STOPWORDS]
    return toks


def _tokenize_all(texts: Sequence[str], stopwords: bool, progress: bool, what: str = "tokenizing") -> list[list[str]]:
    from rich.progress import track

    n = len(texts)
    step = 20_000
    out: list[list[str]] = []
    for s in track(range(0, n, step), description=what, disable=not progress or n <= step):
        out.extend(tokenize(t, stopwords) for t in texts[s:s + step])
    return out


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
def _topk(rows: np.ndarray, scores: np.ndarray, k: int, exclude: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """The k best (row, score) pairs, best first, ties -> lower row first, never ``exclude``."""
    if k <= 0:
        return rows[:0].astype(np.int64), scores[:0]
    kk = k + (1 if exclude >= 0 else 0)
    n = scores.shape[0]
    if n > kk:
        part = np.argpartition(scores, n - kk)[n - kk:]
        thr = scores[part].min()
        sel = np.flatnonzero(scores >= thr)  # every candidate tied with the kk-th best too
        rows, scores = rows[sel], scores[sel]
    if exclude >= 0:
        keep = rows != exclude
        rows, scores = rows[keep], scores[keep]
    order = np.lexsort((rows, -scores))[:k]
    return rows[order].astype(np.int64, copy=False), scores[order]


def _check_ids(ids: Sequence[str] | None, n: int) -> list[str]:
    ids = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(ids) != n:
        raise ValueError(f"{n} texts but {len(ids)} ids")
    if len(set(ids)) != n:
        raise ValueError("ids must be unique")
    if n == 0:
        raise ValueError("cannot build a BM25 index over an empty collection")
    return ids


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False)


class _BM25Base(Retriever):
    ids: list[str]
    params: dict[str, Any]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def stopwords(self) -> bool:
        return bool(self.params.get("stopwords", False))

    def _row_of(self) -> dict[str, int]:
        if getattr(self, "_rows", None) is None:
            self._rows = {pid: i for i, pid in enumerate(self.ids)}
        return self._rows

    def _exclude_rows(self, exclude_ids: Sequence[str | None] | None, n: int) -> list[int]:
        if exclude_ids is None:
            return [-1] * n
        if len(exclude_ids) != n:
            raise ValueError(f"{n} queries but {len(exclude_ids)} exclude_ids")
        rows = self._row_of()
        return [rows.get(e, -1) if e is not None else -1 for e in exclude_ids]

    def search_rows(self, queries: Sequence[str], k: int, exclude_rows: Sequence[int] | None = None
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        raise NotImplementedError

    def search(self, queries: Sequence[str], k: int, exclude_ids: Sequence[str | None] | None = None,
               query_ids: Sequence[str] | None = None) -> SearchResult:
        """Top-k (id, score) per query, best first (see the module docstring for scores, ties, short rows)."""
        rows, scores = self.search_rows(queries, k, self._exclude_rows(exclude_ids, len(queries)))
        ids = self.ids
        return SearchResult([[ids[r] for r in rr.tolist()] for rr in rows], [s.tolist() for s in scores])


# ----------------------------------------------------------------------------------------------
# Reference: rank-bm25
# ----------------------------------------------------------------------------------------------
@register_retriever
class RankBM25Retriever(_BM25Base):
    """The reference: ``rank_bm25.BM25Okapi`` over the shared tokenizer's tokens; every query scores every
    document (``get_scores``). For small collections and for checking ``BM25Retriever``.

    Saved as ``ids.json`` + ``tokens.parquet`` (the tokenized corpus, list<string>); loading rebuilds the
    BM25Okapi model (no pickle)."""

    kind = "bm25-rank"

    def __init__(self, ids: list[str], tokens: list[list[str]], k1: float = 1.5, b: float = 0.75,
                 epsilon: float = 0.25, stopwords: bool = False):
        from rank_bm25 import BM25Okapi

        self.ids = ids
        self.tokens = tokens
        self.params = {"k1": k1, "b": b, "epsilon": epsilon, "stopwords": stopwords,
                       "tokenizer_version": TOKENIZER_VERSION, "n_docs": len(ids)}
        self._rows = None
        self.model = BM25Okapi(tokens, k1=k1, b=b, epsilon=epsilon) if sum(map(len, tokens)) else None

    @classmethod
    def build(cls, texts: Sequence[str], ids: Sequence[str] | None = None, k1: float = 1.5, b: float = 0.75,
              epsilon: float = 0.25, stopwords: bool = False, progress: bool = False) -> "RankBM25Retriever":
        ids = _check_ids(ids, len(texts))
        return cls(ids, _tokenize_all(texts, stopwords, progress), k1, b, epsilon, stopwords)

    @classmethod
    def from_knowledge_base(cls, kb: KnowledgeBase, **kw) -> "RankBM25Retriever":
        return cls.build(kb.texts, kb.ids, **kw)

    def scores(self, query: str) -> np.ndarray:
        """rank-bm25's scores of every document for one query (float64, zeros if nothing matches)."""
        toks = tokenize(query, self.stopwords)
        if self.model is None or not toks:
            return np.zeros(len(self.ids))
        return self.model.get_scores(toks)

    def search_rows(self, queries, k, exclude_rows=None):
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        exclude_rows = [-1] * len(queries) if exclude_rows is None else list(exclude_rows)
        out_rows, out_scores = [], []
        for q, ex in zip(queries, exclude_rows):
            sc = self.scores(q)
            nz = np.flatnonzero(sc)
            r, s = _topk(nz, sc[nz], k, ex)
            out_rows.append(r)
            out_scores.append(s)
        return out_rows, out_scores

    def _save(self, folder: Path) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        _write_json(folder / "ids.json", self.ids)
        pq.write_table(pa.table({"tokens": pa.array(self.tokens, type=pa.list_(pa.string()))}),
                       folder / "tokens.parquet")
        return dict(self.params)

    @classmethod
    def _load(cls, folder: Path, manifest: dict[str, Any], mmap: bool = True) -> "RankBM25Retriever":
        import pyarrow.parquet as pq

        p = manifest.get("params", {})
        _check_tokenizer(p, folder)
        ids = json.loads((folder / "ids.json").read_text(encoding="utf-8"))
        tokens = pq.read_table(folder / "tokens.parquet").column("tokens").to_pylist()
        return cls(ids, tokens, p.get("k1", 1.5), p.get("b", 0.75), p.get("epsilon", 0.25), p.get("stopwords", False))


def _check_tokenizer(params: dict[str, Any], folder: Path) -> None:
    v = params.get("tokenizer_version", TOKENIZER_VERSION)
    if v != TOKENIZER_VERSION:
        raise ValueError(f"{folder} was built with tokenizer version {v}, this code has {TOKENIZER_VERSION}; "
                         "rebuild the index")


# ----------------------------------------------------------------------------------------------
# Fast default: sparse weights
# ----------------------------------------------------------------------------------------------
_FILES = ("indptr", "indices", "data")
_DIRECT_MATMAT = True  # call scipy's csr_matmat kernel directly (see BM25Retriever._product)
_EMPTY_ROWS = np.zeros(0, np.int64)
_EMPTY_SCORES = np.zeros(0, np.float32)
_EMPTY_ROWS.flags.writeable = False
_EMPTY_SCORES.flags.writeable = False


@register_retriever
class BM25Retriever(_BM25Base):
    """BM25 with rank-bm25's exact scoring (see the module docstring) from a precomputed sparse weight matrix
    W (vocabulary x documents, CSR: one row of float32 weights per term, its posting list)::

        W[t, d] = idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
        scores  = Q @ W        Q: (queries x vocabulary) query term counts, unknown tokens dropped

    Queries are processed in batches of at most ``batch_size`` queries and at most ``max_postings`` summed
    posting-list lengths (this bounds the size of the sparse product, which holds one float32 + one int32
    per (query, matching document)), each row reduced to its top k with ``argpartition``.

    Memory: float32 weights and int32 document indices (int64 only past 2^31 nonzeros): ~8 bytes per
    distinct (token, caption) pair: ~79 bytes of arrays per 5-15 word caption (~100 with ids and vocabulary
    once loaded; see benchmarks/bm25.py). Saved as raw ``.npy`` arrays
    (``weights.indptr/indices/data.npy``, loadable memory-mapped with ``np.load(mmap_mode="r")``), ``idf.npy``,
    the vocabulary as ``vocab.json`` (a list, term id order) and the ids as ``ids.json``."""

    kind = "bm25"

    def __init__(self, ids: list[str], vocab: list[str], weights, idf: np.ndarray, params: dict[str, Any],
                 batch_size: int = 256, max_postings: int = 1 << 24, term_index: dict[str, int] | None = None):
        self.ids = ids
        self.vocab = vocab
        self.term_index = term_index if term_index is not None else {t: i for i, t in enumerate(vocab)}
        self.weights = weights  # scipy.sparse.csr_matrix (n_terms, n_docs)
        self.idf = idf
        self.params = params
        self.batch_size = batch_size
        self.max_postings = max_postings
        self._rows = None
        self._df = np.diff(weights.indptr).astype(np.int64)  # postings per term (nonzero weights)
        self.threads = 1  # numba threads of the compiled kernel (``--threads``)
        self._kernel_arrays = None
        from . import bm25_kernel

        self.backend = "numba" if bm25_kernel.available() else "scipy"

    # -- building -------------------------------------------------------------------------------
    @classmethod
    def build(cls, texts: Sequence[str], ids: Sequence[str] | None = None, k1: float = 1.5, b: float = 0.75,
              epsilon: float = 0.25, stopwords: bool = False, progress: bool = True, batch_size: int = 256
              ) -> "BM25Retriever":
        """Index ``texts`` (named by ``ids``, default "0", "1", ...). Tokenized in chunks, straight to term ids,
        so that no list of every token is ever held."""
        from rich.progress import track

        ids = _check_ids(ids, len(texts))
        vocab: dict[str, int] = {}
        lens, terms = [], []
        step = 20_000
        for s in track(range(0, len(texts), step), description="indexing (BM25)",
                       disable=not progress or len(texts) <= step):
            toks = [tokenize(t, stopwords) for t in texts[s:s + step]]
            lens.append(np.fromiter(map(len, toks), dtype=np.int64, count=len(toks)))
            # term ids in first-occurrence order: the order of rank-bm25's idf dict (it fixes the mean-idf sum)
            terms.append(np.fromiter((vocab.setdefault(w, len(vocab)) for d in toks for w in d), dtype=np.int64,
                                     count=int(lens[-1].sum())))
        return cls._from_term_ids(np.concatenate(lens), np.concatenate(terms), vocab, ids, k1, b, epsilon, stopwords,
                                  batch_size)

    @classmethod
    def from_knowledge_base(cls, kb: KnowledgeBase, **kw) -> "BM25Retriever":
        return cls.build(kb.texts, kb.ids, **kw)

    @classmethod
    def from_tokens(cls, tokens: list[list[str]], ids: list[str], k1: float = 1.5, b: float = 0.75,
                    epsilon: float = 0.25, stopwords: bool = False, batch_size: int = 256) -> "BM25Retriever":
        """Index pre-tokenized documents (``stopwords`` is recorded: queries are tokenized with it)."""
        ids = _check_ids(ids, len(tokens))
        vocab: dict[str, int] = {}
        doc_len = np.fromiter((len(d) for d in tokens), dtype=np.int64, count=len(tokens))
        term = np.fromiter((vocab.setdefault(w, len(vocab)) for d in tokens for w in d), dtype=np.int64,
                           count=int(doc_len.sum()))
        return cls._from_term_ids(doc_len, term, vocab, ids, k1, b, epsilon, stopwords, batch_size)

    @classmethod
    def _from_term_ids(cls, doc_len: np.ndarray, term: np.ndarray, vocab: dict[str, int], ids: list[str], k1: float,
                       b: float, epsilon: float, stopwords: bool, batch_size: int) -> "BM25Retriever":
        import scipy.sparse as sp

        n = doc_len.shape[0]
        total = int(doc_len.sum())
        n_terms = len(vocab)
        doc = np.repeat(np.arange(n, dtype=np.int64), doc_len)
        key, tf = np.unique(term * n + doc, return_counts=True)  # sorted by (term, doc)
        del term, doc
        t_of, d_of = key // n, key % n
        del key
        df = np.bincount(t_of, minlength=n_terms)
        # idf exactly as rank-bm25: math.log per distinct document frequency, mean summed in vocabulary order
        uniq, inv = np.unique(df, return_inverse=True)
        idf = np.array([math.log(n - f + 0.5) - math.log(f + 0.5) for f in uniq.tolist()], dtype=np.float64)[inv]
        idf_sum = 0.0
        for v in idf.tolist():
            idf_sum += v
        average_idf = idf_sum / n_terms if n_terms else 0.0
        idf[idf < 0] = epsilon * average_idf
        avgdl = total / n
        if total:
            tf64 = tf.astype(np.float64)
            w = idf[t_of] * (tf64 * (k1 + 1) / (tf64 + k1 * (1 - b + b * doc_len[d_of] / avgdl)))
            del tf64
        else:
            w = np.zeros(0)
        keep = w != 0  # a zero weight (idf exactly 0) never changes a score
        if not keep.all():
            t_of, d_of, w = t_of[keep], d_of[keep], w[keep]
        nnz = int(w.shape[0])
        idx_dtype = np.int32 if nnz < 2**31 and n < 2**31 else np.int64
        indptr = np.zeros(n_terms + 1, dtype=idx_dtype)
        np.cumsum(np.bincount(t_of, minlength=n_terms), out=indptr[1:])
        weights = sp.csr_matrix((w.astype(np.float32), d_of.astype(idx_dtype), indptr), shape=(n_terms, n), copy=False)
        params = {"k1": k1, "b": b, "epsilon": epsilon, "stopwords": stopwords, "tokenizer_version": TOKENIZER_VERSION,
                  "n_docs": n, "n_terms": n_terms, "nnz": nnz, "n_tokens": total, "avgdl": avgdl,
                  "average_idf": average_idf, "storage": "npy (CSR terms x docs: float32 data, int32 indices)"}
        return cls(ids, list(vocab), weights, idf, params, batch_size=batch_size, term_index=vocab)

    # -- scoring --------------------------------------------------------------------------------
    def _query_matrix(self, queries: Sequence[str]):
        """Q (len(queries) x vocabulary) term counts (float32 CSR, int32 indices) and per-query posting counts."""
        import scipy.sparse as sp

        ti = self.term_index
        indptr = [0]
        cols: list[int] = []
        vals: list[int] = []
        for q in queries:
            c = Counter(t for t in tokenize(q, self.stopwords) if t in ti)
            cols.extend(ti[t] for t in c)
            vals.extend(c.values())
            indptr.append(len(cols))
        cols_a = np.asarray(cols, dtype=self.weights.indices.dtype)
        indptr_a = np.asarray(indptr, dtype=self.weights.indices.dtype)
        q = sp.csr_matrix((np.asarray(vals, dtype=np.float32), cols_a, indptr_a),
                          shape=(len(queries), len(self.vocab)), copy=False)
        cs = np.concatenate([[0], np.cumsum(self._df[cols_a])])
        cost = cs[indptr_a[1:]] - cs[indptr_a[:-1]]
        return q, cost

    def scores(self, query: str) -> np.ndarray:
        """Every document's score for one query (float32; rank-bm25's ``get_scores`` to ~1e-7 relative)."""
        q, _ = self._query_matrix([query])
        return np.asarray((q @ self.weights).toarray()[0])

    def search_rows(self, queries: Sequence[str], k: int, exclude_rows: Sequence[int] | None = None
                    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Like ``search`` but with row indices: per query, int64 rows and float32 scores, best first. With numba
        installed the compiled kernel (``bm25_kernel``, on ``self.threads`` threads) scores the queries, else the
        scipy sparse product; both give the same rows and scores bit for bit (tested)."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        nq = len(queries)
        exclude_rows = [-1] * nq if exclude_rows is None else [int(e) for e in exclude_rows]
        out_rows: list[np.ndarray] = [_EMPTY_ROWS] * nq
        out_scores: list[np.ndarray] = [_EMPTY_SCORES] * nq
        if k == 0:
            return out_rows, out_scores
        if self.backend == "numba":
            return self._search_compiled(queries, k, exclude_rows)
        for s in range(0, nq, self.batch_size):
            qm, cost_a = self._query_matrix(queries[s:s + self.batch_size])
            cost = cost_a.tolist()
            full = [i for i in range(qm.shape[0]) if qm.indptr[i] < qm.indptr[i + 1]]  # empty query: empty row
            # sparse products Q @ W, split so that none holds more than max_postings candidates
            start = 0
            while start < len(full):
                end, acc = start, 0
                while end < len(full) and (end == start or acc + cost[full[end]] <= self.max_postings):
                    acc += cost[full[end]]
                    end += 1
                part = full[start:end]
                indptr, indices, data = self._product(qm[part], sum(cost[i] for i in part))
                for j, i in enumerate(part):
                    lo, hi = indptr[j], indptr[j + 1]
                    if lo < hi:
                        out_rows[s + i], out_scores[s + i] = _topk(indices[lo:hi], data[lo:hi], k, exclude_rows[s + i])
                start = end
        return out_rows, out_scores

    def _search_compiled(self, queries: Sequence[str], k: int, exclude_rows: list[int]
                         ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        from . import bm25_kernel

        w = self.weights
        if self._kernel_arrays is None:  # contiguous views of the (possibly memory-mapped) arrays, made once
            arrays = (np.ascontiguousarray(w.indptr), np.ascontiguousarray(w.indices),
                      np.ascontiguousarray(w.data, dtype=np.float32))
            self._kernel_arrays = arrays + bm25_kernel.dense_rows(*arrays, w.shape[1])
        w_indptr, w_indices, w_data, dense_of, dense = self._kernel_arrays
        bm25_kernel.set_threads(self.threads)
        out_rows: list[np.ndarray] = []
        out_scores: list[np.ndarray] = []
        step = max(self.batch_size, 4096)  # the kernel has no per-call cost worth batching finer
        for s in range(0, len(queries), step):
            qm, _ = self._query_matrix(queries[s:s + step])
            ex = np.asarray(exclude_rows[s:s + step], dtype=np.int64)
            rows, scores, counts = bm25_kernel.search_kernel(
                np.asarray(qm.indptr, np.int64), np.asarray(qm.indices, np.int64), np.asarray(qm.data, np.float32),
                w_indptr, w_indices, w_data, dense_of, dense, w.shape[1], k, ex, max(1, self.threads))
            for r, sc, n in zip(rows, scores, counts.tolist()):
                out_rows.append(r[:n] if n else _EMPTY_ROWS)
                out_scores.append(sc[:n] if n else _EMPTY_SCORES)
        return out_rows, out_scores

    def _product(self, q, nnz_bound: int):
        """CSR arrays (indptr, indices, data) of Q @ W. Calls scipy's sparse kernel directly with the known
        bound on the result's size (the query terms' posting counts), which skips scipy's first pass that
        computes that bound (~25% of the time); falls back to ``Q @ W`` if that private kernel changes."""
        w = self.weights
        if _DIRECT_MATMAT:
            try:
                from scipy.sparse import _sparsetools

                dt = w.indices.dtype
                n = q.shape[0]
                cp = np.empty(n + 1, dtype=dt)
                cj = np.empty(max(int(nnz_bound), 1), dtype=dt)
                cx = np.empty(cj.shape[0], dtype=np.float32)
                _sparsetools.csr_matmat(n, w.shape[1], np.asarray(q.indptr, dtype=dt), np.asarray(q.indices, dtype=dt),
                                        np.asarray(q.data, dtype=np.float32), w.indptr, w.indices, w.data, cp, cj, cx)
                return cp, cj, cx
            except (ImportError, AttributeError, TypeError, ValueError):
                pass
        res = q @ w
        return res.indptr, res.indices, res.data

    # -- storage --------------------------------------------------------------------------------
    def _save(self, folder: Path) -> dict[str, Any]:
        for name in _FILES:
            np.save(folder / f"weights.{name}.npy", np.ascontiguousarray(getattr(self.weights, name)))
        np.save(folder / "idf.npy", np.asarray(self.idf, dtype=np.float64))
        _write_json(folder / "vocab.json", self.vocab)
        _write_json(folder / "ids.json", self.ids)
        return dict(self.params)

    @classmethod
    def _load(cls, folder: Path, manifest: dict[str, Any], mmap: bool = True) -> "BM25Retriever":
        import scipy.sparse as sp

        params = dict(manifest.get("params", {}))
        _check_tokenizer(params, folder)
        mode = "r" if mmap else None
        indptr, indices, data = (np.load(folder / f"weights.{n}.npy", mmap_mode=mode) for n in _FILES)
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        ids = json.loads((folder / "ids.json").read_text(encoding="utf-8"))
        if indptr.shape[0] != len(vocab) + 1 or indices.shape[0] != data.shape[0] or indices.dtype != indptr.dtype:
            raise ValueError(f"{folder}: weight arrays do not match the vocabulary ({len(vocab)} terms)")
        weights = sp.csr_matrix((data, indices, indptr), shape=(len(vocab), len(ids)), copy=False)
        idf = np.load(folder / "idf.npy", mmap_mode=mode)
        return cls(ids, vocab, weights, idf, params)

    def index_nbytes(self) -> int:
        """Bytes of the index arrays (weights + idf), excluding Python objects (ids, vocabulary)."""
        w = self.weights
        return int(w.data.nbytes + w.indices.nbytes + w.indptr.nbytes + np.asarray(self.idf).nbytes)


__all__ = ["tokenize", "ENGLISH_STOPWORDS", "TOKENIZER_VERSION", "RankBM25Retriever", "BM25Retriever"]
