"""Retrieval commands of ``reimagen-eval``: ``index build``, ``index info``, ``retrieve``, ``triples``.

The application (reimagen_eval/cli.py) registers them::

    from .retrieval.cli import index_app, retrieve, triples
    app.add_typer(index_app, name="index")
    app.command()(retrieve)
    app.command()(triples)

Every command turns bad input (unknown retriever, missing index folder, k < 1, an empty knowledge base, a
missing weights file) into a one-line red error and exit code 2. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..utils.cliutil import friendly

err_console = Console(stderr=True)

RETRIEVER_KINDS = ("bm25", "bm25-rank", "clip", "precomputed")
INDEX_TYPES = ("flat", "ivfpq", "hnsw")
EMBED_MODES = ("image", "text", "both")
_TEXT_KEYS = ("text", "query", "prompt", "caption")
_ID_KEYS = ("id", "query_id")


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")
    return value


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def _open_kb(spec: str):
    from .readers import open_knowledge_base

    kb = open_knowledge_base(spec)
    err_console.print(escape(kb.skip_report()), highlight=False)
    if len(kb) == 0:
        raise ValueError(f"knowledge base {spec} is empty: nothing to index or retrieve from")
    return kb


def _read_manifest(folder: Path) -> dict[str, Any]:
    from .base import MANIFEST

    mf = Path(folder) / MANIFEST
    if not mf.is_file():
        raise FileNotFoundError(f"{folder} is not a saved index (no {MANIFEST}); build one with "
                                "`reimagen-eval index build`")
    try:
        return json.loads(mf.read_text())
    except ValueError as err:
        raise ValueError(f"{mf} is not valid JSON ({err})") from None


def _load_index(folder: Path, manifest: dict[str, Any]):
    """load_retriever, importing only the module of the manifest's kind (so a saved CLIP index loads even when
    an unrelated retriever module is unavailable)."""
    import importlib

    from .base import load_retriever

    module = {"clip": "clip", "precomputed": "precomputed", "bm25": "bm25", "bm25-rank": "bm25"}.get(
        str(manifest.get("kind")))
    if module is not None:
        importlib.import_module(f"{__package__}.{module}")
    return load_retriever(folder)


# ----------------------------------------------------------------------------------------------
# index build / index info
# ----------------------------------------------------------------------------------------------
index_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        help="Build and inspect saved retrieval indexes (BM25, CLIP + faiss, precomputed neighbours).")


@index_app.command("build")
@friendly
def index_build(
    kb: str = typer.Option(..., "--kb", help="Knowledge base: FORMAT:PATH[?key=value] (coco, wikiimages, webdataset, "
                           "parquet, folder) or a .parquet table written by KnowledgeBase.to_parquet."),
    retriever: str = typer.Option("bm25", "--retriever", help="bm25 (fast BM25, the paper's default), bm25-rank "
                                  "(rank-bm25 reference), clip (open-clip embeddings in faiss) or precomputed "
                                  "(neighbours from --neighbours)."),
    out: Path = typer.Option(..., "--out", help="Index folder to write (replaced atomically if it exists)."),
    clip_model: str = typer.Option("ViT-B-32", "--clip-model", help="clip: open-clip architecture (e.g. ViT-B-32, "
                                   "ViT-L-14), an hf-hub:/local-dir: reference or a JSON model config file."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="clip: open-clip weights tag (e.g. "
                                             "laion2b_s34b_b79k; downloaded) or a local checkpoint file. Without it "
                                             "the model has random weights (for tests only)."),
    index: str = typer.Option("flat", "--index", help="clip: faiss index: flat (exact), ivfpq (compressed, "
                              "approximate, re-ranked exactly) or hnsw (graph, approximate)."),
    embed: str = typer.Option("image", "--embed", help="clip: keys are image embeddings (text -> image), text "
                              "embeddings (text -> text) or both (normalised mean)."),
    batch_size: int = typer.Option(64, "--batch-size", help="clip: images/texts per CLIP forward pass."),
    device: str = typer.Option("cpu", "--device", help="clip: torch device, e.g. cuda."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="clip: folder of the resumable embedding file "
                                            "(default OUT.partial; removed after a successful build). Rerunning "
                                            "after an interruption continues where it stopped."),
    nlist: Optional[int] = typer.Option(None, "--nlist", help="clip ivfpq: coarse cells (default ~4*sqrt(N))."),
    pq_m: Optional[int] = typer.Option(None, "--pq-m", help="clip ivfpq: PQ sub-quantizers, must divide the "
                                       "embedding dimension (default: largest divisor <= dim/4)."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", help="clip ivfpq: cells visited per query "
                                         "(default ~sqrt(nlist))."),
    hnsw_m: int = typer.Option(32, "--hnsw-m", help="clip hnsw: graph links per vector."),
    seed: int = typer.Option(0, "--seed", help="clip: seed of random weights and of the IVF-PQ training sample."),
    neighbours: Optional[Path] = typer.Option(None, "--neighbours", help="precomputed: neighbour table (.parquet; "
                                              "wide: query_id, neighbor_ids[, neighbor_scores] or long: query_id, "
                                              "neighbor_id[, score, rank])."),
) -> None:
    """Build a retrieval index over a knowledge base and save it to a folder (with a manifest.json)."""
    _choice(retriever, RETRIEVER_KINDS, "retriever")
    _choice(index, INDEX_TYPES, "index type")
    _choice(embed, EMBED_MODES, "embed mode")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if retriever == "precomputed" and neighbours is None:
        raise ValueError("--retriever precomputed needs --neighbours TABLE.parquet")
    if neighbours is not None and not neighbours.is_file():
        raise FileNotFoundError(f"neighbour table {neighbours} does not exist")
    knowledge = _open_kb(kb)
    partial = None
    if retriever in ("bm25", "bm25-rank"):
        from . import bm25

        cls = bm25.BM25Retriever if retriever == "bm25" else bm25.RankBM25Retriever
        r = cls.from_knowledge_base(knowledge) if hasattr(cls, "from_knowledge_base") \
            else cls.build(knowledge.texts, knowledge.ids)
    elif retriever == "clip":
        from .clip import ClipRetriever

        partial = work_dir if work_dir is not None else out.with_name(out.name + ".partial")
        r = ClipRetriever.build(knowledge, model_name=clip_model, pretrained=pretrained, index=index, embed=embed,
                                batch_size=batch_size, device=device, work_dir=partial, nlist=nlist, pq_m=pq_m,
                                nprobe=nprobe, hnsw_m=hnsw_m, seed=seed, progress=True)
        if r.resumed_from:
            err_console.print(f"resumed the embeddings after {r.resumed_from} finished rows", highlight=False)
    else:
        from .precomputed import PrecomputedRetriever

        r = PrecomputedRetriever.from_parquet(neighbours)
        unknown = {n for ids in r.table.column("neighbor_ids").to_pylist() for n in (ids or []) if n not in knowledge}
        if unknown:
            err_console.print(f"[yellow]warning:[/] {len(unknown)} neighbour ids are not in the knowledge base "
                              f"(e.g. {escape(', '.join(sorted(unknown)[:3]))})", highlight=False)
    r.save(out, source=kb)
    if retriever == "clip" and work_dir is None and partial is not None:
        import shutil

        shutil.rmtree(partial, ignore_errors=True)
    err_console.print(f"saved a {r.kind} index of {len(knowledge)} pairs to {escape(str(out))}", highlight=False)


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "model_cfg":
            rows += _flatten(value, name + ".")
        elif isinstance(value, (dict, list)):
            rows.append((name, json.dumps(value, separators=(",", ":"))))
        else:
            rows.append((name, str(value)))
    return rows


@index_app.command("info")
@friendly
def index_info(folder: Path = typer.Argument(..., help="A saved index folder (with manifest.json).")) -> None:
    """Print an index's manifest (kind, source, parameters) and its files as a table."""
    manifest = _read_manifest(folder)
    table = Table(title=f"index {escape(str(folder))}", show_header=True)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    params = manifest.get("params", {})
    for key in ("kind", "source", "created", "format_version"):
        if key in manifest:
            table.add_row(key, escape(str(manifest[key])))
    for key, value in _flatten(params, "params."):
        table.add_row(escape(key), escape(value))
    for key, value in manifest.items():
        if key not in ("kind", "source", "created", "format_version", "params"):
            table.add_row(escape(key), escape(json.dumps(value)))
    size = sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
    files = ", ".join(sorted(p.name for p in Path(folder).iterdir()))
    table.add_row("files", escape(f"{files} ({size / 1e6:.2f} MB)"))
    Console().print(table)


# ----------------------------------------------------------------------------------------------
# retrieve
# ----------------------------------------------------------------------------------------------
def read_queries(path: Path) -> list[tuple[Optional[str], str]]:
    """(id or None, text) per query from .jsonl ({"text"|"query"|"prompt"|"caption", "id"|"query_id"} objects or
    strings), .csv/.tsv (same column names) or any other file as one query per non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"queries file {path} does not exist")
    suffix = path.suffix.lower()
    out: list[tuple[Optional[str], str]] = []
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        items = json.loads(text) if suffix == ".json" else None
        if items is None:
            items = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        items.append(json.loads(line))
                    except ValueError as err:
                        raise ValueError(f"{path}:{n}: invalid JSON ({err})") from None
        for n, item in enumerate(items, 1):
            if isinstance(item, str):
                out.append((None, item))
            elif isinstance(item, dict):
                text_key = next((k for k in _TEXT_KEYS if k in item), None)
                id_key = next((k for k in _ID_KEYS if k in item), None)
                if text_key is None and id_key is None:
                    raise ValueError(f"{path}: query {n} has neither a text ({'/'.join(_TEXT_KEYS)}) nor an id")
                out.append((None if id_key is None else str(item[id_key]),
                            "" if text_key is None else str(item[text_key] or "")))
            else:
                raise ValueError(f"{path}: query {n} must be a string or an object, got {type(item).__name__}")
    elif suffix in (".csv", ".tsv"):
        import pandas as pd

        df = pd.read_csv(path, dtype=str, keep_default_na=False, sep="\t" if suffix == ".tsv" else ",")
        text_col = next((c for c in _TEXT_KEYS if c in df.columns), None)
        id_col = next((c for c in _ID_KEYS if c in df.columns), None)
        if text_col is None and id_col is None:
            raise ValueError(f"{path}: needs a text column ({', '.join(_TEXT_KEYS)}) or an id column "
                             f"({', '.join(_ID_KEYS)}); columns: {list(df.columns)}")
        for _, row in df.iterrows():
            out.append((row[id_col] if id_col else None, row[text_col] if text_col else ""))
    else:
        out = [(None, line.strip()) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


def _jsonable(x: float) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def write_results(path: Path, records: list[dict[str, Any]]) -> Path:
    """Write retrieval results atomically as .jsonl or .parquet."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        with open(tmp, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("query_id", pa.string()), ("query", pa.string()),
                            ("neighbor_ids", pa.list_(pa.string())), ("neighbor_scores", pa.list_(pa.float64())),
                            ("neighbor_texts", pa.list_(pa.string()))])
        pq.write_table(pa.Table.from_pylist(records, schema=schema), tmp)
    os.replace(tmp, path)
    return path


def retrieve(
    index: Path = typer.Option(..., "--index", help="A saved index folder (reimagen-eval index build)."),
    kb: Optional[str] = typer.Option(None, "--kb", help="Knowledge base of the index, for neighbour texts and "
                                     "--query-id lookups (default: the source recorded in the index manifest)."),
    query: list[str] = typer.Option([], "--query", help="A query text (repeat the option)."),
    query_id: list[str] = typer.Option([], "--query-id", help="A query id (repeat): the query is that pair's text; "
                                       "precomputed indexes look neighbours up by id."),
    queries: Optional[Path] = typer.Option(None, "--queries", help="Queries file: .jsonl (objects with text and "
                                           "optional id, or strings), .csv/.tsv (text/id columns) or .txt (one per "
                                           "line)."),
    k: int = typer.Option(2, "-k", "--k", help="Neighbours per query (the paper: 2)."),
    exclude_self: bool = typer.Option(False, "--exclude-self", help="Never return a query's own id (queries with ids)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results to FILE.jsonl or FILE.parquet "
                                       "(query_id, query, neighbor_ids, neighbor_scores, neighbor_texts)."),
    device: str = typer.Option("cpu", "--device", help="clip: torch device for encoding queries."),
    threads: int = typer.Option(1, "--threads", min=1, help="bm25: threads scoring the queries (numba)."),
) -> None:
    """Retrieve the top-k knowledge-base pairs of text queries from a saved index and print them."""
    _check_k(k)
    if out is not None and out.suffix.lower() not in (".jsonl", ".parquet"):
        raise ValueError(f"--out must end in .jsonl or .parquet, got {out.name}")
    manifest = _read_manifest(index)
    items: list[tuple[Optional[str], str]] = [(None, q) for q in query] + [(i, None) for i in query_id]
    if queries is not None:
        items += read_queries(queries)
    if not items:
        raise ValueError("no queries: pass --query TEXT, --query-id ID or --queries FILE")
    spec = kb or manifest.get("source")
    if not spec:
        raise ValueError(f"{index} records no knowledge-base source: pass --kb")
    knowledge = _open_kb(spec)
    if k > len(knowledge):
        raise ValueError(f"-k {k} is larger than the knowledge base ({len(knowledge)} pairs); pass -k {len(knowledge)} "
                         "or less")
    texts, ids = [], []
    for qid, text in items:
        if text is None:
            text = knowledge.texts[knowledge.index_of(qid)] if qid in knowledge else ""
            if qid not in knowledge and manifest.get("kind") != "precomputed":
                err_console.print(f"[yellow]warning:[/] query id {escape(qid)} is not in the knowledge base "
                                  "(empty query, no neighbours)", highlight=False)
        texts.append(text)
        ids.append(qid)
    query_ids = [q if q is not None else "" for q in ids] if any(q is not None for q in ids) else None
    exclude = [q for q in ids] if exclude_self else None

    r = _load_index(index, manifest)
    if hasattr(r, "to") and device != "cpu":
        r.to(device)
    if hasattr(r, "threads"):
        r.threads = threads
    res = r.search(texts, k, exclude_ids=exclude, query_ids=query_ids)
    empty = sum(1 for row in res.ids if not row)
    if empty:
        err_console.print(f"note: {empty} of {len(texts)} queries matched nothing in the index (empty, only "
                          "stopwords, or no word the index knows): they get no neighbours", highlight=False)
    if getattr(r, "last_missing", 0):
        err_console.print(f"[yellow]warning:[/] {r.last_missing} query ids have no precomputed neighbours",
                          highlight=False)

    def text_of(pid: str) -> Optional[str]:
        return knowledge.texts[knowledge.index_of(pid)] if pid in knowledge else None

    table = Table(title=f"top-{k} from {escape(str(index))} ({escape(str(manifest.get('kind')))})")
    for col in ("query", "rank", "neighbour id", "score", "neighbour text"):
        table.add_column(col, overflow="fold")
    records = []
    for qi, (qid, text) in enumerate(zip(ids, texts)):
        label = escape(text) if text.strip() else "[dim](empty query)[/]"
        if qid is not None:
            label = escape(f"[{qid}] ") + label
        nids, nscores = res.ids[qi], res.scores[qi]
        if not nids:
            table.add_row(label, "-", "-", "-", "[dim](no neighbours)[/]", end_section=True)
        for rank, (pid, score) in enumerate(zip(nids, nscores)):
            t = text_of(pid)
            table.add_row(label if rank == 0 else "", str(rank + 1), escape(pid),
                          "nan" if _jsonable(score) is None else f"{score:.4f}",
                          escape(t) if t is not None else "[dim](not in the knowledge base)[/]",
                          end_section=rank == len(nids) - 1)
        records.append({"query_id": qid, "query": text, "neighbor_ids": list(nids),
                        "neighbor_scores": [_jsonable(s) for s in nscores],
                        "neighbor_texts": [text_of(p) for p in nids]})
    Console().print(table)
    if out is not None:
        write_results(out, records)
        err_console.print(f"wrote {len(records)} results to {escape(str(out))}", highlight=False)


# ----------------------------------------------------------------------------------------------
# triples
# ----------------------------------------------------------------------------------------------
def triples(
    kb: str = typer.Option(..., "--kb", help="Knowledge base: FORMAT:PATH[?key=value] or a .parquet table."),
    out: Path = typer.Option(..., "--out", help="KNN-ImageText triples table to write (FILE.parquet)."),
    k: int = typer.Option(2, "-k", "--k", help="Neighbours per pair (the paper: 2)."),
    exclude_duplicate_texts: bool = typer.Option(False, "--exclude-duplicate-texts", help="Also exclude neighbours "
                                                 "whose text equals the query's (besides the pair itself)."),
    index: Optional[Path] = typer.Option(None, "--index", help="Reuse a saved index (e.g. BM25 from `index build`) "
                                         "instead of building BM25 over the knowledge base."),
    batch_size: int = typer.Option(1024, "--batch-size", help="Queries per retrieval batch (and per checkpoint)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue a partially written table."),
    threads: int = typer.Option(1, "--threads", min=1, help="Threads scoring the queries (BM25 with numba)."),
    wait_timeout: float = typer.Option(7 * 24 * 3600.0, "--wait-timeout", help="With several processes: how long "
                                       "rank 0 waits for the other processes' chunks before it writes the table."),
) -> None:
    """Build the KNN-ImageText triples table: every pair with its top-k neighbours from the same collection,
    excluding itself (Sec. 4; BM25 by default). Under torchrun (RANK / WORLD_SIZE) each process queries its
    chunks, rank 0 writes the table: pass a saved --index so that every process memory-maps one index."""
    from ..utils.launch import shard_from_env

    rank, world = shard_from_env()
    _check_k(k)
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    retriever = None
    if index is not None:
        manifest = _read_manifest(index)
        if manifest.get("source") and manifest["source"] != kb:
            err_console.print(f"[yellow]note:[/] index {escape(str(index))} was built from "
                              f"{escape(str(manifest['source']))}, not {escape(kb)}", highlight=False)
    knowledge = _open_kb(kb)
    if index is not None:
        retriever = _load_index(index, manifest)
    from .triples import build_triples

    path = build_triples(knowledge, out, k=k, retriever=retriever, exclude_duplicate_texts=exclude_duplicate_texts,
                         batch_size=batch_size, resume=resume, progress=True, threads=threads, rank=rank,
                         world_size=world, wait_timeout=wait_timeout)
    if path is None:
        err_console.print(f"rank {rank}: chunks written; rank 0 writes {escape(str(out))}", highlight=False)
    else:
        err_console.print(f"wrote {escape(str(path))}", highlight=False)


# ``app.command()(retrieve)`` in reimagen_eval/cli.py registers the functions; wrap them for friendly errors here so
# that the registered callables already carry the decorator (functools.wraps keeps the Typer signature).
retrieve = friendly(retrieve)
triples = friendly(triples)
