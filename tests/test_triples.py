"""KNN-ImageText triples (Sec. 3.2 "Model Training"): top-k BM25 neighbours in the same collection, the pair
itself excluded; duplicate-caption exclusion; rows with fewer than k neighbours dropped (and nobody keeps a
dropped pair as a neighbour); resumable chunks; the trainer's reader accepts the table."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from rank_bm25 import BM25Okapi

from reimagen.training.data import TripleData
from reimagen.retrieval import triples as triples_mod
from reimagen.retrieval.base import KnowledgeBase
from reimagen.retrieval.bm25 import BM25Retriever, tokenize
from reimagen.retrieval.triples import build_triples, triples_report


def zipf_captions(n, vocab=150, s=1.1, lo=3, hi=9, seed=0):
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1) ** s
    p /= p.sum()
    words = [f"w{i}" for i in range(vocab)]
    return [" ".join(words[j] for j in rng.choice(vocab, size=int(rng.integers(lo, hi + 1)), p=p)) for _ in range(n)]


def make_kb(tmp_path, texts, images=False):
    ids = [f"p{i:04d}" for i in range(len(texts))]
    refs = [f"img/{pid}.png" for pid in ids]
    if images:
        (tmp_path / "img").mkdir(exist_ok=True)
        for i, r in enumerate(refs):
            Image.new("RGB", (12, 10), (i % 256, 40, 90)).save(tmp_path / r)
    return KnowledgeBase(ids, texts, refs, name="toy", root=tmp_path)


def brute_force(texts, q, allowed):
    """rank-bm25 scores of every pair for row q's caption; the best k among ``allowed`` rows (nonzero score,
    ties -> lower row)."""
    s = BM25Okapi([tokenize(t) for t in texts]).get_scores(tokenize(texts[q]))
    cand = [j for j in allowed if j != q and s[j] != 0]
    return s, sorted(cand, key=lambda j: (-s[j], j))


# ----------------------------------------------------------------------------------------------
def test_neighbours_are_the_bm25_top_k_among_the_others(tmp_path):
    texts = zipf_captions(240, seed=0)
    kb = make_kb(tmp_path, texts)
    out = build_triples(kb, tmp_path / "t.parquet", k=2, batch_size=64, progress=False)
    df = pd.read_parquet(out)
    assert list(df.columns) == ["id", "text", "image", "neighbor_ids", "neighbor_scores"]
    rep = triples_report(out)
    assert rep.rows_written == len(df) and rep.pairs == 240 and rep.chunks == 4
    assert len(df) >= 230  # nearly every caption shares tokens with others
    kept = {kb.index_of(pid) for pid in df["id"]}
    ref = BM25Okapi([tokenize(t) for t in texts])
    exact = 0
    for pid, nbrs, scores, image in zip(df["id"], df["neighbor_ids"], df["neighbor_scores"], df["image"]):
        q = kb.index_of(pid)
        rows = [kb.index_of(n) for n in nbrs]
        assert len(rows) == 2 and q not in rows  # self-exclusion
        assert set(rows) <= kept
        assert image == str(tmp_path / "img" / f"{pid}.png")
        s = ref.get_scores(tokenize(texts[q]))
        best = sorted((j for j in kept if j != q and s[j] != 0), key=lambda j: (-s[j], j))[:2]
        # an equally good top 2 (same reference scores), best first; mostly the very same rows
        np.testing.assert_allclose(s[rows], s[best], rtol=1e-5)
        np.testing.assert_allclose(scores, s[rows], rtol=1e-5)
        exact += rows == best
    assert exact >= 0.99 * len(df)


def test_duplicate_texts_excluded(tmp_path):
    texts = zipf_captions(120, seed=1)
    dup = "a small red wooden boat on a lake"
    texts[5] = texts[17] = texts[60] = texts[61] = dup
    texts += ["a red boat on a lake", "a wooden boat", "red boat"]
    kb = make_kb(tmp_path, texts)
    plain = pd.read_parquet(build_triples(kb, tmp_path / "a.parquet", k=2, progress=False)).set_index("id")
    assert set(plain.loc["p0005", "neighbor_ids"]) <= {"p0017", "p0060", "p0061"}  # duplicates rank first
    out = build_triples(kb, tmp_path / "b.parquet", k=2, exclude_duplicate_texts=True, batch_size=50, progress=False)
    df = pd.read_parquet(out).set_index("id")
    text_of = dict(zip(kb.ids, kb.texts))
    for pid, row in df.iterrows():
        assert len(row["neighbor_ids"]) == 2
        assert all(text_of[n] != row["text"] for n in row["neighbor_ids"])
    assert set(df.loc["p0005", "neighbor_ids"]) <= {"p0120", "p0121", "p0122"}
    rep = triples_report(out)
    assert rep.duplicates_excluded >= 4 * 2 and rep.rows_with_duplicates == 4


def test_rows_with_fewer_than_k_are_dropped_and_never_neighbours(tmp_path):
    texts = zipf_captions(100, seed=2)
    texts += [
        "",  # no token: no neighbour
        "zebracorn",  # unknown to everybody else
        "okapi giraffe",  # shares "okapi" with one other pair only -> 1 neighbour
        "okapi w0",  # its best neighbour would be the okapi above (rare token, high idf)
    ]
    kb = make_kb(tmp_path, texts)
    out = build_triples(kb, tmp_path / "t.parquet", k=2, batch_size=32, progress=False)
    df = pd.read_parquet(out)
    rep = triples_report(out)
    dropped = set(kb.ids) - set(df["id"])
    assert {"p0100", "p0101", "p0102"} <= dropped
    assert rep.dropped_too_few == len(dropped) and rep.rows_written == len(kb) - len(dropped)
    assert all(len(v) == 2 for v in df["neighbor_ids"])
    assert not dropped & {n for v in df["neighbor_ids"] for n in v}  # nobody keeps a dropped pair
    # the okapi row lost its best neighbour and was re-queried: now the best two among the kept pairs
    assert rep.requeried >= 1
    row = df.set_index("id").loc["p0103"]
    kept = [kb.index_of(p) for p in df["id"]]
    s, best = brute_force(texts, 103, kept)
    assert [kb.index_of(n) for n in row["neighbor_ids"]] == best[:2]
    assert s[102] > s[best[0]]  # (the dropped pair would have been first)


class Interrupt(RuntimeError):
    pass


def test_resume_after_interruption(tmp_path, monkeypatch):
    texts = zipf_captions(200, seed=3)
    kb = make_kb(tmp_path, texts)
    want = pd.read_parquet(build_triples(kb, tmp_path / "full.parquet", k=2, batch_size=50, progress=False))

    real = triples_mod._compute_chunk
    calls = []
    fail_at = [50]

    def flaky(ctx, lo, hi):
        calls.append(lo)
        if lo in fail_at:
            fail_at.clear()
            raise Interrupt("killed while computing chunk 1")
        return real(ctx, lo, hi)

    monkeypatch.setattr(triples_mod, "_compute_chunk", flaky)
    out = tmp_path / "t.parquet"
    with pytest.raises(Interrupt):
        build_triples(kb, out, k=2, batch_size=50, progress=False)
    parts = tmp_path / "t.parquet.parts"
    assert not out.exists()
    assert sorted(p.name for p in parts.glob("chunk-*")) == ["chunk-00000.parquet"]
    assert json.loads((parts / "manifest.json").read_text())["k"] == 2

    # other settings: refused with a clear message, the parts are left alone
    with pytest.raises(ValueError, match="other settings.*k"):
        build_triples(kb, out, k=3, batch_size=50, progress=False)
    with pytest.raises(ValueError, match="exclude_duplicate_texts"):
        build_triples(kb, out, k=2, batch_size=50, exclude_duplicate_texts=True, progress=False)
    other = make_kb(tmp_path, texts[:-1] + ["something else"])
    with pytest.raises(ValueError, match="kb_fingerprint"):
        build_triples(other, out, k=2, batch_size=50, progress=False)
    assert (parts / "chunk-00000.parquet").exists()

    calls.clear()
    build_triples(kb, out, k=2, batch_size=50, progress=False)
    assert calls == [50, 100, 150]  # chunk 0 was not recomputed
    assert not parts.exists()
    assert triples_report(out).chunks_resumed == 1
    got = pd.read_parquet(out)
    pd.testing.assert_frame_equal(got, want)

    calls.clear()  # already complete: nothing to do
    build_triples(kb, out, k=2, batch_size=50, progress=False)
    assert calls == []


def test_resume_false_starts_over(tmp_path):
    kb = make_kb(tmp_path, zipf_captions(60, seed=4))
    parts = tmp_path / "t.parquet.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"k": 7}))
    with pytest.raises(ValueError, match="resume=False"):
        build_triples(kb, tmp_path / "t.parquet", k=2, progress=False)
    out = build_triples(kb, tmp_path / "t.parquet", k=2, resume=False, progress=False)
    assert len(pd.read_parquet(out)) > 50 and not parts.exists()


def test_explicit_retriever_and_trainer_reads_the_table(tmp_path):
    texts = zipf_captions(40, seed=5)
    kb = make_kb(tmp_path, texts, images=True)
    retriever = BM25Retriever.from_knowledge_base(kb, progress=False)
    out = build_triples(kb, tmp_path / "tables" / "t.parquet", k=2, retriever=retriever, batch_size=16,
                        progress=False)
    df = pd.read_parquet(out)
    data = TripleData.from_table(out, image_size=16, progress=False)
    assert len(data) == len(df) and data.k == 2 and data.image_size == 16
    assert data.ids == list(df["id"])
    first = df.iloc[0]
    assert [data.ids[j] for j in data.neighbours[0].tolist()] == list(first["neighbor_ids"])
    assert len(data.train_rows) == len(df)
    with pytest.raises(ValueError, match="another collection"):
        build_triples(make_kb(tmp_path, texts[:-1]), tmp_path / "u.parquet", retriever=retriever, progress=False)


def test_ranks_share_the_chunks_and_rank_0_writes_the_same_table(tmp_path):
    texts = zipf_captions(200, seed=5) + ["zebracorn", "okapi giraffe", "okapi w0"]  # drops and a re-query too
    kb = make_kb(tmp_path, texts)
    want = pd.read_parquet(build_triples(kb, tmp_path / "one.parquet", k=2, batch_size=40, progress=False))
    out = tmp_path / "three.parquet"
    with pytest.raises(RuntimeError, match="still missing"):  # rank 0 alone: the others' chunks never come
        build_triples(kb, out, k=2, batch_size=40, progress=False, rank=0, world_size=3, wait_timeout=0.5)
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "three.parquet.parts").glob("chunk-*")) == [
        "chunk-00000.parquet", "chunk-00003.parquet"]  # rank 0's share: chunks 0 and 3 of 6
    for r in (2, 1):
        assert build_triples(kb, out, k=2, batch_size=40, progress=False, rank=r, world_size=3) is None
    assert sorted(p.name for p in (tmp_path / "three.parquet.parts").glob("chunk-*"))[-1] == "chunk-00005.parquet"
    assert build_triples(kb, out, k=2, batch_size=40, progress=False, rank=0, world_size=3) == out
    pd.testing.assert_frame_equal(pd.read_parquet(out), want)
    assert triples_report(out).requeried == triples_report(tmp_path / "one.parquet").requeried >= 1
    with pytest.raises(ValueError, match="--no-resume with several processes"):
        build_triples(kb, tmp_path / "x.parquet", k=2, resume=False, progress=False, rank=0, world_size=2)


def test_two_launched_processes_build_the_table_together(tmp_path):
    import os
    import subprocess
    import sys

    texts = zipf_captions(120, seed=6)
    pd.DataFrame({"id": [f"p{i}" for i in range(120)], "text": texts,
                  "image": [f"img/{i}.png" for i in range(120)]}).to_parquet(tmp_path / "kb.parquet")
    cmd = [sys.executable, "-m", "reimagen_eval.cli", "triples", "--kb", str(tmp_path / "kb.parquet"), "--out",
           str(tmp_path / "t.parquet"), "--batch-size", "30"]
    procs = [subprocess.Popen(cmd, env=dict(os.environ, RANK=str(r), WORLD_SIZE="2"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "rank 1: chunks written" in outs[1][1]
    single = tmp_path / "single.parquet"
    res = subprocess.run([*cmd[:-5], str(tmp_path / "kb.parquet"), "--out", str(single), "--batch-size", "30"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), pd.read_parquet(single))
