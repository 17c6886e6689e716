"""From a prompt to images with retrieval in one call: ReImagenPipeline (reimagen/pipeline.py) and
`reimagen-eval sample --index` (reimagen/sample_run.py), on tiny random stages and a knowledge base made here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import make_model, randomize
from reimagen import Cascade, InterleavedGuidance, JointGuidance, SamplerSettings
from reimagen.pipelines.pipeline import ReImagenPipeline
from reimagen.retrieval.base import KnowledgeBase
from reimagen.models.text import TinyTextEncoder
from reimagen.models.checkpoint import save_checkpoint
from reimagen_eval.cli import app

runner = CliRunner()
TEXTS = ["a red teapot on a table", "a green teapot in the grass", "a blue bird on a branch", "a red bird in snow",
         "a yellow car on a road", "a green car by the sea"]
FAST = ["--steps", "2", "--sr-steps", "2", "--w-p", "3", "--w-n", "3", "--eta", "0.5", "--sr-guidance", "5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    rng = np.random.default_rng(0)
    for i in range(len(TEXTS)):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / f"im{i}.png")
    kb = KnowledgeBase([f"k{i}" for i in range(len(TEXTS))], TEXTS, [f"im{i}.png" for i in range(len(TEXTS))],
                       name="pipe", root=root).to_parquet(root / "kb.parquet")
    assert runner.invoke(app, ["index", "build", "--kb", str(kb), "--out", str(root / "idx")]).exit_code == 0
    enc = TinyTextEncoder(dim=32, seed=0).eval()
    save_checkpoint(root / "base", randomize(make_model("tiny-16", seed=0)), enc)
    save_checkpoint(root / "sr", randomize(make_model("tiny-sr32", seed=1), seed=1), enc)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n"
                                                for i, t in enumerate(["a red teapot", "a blue bird"])))
    return {"root": root, "kb": kb, "idx": root / "idx", "base": root / "base", "sr": root / "sr",
            "prompts": root / "prompts.jsonl"}


def _pipeline(w) -> ReImagenPipeline:
    from reimagen.retrieval.base import load_retriever
    from reimagen.retrieval.readers import open_knowledge_base

    cascade = Cascade.from_checkpoints([w["base"], w["sr"]], [InterleavedGuidance(3.0, 3.0, 0.5), JointGuidance(5.0)],
                                       [SamplerSettings(steps=2), SamplerSettings(steps=2)])
    return ReImagenPipeline(cascade, load_retriever(w["idx"]), open_knowledge_base(str(w["kb"])), str(w["kb"]))


def _sample(w, out, *extra):
    return runner.invoke(app, ["sample", "--checkpoint", str(w["base"]), "--checkpoint", str(w["sr"]), *FAST,
                               "--out", str(out), *[str(e) for e in extra]])


def _pngs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_pipeline_retrieves_and_samples_and_round_trips_through_its_folder(world, tmp_path):
    pipe = _pipeline(world)
    out = pipe(["a red teapot", "a blue bird"], k=2, num_samples=2, seed=0)
    assert out.prompt_ids == ["p0000", "p0001"] and [len(x) for x in out.images] == [2, 2]
    assert out.images[0][0].size == (32, 32)  # the SR stage's size
    assert [n["id"] for n in out.neighbours[0]][0] in ("k0", "k1") and len(out.neighbours[1]) == 2
    assert all(set(n) == {"id", "text", "score", "image"} for row in out.neighbours for n in row)
    assert "teapot" in out.neighbours[0][0]["text"] and "bird" in out.neighbours[1][0]["text"]
    folder = pipe.save_pretrained(tmp_path / "saved")
    assert {p.name for p in folder.iterdir()} == {"pipeline.json", "stage0", "stage1", "index"}
    again = ReImagenPipeline.from_pretrained(folder)
    assert [repr(s.guidance) for s in again.cascade.stages] == [repr(s.guidance) for s in pipe.cascade.stages]
    assert [s.settings for s in again.cascade.stages] == [s.settings for s in pipe.cascade.stages]
    out2 = again(["a red teapot", "a blue bird"], k=2, num_samples=2, seed=0)
    assert out2.neighbours == out.neighbours
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for ra, rb in zip(out.images, out2.images) for a, b in zip(ra, rb))
    # text only differs, and equals the cascade sampled without neighbours
    plain = pipe(["a red teapot"], num_samples=1, retrieval=False)
    assert plain.neighbours == [[]] and not np.array_equal(np.asarray(plain.images[0][0]), np.asarray(out.images[0][0]))


def test_sample_index_writes_images_neighbours_and_contact_sheets_like_the_pipeline(world, tmp_path):
    out = tmp_path / "run"
    res = _sample(world, out, "--index", world["idx"], "-k", "2", "--prompts", world["prompts"], "--num-samples", "2")
    assert res.exit_code == 0, res.output
    assert sorted(_pngs(out)) == ["q0__0.png", "q0__1.png", "q1__0.png", "q1__1.png"]
    table = json.loads((out / "neighbours.json").read_text())
    assert list(table) == ["q0", "q1"] and all(len(r) == 2 for r in table.values())
    assert all(n["image"].endswith(".png") and isinstance(n["score"], float) for r in table.values() for n in r)
    sheets = sorted((out / "sheets").glob("*.png"))
    assert [p.name for p in sheets] == ["q0.png", "q1.png"]
    with Image.open(sheets[0]) as im:
        assert im.size[0] >= 2 * 160 and im.size[1] > 2 * 160  # the neighbours' row and the samples' row
    # the same images as the Python pipeline with the same ids, settings and batches
    ref = _pipeline(world)(["a red teapot", "a blue bird"], k=2, num_samples=2, seed=0, prompt_ids=["q0", "q1"])
    assert [r for r in ref.neighbours] == [table["q0"], table["q1"]]
    for i, pid in enumerate(("q0", "q1")):
        for s in range(2):
            assert np.array_equal(np.asarray(Image.open(out / f"{pid}__{s}.png")), np.asarray(ref.images[i][s]))
    # --save-pipeline, then --pipeline: the same bytes again
    res = _sample(world, tmp_path / "run2", "--index", world["idx"], "-k", "2", "--prompts", world["prompts"],
                  "--num-samples", "2", "--save-pipeline", tmp_path / "pipe")
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["sample", "--pipeline", str(tmp_path / "pipe"), "-k", "2", "--prompts",
                              str(world["prompts"]), "--num-samples", "2", "--out", str(tmp_path / "run3")])
    assert res.exit_code == 0, res.output
    assert _pngs(tmp_path / "run3") == _pngs(out)


def test_no_retrieval_is_the_text_only_baseline(world, tmp_path):
    res = _sample(world, tmp_path / "t", "--index", world["idx"], "--prompt", "a red teapot", "--no-retrieval")
    assert res.exit_code == 2 and "choose one source of neighbours" in res.output
    res = _sample(world, tmp_path / "t", "--prompt", "a red teapot", "--no-retrieval")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "t" / "neighbours.json").exists() and (tmp_path / "t" / "sheets" / "p0000.png").is_file()
    ref = _pipeline(world)(["a red teapot"], num_samples=1, retrieval=False)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "t" / "p0000__0.png")), np.asarray(ref.images[0][0]))


def test_sample_index_gives_entitydraws_images_for_the_same_prompts_and_neighbours(tmp_path):
    """An index over the entities' reference pairs retrieves each prompt's own reference (checked), so `sample
    --index` sees entitydraw's neighbours, prompt ids and settings: the PNG files are the same bytes."""
    from entitydrawbench.entities import load_entities, select

    enc = TinyTextEncoder(dim=32, seed=0).eval()
    save_checkpoint(tmp_path / "base", randomize(make_model("tiny-16", seed=0)), enc)
    save_checkpoint(tmp_path / "sr", randomize(make_model("tiny-sr32", seed=1), seed=1), enc)
    refs = tmp_path / "refs"
    refs.mkdir()
    chosen = select(load_entities(), categories=("dogs", "birds"), per_category=2)
    rng = np.random.default_rng(0)
    for e in chosen:
        Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(refs / f"{e.id}.png")
    draw = tmp_path / "draw"
    res = runner.invoke(app, ["entitydraw", "--model", str(tmp_path / "base"), "--model", str(tmp_path / "sr"),
                              "--references", str(refs), "--categories", "dogs,birds", "--per-category", "2",
                              "--k", "1", "--steps", "2", "--sr-steps", "2", "--w-text", "3", "--w-neighbours", "3",
                              "--out", str(draw)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (draw / "images.jsonl").read_text().splitlines()]
    first = {r["prompt_id"]: r for r in rows if r["sample_index"] == 0}
    kb = KnowledgeBase(list(first), [r["neighbour_texts"][0] for r in first.values()],
                       [str(refs / f"{pid}.png") for pid in first], name="refs", root=refs).to_parquet(tmp_path / "kb.parquet")
    assert runner.invoke(app, ["index", "build", "--kb", str(kb), "--out", str(tmp_path / "idx")]).exit_code == 0
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"id": pid, "text": r["prompt"]}) + "\n"
                                              for pid, r in first.items()))
    res = runner.invoke(app, ["sample", "--checkpoint", str(tmp_path / "base"), "--checkpoint", str(tmp_path / "sr"),
                              "--index", str(tmp_path / "idx"), "-k", "1", "--prompts", str(tmp_path / "p.jsonl"),
                              "--num-samples", "4", "--steps", "2", "--sr-steps", "2", "--w-p", "3", "--w-n", "3",
                              "--eta", "0.5", "--sr-guidance", "5", "--sampler", "ddpm",  # entitydraw's default
                              "--out", str(tmp_path / "sample")])
    assert res.exit_code == 0, res.output
    table = json.loads((tmp_path / "sample" / "neighbours.json").read_text())
    assert {pid: row[0]["id"] for pid, row in table.items()} == {pid: pid for pid in first}  # its own reference
    assert _pngs(tmp_path / "sample") == _pngs(draw) and len(_pngs(draw)) == 4 * len(first)


def test_a_query_column_says_what_retrieval_searches_with(world, tmp_path):
    """The prompt is what the cascade draws; the optional query column (e.g. the entity's name) what retrieval
    searches with: BM25 over a whole prompt favours its scene words."""
    f = tmp_path / "p.csv"
    f.write_text('id,prompt,query\nq0,a red teapot on the moon,blue bird\nq1,a red teapot on the moon,\n')
    res = _sample(world, tmp_path / "run", "--index", world["idx"], "-k", "1", "--prompts", f)
    assert res.exit_code == 0, res.output
    table = json.loads((tmp_path / "run" / "neighbours.json").read_text())
    assert "bird" in table["q0"][0]["text"] and "teapot" in table["q1"][0]["text"]
    assert json.loads((tmp_path / "run" / "prompts.json").read_text())[0]["prompt"] == "a red teapot on the moon"
