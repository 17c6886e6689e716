"""The `reimagen-eval` commands of the model part, run in-process on tiny data written by the test."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from reimagen_eval.cli import app

runner = CliRunner()


@pytest.fixture()
def triples(tmp_path):
    """A 6-pair KNN-ImageText table with 16px images; each pair's neighbours are the next two pairs."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        arr = np.full((20, 24, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
        rows.append({"id": f"p{i}", "text": f"a thing number {i}", "image": f"img{i}.png",
                     "neighbor_ids": [f"p{(i + 1) % 6}", f"p{(i + 2) % 6}"]})
    path = tmp_path / "triples.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_train_then_sample_writes_checkpoint_log_and_images(triples, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--triples", str(triples), "--out", str(out), "--preset", "tiny-16",
                              "--steps", "6", "--batch-size", "4", "--ckpt-every", "3", "--lr", "1e-3"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "last" / "config.json").read_text())
    assert meta["step"] == 6 and meta["unet"]["image_size"] == 16
    assert len((out / "log.jsonl").read_text().splitlines()) >= 1

    samples = tmp_path / "samples"
    res = runner.invoke(app, ["sample", "--checkpoint", str(out / "last"), "--prompt", "a thing number 1",
                              "--prompt", "something else", "--neighbour-image", str(tmp_path / "img2.png"),
                              "--neighbour-text", "a thing number 2", "--steps", "3", "--num-samples", "2",
                              "--out", str(samples)])
    assert res.exit_code == 0, res.output
    pngs = sorted(samples.glob("*.png"))
    assert [p.name for p in pngs] == ["p0000__0.png", "p0000__1.png", "p0001__0.png", "p0001__1.png"]
    assert Image.open(pngs[0]).size == (16, 16)
    assert json.loads((samples / "prompts.json").read_text())[1] == {"prompt_id": "p0001", "prompt": "something else"}
    assert json.loads((samples / "run.json").read_text())["block_size"] == 8


def test_sample_shards_and_resumes_to_the_bytes_of_one_process(triples, tmp_path):
    """`sample` is a run folder like the benchmarks': blocks of --batch-size jobs, so 2 or 3 shards (RANK /
    WORLD_SIZE) and a rerun after lost images give the PNG bytes of one uninterrupted process."""
    ckpt = tmp_path / "run"
    assert runner.invoke(app, ["train", "--triples", str(triples), "--out", str(ckpt), "--preset", "tiny-16",
                               "--steps", "2", "--batch-size", "2"]).exit_code == 0
    args = ["sample", "--checkpoint", str(ckpt / "last"), "--prompt", "a thing number 1", "--prompt", "another",
            "--neighbour-image", str(tmp_path / "img2.png"), "--neighbour-text", "a thing number 2",
            "--steps", "2", "--num-samples", "3", "--batch-size", "4"]

    def run(out, env=None):
        res = runner.invoke(app, args + ["--out", str(out)], env=env)
        assert res.exit_code == 0, res.output
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}

    one = run(tmp_path / "one")
    assert len(one) == 6
    for world in (2, 3):
        for rank in reversed(range(world)):
            got = run(tmp_path / f"w{world}", {"RANK": str(rank), "WORLD_SIZE": str(world)})
        assert got == one
    for name in ("p0000__1.png", "p0001__2.png"):  # lost from the first block and from the second
        (tmp_path / "one" / name).unlink()
    assert run(tmp_path / "one") == one


def test_train_resumes_from_last_checkpoint(triples, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--triples", str(triples), "--out", str(out), "--preset", "tiny-16", "--batch-size", "2"]
    assert runner.invoke(app, args + ["--steps", "3"]).exit_code == 0
    assert runner.invoke(app, args + ["--steps", "5"]).exit_code == 0
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [3, 5]  # the second run continued from step 3 instead of starting over


def test_train_min_snr_gamma_is_recorded_and_weights_the_loss(triples, tmp_path):
    """--min-snr-gamma reaches the trainer: the checkpoint records it, and the same seed's first logged loss
    differs from the paper's loss (the weights are not all 1)."""
    losses = {}
    for gamma in ("0", "5"):
        out = tmp_path / f"run{gamma}"
        res = runner.invoke(app, ["train", "--triples", str(triples), "--out", str(out), "--preset", "tiny-16",
                                  "--steps", "1", "--batch-size", "4", "--min-snr-gamma", gamma])
        assert res.exit_code == 0, res.output
        assert json.loads((out / "last" / "config.json").read_text())["train"]["min_snr_gamma"] == float(gamma)
        losses[gamma] = json.loads((out / "log.jsonl").read_text().splitlines()[0])["loss"]
    assert abs(losses["5"] - losses["0"]) > 1e-3 * losses["0"], losses
    res = runner.invoke(app, ["train", "--triples", str(triples), "--out", str(tmp_path / "bad"), "--preset",
                              "tiny-16", "--steps", "1", "--min-snr-gamma", "-1"])
    assert res.exit_code == 2 and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("extra, message", [
    (["--eta", "1.5"], "eta must be in [0, 1]"),
    (["--w-p", "-1"], "must be a finite number >= 0"),
    (["--neighbour-text", "only a text"], "1 neighbour texts"),
])
def test_sample_bad_input_exits_nonzero_with_message(triples, tmp_path, extra, message):
    out = tmp_path / "run"
    assert runner.invoke(app, ["train", "--triples", str(triples), "--out", str(out), "--preset", "tiny-16",
                               "--steps", "1", "--batch-size", "2"]).exit_code == 0
    base = ["sample", "--checkpoint", str(out / "last"), "--prompt", "x", "--steps", "2", "--out", str(tmp_path / "s")]
    nb = [] if "--neighbour-text" in extra else ["--neighbour-image", str(tmp_path / "img0.png"),
                                                 "--neighbour-text", "a thing number 0"]
    res = runner.invoke(app, base + nb + extra)
    assert res.exit_code == 2
    assert message in res.output
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").glob("*.png"))


def test_train_missing_table_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["train", "--triples", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "r"),
                              "--preset", "tiny-16"])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_presets_lists_paper_sizes():
    res = runner.invoke(app, ["presets", "--paper-only"])
    assert res.exit_code == 0
    for name in ("paper-64", "paper-64-small", "paper-sr256", "paper-sr1024"):
        assert name in res.output


def test_the_main_job_stops_at_a_failed_step(monkeypatch, tmp_path):
    """`reimagen-eval demo` runs its commands through the application it is mounted in and stops at the first
    one that fails (standalone_mode=False returns the exit code instead of raising it)."""
    import reimagen_eval.demo as demo_mod

    monkeypatch.setattr(demo_mod, "demo_commands", lambda out, **kw: [["presets", "--paper-only"],
                                                                       ["fid", "--dataset", "cifar", "--model",
                                                                        f"folder:{tmp_path}"],
                                                                       ["presets"]])
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "job")])
    assert res.exit_code == 2, res.output
    assert "unknown dataset 'cifar'" in res.output
    assert res.output.count("stage presets") == 1  # the third step never ran
    res = runner.invoke(app, ["toy", "demo", "--out", str(tmp_path / "job")])  # the same job under `toy`
    assert res.exit_code == 2 and "unknown dataset 'cifar'" in res.output
