"""Retrieval commands (reimagen/retrieval/cli.py) on an app registered the way reimagen_eval/cli.py registers them."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from reimagen.retrieval.base import KnowledgeBase, load_retriever
from reimagen.retrieval.cli import index_app, retrieve, triples

app = typer.Typer(add_completion=False)
app.add_typer(index_app, name="index")
app.command()(retrieve)
app.command()(triples)
runner = CliRunner()

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
TEXTS = ["a red dog on grass", "a blue car in the city", "a red car on a road", "two dogs playing",
         "a green tree in a park", "a house with a red roof", "a cat sleeping on a sofa", "a blue bird on a tree"]
has_bm25 = importlib.util.find_spec("reimagen.retrieval.bm25") is not None
has_triples = importlib.util.find_spec("reimagen.retrieval.triples") is not None


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("clipcfg") / "tiny-clip-cli.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


@pytest.fixture
def kb_parquet(tmp_path):
    """8 pairs with 20 px PNGs, as a knowledge-base table written by KnowledgeBase.to_parquet."""
    rng = np.random.default_rng(0)
    refs = []
    for i in range(len(TEXTS)):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
        refs.append(f"im{i}.png")
    kb = KnowledgeBase([f"p{i}" for i in range(len(TEXTS))], TEXTS, refs, name="toy", root=tmp_path)
    return kb.to_parquet(tmp_path / "kb.parquet")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(res, needle: str) -> None:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], res.output
    assert "Traceback" not in res.output


def test_clip_build_info_retrieve_and_out_files(tmp_path, kb_parquet, tiny_model):
    idx = tmp_path / "clip-idx"
    res = run("index", "build", "--kb", kb_parquet, "--retriever", "clip", "--out", idx, "--clip-model", tiny_model,
              "--index", "flat", "--batch-size", "3")
    assert res.exit_code == 0, res.output
    assert "8 pairs, nothing skipped" in res.output  # the knowledge base's skip report
    assert (idx / "manifest.json").is_file() and (idx / "index.faiss").is_file()
    assert not (tmp_path / "clip-idx.partial").exists()  # the resumable work dir is removed after success
    manifest = json.loads((idx / "manifest.json").read_text())
    assert manifest["kind"] == "clip" and manifest["source"] == str(kb_parquet)

    res = run("index", "info", idx)
    assert res.exit_code == 0, res.output
    for needle in ("clip", "tiny-clip-cli", "params.index", "flat", "index.faiss"):
        assert needle in res.output

    out = tmp_path / "res.jsonl"
    res = run("retrieve", "--index", idx, "--query", "a red car", "--query", "a dog", "-k", "2", "--out", out)
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["query"] for r in recs] == ["a red car", "a dog"]
    expected = load_retriever(idx).search(["a red car", "a dog"], 2)
    assert [r["neighbor_ids"] for r in recs] == expected.ids
    for r, scores in zip(recs, expected.scores):
        assert r["neighbor_scores"] == pytest.approx(scores)
    for r in recs:
        assert len(r["neighbor_ids"]) == 2
        assert r["neighbor_texts"] == [TEXTS[int(p[1:])] for p in r["neighbor_ids"]]
        assert r["neighbor_ids"][0] in res.output  # printed in the table

    pq_out = tmp_path / "res.parquet"
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"id": "p1", "text": "a blue car in the city"}) + "\n" + json.dumps("two dogs") + "\n")
    res = run("retrieve", "--index", idx, "--kb", kb_parquet, "--queries", qfile, "--query-id", "p3", "-k", "3",
              "--exclude-self", "--out", pq_out)
    assert res.exit_code == 0, res.output
    rows = pq.read_table(pq_out).to_pylist()
    assert [r["query_id"] for r in rows] == ["p3", "p1", None]  # --query-id first, then the file's queries
    assert [r["query"] for r in rows] == ["two dogs playing", "a blue car in the city", "two dogs"]
    assert "p3" not in rows[0]["neighbor_ids"] and "p1" not in rows[1]["neighbor_ids"]
    assert all(len(r["neighbor_ids"]) == 3 == len(r["neighbor_texts"]) for r in rows)


def test_precomputed_build_and_retrieve_by_id(tmp_path, kb_parquet):
    table = tmp_path / "nbrs.parquet"
    pd.DataFrame({"query_id": ["p0", "p1"], "neighbor_ids": [["p2", "p3", "p4"], ["p5"]],
                  "neighbor_scores": [[3.0, 2.0, 1.0], [9.0]]}).to_parquet(table)
    idx = tmp_path / "pre-idx"
    res = run("index", "build", "--kb", kb_parquet, "--retriever", "precomputed", "--neighbours", table, "--out", idx)
    assert res.exit_code == 0, res.output
    out = tmp_path / "r.jsonl"
    res = run("retrieve", "--index", idx, "--query-id", "p0", "--query-id", "p1", "--query-id", "p7", "--out", out)
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["neighbor_ids"] for r in recs] == [["p2", "p3"], ["p5"], []]
    assert recs[0]["neighbor_scores"] == [3.0, 2.0]
    assert "1 query ids have no precomputed neighbours" in res.output
    # text queries without ids cannot be looked up
    one_line_error(run("retrieve", "--index", idx, "--query", "a dog"), "query_ids")


@pytest.mark.skipif(not has_bm25, reason="reimagen.retrieval.bm25 is not there yet")
def test_bm25_build_and_retrieve(tmp_path, kb_parquet):
    idx = tmp_path / "bm25-idx"
    res = run("index", "build", "--kb", kb_parquet, "--retriever", "bm25", "--out", idx)
    assert res.exit_code == 0, res.output
    out = tmp_path / "r.jsonl"
    res = run("retrieve", "--index", idx, "--query", "red car", "-k", "2", "--out", out)
    assert res.exit_code == 0, res.output
    rec = json.loads(out.read_text())
    assert rec["neighbor_ids"][0] == "p2"  # "a red car on a road" matches both terms
    # a query that matches nothing gets no neighbours and a note, whatever --threads
    res = run("retrieve", "--index", idx, "--query", "zzzunknown", "--query", "red car", "-k", "2", "--threads", "2",
              "--out", out)
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs[0]["neighbor_ids"] == [] and recs[1]["neighbor_ids"][0] == "p2"
    assert "1 of 2 queries matched nothing" in " ".join(res.output.split())
    res = run("index", "build", "--kb", kb_parquet, "--retriever", "bm25-rank", "--out", tmp_path / "rank-idx")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "rank-idx" / "manifest.json").read_text())["kind"] == "bm25-rank"


@pytest.mark.skipif(not (has_bm25 and has_triples), reason="bm25/triples modules are not there yet")
def test_triples_with_and_without_a_saved_index(tmp_path, kb_parquet):
    out = tmp_path / "triples.parquet"
    res = run("triples", "--kb", kb_parquet, "--out", out, "-k", "2")
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(out)
    assert 4 <= len(df) <= len(TEXTS)  # build_triples drops pairs that retrieve fewer than k neighbours
    for pid, nbrs in zip(df["id"], df["neighbor_ids"]):
        assert pid not in list(nbrs) and len(nbrs) == 2 and set(nbrs) <= set(df["id"])
    idx = tmp_path / "bm25-idx"
    assert run("index", "build", "--kb", kb_parquet, "--retriever", "bm25", "--out", idx).exit_code == 0
    out2 = tmp_path / "triples2.parquet"
    res = run("triples", "--kb", kb_parquet, "--out", out2, "-k", "2", "--index", idx)
    assert res.exit_code == 0, res.output
    assert [list(x) for x in pd.read_parquet(out2)["neighbor_ids"]] == [list(x) for x in df["neighbor_ids"]]


def test_bad_inputs_exit_2_with_one_red_line(tmp_path, kb_parquet, tiny_model):
    one_line_error(run("index", "build", "--kb", kb_parquet, "--retriever", "tfidf", "--out", tmp_path / "x"),
                   "unknown retriever 'tfidf'")
    one_line_error(run("index", "build", "--kb", kb_parquet, "--retriever", "clip", "--index", "annoy",
                       "--out", tmp_path / "x"), "unknown index type")
    one_line_error(run("index", "info", tmp_path / "nowhere"), "is not a saved index")
    one_line_error(run("retrieve", "--index", tmp_path / "nowhere", "--query", "x"), "is not a saved index")
    one_line_error(run("retrieve", "--index", tmp_path / "nowhere", "--query", "x", "-k", "0"), "k must be >= 1")
    one_line_error(run("retrieve", "--index", tmp_path, "--query", "x", "--out", tmp_path / "r.txt"),
                   ".jsonl or .parquet")
    one_line_error(run("triples", "--kb", kb_parquet, "--out", tmp_path / "t.parquet", "-k", "0"), "k must be >= 1")
    empty = KnowledgeBase([], [], [], name="empty").to_parquet(tmp_path / "empty.parquet")
    one_line_error(run("index", "build", "--kb", empty, "--retriever", "clip", "--clip-model", tiny_model,
                       "--out", tmp_path / "x"), "is empty")
    one_line_error(run("index", "build", "--kb", "nosuchformat:/x", "--out", tmp_path / "x"),
                   "unknown knowledge-base format")
    one_line_error(run("index", "build", "--kb", kb_parquet, "--retriever", "clip", "--clip-model", "ViT-B-32",
                       "--pretrained", tmp_path / "missing.safetensors", "--out", tmp_path / "x"), "does not exist")
    assert not (tmp_path / "x").exists()
