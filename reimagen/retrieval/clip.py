"""CLIP retrieval: gamma(p, B) as the cosine similarity of open-clip embeddings in a faiss index (Sec. 3.2, Sec. 4).

The paper retrieves with BM25 by default and reports CLIP similarity as the alternative (COCO FID 5.29 with CLIP
vs 5.25 with BM25; WikiImages 5.85 vs 5.88). Here a text prompt is encoded with the CLIP text tower and compared
with the knowledge base's keys:

    embed="image"  (default) keys are the L2-normalised CLIP *image* embeddings: the prompt retrieves the pairs
                   whose image matches it (text -> image, the usual use of CLIP for retrieval);
    embed="text"   keys are the CLIP text embeddings of the pair texts (text -> text);
    embed="both"   keys are normalise(normalise(image) + normalise(text)), i.e. the re-normalised mean of the two:
                   a pair matches if its image or its text matches (rows whose image fails are skipped).

Building (``ClipRetriever.build``) embeds the knowledge base in batches, writing rows incrementally to a float32
``embeddings.npy`` memmap in ``work_dir`` next to ``embeddings.state.json`` (the number of finished rows, the rows
skipped and a fingerprint of model, weights, mode and knowledge base). Rerunning with the same ``work_dir``
continues after the last finished batch instead of recomputing. Missing or undecodable images are counted,
reported (``skipped``) and left out of the index (their rows stay zero in the embedding file).

Indexes (all over inner product = cosine similarity of normalised vectors):

    flat   faiss.IndexFlatIP: exact, 4*d bytes per vector; the right choice up to a few million pairs.
    ivfpq  faiss.IndexIVFPQ: nlist ~ 4*sqrt(N) coarse cells (capped at N/39 so that every cell gets training
           points), pq_m sub-quantizers (default: the largest divisor of d <= d/4, e.g. 128 for d = 512, i.e.
           pq_m bytes per vector) of pq_bits bits, trained on a sample; nprobe cells visited per query (default
           ~sqrt(nlist)). Results are re-ranked exactly with the stored embeddings (``rerank`` x k candidates,
           reading only those rows of the memory-mapped embedding file).
    hnsw   faiss.IndexHNSWFlat with METRIC_INNER_PRODUCT: graph search, M = hnsw_m links, efConstruction,
           efSearch parameters; exact vectors, fast queries, more memory than flat.

Saved folder (``save(folder, source)``): manifest.json (kind "clip"; params: model_name, pretrained, seed, index
and its parameters, embed, dim, n, n_kb, skipped counts), index.faiss (``faiss.write_index``), embeddings.npy
(N_kb x d, float32), rows.npy (faiss label -> knowledge-base row), ids.json (knowledge-base ids), skipped.json,
and model_config/<name>.json for a model defined by a custom JSON config. ``_load`` reads the index memory-mapped
when ``mmap=True``: with faiss 1.15 ``IO_FLAG_MMAP`` maps the inverted lists of IVF indexes (ivfpq) and
``IO_FLAG_MMAP_IFC`` maps the vectors of flat-code indexes (flat, and the storage of hnsw; its graph links are
read into memory). Older faiss versions without these flags, or a reader that refuses them, fall back to a normal
read. The CLIP text tower is rebuilt lazily, on the first search, from the manifest's model_name and pretrained.

Weights: ``pretrained`` is an open-clip tag (e.g. "laion2b_s34b_b79k" or "openai", downloaded on first use on a
machine with internet) or the path of a local checkpoint file. If the download fails, a RuntimeError names the
file to download and says to pass its path as ``pretrained=PATH`` (CLI ``--pretrained PATH``). ``pretrained=None``
gives random weights, seeded by ``seed`` so that the image and text towers of a saved index can be rebuilt
identically (useful for tests only: random CLIP embeddings carry no meaning).

``model_name`` is an open-clip architecture ("ViT-B-32", see ``open_clip.list_models()``), an ``hf-hub:``/
``local-dir:`` open-clip reference, or the path of a JSON model config ({"embed_dim", "vision_cfg", "text_cfg"})
that is registered under its file stem (e.g. a tiny model for tests).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .base import KnowledgeBase, Retriever, SearchResult, register_retriever
from .clip_embed import (EMBED_MODES, EMBEDDINGS_FILE, STATE_FILE, ClipEncoder,  # noqa: F401  (re-exported)
                         _open_clip, embed_knowledge_base, resolve_model, weights_download_hint)

INDEX_TYPES = ("flat", "ivfpq", "hnsw")
_ADD_CHUNK = 65536


# ----------------------------------------------------------------------------------------------
# faiss indexes
def _faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(f"CLIP retrieval needs faiss ({err}); install it with pip install faiss-cpu") from None
    return faiss


# ----------------------------------------------------------------------------------------------
def default_nlist(n: int) -> int:
    """~4*sqrt(N) coarse cells, at most N/39 (faiss wants >= 39 training points per cell), at least 1."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // 39))


def default_pq_m(dim: int) -> int:
    """The largest divisor of dim that is <= dim/4 (4+ dimensions per sub-quantizer)."""
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


def build_faiss_index(vectors: np.ndarray, rows: np.ndarray, index: str = "flat", nlist: int | None = None,
                      pq_m: int | None = None, pq_bits: int = 8, nprobe: int | None = None, hnsw_m: int = 32,
                      ef_construction: int = 80, ef_search: int = 64, train_size: int | None = None,
                      seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """An inner-product faiss index over ``vectors[rows]`` (labels 0..len(rows)-1) and its parameters."""
    faiss = _faiss()
    if index not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index!r}; choose one of {', '.join(INDEX_TYPES)}")
    n, dim = len(rows), int(vectors.shape[1])
    if n == 0:
        raise ValueError("no vectors to index")

    def chunks():
        for s in range(0, n, _ADD_CHUNK):
            yield np.ascontiguousarray(vectors[rows[s:s + _ADD_CHUNK]], dtype=np.float32)

    params: dict[str, Any] = {"index": index}
    if index == "flat":
        ix = faiss.IndexFlatIP(dim)
    elif index == "hnsw":
        if hnsw_m < 2:
            raise ValueError(f"hnsw_m must be >= 2, got {hnsw_m}")
        ix = faiss.IndexHNSWFlat(dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        ix.hnsw.efConstruction = int(ef_construction)
        params.update(hnsw_m=int(hnsw_m), ef_construction=int(ef_construction), ef_search=int(ef_search))
    else:
        nlist = int(nlist) if nlist else default_nlist(n)
        pq_m = int(pq_m) if pq_m else default_pq_m(dim)
        if nlist < 1 or nlist > n:
            raise ValueError(f"nlist must be in [1, {n}] for {n} vectors, got {nlist}")
        if pq_m < 1 or dim % pq_m:
            raise ValueError(f"pq_m must divide the embedding dimension {dim}, got {pq_m}")
        n_train = min(n, int(train_size) if train_size else max(50 * nlist, 10000))
        # every sub-quantizer needs at least 2**bits training points
        bits = max(1, min(int(pq_bits), int(math.floor(math.log2(max(n_train, 2))))))
        nprobe = int(nprobe) if nprobe else max(1, min(nlist, int(round(math.sqrt(nlist)))))
        sample = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
        xt = np.ascontiguousarray(vectors[rows[sample]], dtype=np.float32)
        quantizer = faiss.IndexFlatIP(dim)
        ix = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, bits, faiss.METRIC_INNER_PRODUCT)
        ix.train(xt)
        params.update(nlist=nlist, pq_m=pq_m, pq_bits=bits, nprobe=nprobe, train_size=n_train)
    for x in chunks():
        ix.add(x)
    _apply_search_params(ix, params)
    return ix, params


def _apply_search_params(ix: Any, params: dict[str, Any]) -> None:
    faiss = _faiss()
    if params.get("index") == "ivfpq" and params.get("nprobe"):
        faiss.extract_index_ivf(ix).nprobe = int(params["nprobe"])
    if params.get("index") == "hnsw" and params.get("ef_search"):
        faiss.downcast_index(ix).hnsw.efSearch = int(params["ef_search"])


def read_faiss_index(path: str | Path, index: str, mmap: bool = True) -> tuple[Any, str]:
    """Read a saved index, memory-mapped if possible; returns (index, how it was read)."""
    faiss = _faiss()
    if mmap:
        # ivfpq: IO_FLAG_MMAP maps the inverted lists; flat/hnsw: IO_FLAG_MMAP_IFC maps the flat codes (vectors).
        name = "IO_FLAG_MMAP" if index == "ivfpq" else "IO_FLAG_MMAP_IFC"
        flag = getattr(faiss, name, None)
        if flag is None and index != "ivfpq":
            name, flag = "IO_FLAG_MMAP", getattr(faiss, "IO_FLAG_MMAP", None)
        if flag is not None:
            try:
                return faiss.read_index(str(path), flag), name
            except RuntimeError:
                pass
    return faiss.read_index(str(path)), "read"


# ----------------------------------------------------------------------------------------------
# The retriever
# ----------------------------------------------------------------------------------------------
@register_retriever
class ClipRetriever(Retriever):
    """Text query -> top-k knowledge-base pairs by CLIP cosine similarity (see the module docstring).

    Attributes: ``ids`` (all knowledge-base ids), ``rows`` (faiss label -> knowledge-base row), ``embeddings``
    (N_kb x d float32, memory-mapped when possible; zero rows for skipped pairs), ``index`` (faiss), ``params``
    (recorded in the manifest), ``skipped`` ({reason: count}), ``skipped_ids`` ({id: reason}).
    """

    kind = "clip"

    def __init__(self, index: Any, ids: Sequence[str], rows: np.ndarray, embeddings: np.ndarray,
                 params: dict[str, Any], encoder: ClipEncoder | None = None, skipped_ids: dict[str, str] | None = None,
                 device: str = "cpu", embeddings_path: str | Path | None = None, model_config_path: Path | None = None):
        self.index = index
        self.ids = [str(i) for i in ids]
        self.rows = np.asarray(rows, dtype=np.int64)
        self.embeddings = embeddings
        self.params = dict(params)
        self._encoder = encoder
        self.device = device
        self.skipped_ids = dict(skipped_ids or {})
        self.skipped: dict[str, int] = {}
        for reason in self.skipped_ids.values():
            self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.embeddings_path = Path(embeddings_path) if embeddings_path is not None else None
        self._model_config_path = model_config_path
        self.read_mode = "memory"
        self.resumed_from = 0
        self._tmp: str | None = None

    def __repr__(self) -> str:
        p = self.params
        return (f"ClipRetriever({p.get('model_name')!r}, pretrained={p.get('pretrained')!r}, index={p.get('index')!r}, "
                f"embed={p.get('embed')!r}, n={self.index.ntotal}, skipped={self.skipped})")

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def build(cls, kb: KnowledgeBase, model_name: str = "ViT-B-32", pretrained: str | None = None,
              index: str = "flat", embed: str = "image", batch_size: int = 64, device: str = "cpu",
              work_dir: str | Path | None = None, nlist: int | None = None, pq_m: int | None = None,
              hnsw_m: int = 32, progress: bool = True, *, pq_bits: int = 8, nprobe: int | None = None,
              ef_construction: int = 80, ef_search: int = 64, rerank: int = 4, train_size: int | None = None,
              seed: int = 0, num_workers: int = 2) -> "ClipRetriever":
        """Embed ``kb`` with open-clip (resumably, in ``work_dir``; a temporary folder if None) and index it."""
        if index not in INDEX_TYPES:
            raise ValueError(f"unknown index type {index!r}; choose one of {', '.join(INDEX_TYPES)}")
        if embed not in EMBED_MODES:
            raise ValueError(f"unknown embed mode {embed!r}; choose one of {', '.join(EMBED_MODES)}")
        if len(kb) == 0:
            raise ValueError(f"knowledge base {kb.name or '(unnamed)'} is empty: nothing to index")
        encoder = ClipEncoder(model_name, pretrained, device=device, seed=seed)
        tmp = None
        if work_dir is None:
            tmp = tempfile.mkdtemp(prefix="reimagen-clip-")
            work_dir = tmp
        emb_path, failed, resumed_from = embed_knowledge_base(kb, encoder, embed, batch_size, work_dir, progress,
                                                              num_workers)
        emb = np.load(emb_path, mmap_mode="r")
        rows = np.array([i for i in range(len(kb)) if i not in failed], dtype=np.int64)
        if len(rows) == 0:
            raise ValueError(f"no pair of {kb.name or 'the knowledge base'} could be embedded "
                             f"({len(failed)} images skipped: missing or corrupt)")
        ix, iparams = build_faiss_index(emb, rows, index, nlist=nlist, pq_m=pq_m, pq_bits=pq_bits, nprobe=nprobe,
                                        hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search,
                                        train_size=train_size, seed=seed)
        if index == "ivfpq":
            iparams["rerank"] = int(rerank)
        params = cls._model_params(encoder, model_name, embed) | iparams | {"n": int(len(rows)), "n_kb": len(kb)}
        r = cls(ix, kb.ids, rows, emb, params, encoder=encoder, device=device,
                skipped_ids={kb.ids[i]: reason for i, reason in sorted(failed.items())}, embeddings_path=emb_path)
        r.params["skipped"] = dict(r.skipped)
        r.resumed_from = resumed_from
        if tmp is not None:
            r._tmp = tmp
            weakref.finalize(r, shutil.rmtree, tmp, True)
        if progress:
            from rich.console import Console

            Console(stderr=True).print(r.skip_report(), highlight=False)
        return r

    from_knowledge_base = build

    @classmethod
    def from_embeddings(cls, embeddings: np.ndarray, ids: Sequence[str], model_name: str = "ViT-B-32",
                        pretrained: str | None = None, index: str = "flat", embed: str = "image",
                        work_dir: str | Path | None = None, seed: int = 0, device: str = "cpu",
                        rerank: int = 4, **index_kw: Any) -> "ClipRetriever":
        """An index over embeddings computed elsewhere (e.g. the CLIP image embeddings LAION distributes); rows are
        L2-normalised. ``model_name``/``pretrained`` must name the CLIP model that made them: queries are encoded
        with its text tower (lazily, on the first ``search``; ``search_vectors`` needs no model)."""
        x = np.asarray(embeddings)
        if x.ndim != 2 or len(x) != len(ids):
            raise ValueError(f"embeddings must be (len(ids), d) = ({len(ids)}, d), got {x.shape}")
        tmp = None
        if work_dir is None:
            tmp = tempfile.mkdtemp(prefix="reimagen-clip-")
            work_dir = tmp
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        path = Path(work_dir) / EMBEDDINGS_FILE
        if path.exists():
            path.unlink()
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=x.shape)
        for s in range(0, len(x), _ADD_CHUNK):
            c = np.asarray(x[s:s + _ADD_CHUNK], dtype=np.float32)
            mm[s:s + len(c)] = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        mm.flush()
        del mm
        emb = np.load(path, mmap_mode="r")
        rows = np.arange(len(x), dtype=np.int64)
        ix, iparams = build_faiss_index(emb, rows, index, seed=seed, **index_kw)
        if index == "ivfpq":
            iparams["rerank"] = int(rerank)
        name, cfg = resolve_model(model_name) if str(model_name).endswith(".json") else (str(model_name), None)
        params = {"model_name": name, "model_cfg": cfg, "pretrained": pretrained, "seed": seed, "embed": embed,
                  "dim": int(x.shape[1]), "open_clip": None} | iparams | {"n": len(x), "n_kb": len(x), "skipped": {}}
        r = cls(ix, ids, rows, emb, params, device=device, embeddings_path=path)
        if tmp is not None:
            r._tmp = tmp
            weakref.finalize(r, shutil.rmtree, tmp, True)
        return r

    @staticmethod
    def _model_params(encoder: ClipEncoder, model_spec: str, embed: str) -> dict[str, Any]:
        open_clip = _open_clip()
        return {"model_name": encoder.model_name, "model_spec": str(model_spec), "model_cfg": encoder.model_cfg,
                "pretrained": encoder.pretrained, "seed": encoder.seed, "embed": embed, "dim": encoder.dim,
                "open_clip": getattr(open_clip, "__version__", None)}

    # -- queries ---------------------------------------------------------------------------------
    @property
    def encoder(self) -> ClipEncoder:
        """The CLIP model for queries, built on first use from the manifest parameters."""
        if self._encoder is None:
            name = self.params["model_name"]
            spec = name
            if self._model_config_path is not None and self._model_config_path.is_file():
                spec = str(self._model_config_path)  # a custom config saved with the index
            pretrained = self.params.get("pretrained")
            self._encoder = ClipEncoder(spec, pretrained, device=self.device, seed=int(self.params.get("seed", 0)),
                                        text_only=True)
        return self._encoder

    def to(self, device: str) -> "ClipRetriever":
        """Encode queries on ``device`` (a loaded model is rebuilt there on the next search)."""
        if device != self.device:
            self.device = device
            self._encoder = None
        return self

    def skip_report(self) -> str:
        n_kb = self.params.get("n_kb", len(self.ids))
        head = f"CLIP {self.params.get('embed')} index ({self.params.get('index')}): {self.index.ntotal}/{n_kb} pairs"
        if not self.skipped:
            return head + ", nothing skipped"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        examples = ", ".join(list(self.skipped_ids)[:5])
        return f"{head}; skipped {sum(self.skipped.values())}: {parts} (e.g. {examples})"

    def search(self, queries: Sequence[str], k: int, exclude_ids: Sequence[str | None] | None = None,
               query_ids: Sequence[str] | None = None, batch_size: int = 256) -> SearchResult:
        """Top-k pairs per text query by CLIP similarity, best first. Empty queries get no neighbours."""
        queries = [str(q) for q in queries]
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if exclude_ids is not None and len(exclude_ids) != len(queries):
            raise ValueError(f"{len(exclude_ids)} exclude_ids for {len(queries)} queries")
        ids: list[list[str]] = [[] for _ in queries]
        scores: list[list[float]] = [[] for _ in queries]
        live = [i for i, q in enumerate(queries) if q.strip()]
        if not live or self.index.ntotal == 0:
            return SearchResult(ids, scores)
        for s in range(0, len(live), batch_size):
            part = live[s:s + batch_size]
            qv = self.encoder.encode_texts([queries[i] for i in part])
            excl = None if exclude_ids is None else [exclude_ids[i] for i in part]
            res = self.search_vectors(qv, k, excl)
            for j, i in enumerate(part):
                ids[i], scores[i] = res.ids[j], res.scores[j]
        return SearchResult(ids, scores)

    def search_vectors(self, vectors: np.ndarray, k: int,
                       exclude_ids: Sequence[str | None] | None = None) -> SearchResult:
        """Top-k for query embeddings (rows are L2-normalised here), best first."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.ascontiguousarray(vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.index.d:
            raise ValueError(f"query vectors must be (B, {self.index.d}), got {q.shape}")
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        ntotal = self.index.ntotal
        need = k + (1 if exclude_ids is not None and any(e is not None for e in exclude_ids) else 0)
        rerank = int(self.params.get("rerank", 0) or 0) if self.params.get("index") == "ivfpq" else 0
        fetch = min(ntotal, need * rerank if rerank > 1 else need)
        if fetch == 0 or len(q) == 0:
            return SearchResult([[] for _ in q], [[] for _ in q])
        D, I = self.index.search(q, fetch)
        out_ids, out_scores = [], []
        for b in range(len(q)):
            labels = I[b][I[b] >= 0]
            dist = D[b][I[b] >= 0]
            rows = self.rows[labels]
            if rerank > 1 and len(rows):
                order_rows = np.argsort(rows, kind="stable")  # sorted reads from the memmap
                exact = np.empty(len(rows), dtype=np.float32)
                exact[order_rows] = np.asarray(self.embeddings[rows[order_rows]], dtype=np.float32) @ q[b]
                order = np.argsort(-exact, kind="stable")
                rows, dist = rows[order], exact[order]
            excl = None if exclude_ids is None else exclude_ids[b]
            row_ids, row_scores = [], []
            for r, d in zip(rows, dist):
                pid = self.ids[r]
                if excl is not None and pid == excl:
                    continue
                row_ids.append(pid)
                row_scores.append(float(d))
                if len(row_ids) == k:
                    break
            out_ids.append(row_ids)
            out_scores.append(row_scores)
        return SearchResult(out_ids, out_scores)

    # -- storage ---------------------------------------------------------------------------------
    def _save(self, folder: Path) -> dict[str, Any]:
        faiss = _faiss()
        faiss.write_index(self.index, str(folder / "index.faiss"))
        if self.embeddings_path is not None and self.embeddings_path.is_file():
            shutil.copyfile(self.embeddings_path, folder / EMBEDDINGS_FILE)
        else:
            np.save(folder / EMBEDDINGS_FILE, np.asarray(self.embeddings, dtype=np.float32))
        np.save(folder / "rows.npy", self.rows)
        (folder / "ids.json").write_text(json.dumps(self.ids))
        (folder / "skipped.json").write_text(json.dumps(self.skipped_ids, indent=0))
        cfg = self.params.get("model_cfg")
        if cfg is not None:
            (folder / "model_config").mkdir()
            (folder / "model_config" / f"{self.params['model_name']}.json").write_text(json.dumps(cfg, indent=2))
        faiss_version = getattr(faiss, "__version__", None)
        return dict(self.params) | {"faiss": faiss_version}

    @classmethod
    def _load(cls, folder: Path, manifest: dict[str, Any], mmap: bool = True) -> "ClipRetriever":
        folder = Path(folder)
        params = dict(manifest.get("params", {}))
        for name in ("index.faiss", EMBEDDINGS_FILE, "rows.npy", "ids.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is an incomplete CLIP index: {name} is missing")
        index, how = read_faiss_index(folder / "index.faiss", params.get("index", "flat"), mmap=mmap)
        _apply_search_params(index, params)
        ids = json.loads((folder / "ids.json").read_text())
        rows = np.load(folder / "rows.npy")
        emb = np.load(folder / EMBEDDINGS_FILE, mmap_mode="r" if mmap else None)
        skipped_path = folder / "skipped.json"
        skipped_ids = json.loads(skipped_path.read_text()) if skipped_path.is_file() else {}
        cfg_path = folder / "model_config" / f"{params.get('model_name')}.json"
        r = cls(index, ids, rows, emb, params, skipped_ids=skipped_ids, embeddings_path=folder / EMBEDDINGS_FILE,
                model_config_path=cfg_path if cfg_path.is_file() else None)
        r.read_mode = how
        return r
