"""KNN-ImageText training triples (Sec. 3.2 "Model Training"): for every (image, text) pair of a collection, its
top-k neighbours in the same collection by text-to-text BM25, the pair itself excluded.

``build_triples(kb, out)`` writes the triples table ``reimagen.training.data.TripleData.from_table`` reads:

    id               str          the pair's id
    text             str          its caption
    image            str          its image reference made absolute (``kb.absolute_ref``): readable from anywhere
    neighbor_ids     list<str>    exactly k neighbour ids, best first
    neighbor_scores  list<float>  their retrieval scores (float32)

Fixed K: the trainer needs exactly k neighbours per row, so a pair whose query retrieves fewer than k
neighbours (a caption sharing no -- or too few -- tokens with any other caption; see ``bm25`` for which
documents a query retrieves) is DROPPED from the table, and counted in the report. A dropped pair is then not
a pair of the table any more, so it cannot be anybody's neighbour either: rows that had it among their
neighbours are re-queried with the dropped pairs excluded (and dropped in turn if fewer than k remain), until
every neighbour of every row is a row of the table. Neighbours are therefore "the top k among the pairs of
the table". With ``exclude_duplicate_texts=True`` a neighbour whose caption is exactly the query's caption
(string equality) is skipped too, and more candidates are fetched so that k remain when the collection has
them.

Resumable: rows are processed in chunks of ``batch_size`` queries, each written atomically (temporary name,
then rename) to ``<out>.parts/chunk-00000.parquet``, ... next to a ``manifest.json`` of the settings (the
collection's fingerprint, k, duplicate exclusion, chunk size, retriever kind and parameters). A rerun skips
the chunks already written -- refusing if they were written with other settings -- then concatenates
everything into ``out`` (atomically) and removes the parts; if ``out`` is already complete with the same
settings, nothing is recomputed. The report (``TriplesReport``; also stored in
the table's metadata, read back with ``triples_report(out)``) counts rows written, rows dropped for too few
neighbours, re-queried rows and duplicate captions excluded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..utils.atomic import replacing_path, write_json
from .base import KnowledgeBase, Retriever

FORMAT_VERSION = 1
METADATA_KEY = b"reimagen_triples"
_EXTRA_CAP = 64  # extra candidates fetched up front per excluded pair (more are fetched by doubling if needed)
_CANDIDATE_BUDGET = 1 << 20  # queries x candidates per search call (bounds memory with large fetches)


@dataclass
class TriplesReport:
    pairs: int = 0  # pairs in the knowledge base
    rows_written: int = 0  # rows of the triples table (each with exactly k neighbours)
    dropped_too_few: int = 0  # queries that retrieved fewer than k neighbours (self and duplicates excluded)
    requeried: int = 0  # rows re-queried because one of their neighbours had been dropped
    dropped_after_requery: int = 0  # of those, rows left with fewer than k neighbours, dropped too
    duplicates_excluded: int = 0  # candidate neighbours skipped because their text equals the query's
    rows_with_duplicates: int = 0  # rows for which at least one such candidate was skipped
    chunks: int = 0
    chunks_resumed: int = 0  # chunks found on disk from an earlier (interrupted) run
    k: int = 0
    exclude_duplicate_texts: bool = False
    seconds: float = 0.0
    dropped_ids: list[str] = field(default_factory=list)  # (first 100) ids of dropped pairs

    def __str__(self) -> str:
        lines = [f"triples: {self.rows_written} of {self.pairs} pairs written with k={self.k} neighbours",
                 f"  dropped, fewer than k neighbours: {self.dropped_too_few}"]
        if self.requeried:
            lines.append(f"  re-queried (a neighbour was dropped): {self.requeried}, "
                         f"of which dropped: {self.dropped_after_requery}")
        if self.exclude_duplicate_texts:
            lines.append(f"  duplicate captions excluded: {self.duplicates_excluded} candidates "
                         f"({self.rows_with_duplicates} rows)")
        lines.append(f"  chunks: {self.chunks} ({self.chunks_resumed} resumed), {self.seconds:.1f} s")
        return "\n".join(lines)


def triples_report(path: str | Path) -> TriplesReport:
    """The report stored in a triples table written by ``build_triples``."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in meta:
        raise ValueError(f"{path} has no build_triples report (not written by build_triples?)")
    rep = json.loads(meta[METADATA_KEY])["report"]
    return TriplesReport(**{k: v for k, v in rep.items() if k in TriplesReport.__dataclass_fields__})


def kb_fingerprint(kb: KnowledgeBase) -> str:
    """sha256 of the collection's ids, texts and image references (in order)."""
    h = hashlib.sha256()
    for col in (kb.ids, kb.texts, kb.image_refs):
        for s in col:
            h.update(s.encode("utf-8", "surrogatepass"))
            h.update(b"\x00")
        h.update(b"\x01")
    return h.hexdigest()


_DEFAULT_BM25 = {"k1": 1.5, "b": 0.75, "epsilon": 0.25, "stopwords": False}
_SETTING_PARAMS = ("k1", "b", "epsilon", "stopwords", "tokenizer_version", "model", "metric")


def _retriever_settings(retriever: Retriever | None) -> dict[str, Any]:
    if retriever is None:
        from .bm25 import TOKENIZER_VERSION

        return {"kind": "bm25", "params": dict(_DEFAULT_BM25, tokenizer_version=TOKENIZER_VERSION)}
    params = getattr(retriever, "params", None) or {}
    return {"kind": retriever.kind or type(retriever).__name__,
            "params": {k: params[k] for k in _SETTING_PARAMS if k in params}}


def _atomic_write_table(table, path: Path) -> None:
    import pyarrow.parquet as pq

    with replacing_path(path) as tmp:
        pq.write_table(table, tmp)


# ----------------------------------------------------------------------------------------------
# Neighbour selection
# ----------------------------------------------------------------------------------------------
class _Ctx:
    """What every chunk needs: the collection, its row index, duplicate counts and the (lazy) retriever."""

    def __init__(self, kb: KnowledgeBase, retriever: Retriever | None, k: int, exclude_dup: bool, progress: bool,
                 threads: int = 1):
        self.kb, self.k, self.exclude_dup, self.progress, self.threads = kb, k, exclude_dup, progress, threads
        self._retriever = retriever
        if retriever is not None and hasattr(retriever, "threads"):
            retriever.threads = threads
        self.index = {pid: i for i, pid in enumerate(kb.ids)}
        counts = Counter(kb.texts) if exclude_dup else None
        self.dup_others = [counts[t] - 1 for t in kb.texts] if counts is not None else None

    @property
    def retriever(self) -> Retriever:
        if self._retriever is None:
            from .bm25 import BM25Retriever

            self._retriever = BM25Retriever.from_knowledge_base(self.kb, progress=self.progress)
            self._retriever.threads = self.threads
        return self._retriever


def _neighbours(ctx: _Ctx, rows: list[int], banned: frozenset[int] | set[int] = frozenset()
                ) -> dict[int, tuple[list[int], list[float], int]]:
    """Per query row: (neighbour rows, scores, duplicates skipped) -- k neighbours, or fewer when the
    collection has fewer (self, ``banned`` rows and, optionally, same-text rows excluded)."""
    kb, k = ctx.kb, ctx.k
    fetch: dict[int, int] = {}
    for r in rows:
        extra = min(len(banned), _EXTRA_CAP)
        if ctx.dup_others is not None:
            extra += min(ctx.dup_others[r], _EXTRA_CAP)
        fetch[r] = k + extra
    out: dict[int, tuple[list[int], list[float], int]] = {}
    pending = list(rows)
    while pending:
        groups: dict[int, list[int]] = defaultdict(list)
        for r in pending:
            groups[fetch[r]].append(r)
        pending = []
        for f, rs in sorted(groups.items()):
            step = max(1, _CANDIDATE_BUDGET // f)
            for s in range(0, len(rs), step):
                part = rs[s:s + step]
                qids = [kb.ids[r] for r in part]
                res = ctx.retriever.search([kb.texts[r] for r in part], f, exclude_ids=qids, query_ids=qids)
                for r, ids, scores in zip(part, res.ids, res.scores):
                    q = kb.texts[r]
                    nb: list[int] = []
                    sc: list[float] = []
                    ndup = 0
                    for pid, score in zip(ids, scores):
                        j = ctx.index.get(pid)
                        if j is None:
                            raise ValueError(f"the retriever returned id {pid!r}, which is not in the knowledge base "
                                             f"{kb.name or '(unnamed)'}: it must be built on the same collection")
                        if j == r or j in banned:
                            continue
                        if ctx.exclude_dup and kb.texts[j] == q:
                            ndup += 1
                            continue
                        nb.append(j)
                        sc.append(float(score))
                        if len(nb) == k:
                            break
                    if len(nb) == k or len(ids) < f:
                        out[r] = (nb, sc, ndup)  # complete, or the retriever has no more candidates
                    else:
                        fetch[r] = 2 * f  # all candidates fetched were excluded: fetch more
                        pending.append(r)
    return out


def _compute_chunk(ctx: _Ctx, lo: int, hi: int):
    """Rows [lo, hi): the pyarrow table of kept rows (row, neighbor_rows, neighbor_scores) and chunk stats."""
    import pyarrow as pa

    got = _neighbours(ctx, list(range(lo, hi)))
    keep = [r for r in range(lo, hi) if len(got[r][0]) == ctx.k]
    dropped = [r for r in range(lo, hi) if len(got[r][0]) < ctx.k]
    stats = {"lo": lo, "hi": hi, "dropped": dropped,
             "duplicates_excluded": sum(got[r][2] for r in range(lo, hi)),
             "rows_with_duplicates": sum(1 for r in range(lo, hi) if got[r][2])}
    table = pa.table({"row": pa.array(keep, type=pa.int64()),
                      "neighbor_rows": pa.array([got[r][0] for r in keep], type=pa.list_(pa.int64())),
                      "neighbor_scores": pa.array([got[r][1] for r in keep], type=pa.list_(pa.float32()))})
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(stats).encode()}), stats


def _read_chunk(path: Path, lo: int, hi: int):
    """A chunk written earlier, or None if it is unreadable or covers other rows."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        stats = json.loads((table.schema.metadata or {})[METADATA_KEY])
    except Exception:  # noqa: BLE001  (a damaged part is recomputed)
        return None
    if stats.get("lo") != lo or stats.get("hi") != hi:
        return None
    return table, stats


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def build_triples(kb: KnowledgeBase, out: str | Path, k: int = 2, retriever: Retriever | None = None,
                  exclude_duplicate_texts: bool = False, batch_size: int = 1024, resume: bool = True,
                  progress: bool = True, threads: int = 1, rank: int = 0, world_size: int = 1,
                  wait_timeout: float = 7 * 24 * 3600.0) -> Path | None:
    """Write the KNN-ImageText triples table of ``kb`` to ``out`` (parquet; see the module docstring) and
    return its path. ``retriever`` defaults to a ``BM25Retriever`` built on ``kb`` (it must be built on
    ``kb``: its ids are looked up in it). ``resume=False`` discards the parts of an earlier run. The report
    is printed when ``progress`` and stored in the table (``triples_report(out)``). ``threads`` score each
    chunk's queries in parallel (BM25 with numba); the table does not depend on it.

    Several processes (torchrun's RANK / WORLD_SIZE): rank r computes chunks r, r + W, ... (each querying its
    own, ideally memory-mapped, copy of the index); rank 0 then waits for the others' chunks (up to
    ``wait_timeout`` seconds), does the fix-up and writes ``out``; the other ranks return None. The table is
    the same for any number of processes."""
    import pyarrow as pa

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(kb) == 0:
        raise ValueError("the knowledge base is empty")
    if world_size > 1 and not resume:
        raise ValueError("--no-resume with several processes would let one delete the others' chunks: delete "
                         f"{Path(out).name}.parts yourself, then launch again")
    if retriever is not None and getattr(retriever, "ids", None) is not None and list(retriever.ids) != kb.ids:
        raise ValueError("the retriever was built on another collection (its ids differ from the knowledge base's)")
    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = out.with_name(out.name + ".parts")
    settings = {"format_version": FORMAT_VERSION, "n_pairs": len(kb), "kb_fingerprint": kb_fingerprint(kb), "k": k,
                "exclude_duplicate_texts": bool(exclude_duplicate_texts), "batch_size": batch_size,
                "retriever": _retriever_settings(retriever)}
    if resume and out.is_file() and not parts.exists() and _settings_of(out) == settings:
        if progress:
            from rich.console import Console

            Console(stderr=True).print(f"{out} is already complete (same settings); nothing to do", highlight=False)
        return out
    _prepare_parts(parts, settings, resume)

    ctx = _Ctx(kb, retriever, k, exclude_duplicate_texts, progress, threads)
    n = len(kb)
    n_chunks = (n + batch_size - 1) // batch_size
    report = TriplesReport(pairs=n, k=k, exclude_duplicate_texts=bool(exclude_duplicate_texts), chunks=n_chunks)
    chunk_path = [parts / f"chunk-{c:05d}.parquet" for c in range(n_chunks)]
    bounds = [(c * batch_size, min(n, (c + 1) * batch_size)) for c in range(n_chunks)]
    mine = [c for c in range(n_chunks) if c % world_size == rank]
    resumed = _compute_chunks(ctx, mine, chunk_path, bounds, progress, f"triples k={k} (chunks of {batch_size}"
                              + (f", rank {rank}/{world_size})" if world_size > 1 else ")"))
    if rank != 0:
        return None
    from ..utils.launch import wait_for_others

    wait_for_others(lambda: sum(1 for f in chunk_path if not f.is_file()), "triples chunks", wait_timeout,
                    world_size, (lambda m: print(m, flush=True)) if progress else None)
    tables, dropped = [], []
    for c in range(n_chunks):
        got = _read_chunk(chunk_path[c], *bounds[c])
        if got is None:  # damaged: recompute it here
            got = _compute_chunk(ctx, *bounds[c])
            _atomic_write_table(got[0], chunk_path[c])
        table, stats = got
        tables.append(table)
        dropped.extend(stats["dropped"])
        report.duplicates_excluded += stats["duplicates_excluded"]
        report.rows_with_duplicates += stats["rows_with_duplicates"]
    report.chunks_resumed = resumed
    report.dropped_too_few = len(dropped)

    nbr, scr, banned = _without_dropped(ctx, tables, dropped, report)
    report.dropped_ids = [kb.ids[r] for r in sorted(banned)[:100]]

    keep = sorted(nbr)
    ids = kb.ids
    table = pa.table({
        "id": pa.array([ids[r] for r in keep], type=pa.string()),
        "text": pa.array([kb.texts[r] for r in keep], type=pa.string()),
        "image": pa.array([kb.absolute_ref(r) for r in keep], type=pa.string()),
        "neighbor_ids": pa.array([[ids[j] for j in nbr[r]] for r in keep], type=pa.list_(pa.string())),
        "neighbor_scores": pa.array([scr[r] for r in keep], type=pa.list_(pa.float32())),
    })
    report.rows_written = len(keep)
    report.seconds = round(time.perf_counter() - t0, 3)
    meta = {"settings": settings, "report": asdict(report), "knowledge_base": kb.name}
    _atomic_write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), out)
    shutil.rmtree(parts, ignore_errors=True)
    if progress:
        from rich.console import Console

        Console(stderr=True).print(str(report), highlight=False)
    return out


def _compute_chunks(ctx: "_Ctx", chunks: list[int], paths: list[Path], bounds: list[tuple[int, int]],
                    progress: bool, description: str) -> int:
    """Compute and write the ``chunks`` not already on disk; returns how many were (a damaged one is recomputed
    when the table is assembled)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    resumed = 0
    with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), disable=not progress) as bar:
        task = bar.add_task(description, total=len(chunks))
        for c in chunks:
            if paths[c].exists():
                resumed += 1
            else:
                _atomic_write_table(_compute_chunk(ctx, *bounds[c])[0], paths[c])
            bar.advance(task)
    return resumed


def _without_dropped(ctx: "_Ctx", tables: list, dropped: list[int], report: TriplesReport
                     ) -> tuple[dict[int, list[int]], dict[int, list[float]], set[int]]:
    """Rows -> (neighbour rows, scores), then the fix-up: nobody may keep a dropped pair (one with fewer than k
    neighbours) as a neighbour. Rows that had one are queried again without the dropped pairs, which can drop
    them in turn, until nothing changes. Returns the kept rows' neighbours and scores, and every dropped row."""
    import pyarrow as pa

    merged = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    rows = merged.column("row").to_pylist()
    nbr = dict(zip(rows, merged.column("neighbor_rows").to_pylist()))
    scr = dict(zip(rows, merged.column("neighbor_scores").to_pylist()))
    banned = set(dropped)
    new_drops = set(dropped)
    while new_drops:
        affected = [r for r in nbr if any(j in new_drops for j in nbr[r])]
        new_drops = set()
        if not affected:
            break
        report.requeried += len(affected)
        got = _neighbours(ctx, affected, banned)
        for r in affected:
            nb, sc, _ = got[r]
            if len(nb) == ctx.k:
                nbr[r], scr[r] = nb, sc
            else:
                new_drops.add(r)
                del nbr[r], scr[r]
        report.dropped_after_requery += len(new_drops)
        banned |= new_drops
    return nbr, scr, banned


def _settings_of(path: Path) -> dict[str, Any] | None:
    import pyarrow.parquet as pq

    try:
        return json.loads((pq.read_schema(path).metadata or {})[METADATA_KEY])["settings"]
    except Exception:  # noqa: BLE001
        return None


def _prepare_parts(parts: Path, settings: dict[str, Any], resume: bool) -> None:
    """Create ``parts`` with its settings manifest, or check that an existing one has the same settings."""
    manifest = parts / "manifest.json"
    if parts.exists() and not resume:
        shutil.rmtree(parts)
    if parts.exists():
        if manifest.is_file():
            try:
                old = json.loads(manifest.read_text())
            except ValueError:
                old = None
            if old != settings:
                diff = sorted(key for key in set(settings) | set(old or {})
                              if (old or {}).get(key) != settings.get(key))
                raise ValueError(
                    f"{parts} holds chunks of an earlier build_triples run with other settings (differing: "
                    f"{', '.join(diff) or 'unreadable manifest'}); delete {parts} or pass resume=False to start over")
            return
        if any(parts.glob("chunk-*.parquet")):
            raise ValueError(f"{parts} holds chunks but no manifest.json, so their settings are unknown; delete it "
                             "or pass resume=False to start over")
    parts.mkdir(parents=True, exist_ok=True)
    write_json(manifest, settings, indent=2, sort_keys=True)


__all__ = ["build_triples", "triples_report", "TriplesReport", "kb_fingerprint"]
