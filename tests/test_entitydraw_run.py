"""EntityDrawBench runs end to end (entitydrawbench/run.py, scoring.py, ablation.py, cli.py) on tiny random models.

A tiny-16 base stage (+ a tiny-sr32 super-resolution stage) saved with ``reimagen.models.checkpoint.save_checkpoint``, a
folder of reference images the test generates (one entity left without one), 2 sampling steps, and a tiny
randomly initialised open-clip model: the images and scores mean nothing, the tests check the machinery
(files, metadata, resume, shards, refusals, best-of-N, summaries).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from conftest import make_model, randomize
from entitydrawbench.cli import register
from entitydrawbench.entities import load_entities, select
from reimagen.models.text import TinyTextEncoder
from reimagen.models.checkpoint import save_checkpoint

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
FAST = ["--steps", "2", "--sr-steps", "2", "--w-text", "3", "--w-neighbours", "3", "--per-category", "1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Checkpoints, a reference folder (all entities of the 1-per-category selection but one), a tiny CLIP."""
    root = tmp_path_factory.mktemp("edb")
    enc = TinyTextEncoder(dim=32, seed=0).eval()
    save_checkpoint(root / "base", randomize(make_model("tiny-16", seed=0)), enc)
    save_checkpoint(root / "sr", randomize(make_model("tiny-sr32", seed=1), seed=1), enc)
    refs = root / "refs"
    refs.mkdir()
    chosen = select(load_entities(), per_category=1)
    rng = np.random.default_rng(0)
    for e in chosen[:-1]:  # the last one (broader) gets no reference
        Image.fromarray(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)).save(refs / f"{e.id}.png")
    (root / "clip.json").write_text(json.dumps(TINY_CLIP))
    app = typer.Typer()
    register(app)
    return {"root": root, "refs": refs, "chosen": chosen, "missing": chosen[-1].id, "app": app,
            "clip": str(root / "clip.json")}


def invoke(world, *args, env=None):
    return CliRunner().invoke(world["app"], [str(a) for a in args], env=env)


def reimagen_args(world, out, *extra):
    return ["entitydraw", "--model", world["root"] / "base", "--model", world["root"] / "sr",
            "--references", world["refs"], "--out", out, "--k", "1", *FAST, *extra]


def pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def full_run(world):
    out = world["root"] / "run"
    res = invoke(world, *reimagen_args(world, out))
    assert res.exit_code == 0, res.output
    return out, res


def test_full_run_writes_images_manifest_and_per_image_metadata(world, full_run):
    out, res = full_run
    n_prompts = len(world["chosen"]) - 1
    imgs = pixels(out)
    assert len(imgs) == 4 * n_prompts and all(a.shape == (32, 32, 3) for a in imgs.values())  # the SR stage's size
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["benchmark"] == "entitydrawbench-open-v1" and manifest["k"] == 1
    assert manifest["samples_per_prompt"] == 4 and manifest["n_prompts"] == n_prompts
    base, sr = manifest["stages"]
    assert "InterleavedGuidance(w_p=3.0, w_n=3.0, eta=0.5)" in base["guidance"]
    assert "JointGuidance(w=5.0" in sr["guidance"] and "steps=2" in sr["settings"]
    rows = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * n_prompts
    for r in rows:
        assert r["image"] in imgs and r["image"] == f"{r['prompt_id']}__{r['sample_index']}.png"
        assert r["category"] in r["entity_id"] and r["name"] in r["prompt"]
        assert isinstance(r["frequent"], bool) and r["frequency_source"] == "wordfreq:en"
        assert r["reference_image"].endswith(f"{r['entity_id']}.png") and r["neighbour_ids"] == [f"{r['entity_id']}:0"]
    assert sorted({r["sample_index"] for r in rows}) == [0, 1, 2, 3]
    skipped = json.loads((out / "skipped.json").read_text())
    assert list(skipped) == [world["missing"]] and "no reference image" in skipped[world["missing"]]
    assert world["missing"] in res.output  # listed on the console too
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [p["prompt_id"] for p in prompts] == [e.id for e in world["chosen"][:-1]]
    # the frequency split is the benchmark's (whole manifest), not the subset's
    assert next(p for p in prompts if p["name"] == "Labrador Retriever")["frequent"] is True


def test_resume_after_interruption_and_shards_reproduce_the_images(world, full_run, monkeypatch):
    from reimagen.pipelines.generate import CascadeGenerator

    out = world["root"] / "interrupted"
    real = CascadeGenerator.generate
    calls = {"n": 0}

    class Interrupted(Exception):
        pass

    def flaky(self, jobs, neighbours, seed):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupted("killed")
        return real(self, jobs, neighbours, seed)

    monkeypatch.setattr(CascadeGenerator, "generate", flaky)
    res = invoke(world, *reimagen_args(world, out, "--batch-size", "8"))
    assert isinstance(res.exception, Interrupted)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert len(first) == 8  # the first batch survived, written atomically
    monkeypatch.setattr(CascadeGenerator, "generate", real)
    res = invoke(world, *reimagen_args(world, out, "--batch-size", "8"))
    assert res.exit_code == 0, res.output
    assert {n: (out / n).stat().st_mtime_ns for n in first} == first  # skipped, not made again
    ref = pixels(full_run[0])
    assert pixels(out).keys() == ref.keys() and all(np.array_equal(pixels(out)[k], ref[k]) for k in ref)
    assert _png_bytes(out) == _png_bytes(full_run[0])


def _png_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_make_the_bytes_of_one_process(world, full_run, world_size):
    """RANK / WORLD_SIZE shards take whole blocks of --batch-size jobs (the full run's 8), so every PNG has the
    bytes of the one-process run, ranks run in any order."""
    out = world["root"] / f"sharded{world_size}"
    for rank in reversed(range(world_size)):
        res = invoke(world, *reimagen_args(world, out), env={"RANK": str(rank), "WORLD_SIZE": str(world_size)})
        assert res.exit_code == 0, res.output
    assert _png_bytes(out) == _png_bytes(full_run[0])
    assert json.loads((out / "run.json").read_text()) == json.loads((full_run[0] / "run.json").read_text())


def test_another_batch_size_is_another_run(world, full_run):
    """The block size fixes which images are sampled together (float kernels differ across batch shapes): a rerun
    with another --batch-size is refused, naming it, before anything is written."""
    res = invoke(world, *reimagen_args(world, full_run[0], "--batch-size", "3"))
    assert res.exit_code == 2 and "block_size" in res.output


def test_other_settings_are_refused_before_anything_is_written(world, full_run, tmp_path):
    import shutil

    out = full_run[0]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    res = invoke(world, *reimagen_args(world, out, "--eta", "0.3"))
    assert res.exit_code == 2 and "other settings" in res.output and "stages" in res.output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # the same checkpoints copied elsewhere are the same settings: the run resumes (nothing left to make)
    for name in ("base", "sr"):
        shutil.copytree(world["root"] / name, tmp_path / name)
    res = invoke(world, "entitydraw", "--model", tmp_path / "base", "--model", tmp_path / "sr", "--references",
                 world["refs"], "--out", out, "--k", "1", *FAST)
    assert res.exit_code == 0 and "made 0" in res.output, res.output
    assert json.loads((out / "provenance.json").read_text())["checkpoints"][0] == str((tmp_path / "base").resolve())


@pytest.mark.parametrize("extra, message", [
    (["--categories", "dogs,cats"], "unknown category 'cats'"),
    (["--eta", "1.5"], "Invalid value for '--eta': Input should be less than or equal to 1"),  # Typer's bounds
    (["--eta", "-0.1"], "Invalid value for '--eta': Input should be greater than or equal to 0"),
    (["--k", "0"], "Invalid value for '--k'"),
    (["--strict"], "have no reference image and --strict is set"),
    (["--k", "2"], "pass --kb SPEC to top them up"),
    (["--samples-per-prompt", "0"], "samples per prompt must be >= 1"),
    (["--sr-steps", "2,x"], "--sr-steps must be comma-separated integers"),
])
def test_bad_input_is_one_red_line_and_writes_nothing(world, tmp_path, extra, message):
    out = tmp_path / "run"
    res = invoke(world, *reimagen_args(world, out, *extra))
    assert res.exit_code == 2, res.output
    assert message in res.output.replace("\n", " ") and "Traceback" not in res.output
    assert not out.exists()


def test_missing_references_folder_and_two_models_are_refused(world, tmp_path):
    res = invoke(world, "entitydraw", "--model", world["root"] / "base", "--out", tmp_path / "r", *FAST)
    assert res.exit_code == 2 and "pass --references FOLDER" in res.output
    res = invoke(world, "entitydraw", "--model", world["root"] / "base", "--images-from", tmp_path,
                 "--out", tmp_path / "r", *FAST)
    assert res.exit_code == 2 and "only Re-Imagen takes several" in " ".join(res.output.split())
    assert not (tmp_path / "r").exists()
    # the same model sampled text-only needs no references, and keeps every entity
    res = invoke(world, "entitydraw", "--model", world["root"] / "base", "--no-retrieval", "--out", tmp_path / "r",
                 "--samples-per-prompt", "1", *FAST)
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert "use_neighbours=False" in manifest["stages"][0]["guidance"] and "k" not in manifest
    assert len(pixels(tmp_path / "r")) == len(world["chosen"])


def test_k_above_the_reference_pairs_is_topped_up_by_bm25_from_a_knowledge_base(world, tmp_path):
    from reimagen.retrieval.base import KnowledgeBase

    kb_dir = tmp_path / "kb"
    kb_dir.mkdir()
    texts = ["a photo of a labrador retriever dog", "grilled pizza with basil", "the tower at night",
             "a red bird on a branch", "robot toy", "a sunny beach"]
    for i in range(len(texts)):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(kb_dir / f"k{i}.png")
    KnowledgeBase([f"k{i}" for i in range(len(texts))], texts, [f"k{i}.png" for i in range(len(texts))],
                  name="toy", root=kb_dir).to_parquet(kb_dir / "kb.parquet")
    out = tmp_path / "run"
    res = invoke(world, "entitydraw", "--model", world["root"] / "base", "--references", world["refs"], "--out", out,
                 "--k", "2", "--kb", kb_dir / "kb.parquet", "--samples-per-prompt", "1", *FAST)
    assert res.exit_code == 0, res.output
    rows = {r["entity_id"]: r for r in map(json.loads, (out / "images.jsonl").read_text().splitlines())}
    lab = rows["dogs-labrador-retriever"]
    assert lab["neighbour_ids"] == ["dogs-labrador-retriever:0", "k0"]  # own pair first, then BM25 on the name
    assert json.loads((out / "provenance.json").read_text())["kb"].endswith("kb.parquet")
    assert json.loads((out / "run.json").read_text())["topup_query"] == "name"
    # without a kb, --allow-fewer-neighbours masks the empty slot
    out2 = tmp_path / "run2"
    res = invoke(world, "entitydraw", "--model", world["root"] / "base", "--references", world["refs"], "--out", out2,
                 "--k", "2", "--allow-fewer-neighbours", "--samples-per-prompt", "1", *FAST)
    assert res.exit_code == 0 and "fewer than k = 2 neighbours" in res.output.replace("\n", " ")


def test_image_folder_baseline_must_be_complete(world, full_run, tmp_path):
    made = full_run[0]
    partial = tmp_path / "partial"
    partial.mkdir()
    for p in list(made.glob("*.png"))[:5]:
        (partial / p.name).write_bytes(p.read_bytes())
    res = invoke(world, "entitydraw", "--model", f"folder:{partial}", "--references", world["refs"],
                 "--out", tmp_path / "base_run", "--per-category", "1")
    assert res.exit_code == 2 and "lacks" in res.output and "nothing was written" in " ".join(res.output.split())
    assert not (tmp_path / "base_run").exists()
    # a folder baseline runs text-free: the entity without a reference is kept (not skipped)
    res = invoke(world, "entitydraw", "--model", f"folder:{made}", "--references", world["refs"],
                 "--out", tmp_path / "base_run", "--per-category", "1")
    assert res.exit_code == 2 and world["missing"] in res.output  # ... so its images are required too
    complete = tmp_path / "complete"
    complete.mkdir()
    for p in made.glob("*.png"):
        (complete / p.name).write_bytes(p.read_bytes())
    for i in range(4):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(complete / f"{world['missing']}__{i}.png")
    res = invoke(world, "entitydraw", "--model", f"folder:{complete}", "--references", world["refs"],
                 "--out", tmp_path / "base_run", "--per-category", "1")
    assert res.exit_code == 0, res.output
    assert len(pixels(tmp_path / "base_run")) == 4 * len(world["chosen"])


def test_clip_scores_best_of_4_and_summaries(world, full_run, tmp_path):
    import shutil

    from reimagen.retrieval.clip import ClipEncoder

    run = tmp_path / "scored"
    shutil.copytree(full_run[0], run)
    res = invoke(world, "entitydraw-score", run, "--clip-model", world["clip"])
    assert res.exit_code == 0, res.output
    assert "NOT human ratings" in res.output and "RANDOM WEIGHTS" in res.output.replace("\n", " ")
    rows = [json.loads(line) for line in (run / "images.jsonl").read_text().splitlines()]
    assert all(-1 <= r["clip_t"] <= 1 and -1 <= r["clip_i"] <= 1 for r in rows)
    for pid in {r["prompt_id"] for r in rows}:
        group = [r for r in rows if r["prompt_id"] == pid]
        chosen = [r for r in group if r["selected"]]
        assert len(chosen) == 1 and chosen[0]["select_score"] == max(r["select_score"] for r in group)
        assert chosen[0]["select_score"] == pytest.approx((chosen[0]["clip_t"] + chosen[0]["clip_i"]) / 2, abs=2e-6)
    # independently: the same seeded random CLIP, cosine of normalised embeddings
    enc = ClipEncoder(world["clip"], pretrained=None, seed=0)
    r = rows[0]
    with Image.open(run / r["image"]) as im, Image.open(r["reference_image"]) as ref:
        e_img, e_ref = enc.encode_images([im.convert("RGB"), ref.convert("RGB")])
    assert r["clip_i"] == pytest.approx(float(e_img @ e_ref), abs=1e-5)
    assert r["clip_t"] == pytest.approx(float(e_img @ enc.encode_texts([r["prompt"]])[0]), abs=1e-5)
    md = (run / "summary.md").read_text()
    assert "not the paper's human" in md and "| Model | Dogs | Foods | Landmarks | Birds | Characters | All |" in md
    assert "Frequent | Infrequent" in md and (run / "summary.png").stat().st_size > 10_000
    import pandas as pd

    csv = pd.read_csv(run / "summary.csv")
    best = csv[(csv.selection == "best_of_n") & (csv.group_by == "category") & (csv.group == "all")]
    assert set(best.metric) == {"clip_t", "clip_i"} and (best.n == len({r["prompt_id"] for r in rows})).all()
    # selecting by CLIP-T instead changes only the selection
    res = invoke(world, "entitydraw-score", run, "--clip-model", world["clip"], "--select", "clip-t")
    rows_t = [json.loads(line) for line in (run / "images.jsonl").read_text().splitlines()]
    assert [r["clip_t"] for r in rows_t] == [r["clip_t"] for r in rows]
    assert all(r["select_score"] == r["clip_t"] for r in rows_t)
    # a comparison table over two runs, one row per model
    other = tmp_path / "other"
    shutil.copytree(run, other)
    res = invoke(world, "entitydraw-summary", f"reimagen={run}", f"copy={other}", "--out", tmp_path / "cmp")
    assert res.exit_code == 0, res.output
    cmp_md = (tmp_path / "cmp.md").read_text()
    assert "| reimagen |" in cmp_md and "| copy |" in cmp_md and (tmp_path / "cmp.png").is_file()
    res = invoke(world, "entitydraw-summary", full_run[0], "--out", tmp_path / "bad")
    assert res.exit_code == 2 and "not scored yet" in res.output


def test_dino_subject_similarity_and_a_vqa_plugin_join_the_scores(world, full_run, tmp_path):
    import shutil

    import numpy as np
    from transformers import ViTConfig, ViTModel

    import vqa_plugin

    dino = tmp_path / "dino"  # DINO ViT-S/16's layout with random weights, where a downloaded copy would be
    torch.manual_seed(0)
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=224, patch_size=16), add_pooling_layer=False).save_pretrained(dino)
    run = tmp_path / "scored"
    shutil.copytree(full_run[0], run)
    res = invoke(world, "entitydraw-score", run, "--clip-model", world["clip"], "--dino-model", dino, "--vqa",
                 "vqa_plugin:colour_share", "--select", "vqa")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (run / "images.jsonl").read_text().splitlines()]
    r = rows[1]
    net = ViTModel.from_pretrained(dino, add_pooling_layer=False).eval()

    def cls(path):
        with Image.open(path) as im:
            x = torch.from_numpy(np.asarray(im.convert("RGB").resize((224, 224), 3), np.float32)).permute(2, 0, 1) / 255
        x = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        with torch.no_grad():
            return torch.nn.functional.normalize(net(pixel_values=x[None]).last_hidden_state[0, 0], dim=0)

    assert r["dino_i"] == pytest.approx(float(cls(run / r["image"]) @ cls(r["reference_image"])), abs=1e-5)
    with Image.open(run / r["image"]) as im:
        assert r["vqa"] == pytest.approx(vqa_plugin.colour_share([im.convert("RGB")], [r["prompt"]])[0], abs=1e-6)
    for pid in {x["prompt_id"] for x in rows}:  # best of N by the plug-in's score
        group = [x for x in rows if x["prompt_id"] == pid]
        assert next(x for x in group if x["selected"])["vqa"] == max(x["vqa"] for x in group)
    import pandas as pd

    csv = pd.read_csv(run / "summary.csv")
    best = csv[(csv.selection == "best_of_n") & (csv.group_by == "category") & (csv.group == "all")]
    assert set(best.metric) == {"clip_t", "clip_i", "dino_i", "vqa"} and (best.ci_lo <= best["mean"]).all()
    assert "DINO" in (run / "summary.md").read_text()
    res = invoke(world, "entitydraw-score", run, "--clip-model", world["clip"], "--dino-model", tmp_path / "nodino")
    assert res.exit_code == 2 and "dino-vits16" in " ".join(res.output.split())
    res = invoke(world, "entitydraw-score", run, "--clip-model", world["clip"], "--vqa", "nomodule:f")
    assert res.exit_code == 2 and "cannot import" in " ".join(res.output.split())


def test_scoring_an_unfinished_run_needs_allow_partial(world, full_run, tmp_path):
    import shutil

    run = tmp_path / "partial"
    shutil.copytree(full_run[0], run)
    victim = sorted(run.glob("*.png"))[0]
    victim.unlink()
    res = invoke(world, "entitydraw-score", run, "--clip-model", world["clip"])
    assert res.exit_code == 2 and "lacks 1 of" in res.output
    res = invoke(world, "entitydraw-score", run, "--clip-model", world["clip"], "--allow-partial", "--select", "bogus")
    assert res.exit_code == 2 and "unknown selection score" in res.output
    res = invoke(world, "entitydraw-score", run, "--clip-model", world["clip"], "--allow-partial")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (run / "images.jsonl").read_text().splitlines()]
    gone = next(r for r in rows if r["image"] == victim.name)
    assert gone["clip_t"] is None and not gone["selected"]


def test_eta_sweep_writes_one_table_and_one_plot(world, tmp_path):
    out = tmp_path / "sweep"
    res = invoke(world, "entitydraw-sweep", "--param", "eta", "--values", "0,1", "--out", out,
                 "--model", world["root"] / "base", "--references", world["refs"], "--k", "1",
                 "--samples-per-prompt", "1", "--categories", "dogs,birds", "--clip-model", world["clip"], *FAST)
    assert res.exit_code == 0, res.output
    import pandas as pd

    table = pd.read_csv(out / "sweep_eta.csv")
    assert list(table["eta"]) == [0.0, 1.0] and list(table["prompts"]) == [2, 2]
    assert {"clip_i_all", "clip_t_all", "clip_i_frequent", "clip_i_infrequent"} <= set(table.columns)
    assert (out / "sweep_eta.png").stat().st_size > 10_000
    assert "not the paper's human" in (out / "sweep_eta.md").read_text()
    guidance = [json.loads((out / f"eta={v}" / "run.json").read_text())["stages"][0]["guidance"]
                for v in ("0.0", "1.0")]
    assert "eta=0.0" in guidance[0] and "eta=1.0" in guidance[1]
    a, b = pixels(out / "eta=0.0"), pixels(out / "eta=1.0")
    assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)  # eta reaches the sampler
    res = invoke(world, "entitydraw-sweep", "--param", "k", "--values", "0,1", "--out", out,
                 "--model", world["root"] / "base", "--references", world["refs"], "--clip-model", world["clip"], *FAST)
    assert res.exit_code == 2 and "k must be >= 1" in res.output
    res = invoke(world, "entitydraw-sweep", "--param", "w", "--values", "1", "--out", out,
                 "--model", world["root"] / "base", "--references", world["refs"], *FAST)
    assert res.exit_code == 2 and "cannot sweep 'w'" in res.output


def test_neighbour_batches_carry_the_reference_images(world):
    from entitydrawbench.references import load_references
    from entitydrawbench.run import NeighbourPlan, NeighbourProvider, RunConfig, plan_neighbours
    from reimagen.pipelines.generate import Job

    chosen = world["chosen"][:2]
    pairs, _ = load_references(world["refs"], chosen)
    prompts = [{"prompt_id": e.id, "entity_id": e.id, "name": e.name, "prompt": e.name} for e in chosen]
    plan = plan_neighbours(prompts, pairs, RunConfig(k=2, allow_fewer_neighbours=True))
    assert isinstance(plan, NeighbourPlan) and plan.short == {e.id: 1 for e in chosen}
    nb = NeighbourProvider(plan, 2, 16)([Job(chosen[0].id, "x", 0), Job(chosen[1].id, "y", 3)])
    assert nb.images.shape == (2, 2, 3, 16, 16) and nb.mask.tolist() == [[True, False], [True, False]]
    assert nb.texts[0][0] == chosen[0].reference_text
    from reimagen.pipelines.cascade import image_to_tensor

    expected = image_to_tensor(np.asarray(Image.open(pairs[chosen[0].id][0].path).convert("RGB")), 16)
    assert torch.allclose(nb.images[0, 0], expected)


def test_mean_sem_is_cluster_robust_by_prompt():
    """Per-image rates pool 4 samples per prompt; their standard error is clustered by prompt (Liang-Zeger)."""
    from entitydrawbench.summary import mean_sem as _mean_sem

    a = [0.1, 0.9, 0.4, 0.7, 0.2]
    # one value per cluster: the i.i.d. formula
    assert _mean_sem(a, list(range(5)))[1] == pytest.approx(np.std(a, ddof=1) / np.sqrt(5))
    assert _mean_sem(a)[1] == pytest.approx(np.std(a, ddof=1) / np.sqrt(5))
    # every prompt's samples identical: duplicating the data does not shrink the error (the i.i.d. one shrinks)
    dup, clusters = [x for x in a for _ in range(4)], [i for i in range(5) for _ in range(4)]
    mean, sem, n = _mean_sem(dup, clusters)
    assert (mean, n) == (pytest.approx(np.mean(a)), 20) and sem == pytest.approx(np.std(a, ddof=1) / np.sqrt(5))
    assert _mean_sem(dup)[1] < 0.6 * sem
    # missing values are dropped with their cluster labels; one cluster: undefined
    assert _mean_sem([1.0, None, 0.0, float("nan")], [0, 1, 2, 3])[2] == 2
    assert _mean_sem([1.0, 0.0], ["p", "p"])[1] is None


def test_summary_tables_keep_long_model_names_whole_at_80_columns(monkeypatch):
    """rich cut "entitydraw-retrieval" to "entitydra…" at 80 columns; the name column folds instead."""
    from rich.console import Console

    import entitydrawbench.cli as cli

    console = Console(width=80, record=True, file=io.StringIO())
    monkeypatch.setattr(cli, "out_console", console)
    recs = [{"model": m, "selection": sel, "metric": met, "split": g, "mean": 0.5, "sem": 0.1, "n": 4}
            for m in ("entitydraw-retrieval", "entitydraw-text-only") for sel in ("best_of_n", "per_image")
            for met in ("faithful", "look_ok", "scene_ok") for g in ("frequent", "infrequent", "unseen", "all")]
    cli._print_world_summary({"records": recs, "models": ["entitydraw-retrieval", "entitydraw-text-only"]})
    first = [line.split("│")[1].strip() for line in console.export_text().splitlines() if line.count("│") > 2]
    names = "".join(first)  # the model column, its folded lines joined
    assert "entitydraw-retrieval" in names and "entitydraw-text-only" in names, first
    assert not any("…" in cell for cell in first)


def test_summaries_say_what_the_fast_sampler_would_save_only_for_ddpm_cascades():
    from entitydrawbench.summary import generators_markdown

    gens = {"paper": {"kind": "reimagen", "model": "a + b + c", "scheduler": "ddpm / ddpm / ddpm",
                      "steps": "256 / 128 / 32", "guidance": "-", "size": 1024},
            "fast": {"kind": "reimagen", "model": "a + b", "scheduler": "dpmpp-2m / dpmpp-2m", "steps": "16 / 8",
                     "guidance": "-", "size": 256},
            "sd": {"kind": "diffusers", "model": "sd", "scheduler": "DDPMScheduler", "steps": 1000, "guidance": 7.5,
                   "size": 512}}
    text = "\n".join(generators_markdown(gens))
    notes = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(notes) == 1 and notes[0].startswith("- paper: DDPM, 416 network evaluations")
    assert "24, 17x fewer" in notes[0]
    assert "A faster sampler" not in "\n".join(generators_markdown({"fast": gens["fast"], "sd": gens["sd"]}))
