"""Precomputed neighbours (reimagen/retrieval/precomputed.py): wide and long tables, lookup by query id."""

from __future__ import annotations

import hashlib
import json
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reimagen.retrieval.base import load_retriever
from reimagen.retrieval.precomputed import PrecomputedRetriever


@pytest.fixture
def wide(tmp_path):
    path = tmp_path / "wide.parquet"
    table = pa.table({
        "query_id": ["q1", "q2", "q3"],
        "neighbor_ids": pa.array([["a", "b", "c"], ["c", "a"], []], pa.list_(pa.string())),
        "neighbor_scores": pa.array([[0.9, 0.5, 0.1], [0.8, 0.7], []], pa.list_(pa.float32())),
    })
    pq.write_table(table, path)
    return path


@pytest.fixture
def long(tmp_path):
    """The same neighbours as ``wide`` in the long format, rows shuffled, ranks 1-based."""
    path = tmp_path / "long.parquet"
    df = pd.DataFrame({"query_id": ["q2", "q1", "q1", "q2", "q1"],
                       "neighbor_id": ["a", "c", "a", "c", "b"],
                       "score": [0.7, 0.1, 0.9, 0.8, 0.5],
                       "rank": [2, 3, 1, 1, 2]})
    df.to_parquet(path)
    return path


def test_wide_table_lookup_and_k_truncation(wide):
    r = PrecomputedRetriever.from_parquet(wide)
    res = r.search(["ignored", "", "text"], 2, query_ids=["q1", "q2", "q3"])
    assert res.ids == [["a", "b"], ["c", "a"], []]
    assert res.scores[0] == pytest.approx([0.9, 0.5]) and res.scores[1] == pytest.approx([0.8, 0.7])
    assert r.search([], 10, query_ids=["q1"]).ids == [["a", "b", "c"]]  # k larger than stored: all of them
    assert r.search(["x"], 1, query_ids=["q2"]).ids == [["c"]]
    assert r.last_missing == 0


def test_long_table_gives_the_same_neighbours(wide, long):
    w = PrecomputedRetriever.from_parquet(wide)
    lg = PrecomputedRetriever.from_parquet(long)
    for qid in ("q1", "q2"):
        a, b = w.search([""], 5, query_ids=[qid]), lg.search([""], 5, query_ids=[qid])
        assert a.ids == b.ids
        assert a.scores[0] == pytest.approx(b.scores[0])
    assert lg.table.column("query_id").to_pylist() == ["q2", "q1"]  # order of first appearance


def test_long_table_without_rank_sorts_by_score_and_without_score_keeps_order(tmp_path):
    df = pd.DataFrame({"query_id": ["q", "q", "q"], "neighbor_id": ["x", "y", "z"], "score": [0.1, 0.9, 0.5]})
    r = PrecomputedRetriever(df)
    assert r.search([""], 3, query_ids=["q"]).ids == [["y", "z", "x"]]
    r = PrecomputedRetriever(df.drop(columns="score"))
    res = r.search([""], 3, query_ids=["q"])
    assert res.ids == [["x", "y", "z"]] and all(math.isnan(s) for s in res.scores[0])
    # wide without scores, British spelling
    r = PrecomputedRetriever(pd.DataFrame({"query_id": ["q"], "neighbour_ids": [["m", "n"]]}))
    res = r.search([""], 2, query_ids=["q"])
    assert res.ids == [["m", "n"]] and all(math.isnan(s) for s in res.scores[0])
    # long format from a csv file
    path = tmp_path / "n.csv"
    df.to_csv(path, index=False)
    assert PrecomputedRetriever.from_parquet(path).search([""], 2, query_ids=["q"]).ids == [["y", "z"]]


def test_query_ids_are_required(wide):
    r = PrecomputedRetriever.from_parquet(wide)
    with pytest.raises(ValueError, match="query_ids"):
        r.search(["a query"], 2)
    with pytest.raises(ValueError, match="k must be"):
        r.search([""], 0, query_ids=["q1"])


def test_unknown_ids_empty_rows_counted_or_strict_error(wide):
    r = PrecomputedRetriever.from_parquet(wide)
    res = r.search(["", "", ""], 2, query_ids=["q1", "nope", "nada"])
    assert res.ids == [["a", "b"], [], []] and res.scores[1] == []
    assert r.last_missing == 2 and r.last_missing_ids == ["nope", "nada"]
    r.search([""], 2, query_ids=["q1"])
    assert r.last_missing == 0
    strict = PrecomputedRetriever.from_parquet(wide, strict=True)
    with pytest.raises(ValueError, match="1 of 2 query ids have no precomputed neighbours: 'nope'"):
        strict.search(["", ""], 2, query_ids=["q1", "nope"])


def test_exclusion_removes_the_id_before_truncating(wide):
    r = PrecomputedRetriever.from_parquet(wide)
    res = r.search(["", ""], 2, exclude_ids=["a", None], query_ids=["q1", "q2"])
    assert res.ids == [["b", "c"], ["c", "a"]]
    assert res.scores[0] == pytest.approx([0.5, 0.1])
    assert r.search([""], 2, exclude_ids=["zzz"], query_ids=["q1"]).ids == [["a", "b"]]


def test_save_copies_the_table_and_load_is_independent_of_the_original(wide, tmp_path):
    r = PrecomputedRetriever.from_parquet(wide)
    before = r.search(["", "", ""], 3, query_ids=["q1", "q2", "q3"])
    folder = r.save(tmp_path / "idx", source="parquet:kb.parquet")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "precomputed"
    p = manifest["params"]
    assert p["source_sha256"] == hashlib.sha256(wide.read_bytes()).hexdigest()
    assert p["source_path"] == str(wide.resolve()) and p["n_queries"] == 3 and p["max_neighbours"] == 3
    wide.unlink()  # the saved index carries its own copy
    for mmap in (True, False):
        loaded = load_retriever(folder, mmap=mmap)
        assert isinstance(loaded, PrecomputedRetriever)
        after = loaded.search(["", "", ""], 3, query_ids=["q1", "q2", "q3"])
        assert after.ids == before.ids
        assert after.scores == before.scores


def test_malformed_tables_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="query_id"):
        PrecomputedRetriever(pd.DataFrame({"id": ["q"], "neighbor_ids": [["a"]]}))
    with pytest.raises(ValueError, match="twice"):
        PrecomputedRetriever(pd.DataFrame({"query_id": ["q", "q"], "neighbor_ids": [["a"], ["b"]]}))
    with pytest.raises(ValueError, match="neighbor_scores"):
        PrecomputedRetriever(pd.DataFrame({"query_id": ["q"], "neighbor_ids": [["a", "b"]],
                                           "neighbor_scores": [[0.3]]}))
    with pytest.raises(ValueError, match="neither neighbor_ids"):
        PrecomputedRetriever(pd.DataFrame({"query_id": ["q"], "other": [1]}))
    with pytest.raises(FileNotFoundError):
        PrecomputedRetriever.from_parquet(tmp_path / "missing.parquet")
