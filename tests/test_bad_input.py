"""Bad input across the `reimagen-eval` commands: each case exits non-zero with a message naming the bad argument
or file, prints no traceback, and leaves no output behind (its --out does not exist afterwards).

The inputs are tiny and made here: a knowledge base and its BM25 index, a triples table, a tiny-16 checkpoint, a
COCO-format folder, EntityDrawBench references; damaged copies of some of them."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import make_model, randomize
from reimagen_eval.cli import app
from reimagen.retrieval.base import KnowledgeBase
from reimagen.models.text import TinyTextEncoder
from reimagen.models.checkpoint import save_checkpoint
from test_fid_cli import write_coco

runner = CliRunner()
CORRUPT = b"\xff\xd8\xff\xe0 this is not a JPEG"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    texts = [f"a {c} thing number {i}" for i, c in enumerate(["red", "green", "blue", "grey"] * 2)]
    for i in range(len(texts)):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    kb = KnowledgeBase([f"p{i}" for i in range(len(texts))], texts, [f"im{i}.png" for i in range(len(texts))],
                       name="bad", root=root).to_parquet(root / "kb.parquet")
    assert runner.invoke(app, ["index", "build", "--kb", str(kb), "--out", str(root / "idx")]).exit_code == 0
    import shutil as _sh

    _sh.copy(kb, root / "gone.parquet")  # an index whose knowledge base is then deleted
    assert runner.invoke(app, ["index", "build", "--kb", str(root / "gone.parquet"), "--out",
                               str(root / "idx-gone")]).exit_code == 0
    (root / "gone.parquet").unlink()
    (root / "blank-line.txt").write_text("a red thing\n\na blue thing\n")
    (root / "no-text.csv").write_text("id,colour\nq0,red\n")
    pd.DataFrame([{"id": f"p{i}", "text": t, "image": f"im{i}.png", "neighbor_ids": [f"p{(i + 1) % 8}"]}
                  for i, t in enumerate(texts)]).to_parquet(root / "triples.parquet")
    pd.DataFrame([{"id": f"p{i}", "text": t, "image": f"im{i}.png", "neighbor_ids": ["nobody" if i == 3 else "p0"]}
                  for i, t in enumerate(texts)]).to_parquet(root / "bad-triples.parquet")
    enc = TinyTextEncoder(dim=32, seed=0).eval()
    ckpt = save_checkpoint(root / "ckpt", randomize(make_model("tiny-16")), enc)
    damaged = root / "damaged"
    shutil.copytree(ckpt, damaged)
    (damaged / "ema.safetensors").write_bytes(b"\x00" * 40)
    (root / "corrupt.png").write_bytes(CORRUPT)
    refs = root / "refs"
    refs.mkdir()
    from entitydrawbench.entities import load_entities, select

    chosen = select(load_entities(), categories=("dogs",), per_category=2)
    for e in chosen:
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(refs / f"{e.id}.png")
    bad_refs = root / "bad-refs"
    shutil.copytree(refs, bad_refs)
    (bad_refs / f"{chosen[0].id}.png").write_bytes(CORRUPT)
    return {"root": root, "kb": kb, "idx": root / "idx", "triples": root / "triples.parquet", "ckpt": ckpt,
            "damaged": damaged, "coco": write_coco(root / "coco"), "refs": refs, "bad_refs": bad_refs,
            "img": root / "im0.png", "corrupt": root / "corrupt.png",
            "bad_triples": root / "bad-triples.parquet"}


def _fid(i, *extra):
    return ["fid", "--dataset", "coco", "--dataset-root", i["coco"], "--model", i["ckpt"], "--num-prompts", "8",
            "--stats-cache", i["root"] / "cache", "--no-progress", "--metrics", "fid", *extra]


def _draw(i, *extra):
    return ["entitydraw", "--model", i["ckpt"], "--references", i["refs"], "--categories", "dogs",
            "--per-category", "2", "--k", "1", "--steps", "2", *extra]


def _sample(i, *extra, neighbour="img", index=None, prompt=True):
    nbr = ["--neighbour-image", i[neighbour], "--neighbour-text", "a thing"] if neighbour else []
    return ["sample", "--checkpoint", i["ckpt"], *(["--prompt", "a red thing"] if prompt else []), *nbr,
            *(["--index", i["root"] / index] if index else []), "--steps", "2", *extra]


def _train(i, *extra):
    return ["train", "--triples", i["triples"], "--preset", "tiny-16", "--steps", "1", *extra]


M = "MISSING"  # a path that does not exist, under the test's own folder

# (case, args builder -> args without --out, the message's needles, an env)
CASES = [
    ("fid-unknown-dataset", lambda i: _fid(i, "--dataset", "cifar"), ["unknown dataset 'cifar'"], None),
    ("fid-unknown-db", lambda i: _fid(i, "--db", "no-such-db"), ["unknown database 'no-such-db'"], None),
    ("fid-missing-model", lambda i: _fid(i, "--model", i["root"] / M), ["--model", M], None),
    ("fid-missing-root", lambda i: _fid(i, "--dataset-root", i["root"] / M), [M], None),
    ("entitydraw-eta", lambda i: _draw(i, "--eta", "1.5"), ["Invalid value for '--eta'"], None),
    ("entitydraw-k", lambda i: _draw(i, "--k", "0"), ["Invalid value for '--k'"], None),
    ("entitydraw-missing-model", lambda i: _draw(i, "--model", i["root"] / M), [M, "does not exist"], None),
    ("entitydraw-missing-references", lambda i: _draw(i, "--references", i["root"] / M), [M, "does not exist"], None),
    ("entitydraw-corrupt-reference", lambda i: _draw(i, "--references", i["bad_refs"]),
     ["cannot be read", "dogs-"], None),
    ("index-missing-kb", lambda i: ["index", "build", "--kb", f"parquet:{i['root'] / M}.parquet"], [M], None),
    ("index-unknown-retriever", lambda i: ["index", "build", "--kb", i["kb"], "--retriever", "nope"],
     ["unknown retriever", "nope"], None),
    ("retrieve-missing-index", lambda i: ["retrieve", "--index", i["root"] / M, "--query", "x"], [M], None),
    ("retrieve-k", lambda i: ["retrieve", "--index", i["idx"], "--query", "x", "-k", "0"], ["k must be >= 1"], None),
    ("retrieve-k-above-the-corpus", lambda i: ["retrieve", "--index", i["idx"], "--query", "x", "-k", "9"],
     ["-k 9 is larger than the knowledge base (8 pairs)"], None),
    ("retrieve-missing-queries", lambda i: ["retrieve", "--index", i["idx"], "--queries", i["root"] / f"{M}.jsonl"],
     [M], None),
    ("triples-missing-kb", lambda i: ["triples", "--kb", i["root"] / f"{M}.parquet"], [M], None),
    ("triples-k", lambda i: ["triples", "--kb", i["kb"], "-k", "0"], ["k must be >= 1"], None),
    ("train-missing-table", lambda i: _train(i, "--triples", i["root"] / f"{M}.parquet"), [M, "does not exist"], None),
    ("train-unknown-preset", lambda i: _train(i, "--preset", "nope"), ["nope"], None),
    ("toy-repeat-triples-missing-world", lambda i: ["toy", "repeat-triples", "--world", i["root"] / M],
     [M, "no triples.parquet"], None),
    ("train-preset-folder-not-a-checkpoint", lambda i: _train(i, "--preset", i["refs"]),
     ["--preset", "not a stage checkpoint"], None),
    ("train-negative-gamma", lambda i: _train(i, "--min-snr-gamma", "-1"), ["--min-snr-gamma"], None),
    ("train-two-sources", lambda i: _train(i, "--shards", i["root"]), ["exactly one of --triples"], None),
    ("train-unfinished-shards", lambda i: ["train", "--shards", i["root"] / M, "--preset", "tiny-16"],
     [M, "no manifest.json"], None),
    ("train-init-from-missing", lambda i: _train(i, "--init-from", i["root"] / M), [M, "not a stage checkpoint"],
     None),
    ("train-init-from-other-encoder", lambda i: _train(i, "--init-from", i["ckpt"], "--text-encoder", "minilm"),
     ["trained with the tiny text encoder", "--text-encoder tiny"], None),
    ("train-unknown-precision", lambda i: _train(i, "--precision", "fp8"), ["precision must be one of"], None),
    ("train-batch-not-divisible", lambda i: _train(i, "--batch-size", "3", "--grad-accum", "2"),
     ["batch size 3 is not divisible"], None),
    ("train-half-set-launcher", lambda i: _train(i), ["WORLD_SIZE=2 is set but RANK is not"], {"WORLD_SIZE": "2"}),
    ("shards-missing-table", lambda i: ["shards", "--triples", i["root"] / f"{M}.parquet"], [M, "does not exist"], None),
    ("shards-bad-neighbours", lambda i: ["shards", "--triples", i["bad_triples"]], ["1 neighbour ids", "not ids"],
     None),
    ("sample-missing-checkpoint", lambda i: _sample(i, "--checkpoint", i["root"] / M), [M, "config.json"], None),
    ("sample-damaged-checkpoint", lambda i: _sample(i, "--checkpoint", i["damaged"]),
     ["ema.safetensors", "damaged"], None),
    ("sample-corrupt-neighbour", lambda i: _sample(i, neighbour="corrupt"),
     ["corrupt.png", "cannot decode"], None),
    ("sample-eta", lambda i: _sample(i, "--eta", "2"), ["eta must be in [0, 1]"], None),
    ("sample-fp16-on-cpu", lambda i: _sample(i, "--precision", "fp16"), ["fp16 sampling needs a GPU"], None),
    ("entitydraw-fp16-on-cpu", lambda i: _draw(i, "--precision", "fp16"), ["fp16 sampling needs a GPU"], None),
    ("fid-unknown-precision", lambda i: _fid(i, "--precision", "fp8"), ["precision must be one of"], None),
    ("fid-unknown-metric", lambda i: _fid(i, "--metrics", "fid,fvd"), ["unknown metric 'fvd'"], None),
    ("fid-kid-needs-more-images", lambda i: _fid(i, "--metrics", "fid,kid"), ["--kid-subset-size 1000", "8 generated"],
     None),
    ("sample-half-set-launcher", lambda i: _sample(i), ["RANK=1 is set but WORLD_SIZE is not"], {"RANK": "1"}),
    ("sample-index-without-kb", lambda i: _sample(i, neighbour=None, index="idx-gone"),
     ["knowledge base of index", "gone.parquet", "was not found (looked for"], None),
    ("sample-k-above-the-index", lambda i: _sample(i, "-k", "100", neighbour=None, index="idx"),
     ["--k 100", "holds 8 pairs"], None),
    ("sample-prompts-blank-line", lambda i: _sample(i, "--prompts", i["root"] / "blank-line.txt", neighbour=None,
                                                    prompt=False), ["blank-line.txt:2: empty prompt line"], None),
    ("sample-prompts-no-text", lambda i: _sample(i, "--prompts", i["root"] / "no-text.csv", neighbour=None,
                                                 prompt=False), ["no-text.csv", "needs a prompt / text / caption column"], None),
    ("sample-not-a-pipeline", lambda i: ["sample", "--pipeline", i["ckpt"], "--prompt", "x"],
     ["is not a pipeline folder (no pipeline.json)"], None),
    ("rate-tasks-missing-run", lambda i: ["rate", "tasks", str(i["root"] / M)], [M], None),
    ("rate-report-missing-study", lambda i: ["rate", "report", "--study", i["root"] / M], [M], None),
]
#: where each command writes: the option that names its output, and the file name it needs
OUT_OPTION = {"rate-tasks": "--study"}
OUT_NAME = {"retrieve": "out.parquet", "triples": "out.parquet"}


@pytest.mark.parametrize("case, build, needles, env", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_nonzero_naming_the_problem_and_leaves_nothing(inputs, tmp_path, case, build, needles, env):
    args = [str(a) for a in build(inputs)]
    command = "-".join(args[:2]) if args[0] in ("rate", "index") else args[0]
    out = tmp_path / OUT_NAME.get(command, "out")
    args += [OUT_OPTION.get(command, "--out"), str(out)]
    before = sorted(p.name for p in inputs["root"].iterdir())
    res = runner.invoke(app, args, env=env)
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)  # no traceback
    text = " ".join(res.output.split())
    for needle in needles:
        assert needle in text, res.output
    assert not out.exists(), sorted(p.name for p in out.rglob("*")) if out.is_dir() else out
    assert sorted(p.name for p in inputs["root"].iterdir()) == before  # nothing written beside the inputs


def _swap(args, old, new):
    """``args`` with the option ``old`` (and its value) replaced by ``new`` (a list), or dropped."""
    i = args.index(old)
    return args[:i] + list(new) + args[i + 2:]


#: The cases whose message suggests a fix: (the suggestion as the message spells it, the command with the fix)
REMEDIES = {
    "train-init-from-other-encoder": ("pass --text-encoder tiny",
                                      lambda a, i: _swap(a, "--text-encoder", ["--text-encoder", "tiny"])),
    "train-batch-not-divisible": ("pass a --batch-size that is a multiple of 2 (e.g. --batch-size 4)",
                                  lambda a, i: _swap(a, "--batch-size", ["--batch-size", "4"])),
    "train-two-sources": ("give exactly one of --triples", lambda a, i: _swap(a, "--shards", [])),
    "sample-fp16-on-cpu": ("on a CPU pass --precision bf16", lambda a, i: _swap(a, "--precision", ["--precision", "bf16"])),
    "entitydraw-fp16-on-cpu": ("on a CPU pass --precision bf16",
                               lambda a, i: _swap(a, "--precision", ["--precision", "bf16"])),
    "sample-k-above-the-index": ("pass --k 8 or less", lambda a, i: _swap(a, "-k", ["-k", "8"])),
    "retrieve-k-above-the-corpus": ("pass -k 8 or less", lambda a, i: _swap(a, "-k", ["-k", "8"])),
    "sample-index-without-kb": ("pass it with --kb SPEC", lambda a, i: a + ["--kb", str(i["kb"])]),
    "fid-kid-needs-more-images": ("lower --kid-subset-size", lambda a, i: a + ["--kid-subset-size", "8"]),
}


@pytest.mark.parametrize("case", sorted(REMEDIES))
def test_following_a_messages_remedy_gets_past_its_error(inputs, tmp_path, case):
    """The fix a message suggests is spelled as the command that printed it takes it, and it works: the command
    with the fix no longer stops at that error (it may stop at a later one, e.g. Inception weights offline)."""
    _, build, needles, env = next(c for c in CASES if c[0] == case)
    suggestion, fix = REMEDIES[case]
    args = [str(a) for a in build(inputs)]
    command = "-".join(args[:2]) if args[0] in ("rate", "index") else args[0]
    res = runner.invoke(app, args + [OUT_OPTION.get(command, "--out"), str(tmp_path / "bad" / OUT_NAME.get(command, "out"))],
                        env=env)
    assert suggestion in " ".join(res.output.split()), res.output
    fixed = fix(args, inputs) + [OUT_OPTION.get(command, "--out"), str(tmp_path / "fixed" / OUT_NAME.get(command, "out"))]
    res = runner.invoke(app, fixed)
    text = " ".join(res.output.split())
    assert needles[0] not in text, text

def test_the_battery_covers_every_command():
    commands = {c[0].split("-")[0] for c in CASES}
    assert len(CASES) >= 20
    assert commands >= {"fid", "entitydraw", "index", "retrieve", "triples", "train", "sample", "rate", "shards"}


def test_the_inputs_themselves_are_good(inputs, tmp_path):
    """The battery's bad cases differ from a working command by the one bad thing: the same inputs run."""
    res = runner.invoke(app, [str(a) for a in _sample(inputs, "--out", tmp_path / "s")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [str(a) for a in _draw(inputs, "--out", tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "d").glob("*.png"))) == 8
    assert json.loads((tmp_path / "d" / "run.json").read_text())["k"] == 1
