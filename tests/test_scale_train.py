"""Training at scale (reimagen/shards.py, text_store.py, loader.py, distributed.py, train.py): webdataset shards,
precomputed text embeddings, the streaming loader's global order and position, gradient accumulation, precision,
and torchrun with gloo on 2 CPU processes (DDP and FSDP2)."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import WORDS, make_model, structured_images
from reimagen.training.data import TripleData
from reimagen.training.loader import Randomness, ShardSamples, Slicing, StreamOrder, make_loader
from reimagen.training.shards import ShardSettings, read_manifest, write_shards
from reimagen.models.text import TinyTextEncoder
from reimagen.training.train import TrainConfig, Trainer

N, SIZE = 24, 20
# Two runs on the same samples and noise whose float32 sums run in another order (accumulation, DDP's all-reduce,
# FSDP's reduce-scatter), amplified by Adam's normalisation of small gradients. The bar was atol 1e-6 first;
# seen: 2.9e-6 (accumulation) and 1.25e-6 (FSDP2 x 2 with accumulation) on single weights. Now 1e-5 = 1% of
# one step at lr 1e-3, for every such comparison (a moved bar).
SAME_SAMPLES = {"rtol": 1e-5, "atol": 1e-5}


def _table(folder: Path, n: int = N, k: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    imgs = structured_images(n, SIZE, seed=3)
    rows = []
    for i in range(n):
        fmt = "png" if i % 2 else "jpg"  # both kinds of member
        Image.fromarray(imgs[i]).save(folder / f"im{i}.{fmt}", quality=95)
        rows.append({"id": f"p.{i}/x", "text": f"a {WORDS[i % 3]} {WORDS[3 + i % 5]} number {i}",
                     "image": f"im{i}.{fmt}", "neighbor_ids": [f"p.{(i + j + 1) % n}/x" for j in range(k)]})
    pd.DataFrame(rows).to_parquet(folder / "triples.parquet")
    return folder / "triples.parquet"


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    table = _table(root / "data")
    write_shards(table, root / "shards", ShardSettings(samples_per_shard=8), progress=False)
    return root / "shards"


def _rnd(size=16, seed=0):
    return Randomness(size, seed, 0.1, 0.1, 1.0)


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------
def test_shards_carry_image_text_and_neighbours_with_a_wids_manifest(shard_dir):
    m = read_manifest(shard_dir)
    assert m["k"] == 2 and m["samples"] == N and [s["nsamples"] for s in m["shardlist"]] == [8, 8, 8]
    with tarfile.open(shard_dir / "shard-000001.tar") as tf:
        names = tf.getnames()
        meta = json.loads(tf.extractfile("000000008.json").read())
    assert {"000000008.jpg", "000000008.txt", "000000008.nbr0.png", "000000008.nbr1.jpg"} <= set(names)
    assert meta["id"] == "p.8/x" and meta["neighbor_ids"] == ["p.9/x", "p.10/x"]
    assert meta["neighbor_texts"][0].endswith("number 9")


def test_shard_writer_counts_bad_images_resumes_and_splits_by_rank(tmp_path):
    table = _table(tmp_path / "data", n=12)
    (tmp_path / "data" / "im3.png").unlink()                      # missing
    (tmp_path / "data" / "im4.jpg").write_bytes(b"not a jpeg")   # corrupt
    out = tmp_path / "shards"
    r1 = write_shards(table, out, ShardSettings(samples_per_shard=4), rank=1, world_size=2, progress=False)
    assert r1.shards_written == 1 and r1.manifest is None        # rank 1 of 2 wrote shard 1 only
    assert not (out / "shard-000000.tar").exists() and (out / "shard-000001.tar").exists()
    r0 = write_shards(table, out, ShardSettings(samples_per_shard=4), rank=0, world_size=2, progress=False)
    assert r0.shards_written == 2 and r0.manifest is not None
    m = read_manifest(out)
    # row i's neighbours are i + 1, i + 2: rows 3 (missing) and 4 (corrupt) go, and rows 1 and 2, whose first
    # bad neighbour is row 3; each skipped row is counted once, under its first reason
    assert m["samples"] == 8
    assert m["skipped"] == {"missing image": 1, "unreadable image": 1, "neighbour's missing image": 2}
    again = write_shards(table, out, ShardSettings(samples_per_shard=4), progress=False)
    assert again.shards_written == 0 and again.shards_skipped == 3
    with pytest.raises(ValueError, match="other settings"):
        write_shards(table, out, ShardSettings(samples_per_shard=5), progress=False)


# ----------------------------------------------------------------------------------------------
# The loader: one global order, exactly once per epoch, exact position
# ----------------------------------------------------------------------------------------------
def _collect(dataset, order, world, step0, steps, batch=6, accum=1, workers=0):
    seen = {}
    for r in range(world):
        it = iter(make_loader(dataset, order, Slicing(batch, world, r, accum), step0, workers))
        for _ in range(steps * accum):
            b = next(it)
            seen.update({int(p): int(x) for p, x in zip(b["position"], b["row"])})
    return seen


@pytest.mark.parametrize("world,accum,workers", [(1, 1, 0), (2, 1, 2), (3, 2, 1)])
def test_every_sample_once_per_epoch_in_one_order_whatever_the_ranks_and_workers(shard_dir, world, accum, workers):
    ds = ShardSamples(shard_dir, _rnd())
    order = StreamOrder(ds.lengths, seed=5, window=2)
    seen = _collect(ds, order, world, 0, 2 * N // 6, batch=6, accum=accum, workers=workers)  # two epochs
    assert sorted(seen) == list(range(2 * N))
    for e in range(2):
        assert sorted(seen[p] for p in range(e * N, (e + 1) * N)) == list(range(N))  # each row once per epoch
    reference = _collect(ds, order, 1, 0, 2 * N // 6)
    assert seen == reference  # the same global order as one process, one worker
    assert [seen[p] for p in range(N)] != [seen[p] for p in range(N, 2 * N)]  # reshuffled per epoch


def test_resume_continues_at_the_next_sample(shard_dir):
    ds = ShardSamples(shard_dir, _rnd())
    order = StreamOrder(ds.lengths, seed=1)
    full = iter(make_loader(ds, order, Slicing(6), 0))
    batches = [next(full) for _ in range(5)]
    later = next(iter(make_loader(ds, order, Slicing(6), 3)))
    assert torch.equal(later["row"], batches[3]["row"]) and torch.equal(later["noise"], batches[3]["noise"])
    assert torch.equal(later["x0"], batches[3]["x0"])


def test_stream_order_memory_is_per_window_not_per_dataset():
    order = StreamOrder([1000] * 5000, seed=0, window=4)  # 5M samples
    assert order(4_999_999) in range(5_000_000) and order(5_000_000 + 17) in range(5_000_000)
    assert max(w.size for w in [order._window(0, i) for i in range(3)]) == 4000


def test_corrupt_jpeg_inside_a_shard_is_counted_and_skipped(shard_dir, tmp_path):
    import shutil

    bad = tmp_path / "shards"
    shutil.copytree(shard_dir, bad)
    with tarfile.open(bad / "shard-000000.tar") as tf:
        member = tf.getmember("000000002.jpg")
    with open(bad / "shard-000000.tar", "r+b") as fh:  # the bytes of one image, garbled in place
        fh.seek(member.offset_data)
        fh.write(b"\0garbage" * (member.size // 8))
    tr = Trainer(make_model("tiny-16"), TinyTextEncoder(dim=32), bad, TrainConfig(steps=4, batch_size=6, lr=1e-3,
                 log_every=4, ckpt_every=10**9), out_dir=tmp_path / "run")
    hist = tr.fit(progress=False)  # one epoch: 24 samples
    assert tr.skipped["unreadable samples"] == 1 and hist[-1]["unreadable_samples"] == 1
    assert np.isfinite(hist[-1]["loss"])


# ----------------------------------------------------------------------------------------------
# One process: accumulation, precision, the in-RAM and streamed paths agree
# ----------------------------------------------------------------------------------------------
def _memory_trainer(shard_dir, **kw):
    data = TripleData.from_table(shard_dir.parent / "data" / "triples.parquet", 16, progress=False)
    cfg = TrainConfig(log_every=1, ckpt_every=10**9, **{"steps": 3, "batch_size": 8, "lr": 1e-3, **kw})
    return Trainer(make_model("tiny-16"), TinyTextEncoder(dim=32, seed=0), data, cfg)


def test_gradient_accumulation_2_x_half_batch_equals_the_full_batch(shard_dir):
    full, accum = _memory_trainer(shard_dir), _memory_trainer(shard_dir, grad_accum=2)
    for _ in range(3):
        full.train_step(), accum.train_step()
    for a, b in zip(full.model.parameters(), accum.model.parameters()):
        torch.testing.assert_close(a, b, **SAME_SAMPLES)


def test_the_streamed_path_trains_like_the_in_ram_path(shard_dir):
    ram = _memory_trainer(shard_dir)
    streamed = Trainer(make_model("tiny-16"), TinyTextEncoder(dim=32, seed=0), shard_dir,
                       TrainConfig(steps=3, batch_size=8, lr=1e-3))
    ram.order = streamed.order  # the same sample order (the in-RAM data is one "shard")
    for _ in range(3):
        torch.testing.assert_close(ram.train_step(), streamed.train_step(), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_trains_on_cpu(shard_dir):
    tr = _memory_trainer(shard_dir, precision="bf16", steps=40, batch_size=8, lr=3e-3)
    losses = [tr.train_step() for _ in range(40)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_fp16_scaler_state_is_checkpointed(shard_dir, tmp_path):
    if not torch.amp.is_autocast_available("cpu"):
        pytest.skip("no CPU autocast")
    tr = _memory_trainer(shard_dir, precision="fp16", steps=2, batch_size=4)
    tr.train_step(), tr.train_step()
    state = tr.trainer_state()
    assert state["scaler"] is not None and state["position"] == 8 and state["global_batch"] == 4


def test_frozen_encoder_embeddings_are_precomputed_and_never_loaded_for_training(shard_dir, tmp_path, monkeypatch):
    import shutil

    from reimagen.models.text import MiniLMTextEncoder, build_text_encoder
    from reimagen.training.text_store import TextStore, embed_shards

    local = tmp_path / "shards"
    shutil.copytree(shard_dir, local)
    enc = build_text_encoder({"name": "minilm"})
    store = TextStore(embed_shards(local, enc, progress=False))
    rows, lengths = store.rows(str(local / "shard-000000.tar"), 2)
    want = enc.encode([f"a {WORDS[i % 3]} {WORDS[3 + i % 5]} number {i}" for i in (2, 3, 4)])  # row 2, neighbours
    assert lengths.tolist() == want.lengths.tolist()
    torch.testing.assert_close(rows[:, :want.embeddings.shape[1]], want.embeddings, rtol=0, atol=2e-3)  # fp16
    monkeypatch.setattr(MiniLMTextEncoder, "load", lambda self: pytest.fail("training loaded the text encoder"))
    model = make_model("tiny-16", text_dim=store.dim)
    tr = Trainer(model, store.encoder_spec, local, TrainConfig(steps=2, batch_size=4, ckpt_every=1),
                 out_dir=tmp_path / "run", text_store=store)
    tr.fit(progress=False)
    assert json.loads((tmp_path / "run" / "last" / "config.json").read_text())["text_encoder"]["name"] == "minilm"
    with pytest.raises(ValueError, match="embed-text"):
        Trainer(make_model("tiny-16", text_dim=store.dim), store.encoder_spec, local, TrainConfig())


def test_a_changed_global_batch_is_refused_on_resume(shard_dir, tmp_path):
    tr = Trainer(make_model("tiny-16"), TinyTextEncoder(dim=32), shard_dir, TrainConfig(steps=1, batch_size=4),
                 out_dir=tmp_path)
    tr.fit(progress=False)
    other = Trainer(make_model("tiny-16"), TinyTextEncoder(dim=32), shard_dir, TrainConfig(steps=2, batch_size=6),
                    out_dir=tmp_path)
    with pytest.raises(ValueError, match="--batch-size 4"):
        other.fit(progress=False)


def test_resume_refuses_another_preset_another_k_or_another_encoder(shard_dir, tmp_path):
    cfg = TrainConfig(steps=1, batch_size=4)
    Trainer(make_model("tiny-16"), TinyTextEncoder(dim=32), shard_dir, cfg, out_dir=tmp_path).fit(progress=False)
    before = (tmp_path / "last" / "model.safetensors").read_bytes()
    two = TrainConfig(steps=2, batch_size=4)
    other = r"another stage configuration; differing fields: base_channels \(checkpoint 16, model 48\)"
    with pytest.raises(ValueError, match=other):
        Trainer(make_model("tiny-16", base_channels=48), TinyTextEncoder(dim=32), shard_dir, two,
                out_dir=tmp_path).fit(progress=False)
    with pytest.raises(ValueError, match="trained with the text encoder"):
        Trainer(make_model("tiny-16"), TinyTextEncoder(dim=32, layers=2), shard_dir, two,
                out_dir=tmp_path).fit(progress=False)
    k1 = tmp_path / "k1"
    write_shards(_table(tmp_path / "data-k1", n=8, k=1), k1, ShardSettings(samples_per_shard=4), progress=False)
    with pytest.raises(ValueError, match="trained with K = 2 neighbours per sample, the data have K = 1"):
        Trainer(make_model("tiny-16"), TinyTextEncoder(dim=32), k1, two, out_dir=tmp_path).fit(progress=False)
    assert (tmp_path / "last" / "model.safetensors").read_bytes() == before  # the checkpoint is untouched


def test_a_text_store_that_misses_samples_or_has_another_k_is_refused(shard_dir, tmp_path):
    import shutil

    from reimagen.models.text import build_text_encoder
    from reimagen.training.text_store import TextStore, embed_shards

    local = tmp_path / "shards"
    shutil.copytree(shard_dir, local)
    enc = build_text_encoder({"name": "minilm"})
    store = embed_shards(local, enc, progress=False)
    model = lambda: make_model("tiny-16", text_dim=enc.dim)  # noqa: E731
    f = store / "shard-000001.safetensors"
    f.rename(f.with_suffix(".bak"))
    with pytest.raises(FileNotFoundError, match="shard-000001.safetensors is missing"):
        Trainer(model(), enc.spec(), local, TrainConfig(), text_store=TextStore(store))
    from safetensors.torch import load_file, save_file

    t = load_file(str(f.with_suffix(".bak")))
    save_file({k: v[:-3].contiguous() for k, v in t.items()}, str(f))  # one sample's three rows short
    with pytest.raises(ValueError, match="holds 21 text rows, but shard shard-000001.tar has 8 samples x 3"):
        Trainer(model(), enc.spec(), local, TrainConfig(), text_store=TextStore(store))
    meta = json.loads((store / "store.json").read_text())
    (store / "store.json").write_text(json.dumps(dict(meta, k=1)))
    with pytest.raises(ValueError, match="K = 1 neighbour texts per sample, the shards K = 2"):
        Trainer(model(), enc.spec(), local, TrainConfig(), text_store=TextStore(store))


# ----------------------------------------------------------------------------------------------
# torchrun, gloo, 2 processes
# ----------------------------------------------------------------------------------------------
def _train_cmd(shards, out, steps, nproc=1, extra=()):
    base = ["-m", "reimagen_eval.cli", "train", "--shards", str(shards), "--preset", "tiny-16", "--out", str(out),
            "--steps", str(steps), "--batch-size", "8", "--ckpt-every", "2", "--log-every", "1", "--lr", "1e-3", *extra]
    if nproc == 1:
        return [sys.executable, *base]
    port = str(29500 + (os.getpid() + hash(str(out))) % 2000)
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", port, *base]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", COLUMNS="200")


def _run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def _weights(run):
    """The checkpoint's weights by file (an FSDP checkpoint has no model.safetensors: its weights are sharded)."""
    return {f"{f}.{k}": v for f in ("model", "ema", "text_encoder") if (run / "last" / f"{f}.safetensors").is_file()
            for k, v in load_file(str(run / "last" / f"{f}.safetensors")).items()}


@pytest.fixture(scope="module")
def runs(shard_dir, tmp_path_factory):
    """Straight runs of 6 steps: 1 process x 8, 2 processes x 4 (DDP)."""
    root = tmp_path_factory.mktemp("runs")
    _run(_train_cmd(shard_dir, root / "one", 6))
    _run(_train_cmd(shard_dir, root / "two", 6, nproc=2))
    return root


@pytest.mark.slow
def test_two_processes_x_half_batch_equal_one_process_x_batch(runs):
    one, two = _weights(runs / "one"), _weights(runs / "two")
    assert one.keys() == two.keys()
    for k in one:  # the same samples and noise; only the float32 reduction order differs
        torch.testing.assert_close(one[k], two[k], msg=k, **SAME_SAMPLES)
    logs = [[json.loads(x)["samples"] for x in (runs / r / "log.jsonl").read_text().splitlines()] for r in ("one", "two")]
    assert logs[0] == logs[1] == [8 * s for s in range(1, 7)]


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_bits(shard_dir, runs, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(shard_dir, out, 6, nproc=2), env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        cfg = out / "last" / "config.json"
        if cfg.is_file() and json.loads(cfg.read_text())["step"] >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "last" / "config.json").read_text())["step"] < 6, "the run ended before the kill"
    _run(_train_cmd(shard_dir, out, 6, nproc=2))
    straight, resumed = _weights(runs / "two"), _weights(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # bitwise: same world size


@pytest.fixture(scope="module")
def one_to_8(shard_dir, runs, tmp_path_factory):
    """The 1-process run continued to 8 steps."""
    import shutil

    out = tmp_path_factory.mktemp("one8") / "one"
    shutil.copytree(runs / "one", out)
    _run(_train_cmd(shard_dir, out, 8))
    return _weights(out)


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process(shard_dir, runs, one_to_8, tmp_path):
    import shutil

    shutil.copytree(runs / "two", tmp_path / "two")
    _run(_train_cmd(shard_dir, tmp_path / "two", 8))         # steps 7, 8 on 1 process
    state = torch.load(tmp_path / "two" / "last" / "trainer_state.pt", weights_only=True)
    assert state["position"] == 64 and state["world_size"] == 1
    b = _weights(tmp_path / "two")
    for k in one_to_8:
        torch.testing.assert_close(one_to_8[k], b[k], msg=k, **SAME_SAMPLES)


@pytest.mark.slow
def test_fsdp2_on_two_processes_trains_like_one_process_and_resumes_on_one(shard_dir, runs, one_to_8, tmp_path):
    out = tmp_path / "fsdp"
    _run(_train_cmd(shard_dir, out, 6, nproc=2, extra=["--fsdp", "--grad-accum", "2"]))
    # sharded: each rank wrote its part of the weights, EMA and optimiser; rank 0 the EMA for sampling
    assert sorted(p.name for p in (out / "last" / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (out / "last" / "model.safetensors").exists()
    one, fsdp = _weights(runs / "one"), _weights(out)
    assert fsdp.keys() == {k for k in one if not k.startswith("model.")}
    for k in fsdp:
        torch.testing.assert_close(one[k], fsdp[k], msg=k, **SAME_SAMPLES)
    _run(_train_cmd(shard_dir, out, 8))                      # steps 7, 8 on 1 process, without FSDP
    resumed = _weights(out)
    for k in one_to_8:
        torch.testing.assert_close(one_to_8[k], resumed[k], msg=k, **SAME_SAMPLES)


@pytest.mark.slow
def test_fsdp2_trains_in_bf16_with_low_precision_gathers(shard_dir, tmp_path):
    out = tmp_path / "bf16"
    _run(_train_cmd(shard_dir, out, 12, nproc=2, extra=["--fsdp", "--precision", "bf16", "--lr", "3e-3"]))
    losses = [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
    ema = load_file(str(out / "last" / "ema.safetensors"))
    assert all(v.dtype == torch.float32 for v in ema.values())  # fp32 master weights; bf16 only in the gathers


# ----------------------------------------------------------------------------------------------
# A cluster's faults: pre-emption signals, torchrun's restart of a dead rank, a kill mid-checkpoint
# ----------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            kids = (task / "children").read_text().split() if (task / "children").is_file() else []
            out += [int(k) for k in kids]
            todo += [int(k) for k in kids]
    return out


def _workers(pid: int) -> dict[int, int]:
    """rank -> pid of the training processes under ``pid`` (their RANK from /proc/PID/environ)."""
    found = {}
    for c in _children(pid):
        try:
            env = dict(x.split("=", 1) for x in Path(f"/proc/{c}/environ").read_text().split("\0") if "=" in x)
            cmd = Path(f"/proc/{c}/cmdline").read_text()
        except OSError:
            continue
        if "reimagen_eval.cli" in cmd and "RANK" in env:
            found[int(env["RANK"])] = c
    return found


def _start_and_wait(cmd, out: Path, step: int, deadline_s: float = 240):
    """Start a training command in its own session; return it once its checkpoint has reached ``step``."""
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + deadline_s
    while time.time() < deadline and proc.poll() is None:
        cfg = out / "last" / "config.json"
        if cfg.is_file() and json.loads(cfg.read_text())["step"] >= step:
            return proc
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint at step {step}: {proc.communicate()[1][-2000:] if proc.poll() is not None else ''}")


@pytest.mark.slow
def test_sigterm_ends_one_process_with_a_checkpoint_and_exit_75_and_the_rerun_resumes(shard_dir, tmp_path):
    out, straight = tmp_path / "term", tmp_path / "straight"
    _run(_train_cmd(shard_dir, straight, 12))
    proc = subprocess.Popen(_train_cmd(shard_dir, out, 12, extra=["--ckpt-every", "100"]), env=_env(),
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while proc.poll() is None and not (out / "log.jsonl").is_file() and time.time() < deadline:
        time.sleep(0.01)  # the loop runs (its first step logged): a checkpoint now can only be the signal's
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    step = json.loads((out / "last" / "config.json").read_text())["step"]
    assert "pre-empted" in err and "SIGTERM" in err and 1 <= step < 12, (step, err[-2000:])
    _run(_train_cmd(shard_dir, out, 12))
    a, b = _weights(straight), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise: same world size
    assert _logged_steps(out) == list(range(1, 13))


@pytest.mark.slow
def test_sigusr1_to_every_rank_checkpoints_a_two_process_run_that_then_resumes(shard_dir, runs, tmp_path):
    out = tmp_path / "usr1"
    proc = _start_and_wait(_train_cmd(shard_dir, out, 6, nproc=2), out, 2)
    for pid in _workers(proc.pid).values():  # as SLURM's --signal=USR1 does to the job's tasks
        os.kill(pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "75" in err, err[-2000:]  # torchrun reports its workers' exit code 75
    assert json.loads((out / "last" / "config.json").read_text())["step"] < 6
    _run(_train_cmd(shard_dir, out, 6, nproc=2))
    straight, resumed = _weights(runs / "two"), _weights(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_the_workers_resume_to_the_same_bits(shard_dir, runs, tmp_path):
    out = tmp_path / "restart"
    cmd = _train_cmd(shard_dir, out, 6, nproc=2)
    cmd.insert(cmd.index("--nproc-per-node"), "--max-restarts=2")
    proc = _start_and_wait(cmd, out, 2)
    os.kill(_workers(proc.pid)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    assert "restart" in err.lower()  # torchrun's agent restarted the workers
    straight, resumed = _weights(runs / "two"), _weights(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert _logged_steps(out) == [1, 2, 3, 4, 5, 6]


KILL_POINTS = {"while staging": "_write_staged", "between the renames": "os.replace"}  # what the patch slows


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_during_a_checkpoint_write_keeps_a_valid_checkpoint_that_the_rerun_uses(shard_dir, runs, tmp_path,
                                                                                       point):
    """The checkpoint at step 4 is interrupted by SIGKILL (a real process and signal; the write is slowed by a
    patch so that the kill lands inside it): the rerun resumes from a whole checkpoint and ends where an
    uninterrupted run ends."""
    out, marker = tmp_path / "kill", tmp_path / "inside"
    what = KILL_POINTS[point]
    script = f"""
import json, os, sys, time
from pathlib import Path
import reimagen.models.checkpoint as ck
marker = {str(marker)!r}
if {what!r} == "_write_staged":
    real = ck._write_staged
    def slow(tmp, unet_cfg, text_spec, weights, train_config, step, *rest):
        if step == 4:
            tmp.mkdir(parents=True, exist_ok=True)
            (tmp / "config.json").write_text("{{}}")  # a half-written staging folder
            open(marker, "w").close()
            time.sleep(120)
        return real(tmp, unet_cfg, text_spec, weights, train_config, step, *rest)
    ck._write_staged = slow
else:
    class OsProxy:  # checkpoint.py's os, with a pause after the first of the swap's two renames
        def __getattr__(self, name):
            return getattr(os, name)
        def replace(self, src, dst):
            os.replace(src, dst)
            new = Path(dst).with_name("last.tmp") / "config.json"
            if Path(dst).name == "last.old" and json.loads(new.read_text())["step"] == 4:
                open(marker, "w").close()
                time.sleep(120)
    ck.os = OsProxy()
from reimagen_eval.cli import app
app(sys.argv[1:])
"""
    cmd = [sys.executable, "-c", script, *_train_cmd(shard_dir, out, 6)[3:]]
    proc = subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists(), proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if point == "between the renames":
        assert not (out / "last").exists() and (out / "last.old").is_dir()  # the window the recovery closes
    else:
        assert json.loads((out / "last" / "config.json").read_text())["step"] == 2  # the previous one, whole
    _run(_train_cmd(shard_dir, out, 6))
    straight, resumed = _weights(runs / "one"), _weights(out)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert _logged_steps(out) == [1, 2, 3, 4, 5, 6]  # resumed, not started over (a restart from 0 logs twice)


def _logged_steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]


def test_a_launch_environment_without_the_rendezvous_address_is_refused():
    from reimagen.training.distributed import init_distributed

    with pytest.raises(ValueError, match="MASTER_ADDR"):
        init_distributed("cpu", {"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="divisible"):
        Slicing(6, world_size=4)


# ----------------------------------------------------------------------------------------------
# The same precision for inference
# ----------------------------------------------------------------------------------------------
def test_bf16_sampling_stays_near_fp32_and_is_recorded(text_encoder):
    from conftest import randomize
    from reimagen import Cascade, JointGuidance, SamplerSettings, Stage
    from reimagen.pipelines.generate import CascadeGenerator

    base, sr = randomize(make_model("tiny-16")), randomize(make_model("tiny-sr32", seed=1))

    def cascade(precision):
        return Cascade([Stage(base, JointGuidance(w=2.0, use_neighbours=False), SamplerSettings(steps=4, sampler="ddim"),
                              precision=precision),
                        Stage(sr, JointGuidance(w=1.0, use_neighbours=False), SamplerSettings(steps=2, sampler="ddim"),
                              precision=precision)], text_encoder)

    full, half = (cascade(p).sample(["a red dog", "a blue cat"], seed=3).images for p in ("fp32", "bf16"))
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    diff = (full - half).abs().mean()
    assert 0 < diff < 0.05  # bf16 rounds (8-bit mantissa); the images stay the same ones
    assert "precision" not in json.dumps(CascadeGenerator(cascade("fp32")).describe())  # old run folders resume
    assert CascadeGenerator(cascade("bf16")).describe()["stages"][0]["precision"] == "bf16"
    with pytest.raises(ValueError, match="fp16 sampling needs a GPU"):
        cascade("fp16")
