"""Retrieval feeding the model (Sec. 3.2): a prompt retrieves its top-k pairs by BM25, they become the
neighbours c_n of a cascade; a query that retrieves nothing samples with the learned null neighbour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reimagen import Cascade, InterleavedGuidance, SamplerSettings, Stage
from reimagen.pipelines.cascade import neighbours_from_result
from reimagen.retrieval import KnowledgeBase
from reimagen.retrieval.bm25 import BM25Retriever
from conftest import make_model, randomize


@pytest.fixture()
def kb(tmp_path):
    texts = ["a Chortai running on grass", "a Chortai sleeping", "tomato bredie with wine", "a red teapot",
             "Palau Gueell at dusk", "a flock of birds"]
    rng = np.random.default_rng(0)
    refs = []
    for i in range(len(texts)):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        refs.append(f"{i}.png")
    return KnowledgeBase([f"p{i}" for i in range(len(texts))], texts, refs, name="tiny", root=tmp_path)


def test_bm25_neighbours_feed_the_cascade_and_empty_queries_use_the_null_neighbour(kb, text_encoder):
    retriever = BM25Retriever.from_knowledge_base(kb)
    prompts = ["Two Chortai are running on the field.", "", "zzzz qqqq"]
    result = retriever.search(prompts, k=2)
    assert result.ids[0] == ["p0", "p1"] and result.ids[1] == [] and result.ids[2] == []
    nbrs = neighbours_from_result(kb, result, k=2, size=16)
    assert nbrs.mask.tolist() == [[True, True], [False, False], [False, False]]
    ref = torch.from_numpy(np.array(kb.image(0).resize((16, 16), Image.BILINEAR))).permute(2, 0, 1).float() / 127.5 - 1
    assert (nbrs.images[0, 0] - ref).abs().mean() < 0.1  # the retrieved image itself, resized
    assert nbrs.texts[0] == [kb.texts[0], kb.texts[1]]

    model = randomize(make_model("tiny-16"))
    cascade = Cascade([Stage(model, InterleavedGuidance(2.0, 2.0, 0.5), SamplerSettings(steps=3))], text_encoder)
    out = cascade.sample(prompts, nbrs, seed=0)
    assert out.images.shape == (3, 3, 16, 16) and torch.isfinite(out.images).all()
    # A row with no neighbour is sampled exactly like a row whose neighbours are absent altogether.
    alone = cascade.sample(prompts[1:2], neighbours_from_result(kb, retriever.search(prompts[1:2], k=2), 2, 16), seed=0)
    assert torch.allclose(out.images[1], alone.images[0], atol=1e-5)


def test_neighbours_from_result_rejects_k_below_one(kb):
    retriever = BM25Retriever.from_knowledge_base(kb)
    with pytest.raises(ValueError, match="k must be >= 1"):
        neighbours_from_result(kb, retriever.search(["teapot"], k=1), k=0, size=16)
