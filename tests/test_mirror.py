"""Mirroring with swapped layout words (reimagen.training.loader, `train --mirror-words`): half the samples are flipped
left-right with their caption's layout words swapped, the neighbours stay as retrieved, and every other random
draw of a sample is what it is without mirroring."""

import pytest
import torch
from typer.testing import CliRunner

from conftest import make_model
from reimagen.training.data import TripleData
from reimagen.training.loader import MemorySamples, Randomness, parse_mirror_words, swap_words
from reimagen.models.text import TinyTextEncoder, build_text_encoder
from reimagen.training.train import TrainConfig, Trainer

PAIRS = (("left", "right"),)
SIDES = ["left", "right", "left", "right", "left", "right"]


def _data(n: int = 6, size: int = 8) -> TripleData:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    texts = [f"a cat number {i} on the {SIDES[i]}, not leftover." for i in range(n)]
    return TripleData(images, texts, torch.tensor([[(i + 1) % n, (i + 2) % n] for i in range(n)]))


def test_swap_words_exchanges_whole_words_at_once():
    assert swap_words("two cats on the left side", PAIRS) == "two cats on the right side"
    assert swap_words("left of right, leftover", PAIRS) == "right of left, leftover"
    assert swap_words("on the left", ()) == "on the left"
    assert parse_mirror_words(" left:right , top:bottom") == (("left", "right"), ("top", "bottom"))
    for bad in ("left", "left:", "a:b:c"):
        with pytest.raises(ValueError, match="WORD:WORD"):
            parse_mirror_words(bad)
    with pytest.raises(ValueError, match="WORD:WORD"):
        TrainConfig(mirror_words="left")


def test_mirroring_draws_last_so_other_draws_are_unchanged():
    plain, mirrored = Randomness(8, 3, 0.1, 0.1, 1.0), Randomness(8, 3, 0.1, 0.1, 1.0, mirror_words=PAIRS)
    flips = []
    for p in range(200):
        a, b = plain.draw(p), mirrored.draw(p)
        assert a["mirror"] is False and torch.equal(a["noise"], b["noise"]) and a["crop"] == b["crop"]
        flips.append(b["mirror"])
    assert 70 < sum(flips) < 130  # about half


def test_a_mirrored_sample_has_the_flipped_image_the_swapped_caption_and_the_same_neighbours():
    data = _data()
    samples = MemorySamples(data, Randomness(8, 0, 0.0, 0.0, 1.0, mirror_words=PAIRS))
    seen = set()
    for p in range(40):
        s = samples[(p, p % len(data))]
        row = s["row"]
        image, text = data.images[row], data.texts[row]
        assert torch.equal(s["x0"], image.flip(-1) if s["mirror"] else image)
        assert s["text"] == (swap_words(text, PAIRS) if s["mirror"] else text)
        assert s["nbr_text"] == [data.texts[int(i)] for i in data.neighbours[row]]
        assert torch.equal(s["nimg"], data.images[data.neighbours[row]])
        seen.add(s["mirror"])
    assert seen == {True, False}
    assert torch.equal(data.images[0], _data().images[0])  # the table itself is never flipped in place


def test_a_frozen_encoder_encodes_both_captions_once_and_trains():
    enc = build_text_encoder({"name": "minilm"})
    data = _data(size=16)
    tr = Trainer(make_model("tiny-16", text_dim=enc.dim), enc, data,
                 TrainConfig(steps=2, batch_size=4, lr=1e-3, ckpt_every=10**9, mirror_words="left:right"))
    ds = tr.dataset
    for p in range(12):
        s = ds[(p, p % len(data))]
        want = enc.encode([swap_words(data.texts[s["row"]], PAIRS) if s["mirror"] else data.texts[s["row"]]])
        n = int(want.lengths[0])
        assert int(s["text_len"][0]) == n
        torch.testing.assert_close(s["text_emb"][0, :n], want.embeddings[0, :n], rtol=1e-4, atol=1e-4)
        nbr = enc.encode([data.texts[int(i)] for i in data.neighbours[s["row"]]])
        torch.testing.assert_close(s["text_emb"][1, :nbr.embeddings.shape[1]], nbr.embeddings[0], rtol=1e-4,
                                   atol=1e-4)
    assert all(torch.isfinite(torch.tensor(tr.train_step())) for _ in range(2))


def test_mirroring_on_shards_with_a_frozen_encoder_is_refused_before_loading(tmp_path):
    from reimagen.cli import app

    res = CliRunner().invoke(app, ["train", "--shards", str(tmp_path / "nowhere"), "--text-encoder", "minilm",
                                   "--mirror-words", "left:right", "--out", str(tmp_path / "run")])
    assert res.exit_code != 0 and "needs the trainable tiny encoder" in " ".join(res.output.split())
    assert not (tmp_path / "run").exists()
    tiny = Trainer(make_model("tiny-16"), TinyTextEncoder(dim=32), _data(size=16),
                   TrainConfig(steps=1, batch_size=2, mirror_words="left:right"))
    assert tiny.dataset.encoding is None  # a trainable encoder reads the swapped caption as text
