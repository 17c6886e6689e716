"""Queries that retrieved fewer than K neighbours: padding is ignored, and none at all means the null neighbour."""

from __future__ import annotations

import pytest
import torch

from reimagen import Cascade, InterleavedGuidance, Neighbours, ReImagenUNet, SamplerSettings, Stage, get_preset
from reimagen.models.text import TinyTextEncoder


@pytest.fixture()
def stage():
    torch.manual_seed(0)
    m = ReImagenUNet(get_preset("tiny-16")).eval()
    with torch.no_grad():  # give the zero-initialised output layers weights so every path shows in the output
        for p in m.parameters():
            if p.dim() > 1 and not p.abs().sum():
                torch.nn.init.normal_(p, std=0.1)
    return m, TinyTextEncoder(dim=32, seed=0).eval()


def _forward(m, enc, imgs, texts, valid, drop=None):
    te, ne = enc.encode(["x", "y"]), enc.encode([t for row in texts for t in row])
    mem = m.encode_neighbours(imgs, m.project_text(ne.embeddings, ne.mask), valid)
    x, t = torch.ones(2, 3, 16, 16) * 0.3, torch.full((2,), 0.5)
    with torch.no_grad():
        return m(x, t, m.project_text(te.embeddings, te.mask), mem, drop_neighbours=drop)


def test_padded_neighbours_do_not_influence_the_output(stage):
    m, enc = stage
    imgs = torch.rand(2, 2, 3, 16, 16) * 2 - 1
    valid = torch.tensor([[True, False], [True, True]])
    a = _forward(m, enc, imgs, [["a", "b"], ["c", "d"]], valid)
    imgs2 = imgs.clone()
    imgs2[0, 1] = -1.0  # change only the padded slot of row 0
    b = _forward(m, enc, imgs2, [["a", "something else"], ["c", "d"]], valid)
    assert torch.allclose(a[0], b[0], atol=1e-6)
    full = _forward(m, enc, imgs2, [["a", "something else"], ["c", "d"]], None)
    assert not torch.allclose(a[0], full[0], atol=1e-3)  # the same slot does matter when it is valid


def test_a_row_without_any_neighbour_equals_the_dropped_neighbour_prediction(stage):
    m, enc = stage
    imgs = torch.rand(2, 2, 3, 16, 16) * 2 - 1
    none_valid = _forward(m, enc, imgs, [["a", "b"], ["c", "d"]], torch.tensor([[True, True], [False, False]]))
    dropped = _forward(m, enc, imgs, [["a", "b"], ["c", "d"]], None, drop=torch.tensor([False, True]))
    assert torch.allclose(none_valid, dropped, atol=1e-6)


def test_cascade_accepts_a_mask_and_checks_its_shape(stage):
    m, enc = stage
    c = Cascade([Stage(m, InterleavedGuidance(2.0, 2.0, 0.5), SamplerSettings(steps=2))], enc)
    imgs = torch.rand(2, 2, 3, 16, 16) * 2 - 1
    out = c.sample(["x", "y"], Neighbours(imgs, [["a", ""], ["", ""]], torch.tensor([[True, False], [False, False]])))
    assert out.images.shape == (2, 3, 16, 16) and torch.isfinite(out.images).all()
    with pytest.raises(ValueError, match="mask"):
        Neighbours(imgs, [["a", "b"], ["c", "d"]], torch.ones(2, 3, dtype=torch.bool))
