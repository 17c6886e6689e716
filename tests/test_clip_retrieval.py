"""CLIP retrieval (reimagen/retrieval/clip.py): a tiny randomly initialised open-clip model, ~20 generated PNGs.

Random CLIP weights make similarities meaningless, so the tests check the machinery against independent
computations: the stored embeddings are the model's normalised image embeddings, the flat index returns the
brute-force top-k of those embeddings, approximate indexes reach a recall bound, and saving, memory-mapped
loading, resuming and skipping do what they claim.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from reimagen.retrieval.base import KnowledgeBase, load_retriever
from reimagen.retrieval.clip import STATE_FILE, ClipEncoder, ClipRetriever, default_nlist

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
COLOURS = ["red", "green", "blue", "yellow"]
THINGS = ["dog", "cat", "house", "tree", "car"]
QUERIES = ["a red dog", "a small green house", "tree", "a yellow car on a road"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """Path of a JSON open-clip config (32-d embeddings, 32 px images, 2+2 layers): builds in ~0.1 s."""
    path = tmp_path_factory.mktemp("clipcfg") / "tiny-clip-test.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


def make_kb(root, n: int = 20, seed: int = 0, extra: dict[str, bytes | None] | None = None) -> KnowledgeBase:
    """n structured PNGs (background colour + a square) with captions; ``extra`` adds rows whose image file
    has the given bytes (None: the file does not exist)."""
    rng = np.random.default_rng(seed)
    ids, texts, refs = [], [], []
    for i in range(n):
        arr = np.zeros((24, 24, 3), dtype=np.uint8)
        arr[:] = rng.integers(0, 256, 3)
        y, x = rng.integers(0, 16, 2)
        arr[y:y + 8, x:x + 8] = rng.integers(0, 256, 3)
        Image.fromarray(arr).save(root / f"img{i}.png")
        ids.append(f"p{i}")
        texts.append(f"a {COLOURS[i % 4]} {THINGS[i % 5]} number {i}")
        refs.append(f"img{i}.png")
    for name, data in (extra or {}).items():
        if data is not None:
            (root / f"{name}.png").write_bytes(data)
        ids.append(name)
        texts.append(f"the {name} one")
        refs.append(f"{name}.png")
    return KnowledgeBase(ids, texts, refs, name="tiny", root=root)


def build(kb, tiny_model, tmp_path, **kw) -> ClipRetriever:
    kw.setdefault("work_dir", tmp_path / "work")
    return ClipRetriever.build(kb, model_name=tiny_model, batch_size=kw.pop("batch_size", 8), progress=False, **kw)


def test_stored_embeddings_are_the_models_normalised_image_embeddings(tmp_path, tiny_model):
    import torch

    from reimagen.utils.compat import patch_torchvision_if_broken

    patch_torchvision_if_broken()
    import open_clip

    kb = make_kb(tmp_path)
    r = build(kb, tiny_model, tmp_path)
    emb = np.load(tmp_path / "work" / "embeddings.npy")
    assert emb.shape == (20, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # independently: the same seeded random model, straight from open-clip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model, _, preprocess = open_clip.create_model_and_transforms("tiny-clip-test", pretrained=None)
    model.eval()
    with torch.no_grad():
        ref = model.encode_image(torch.stack([preprocess(kb.image(i)) for i in (0, 7, 19)]))
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(emb[[0, 7, 19]], ref, atol=1e-5)
    assert r.params["n"] == 20 and r.params["dim"] == 32 and r.params["embed"] == "image"


def test_flat_index_returns_exact_bruteforce_topk(tmp_path, tiny_model):
    kb = make_kb(tmp_path)
    r = build(kb, tiny_model, tmp_path)
    k = 5
    res = r.search(QUERIES, k)
    emb = np.load(tmp_path / "work" / "embeddings.npy")
    q = r.encoder.encode_texts(QUERIES)
    sims = q @ emb.T
    for i in range(len(QUERIES)):
        order = np.argsort(-sims[i], kind="stable")[:k]
        assert res.ids[i] == [kb.ids[j] for j in order]
        np.testing.assert_allclose(res.scores[i], sims[i, order], atol=1e-5)
        assert res.scores[i] == sorted(res.scores[i], reverse=True)


@pytest.mark.parametrize("embed", ["text", "both"])
def test_text_and_both_embedding_modes(tmp_path, tiny_model, embed):
    kb = make_kb(tmp_path, n=10)
    r = build(kb, tiny_model, tmp_path, embed=embed)
    emb = np.asarray(r.embeddings)
    txt = r.encoder.encode_texts(kb.texts)
    if embed == "text":
        np.testing.assert_allclose(emb, txt, atol=1e-5)
    else:
        img = r.encoder.encode_images([kb.image(i) for i in range(len(kb))])
        mixed = img + txt
        np.testing.assert_allclose(emb, mixed / np.linalg.norm(mixed, axis=1, keepdims=True), atol=1e-5)
    # text -> text retrieval: a pair's own caption is its best match
    if embed == "text":
        assert [row[0] for row in r.search(kb.texts, 1).ids] == kb.ids


def test_exclusion_and_empty_queries(tmp_path, tiny_model):
    kb = make_kb(tmp_path)
    r = build(kb, tiny_model, tmp_path)
    full = r.search(QUERIES, 4)
    excl = [row[0] for row in full.ids]
    res = r.search(QUERIES, 3, exclude_ids=excl)
    for i in range(len(QUERIES)):
        assert excl[i] not in res.ids[i]
        assert res.ids[i] == full.ids[i][1:4]  # the next three, still k of them
    res = r.search(["", "   ", "a red dog"], 2, exclude_ids=[None, None, None])
    assert res.ids[0] == [] and res.ids[1] == [] and len(res.ids[2]) == 2
    assert r.search(["", ""], 3).ids == [[], []]
    with pytest.raises(ValueError):
        r.search(["x"], 0)


def _clustered(n: int, d: int, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, d))
    x = centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, d))
    q = centres[rng.integers(0, 40, 100)] + 0.5 * rng.standard_normal((100, d))
    return x.astype(np.float32), q.astype(np.float32)


def test_approximate_indexes_recall_against_flat():
    x, q = _clustered(2000, 64, seed=1)
    ids = [f"v{i}" for i in range(len(x))]
    k = 10
    flat = ClipRetriever.from_embeddings(x, ids, index="flat")
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    exact = np.argsort(-(qn @ xn.T), axis=1)[:, :k]
    ref = flat.search_vectors(q, k)
    assert ref.ids == [[ids[j] for j in row] for row in exact]

    def recall(res):
        return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref.ids, res.ids)]))

    hnsw = ClipRetriever.from_embeddings(x, ids, index="hnsw", hnsw_m=16)
    assert hnsw.params["index"] == "hnsw" and hnsw.index.ntotal == 2000
    assert recall(hnsw.search_vectors(q, k)) >= 0.9

    raw = ClipRetriever.from_embeddings(x, ids, index="ivfpq", rerank=0)
    assert raw.params["nlist"] == default_nlist(2000) and 64 % raw.params["pq_m"] == 0
    assert 1 <= raw.params["nprobe"] <= raw.params["nlist"]
    rec_raw = recall(raw.search_vectors(q, k))
    assert rec_raw >= 0.5
    reranked = ClipRetriever.from_embeddings(x, ids, index="ivfpq", rerank=4)
    res = reranked.search_vectors(q, k)
    assert recall(res) >= max(0.9, rec_raw)
    # re-ranked scores are the exact cosine similarities
    row = {pid: i for i, pid in enumerate(ids)}
    np.testing.assert_allclose(res.scores[0], [float(qn[0] @ xn[row[p]]) for p in res.ids[0]], atol=1e-5)


@pytest.mark.parametrize("index", ["flat", "hnsw", "ivfpq"])
def test_save_and_mmap_load_round_trip(tmp_path, tiny_model, index):
    kb = make_kb(tmp_path)
    r = build(kb, tiny_model, tmp_path, index=index)
    before = r.search(QUERIES, 3, exclude_ids=["p0", None, "p5", None])
    folder = r.save(tmp_path / "idx", source="folder:somewhere")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "clip" and manifest["source"] == "folder:somewhere"
    p = manifest["params"]
    assert (p["model_name"], p["pretrained"], p["index"], p["embed"], p["dim"], p["n"]) == \
        ("tiny-clip-test", None, index, "image", 32, 20)
    for mmap in (True, False):
        loaded = load_retriever(folder, mmap=mmap)
        assert isinstance(loaded, ClipRetriever) and loaded._encoder is None  # text tower built lazily
        assert loaded.read_mode.startswith("IO_FLAG") if mmap else loaded.read_mode == "read"
        if mmap:
            assert isinstance(loaded.embeddings, np.memmap)
        after = loaded.search(QUERIES, 3, exclude_ids=["p0", None, "p5", None])
        assert after.ids == before.ids
        np.testing.assert_allclose(np.array(after.scores), np.array(before.scores), atol=1e-6)


def test_embedding_resumes_after_interruption(tmp_path, tiny_model, monkeypatch):
    kb = make_kb(tmp_path)
    work = tmp_path / "work"
    calls: list[int] = []
    original = ClipEncoder.encode_image_tensors

    def interrupted(self, batch):
        if calls:
            raise KeyboardInterrupt  # the user hits Ctrl-C during the second batch
        calls.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(ClipEncoder, "encode_image_tensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(kb, tiny_model, tmp_path, work_dir=work)
    state = json.loads((work / STATE_FILE).read_text())
    assert state["done"] == 8 and calls == [8]
    first_rows = np.load(work / "embeddings.npy")[:8].copy()

    encoded: list[int] = []

    def counting(self, batch):
        encoded.append(len(batch))
        return original(self, batch)

    monkeypatch.setattr(ClipEncoder, "encode_image_tensors", counting)
    r = build(kb, tiny_model, tmp_path, work_dir=work)
    assert sum(encoded) == 12 and r.resumed_from == 8  # only the unfinished rows were embedded
    emb = np.load(work / "embeddings.npy")
    assert np.array_equal(emb[:8], first_rows)
    encoded.clear()
    fresh = build(kb, tiny_model, tmp_path, work_dir=tmp_path / "fresh")
    assert sum(encoded) == 20 and fresh.resumed_from == 0
    np.testing.assert_allclose(emb, np.asarray(fresh.embeddings), atol=1e-6)
    # a finished work dir is reused as is; a different knowledge base starts over
    encoded.clear()
    build(kb, tiny_model, tmp_path, work_dir=work)
    assert sum(encoded) == 0
    build(kb.subset(range(15)), tiny_model, tmp_path, work_dir=work)
    assert sum(encoded) == 15


def test_corrupt_and_missing_images_are_counted_and_skipped(tmp_path, tiny_model):
    kb = make_kb(tmp_path, n=12, extra={"broken": b"this is not a PNG", "gone": None})
    r = build(kb, tiny_model, tmp_path)
    assert r.skipped == {"corrupt_image": 1, "missing_image": 1}
    assert r.skipped_ids == {"broken": "corrupt_image", "gone": "missing_image"}
    assert r.index.ntotal == 12 and r.params["n"] == 12 and r.params["n_kb"] == 14
    assert "skipped 2" in r.skip_report()
    res = r.search(QUERIES, 14)
    for row in res.ids:
        assert len(row) == 12 and not {"broken", "gone"} & set(row)
    loaded = load_retriever(r.save(tmp_path / "idx"))
    assert loaded.skipped == r.skipped and loaded.params["skipped"] == {"corrupt_image": 1, "missing_image": 1}


def test_missing_weights_error_names_the_file_and_pretrained_path(monkeypatch):
    from reimagen.utils.compat import patch_torchvision_if_broken

    patch_torchvision_if_broken()
    import open_clip.pretrained as ocp

    def offline(*args, **kwargs):  # what hf_hub_download does without internet (whatever the local cache holds)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(ocp, "hf_hub_download", offline)
    with pytest.raises(RuntimeError) as err:
        ClipEncoder("ViT-B-32", "laion2b_s34b_b79k")
    msg = str(err.value)
    assert "https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/" in msg
    assert "open_clip_model.safetensors" in msg and "pretrained=PATH" in msg
    with pytest.raises(ValueError, match="neither a file nor an open-clip tag"):
        ClipEncoder("ViT-B-32", "no-such-tag")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipEncoder("ViT-B-32", "/no/such/checkpoint.pt")
    with pytest.raises(ValueError, match="unknown open-clip model"):
        ClipEncoder("ViT-Nope-1")


def test_bad_build_arguments(tmp_path, tiny_model):
    kb = make_kb(tmp_path, n=3)
    with pytest.raises(ValueError, match="index type"):
        build(kb, tiny_model, tmp_path, index="annoy")
    with pytest.raises(ValueError, match="embed mode"):
        build(kb, tiny_model, tmp_path, embed="audio")
    with pytest.raises(ValueError, match="empty"):
        build(KnowledgeBase([], [], []), tiny_model, tmp_path)
