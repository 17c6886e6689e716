"""Neighbours computed elsewhere, read from a parquet table (Sec. 4: at LAION scale retrieval runs as a service).

At LAION scale the neighbours of every query are usually computed by a separate system (a clip-retrieval
server over a LAION kNN index, an Elasticsearch/OpenSearch BM25 index, a batch job on a cluster) and exported.
``PrecomputedRetriever`` serves such an export: ``search`` looks the neighbours up by **query id** (the query texts
are ignored), so ``query_ids`` is required.

Accepted tables (parquet; also .jsonl/.csv for small hand-made files), column names case-sensitive:

    wide  one row per query:
            query_id          string
            neighbor_ids      list<string>, best first
            neighbor_scores   list<float>, optional, same length (higher = better)
    long  one row per (query, neighbour):
            query_id          string
            neighbor_id       string
            score             float, optional
            rank              int, optional (0 or 1 = best; sorted ascending). Without rank, rows are ordered by
                              descending score, and without score they keep their order in the file.

British spellings (neighbour_ids, neighbour_scores, neighbour_id) are accepted too. Missing scores are NaN.
A query id that appears twice is an error.

Lookup: unknown query ids get an empty row by default (``last_missing`` = how many, ``last_missing_ids`` = which),
or a ValueError with ``strict=True``. ``exclude_ids[i]`` is removed from row i before truncating to k.

Saving copies the table, normalised to the wide format, into ``<folder>/neighbours.parquet`` (the saved index
does not depend on the original file) and records the original path, its sha256 and the number of queries in
the manifest. ``_load`` reads the copy with pyarrow memory-mapped (``mmap=True``) and converts one row to Python
only when it is looked up.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Sequence

from .base import Retriever, SearchResult, register_retriever

TABLE_FILE = "neighbours.parquet"
_ALIASES = {"neighbour_ids": "neighbor_ids", "neighbour_scores": "neighbor_scores", "neighbour_id": "neighbor_id",
            "neighbours": "neighbor_ids", "neighbors": "neighbor_ids"}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _read_table(path: Path, mmap: bool = True):
    import pyarrow as pa
    import pyarrow.parquet as pq

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pq.read_table(path, memory_map=mmap)
    if suffix in (".jsonl", ".csv"):
        import pandas as pd

        df = pd.read_json(path, lines=True, dtype=False) if suffix == ".jsonl" else pd.read_csv(path, dtype=str)
        if suffix == ".csv":  # a csv has no lists: only the long format
            for col in ("score", "neighbor_score"):
                if col in df.columns:
                    df[col] = df[col].astype(float)
            if "rank" in df.columns:
                df["rank"] = df["rank"].astype(int)
        return pa.Table.from_pandas(df, preserve_index=False)
    raise ValueError(f"{path}: neighbour tables are .parquet (or .jsonl/.csv), got {suffix or 'no suffix'}")


def normalise_table(table) -> Any:
    """A wide pyarrow table (query_id string, neighbor_ids list<string>, neighbor_scores list<double>) from a wide
    or long table (see the module docstring)."""
    import pyarrow as pa

    renames = {c: _ALIASES.get(c, c) for c in table.column_names}
    if any(k != v for k, v in renames.items()):
        table = table.rename_columns([renames[c] for c in table.column_names])
    cols = set(table.column_names)
    if "query_id" not in cols:
        raise ValueError(f"neighbour table has no query_id column (columns: {sorted(cols)}); expected query_id + "
                         "neighbor_ids [+ neighbor_scores] (wide) or query_id + neighbor_id [+ score, rank] (long)")
    if "neighbor_ids" in cols:
        qids = [None if q is None else str(q) for q in table.column("query_id").to_pylist()]
        nids = table.column("neighbor_ids").to_pylist()
        if any(row is not None and not isinstance(row, list) for row in nids):
            raise ValueError("neighbor_ids must be a list column (list<string>) in the wide format; "
                             "use neighbor_id for one neighbour per row (long format)")
        nids = [[str(x) for x in (row or []) if x is not None] for row in nids]
        if "neighbor_scores" in cols:
            sc = table.column("neighbor_scores").to_pylist()
            scores = []
            for i, (ids, row) in enumerate(zip(nids, sc)):
                row = [math.nan if x is None else float(x) for x in (row or [])]
                if row and len(row) != len(ids):
                    raise ValueError(f"query {qids[i]!r}: {len(ids)} neighbor_ids but {len(row)} neighbor_scores")
                scores.append(row or [math.nan] * len(ids))
        else:
            scores = [[math.nan] * len(ids) for ids in nids]
    elif "neighbor_id" in cols:
        df = table.to_pandas()
        if df["query_id"].isna().any() or df["neighbor_id"].isna().any():
            raise ValueError("neighbour table (long format) has rows without query_id or neighbor_id")
        df["query_id"] = df["query_id"].astype(str)
        df["neighbor_id"] = df["neighbor_id"].astype(str)
        score_col = "score" if "score" in df.columns else ("neighbor_score" if "neighbor_score" in df.columns else None)
        df["_score"] = df[score_col].astype(float) if score_col else math.nan
        df["_pos"] = range(len(df))
        if "rank" in df.columns:
            df = df.sort_values(["rank", "_pos"], kind="stable")
        elif score_col:
            df = df.sort_values(["_score", "_pos"], ascending=[False, True], kind="stable")
        qids = list(dict.fromkeys(df.sort_values("_pos")["query_id"]))  # queries in order of first appearance
        grouped = {q: g for q, g in df.groupby("query_id", sort=False)}
        nids = [grouped[q]["neighbor_id"].tolist() for q in qids]
        scores = [[float(x) for x in grouped[q]["_score"].tolist()] for q in qids]
    else:
        raise ValueError(f"neighbour table has neither neighbor_ids (wide format) nor neighbor_id (long format); "
                         f"columns: {sorted(cols)}")
    seen: set[str] = set()
    for q in qids:
        if q is None:
            raise ValueError("neighbour table has a row without query_id")
        if q in seen:
            raise ValueError(f"neighbour table lists query_id {q!r} twice (wide format: one row per query)")
        seen.add(q)
    return pa.table({"query_id": pa.array(qids, pa.string()),
                     "neighbor_ids": pa.array(nids, pa.list_(pa.string())),
                     "neighbor_scores": pa.array(scores, pa.list_(pa.float64()))})


def _is_normalised(table) -> bool:
    """Already the wide format with list<string> ids and list<double> scores of equal lengths (a saved copy)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if table.column_names != ["query_id", "neighbor_ids", "neighbor_scores"]:
        return False
    if (table.schema.field("query_id").type != pa.string()
            or table.schema.field("neighbor_ids").type != pa.list_(pa.string())
            or table.schema.field("neighbor_scores").type != pa.list_(pa.float64())):
        return False
    if table.column("query_id").null_count or table.column("neighbor_ids").null_count:
        return False
    lengths_equal = pc.equal(pc.list_value_length(table.column("neighbor_ids")),
                             pc.list_value_length(table.column("neighbor_scores")))
    return bool(pc.all(lengths_equal).as_py() if table.num_rows else True)


@register_retriever
class PrecomputedRetriever(Retriever):
    """Neighbours looked up by query id in a table computed elsewhere (see the module docstring)."""

    kind = "precomputed"

    def __init__(self, table, strict: bool = False, source_path: str | None = None,
                 source_sha256: str | None = None):
        """``table``: a pyarrow Table or pandas DataFrame in the wide or long format."""
        import pyarrow as pa

        if not isinstance(table, pa.Table):
            table = pa.Table.from_pandas(table, preserve_index=False)
        if not _is_normalised(table):
            table = normalise_table(table)
        self.table = table
        self.strict = strict
        self.source_path = source_path
        self.source_sha256 = source_sha256
        self._row = {q: i for i, q in enumerate(table.column("query_id").to_pylist())}
        if len(self._row) != table.num_rows:
            raise ValueError("neighbour table lists a query_id twice")
        self.last_missing = 0
        self.last_missing_ids: list[str] = []

    def __len__(self) -> int:
        return self.table.num_rows

    def __repr__(self) -> str:
        return f"PrecomputedRetriever({self.table.num_rows} queries, source={self.source_path!r}, strict={self.strict})"

    @classmethod
    def from_parquet(cls, path: str | Path, strict: bool = False) -> "PrecomputedRetriever":
        """Read a wide or long neighbour table (.parquet; .jsonl/.csv also accepted)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"neighbour table {path} does not exist")
        return cls(_read_table(path), strict=strict, source_path=str(path.resolve()), source_sha256=sha256_file(path))

    def neighbours_of(self, query_id: str) -> tuple[list[str], list[float]] | None:
        """All stored (ids, scores) of one query, or None if the id is unknown."""
        row = self._row.get(str(query_id))
        if row is None:
            return None
        ids = self.table.column("neighbor_ids")[row].as_py() or []
        scores = self.table.column("neighbor_scores")[row].as_py() or [math.nan] * len(ids)
        return ids, [math.nan if s is None else float(s) for s in scores]

    def search(self, queries: Sequence[str], k: int, exclude_ids: Sequence[str | None] | None = None,
               query_ids: Sequence[str] | None = None) -> SearchResult:
        """The stored top-k of each query id, best first (the query texts are not used)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if query_ids is None:
            raise ValueError("precomputed neighbours are looked up by query id: pass query_ids (e.g. --queries with an "
                             "id column, or --query-id on the command line)")
        query_ids = [str(q) for q in query_ids]
        if queries is not None and len(queries) and len(queries) != len(query_ids):
            raise ValueError(f"{len(queries)} queries but {len(query_ids)} query_ids")
        if exclude_ids is not None and len(exclude_ids) != len(query_ids):
            raise ValueError(f"{len(exclude_ids)} exclude_ids for {len(query_ids)} queries")
        out_ids: list[list[str]] = []
        out_scores: list[list[float]] = []
        missing: list[str] = []
        for i, q in enumerate(query_ids):
            found = self.neighbours_of(q)
            if found is None:
                missing.append(q)
                out_ids.append([])
                out_scores.append([])
                continue
            excl = None if exclude_ids is None else exclude_ids[i]
            pairs = [(n, s) for n, s in zip(*found) if excl is None or n != excl][:k]
            out_ids.append([n for n, _ in pairs])
            out_scores.append([s for _, s in pairs])
        self.last_missing = len(missing)
        self.last_missing_ids = missing
        if missing and self.strict:
            shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"{len(missing)} of {len(query_ids)} query ids have no precomputed neighbours: {shown}")
        return SearchResult(out_ids, out_scores)

    # -- storage ---------------------------------------------------------------------------------
    def _save(self, folder: Path) -> dict[str, Any]:
        import pyarrow.parquet as pq

        pq.write_table(self.table, folder / TABLE_FILE)
        lengths = self.table.column("neighbor_ids").combine_chunks().value_lengths().to_pylist() \
            if self.table.num_rows else []
        return {"table": TABLE_FILE, "n_queries": self.table.num_rows,
                "max_neighbours": max((x or 0 for x in lengths), default=0), "strict": self.strict,
                "source_path": self.source_path, "source_sha256": self.source_sha256,
                "table_sha256": sha256_file(folder / TABLE_FILE)}

    @classmethod
    def _load(cls, folder: Path, manifest: dict[str, Any], mmap: bool = True) -> "PrecomputedRetriever":
        import pyarrow.parquet as pq

        params = manifest.get("params", {})
        path = Path(folder) / params.get("table", TABLE_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is an incomplete precomputed index: {path.name} is missing")
        table = pq.read_table(path, memory_map=mmap)
        return cls(table, strict=bool(params.get("strict", False)), source_path=params.get("source_path"),
                   source_sha256=params.get("source_sha256"))
