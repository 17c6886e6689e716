"""Properties of training (reimagen/train.py, reimagen/data.py, Sec. 3.2 "Model Training"): condition dropout
rates, overfitting a few images, checkpoints, exact resume, validation, the triples table reader."""

import inspect
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import layout_model, make_model, make_triples, randomize, structured_images
from reimagen.models.config import UNetConfig
from reimagen.training.data import TripleData
from reimagen.models.text import TinyTextEncoder
from reimagen.models.checkpoint import load_stage, load_weights, save_checkpoint
from reimagen.training.train import TrainConfig, Trainer


def _trainer(tmp_path=None, steps=4, batch_size=4, seed=0, model_seed=0, enc_seed=0, data=None, preset="tiny-16", **kw):
    data = data if data is not None else make_triples(6, 32 if preset == "tiny-sr32" else 16, 2)
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=1e-3, seed=seed, log_every=kw.pop("log_every", 2),
                      ckpt_every=kw.pop("ckpt_every", 10**9), **kw)
    return Trainer(make_model(preset, seed=model_seed), TinyTextEncoder(dim=32, seed=enc_seed), data, cfg,
                   out_dir=tmp_path)


def _state(trainer):
    sd = {f"m.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    sd.update({f"e.{k}": v.clone() for k, v in trainer.ema.state_dict().items()})
    sd.update({f"t.{k}": v.clone() for k, v in trainer.text_encoder.state_dict().items()})
    return sd


# ----------------------------------------------------------------------------------------------
# Condition dropout: 10% each, independently
# ----------------------------------------------------------------------------------------------
def _record_masks(trainer, monkeypatch):
    """Replace the network by a cheap recorder of the drop masks it is given (the trainer's path is unchanged)."""
    rec = {"text": [], "nbr": [], "nbr_images": []}
    m = trainer.model

    def fake_encode_neighbours(images, *a, **kw):
        rec["nbr_images"].append(images.shape)
        return None

    sig = inspect.signature(m.forward)

    def fake_forward(*a, **kw):
        v = sig.bind(*a, **kw).arguments
        rec["text"].append(v["drop_text"].clone())
        rec["nbr"].append(v["drop_neighbours"].clone())
        return v["x_t"] * 0.0 + m.null_text.sum() * 0.0  # differentiable, so backward/step run as usual

    monkeypatch.setattr(m, "encode_neighbours", fake_encode_neighbours)
    monkeypatch.setattr(m, "forward", fake_forward)
    return rec


def test_text_and_neighbour_dropout_rates_are_ten_percent_each_and_independent(monkeypatch, tiny_data):
    steps, b = 120, 64
    tr = _trainer(steps=steps, batch_size=b, data=tiny_data)
    assert tr.cfg.p_drop_text == 0.1 and tr.cfg.p_drop_neighbours == 0.1  # the paper's defaults
    rec = _record_masks(tr, monkeypatch)
    for _ in range(steps):
        tr.train_step()
    dt, dn = torch.cat(rec["text"]).float(), torch.cat(rec["nbr"]).float()
    n = steps * b
    assert dt.numel() == n and len(rec["nbr_images"]) == steps and rec["nbr_images"][0][:2] == (b, 2)
    tol = lambda p: 4 * math.sqrt(p * (1 - p) / n)  # noqa: E731  (4-sigma binomial bound)
    assert abs(float(dt.mean()) - 0.1) < tol(0.1)
    assert abs(float(dn.mean()) - 0.1) < tol(0.1)
    assert abs(float((dt * dn).mean()) - 0.01) < tol(0.01)  # independent: P(both) = 0.1 * 0.1
    # and the masks differ from step to step (fresh draws)
    assert not all(torch.equal(rec["text"][0], r) for r in rec["text"][1:])


def test_dropout_rates_follow_the_config(monkeypatch):
    steps, b = 40, 64
    tr = _trainer(steps=steps, batch_size=b, p_drop_text=0.5, p_drop_neighbours=0.0)
    rec = _record_masks(tr, monkeypatch)
    for _ in range(steps):
        tr.train_step()
    dt, dn = torch.cat(rec["text"]).float(), torch.cat(rec["nbr"]).float()
    assert abs(float(dt.mean()) - 0.5) < 4 * math.sqrt(0.25 / (steps * b))
    assert float(dn.sum()) == 0.0


# ----------------------------------------------------------------------------------------------
# Learning: a tiny model overfits four images
# ----------------------------------------------------------------------------------------------
def test_tiny_model_overfits_four_images():
    data = make_triples(4, 16, 2, seed=3)
    cfg = TrainConfig(steps=200, batch_size=8, lr=3e-3, log_every=25, ckpt_every=10**9, ema_decay=0.99, seed=0)
    tr = Trainer(make_model("tiny-16", seed=0), TinyTextEncoder(dim=32, seed=0), data, cfg)
    hist = tr.fit(progress=False)
    assert [h["step"] for h in hist] == list(range(25, 201, 25))
    first, last = hist[0]["loss"], hist[-1]["loss"]
    assert all(math.isfinite(h["loss"]) for h in hist)
    # measured: ~0.5 -> ~0.05 (factor ~10); require at least 5x
    assert last * 5 <= first, f"loss only went from {first:.4f} to {last:.4f}"


def test_channels_last_trains_the_same_function_in_another_memory_layout():
    """--channels-last changes where the convolutions' tensors live, not the maths: the same losses (to float
    rounding: other kernels) over a few steps, each computed by the weights the previous steps left, and the
    model's convolution weights are NHWC. (Weights are not compared one by one: Adam's normalised update turns
    rounding-level gradient differences on near-zero gradients into lr-sized ones.)"""
    runs = []
    for channels_last in (False, True):
        cfg = TrainConfig(steps=4, batch_size=8, lr=3e-3, ckpt_every=10**9, seed=0, channels_last=channels_last)
        tr = Trainer(make_model("tiny-16", seed=0), TinyTextEncoder(dim=32, seed=0), make_triples(8, 16, 2, seed=1),
                     cfg)
        runs.append(([tr.train_step() for _ in range(4)], tr))
    (plain, _), (nhwc, b) = runs
    conv = next(m for m in b.model.modules() if isinstance(m, torch.nn.Conv2d)).weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert nhwc == pytest.approx(plain, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_gives_identical_outputs_and_text_encodings(tmp_path):
    tr = _trainer(steps=3, batch_size=4)
    for _ in range(3):
        tr.train_step()
    model, enc = tr.model.eval(), tr.text_encoder.eval()
    save_checkpoint(tmp_path / "ck", model, enc, ema=tr.ema, train_config=tr.cfg, step=tr.step)
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["step"] == 3 and UNetConfig.from_dict(meta["unet"]) == model.cfg

    texts = ["a red dog number 1", "a blue cat"]
    e0 = enc.encode(texts)
    loaded_model, loaded_enc = load_stage(tmp_path / "ck", ema=False)
    e1 = loaded_enc.encode(texts)
    assert torch.equal(e0.embeddings, e1.embeddings) and torch.equal(e0.mask, e1.mask)
    # the trained encoder differs from a fresh one with the same seed: the weights really were restored
    assert not torch.equal(TinyTextEncoder(dim=32, seed=0).eval().encode(texts).embeddings, e0.embeddings)

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([0.3, 0.8])
    nimg = torch.rand(2, 2, 3, 16, 16, generator=g) * 2 - 1
    ntexts = ["n1", "n2", "n3", "n4"]

    def run(m, e):
        with torch.no_grad():
            te, ne = e.encode(texts), e.encode(ntexts)
            mem = m.encode_neighbours(nimg, m.project_text(ne.embeddings, ne.mask))
            return m(x, t, m.project_text(te.embeddings, te.mask), mem)

    ref = run(model, enc)
    assert ref.abs().max() > 0  # trained: no longer the zero-initialised output
    assert torch.equal(run(loaded_model, loaded_enc), ref)
    ema_model, _ = load_stage(tmp_path / "ck", ema=True)
    assert torch.equal(run(ema_model, enc), run(tr.ema, enc))
    for (k, a), b in zip(ema_model.state_dict().items(), tr.ema.state_dict().values()):
        assert torch.equal(a, b), k


def test_load_weights_into_other_config_raises_naming_differing_fields(tmp_path):
    model = make_model("tiny-16")
    save_checkpoint(tmp_path / "ck", model, TinyTextEncoder(dim=32))
    other = make_model("tiny-16", base_channels=8, attn_resolutions=())
    with pytest.raises(ValueError) as err:
        load_weights(other, tmp_path / "ck")
    msg = str(err.value)
    assert "base_channels" in msg and "attn_resolutions" in msg
    assert "text_dim" not in msg  # only the fields that differ
    with pytest.raises(FileNotFoundError):
        load_weights(model, tmp_path / "nowhere")


def test_init_from_starts_a_grown_preset_from_a_stage_computing_the_same_function(tmp_path, text_encoder):
    from reimagen.models.checkpoint import init_from

    old = randomize(make_model("tiny-16"), std=0.05, seed=3)
    save_checkpoint(tmp_path / "ck", old, TinyTextEncoder(dim=32), ema=old)
    grown = make_model("tiny-16", seed=1, text_layout=2)
    new = init_from(grown, tmp_path / "ck")
    assert new and all(n.endswith((".layout.weight", ".layout.bias", ".layout_queries")) for n in new)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([0.3, 0.8])
    e = text_encoder.encode(["a red dog", "a cat"])
    nimg = torch.rand(2, 2, 3, 16, 16, generator=g) * 2 - 1
    outs = []
    for m in (old, grown):
        with torch.no_grad():
            tc = m.project_text(e.embeddings, e.mask)
            outs.append(m(x, t, tc, m.encode_neighbours(nimg, tc.index(torch.tensor([0, 0, 1, 1])))))
    assert outs[0].abs().max() > 0
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=0)  # the layout maps start at zero
    with pytest.raises(ValueError, match="fine-tuning can only add tensors"):
        init_from(make_model("tiny-16", base_channels=8), tmp_path / "ck")
    with pytest.raises(ValueError, match="this stage lacks"):
        init_from(make_model("tiny-16", neighbour_attention=False), tmp_path / "ck")


def test_exact_resume_gives_bitwise_equal_weights(tmp_path):
    n = 3
    straight = _trainer(tmp_path / "a", steps=2 * n)
    straight.fit(progress=False)
    assert straight.step == 2 * n

    first = _trainer(tmp_path / "b", steps=n)
    first.fit(progress=False)
    assert (tmp_path / "b" / "last" / "trainer_state.pt").exists()
    # a new process: different initial weights and text-encoder seed, all overwritten by the resume
    second = _trainer(tmp_path / "b", steps=2 * n, model_seed=5, enc_seed=9)
    second.fit(progress=False)
    assert second.step == 2 * n
    a, b = _state(straight), _state(second)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"resumed run differs in {different[:5]}"
    # and training did move the weights (the comparison is not between two untouched models)
    init = _state(_trainer(steps=1))
    assert any(not torch.equal(init[k], a[k]) for k in a if k.startswith("m."))


def test_resume_drops_log_rows_past_the_checkpoint_and_keeps_counting_seconds(tmp_path):
    """A run killed between checkpoints has logged steps it will redo; the resumed log has each step once, in
    order, and its train-loop seconds continue from the checkpoint's instead of restarting at 0."""
    first = _trainer(tmp_path, steps=2, log_every=1, ckpt_every=2)
    first.fit(progress=False)
    log = tmp_path / "log.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    with open(log, "a") as fh:  # what the killed process logged after its last checkpoint
        for step in (3, 4):
            fh.write(json.dumps({"step": step, "loss": 9.0, "seconds": 1e6}) + "\n")
    rows[-1]["seconds"] = 500.0  # as if the first session had taken 500 s to reach its checkpoint
    log.write_text("".join(json.dumps(r) + "\n" for r in rows) + log.read_text().split("\n", 2)[2])
    second = _trainer(tmp_path, steps=4, log_every=1, ckpt_every=2)
    second.fit(progress=False)
    after = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    assert all(r["loss"] != 9.0 for r in after)
    assert 500.0 <= after[2]["seconds"] <= after[3]["seconds"] < 1e6


def test_ema_decay_extremes():
    tr = _trainer(steps=1, ema_decay=0.0)
    tr.train_step()
    for a, b in zip(tr.ema.parameters(), tr.model.parameters()):
        assert torch.equal(a, b)
    tr = _trainer(steps=1, ema_decay=1.0, ema_warmup=False)
    init = [p.clone() for p in tr.model.parameters()]
    tr.train_step()
    assert all(torch.equal(a, b) for a, b in zip(tr.ema.parameters(), init))
    assert any(not torch.equal(a, b) for a, b in zip(tr.model.parameters(), init))


def test_ema_warmup_tracks_early_weights():
    """With warm-up the EMA forgets the initial weights within tens of steps; without, it keeps 0.999^s of them."""
    tr = _trainer(steps=1, ema_decay=0.999)
    assert tr.ema_decay_at(0) == pytest.approx(0.1) and tr.ema_decay_at(10**6) == 0.999
    cold = _trainer(steps=1, ema_decay=0.999, ema_warmup=False)
    init = [p.clone() for p in tr.model.parameters()]
    for t in (tr, cold):
        for _ in range(5):
            t.train_step()

    def dist(a, b):
        return sum(float((x - y).detach().norm()) for x, y in zip(a, b))

    moved = dist(tr.model.parameters(), init)
    assert dist(tr.ema.parameters(), init) > 0.3 * moved  # warm EMA follows the training weights
    assert dist(cold.ema.parameters(), init) < 0.01 * moved  # cold EMA is still the initialisation


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["p_drop_text", "p_drop_neighbours", "max_aug_level"])
@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_train_config_rejects_probabilities_outside_unit_interval(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_train_config_rejects_bad_optimizer_and_sizes():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(ValueError):
        TrainConfig(steps=0)
    with pytest.raises(ValueError):
        TrainConfig(batch_size=0)


def test_trainer_rejects_wrong_image_size_text_dim_and_missing_neighbours():
    with pytest.raises(ValueError, match="32px"):
        _trainer(data=make_triples(6, 32, 2))
    with pytest.raises(ValueError, match="16"):
        Trainer(make_model("tiny-16"), TinyTextEncoder(dim=16), make_triples(6, 16, 2), TrainConfig())
    with pytest.raises(ValueError, match="K = 0"):
        _trainer(data=make_triples(6, 16, 0))


def test_sr_trainer_step_gives_finite_loss_with_downsampled_lowres(monkeypatch):
    tr = _trainer(steps=1, batch_size=3, preset="tiny-sr32", max_aug_level=0.0)
    seen = {}
    orig = tr.model.forward

    sig = inspect.signature(orig)

    def spy(*a, **kw):
        v = sig.bind(*a, **kw).arguments
        seen["lowres"], seen["aug_t"] = v["lowres"], v["aug_t"]
        return orig(*a, **kw)

    monkeypatch.setattr(tr.model, "forward", spy)
    loss = tr.train_step()
    assert math.isfinite(loss) and loss > 0
    assert seen["lowres"].shape == (3, 3, 32, 32)
    assert torch.equal(seen["aug_t"], torch.zeros(3))  # max_aug_level = 0: clean c_x
    # the conditioning of each row is a training image downsampled to 16 px and upsampled back to 32 px
    x0 = tr.data.images_at(torch.arange(len(tr.data)))
    low = F.interpolate(x0, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    expected = F.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    for row in seen["lowres"]:
        dist = (expected - row).abs().flatten(1).amax(1)
        assert float(dist.min()) < 1e-5
    tr2 = _trainer(steps=1, batch_size=3, preset="tiny-sr32", max_aug_level=1.0)
    assert math.isfinite(tr2.train_step())


# ----------------------------------------------------------------------------------------------
# TripleData
# ----------------------------------------------------------------------------------------------
def _write_images(folder, n, size=24):
    from PIL import Image

    imgs = structured_images(n, size, seed=5)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(imgs[i]).save(p)
        paths.append(p.name)
    return paths


def test_from_table_reads_parquet_and_skips_missing_and_corrupt_images(tmp_path):
    from PIL import Image

    paths = _write_images(tmp_path, 6)
    (tmp_path / "img4.png").write_bytes(b"this is not a png")  # corrupt
    paths[5] = "does_not_exist.png"  # missing
    # solid-colour image 0 so its resized pixels are known exactly
    Image.fromarray(np.full((24, 24, 3), (200, 10, 90), dtype=np.uint8)).save(tmp_path / "img0.png")
    ids = [f"p{i}" for i in range(6)]
    nbrs = [["p1", "p2"], ["p2", "p3"], ["p3", "p0"], ["p4", "p0"], ["p0", "p1"], ["p0", "p1"]]
    df = pd.DataFrame({"id": ids, "text": [f"caption {i}" for i in range(6)], "image": paths, "neighbor_ids": nbrs})
    df.to_parquet(tmp_path / "triples.parquet")
    data = TripleData.from_table(tmp_path / "triples.parquet", image_size=16, progress=False)
    assert data.skipped["missing image"] == 1 and data.skipped["unreadable image"] == 1
    assert data.ids == ["p0", "p1", "p2", "p3"]
    assert data.images.shape == (4, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.texts == ["caption 0", "caption 1", "caption 2", "caption 3"]
    # p3's neighbour p4 was skipped: p3 stays only as a neighbour, and is counted
    assert data.train_rows.tolist() == [0, 1, 2]
    assert data.skipped["neighbour image skipped"] == 1
    assert data.neighbours[:3].tolist() == [[1, 2], [2, 3], [3, 0]]
    assert (data.images[0].int() - torch.tensor([200, 10, 90])[:, None, None]).abs().max() <= 1


def test_from_table_reads_pipe_separated_neighbour_ids_from_csv(tmp_path):
    paths = _write_images(tmp_path, 3, size=16)
    df = pd.DataFrame({"id": ["a", "b", "c"], "text": ["x", "y", "z"], "image": paths,
                       "neighbor_ids": ["b|c", "c|a", "a|b"]})
    df.to_csv(tmp_path / "t.csv", index=False)
    data = TripleData.from_table(tmp_path / "t.csv", image_size=16, progress=False)
    assert data.neighbours.tolist() == [[1, 2], [2, 0], [0, 1]] and data.k == 2
    assert data.skipped == {}
    np.testing.assert_array_equal(data.images.permute(0, 2, 3, 1).numpy(), structured_images(3, 16, seed=5))


def test_from_table_rejects_unknown_neighbour_ids(tmp_path):
    paths = _write_images(tmp_path, 2)
    df = pd.DataFrame({"id": ["a", "b"], "text": ["x", "y"], "image": paths, "neighbor_ids": [["b"], ["zzz"]]})
    df.to_parquet(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="not ids"):
        TripleData.from_table(tmp_path / "t.parquet", image_size=16, progress=False)


def test_from_table_rejects_missing_columns_and_duplicate_ids(tmp_path):
    paths = _write_images(tmp_path, 2)
    pd.DataFrame({"id": ["a", "b"], "text": ["x", "y"], "image": paths}).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="neighbor_ids"):
        TripleData.from_table(tmp_path / "t.parquet", image_size=16, progress=False)
    pd.DataFrame({"id": ["a", "a"], "text": ["x", "y"], "image": paths,
                  "neighbor_ids": [["a"], ["a"]]}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="duplicate"):
        TripleData.from_table(tmp_path / "d.parquet", image_size=16, progress=False)


def test_from_arrays_and_resized():
    imgs = structured_images(3, 16)
    data = TripleData.from_arrays(imgs, ["a", "b", "c"], np.array([[1], [2], [0]]))
    assert data.images.shape == (3, 3, 16, 16) and data.k == 1 and data.train_rows.tolist() == [0, 1, 2]
    x = data.images_at(torch.tensor([0]))
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[0], torch.from_numpy(imgs[0]).permute(2, 0, 1).float() / 127.5 - 1)
    big = data.resized(32)
    assert big.image_size == 32 and big.texts == data.texts and torch.equal(big.neighbours, data.neighbours)
    with pytest.raises(ValueError):
        TripleData.from_arrays(imgs, ["a", "b"], np.array([[1], [2], [0]]))


def test_adafactor_trains_and_resumes_exactly(tmp_path):
    """The paper's optimiser for the 64x64 stage: its state survives a checkpoint, so a resumed run is bitwise the straight one."""
    straight = _trainer(steps=6, optimizer="adafactor")
    straight.fit(progress=False)
    first = _trainer(tmp_path, steps=3, optimizer="adafactor", ckpt_every=3)
    first.fit(progress=False)
    resumed = _trainer(tmp_path, steps=6, optimizer="adafactor")
    resumed.fit(progress=False)
    assert resumed.step == 6
    for (k, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert isinstance(resumed.opt, torch.optim.Adafactor)


def test_ship_stage_packs_fp16_ema_weights_and_the_timed_command(tmp_path):
    """``toyworld.ship``: a trained run shipped into the package is small (fp16 EMA, no optimiser state),
    loads as the EMA weights, and its provenance has the command that really ran (from /usr/bin/time -v)."""
    from toyworld.ship import ship_stage

    tr = _trainer(tmp_path / "run", steps=4, ckpt_every=2)
    tr.fit(progress=False)
    cmd = "reimagen-eval train --preset tiny-16 --steps 4 --out run"
    timelog = tmp_path / "train.out"
    timelog.write_text(f'loss 1 -> 0.5\n\tCommand being timed: "{cmd}"\n\tUser time (seconds): 3.0\n'
                       "\tElapsed (wall clock) time (h:mm:ss or m:ss): 1:02:03.5\n"
                       "\tMaximum resident set size (kbytes): 204800\n")
    dst = ship_stage(tmp_path / "run" / "last", tmp_path / "shipped" / "base", timelog)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "ema.safetensors", "log.jsonl", "loss.png",
                                                    "provenance.json"]
    prov = json.loads((dst / "provenance.json").read_text())
    assert prov["command"] == cmd and prov["step"] == 4
    assert prov["wall_seconds"] == 3723.5 and prov["peak_rss_mb"] == 200.0
    model, _ = load_stage(dst)
    ema = tr.ema.state_dict()
    assert all(torch.allclose(v, ema[k].float(), atol=1e-2 * (1 + ema[k].abs().max())) for k, v in model.state_dict().items())
    # no time log: the documented command of the stage name, if any
    assert json.loads((ship_stage(tmp_path / "run" / "last", tmp_path / "x" / "sr") / "provenance.json").read_text()
                      )["command"].startswith("reimagen-eval train")


def test_reduce_layout_rank_keeps_the_function_on_the_captions_span(text_encoder):
    from reimagen.models.checkpoint import reduce_layout_rank

    big = layout_model(seed=4)
    captions = [f"a {c} dog on the {s}" for c in ("red", "blue", "green") for s in ("left", "right")]
    e = text_encoder.encode(captions)
    with pytest.raises(ValueError, match="full-rank"):
        reduce_layout_rank(make_model("tiny-16"), e.embeddings, e.mask, 4)
    small, kept = reduce_layout_rank(big, e.embeddings, e.mask, rank=len(captions) * 2)
    assert small.cfg.text_layout_rank == 12 and kept > 0.999999
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in big.parameters())
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 3, 16, 16, generator=g), torch.rand(6, generator=g)
    drop = torch.tensor([False, True] * 3)
    nimg = torch.rand(6, 2, 3, 16, 16, generator=g) * 2 - 1
    outs = []
    for m in (big, small):
        with torch.no_grad():
            tc = m.project_text(e.embeddings, e.mask)
            mem = m.encode_neighbours(nimg, tc.index(torch.arange(6).repeat_interleave(2)))
            outs.append(m(x, t, tc, mem, drop_text=drop))
    assert (outs[0] - big.eval()(x, t, big.project_text(e.embeddings, e.mask), mem, drop_text=~drop)).abs().max() > 0
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=0)
    _, kept = reduce_layout_rank(big, e.embeddings, e.mask, rank=2)
    assert kept < 0.999


def test_train_continues_a_checkpoint_with_its_own_configuration(tmp_path):
    """`train --preset CKPT --init-from CKPT`: a stage whose configuration is no preset (a shipped one, reduced
    layout maps) trains on from its weights."""
    from typer.testing import CliRunner

    from reimagen.models.checkpoint import read_checkpoint_config, read_stage_weights
    from reimagen_eval.cli import app

    paths = _write_images(tmp_path, 4, size=16)
    nbrs = [["p1", "p2"], ["p2", "p3"], ["p3", "p0"], ["p0", "p1"]]
    pd.DataFrame({"id": [f"p{i}" for i in range(4)], "text": [f"caption {i}" for i in range(4)], "image": paths,
                  "neighbor_ids": nbrs}).to_parquet(tmp_path / "triples.parquet")
    old = randomize(make_model("tiny-16", text_layout=2, text_layout_rank=4), std=0.05, seed=3)
    save_checkpoint(tmp_path / "ck", old, TinyTextEncoder(dim=32), ema=old)
    args = ["train", "--triples", str(tmp_path / "triples.parquet"), "--preset", str(tmp_path / "ck"), "--init-from",
            str(tmp_path / "ck"), "--steps", "1", "--batch-size", "2", "--lr", "1e-9", "--out", str(tmp_path / "run")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert UNetConfig.from_dict(read_checkpoint_config(tmp_path / "run" / "last")["unet"]) == old.cfg
    new, start = read_stage_weights(tmp_path / "run" / "last", ema=False), old.state_dict()
    assert set(new) == set(start)
    assert max((new[k] - start[k]).abs().max().item() for k in new) < 1e-6  # one step at lr 1e-9 from its weights
