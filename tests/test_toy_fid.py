"""`reimagen-eval fid --dataset synthetic` (evaluation/synthetic.py): FID with in-domain retrieval (Sec. 4.1) on
a tiny toy world built here, a tiny random Re-Imagen cascade and an untrained judge (saved to a tmp folder and
selected with $REIMAGEN_TOY_JUDGE) as the feature extractor. Offline, CPU, seconds."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from evaluation.cli import fid
from test_fid_cli import write_models  # the same tiny perturbed base + SR checkpoints as the COCO FID tests
from toyworld.build import build_world_files
from toyworld.judge import Judge, save_judge
from toyworld.world import World, WorldSpec

app = typer.Typer(add_completion=False)
app.command()(fid)


@app.callback()
def _root() -> None:
    """test app"""


runner = CliRunner()
# 40 reference images, 256-d features: singular covariances, as expected of a test-sized set
pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular")
TINY = {"n_entities": 20, "n_unseen": 4, "corpus_size": 200, "validation_size": 40, "n_references": 1}
EXTRACTOR = "evaluation.synthetic:judge_features"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toyfid")
    world = World(WorldSpec(seed=0, **TINY))
    build_world_files(world, root / "world", progress=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        judge = Judge().eval()
    save_judge(judge, root / "judge", {"note": "untrained, for tests"})
    return {"world": world, "root": root / "world", "judge": root / "judge", "cache": root / "cache",
            **write_models(root / "models")}


@pytest.fixture(autouse=True)
def _judge_env(toy, monkeypatch):
    monkeypatch.setenv("REIMAGEN_TOY_JUDGE", str(toy["judge"]))


def args(toy, out, *extra, root=None) -> list[str]:
    return ["fid", "--dataset", "synthetic", "--dataset-root", str(root or toy["root"]), "--model", str(toy["base"]),
            "--num-prompts", "8", "--batch-size", "8", "--feature-extractor", EXTRACTOR, "--metrics", "fid",
            "--stats-cache", str(toy["cache"]), "--no-progress", "--out", str(out), *[str(e) for e in extra]]


def measured(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["source"] == "measured"]


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------
def test_dataset_prompts_reference_and_in_domain_database(toy):
    from evaluation.datasets import default_resolution, open_dataset

    world = toy["world"]
    ds = open_dataset("synthetic", toy["root"], 8, seed=0)
    val_ids = [f"v{i:05d}" for i in range(len(world.validation))]
    captions = {pid: world.caption(s, i) for i, (pid, s) in enumerate(zip(val_ids, world.validation))}
    assert len(ds.prompts) == 8 and len({p.prompt_id for p in ds.prompts}) == 8
    assert all(captions[p.prompt_id] == p.text for p in ds.prompts)  # validation captions, drawn with the seed
    assert [p.prompt_id for p in open_dataset("synthetic", toy["root"], 8, seed=0).prompts] == \
        [p.prompt_id for p in ds.prompts]
    assert [p.prompt_id for p in open_dataset("synthetic", toy["root"], 8, seed=1).prompts] != \
        [p.prompt_id for p in ds.prompts]
    assert ds.reference == [f"tar://validation.tar#{pid}.png" for pid in val_ids]  # ALL validation images
    assert ds.reference_root == str(toy["root"].resolve())
    assert ds.split == f"validation-{world.fingerprint()}" and ds.in_domain_db == "synthetic-train"
    kb = ds.open_in_domain()  # the training corpus, never the validation images
    assert len(kb) == TINY["corpus_size"] and kb.texts == world.corpus_captions and not set(kb.ids) & set(val_ids)
    assert np.asarray(kb.image(0)).shape == (64, 64, 3)
    assert len(open_dataset("synthetic", toy["root"], None, seed=0).prompts) == 40  # default 500, capped
    assert default_resolution("synthetic") == 64 and default_resolution("coco") == 256


def test_a_new_folder_is_built_on_the_spot_validation_first_and_the_corpus_only_for_retrieval(toy, tmp_path):
    from evaluation.datasets import open_dataset

    root = tmp_path / "fresh"
    opts = {k: str(v) for k, v in TINY.items()}
    ds = open_dataset("synthetic", root, 8, seed=0, **opts)
    assert (root / "validation.tar").is_file() and not (root / "corpus.tar").exists()  # no corpus for --db none
    assert (root / "validation.tar").read_bytes() == (toy["root"] / "validation.tar").read_bytes()  # same world
    assert [p.text for p in ds.prompts] == [p.text for p in open_dataset("synthetic", toy["root"], 8, 0).prompts]
    assert len(ds.open_in_domain()) == TINY["corpus_size"] and (root / "world.json").is_file()
    # the folder remembers its world: other world options are refused
    with pytest.raises(ValueError, match="another world"):
        open_dataset("synthetic", root, 8, seed=0, world_seed="3")


# ----------------------------------------------------------------------------------------------
# The CLI
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("db, label, extractor", [("synthetic-train", "FID", EXTRACTOR), ("none", "ZS-FID", "judge")])
def test_fid_cli_end_to_end_with_the_judge_features(toy, tmp_path, db, label, extractor):
    out = tmp_path / "out"
    a = args(toy, out, "--db", db, "--sr-model", toy["sr"], "--guidance-64", "1.0,3.0",
             "--guidance-sr", "1", "--steps", "2", "--sampler", "ddim")
    a[a.index("--feature-extractor") + 1] = extractor  # "judge" is short for EXTRACTOR
    res = runner.invoke(app, a)
    assert res.exit_code == 0, res.output
    rows = measured(out)
    assert sorted((r["w_64"], r["w_sr"]) for r in rows) == [("1.0", "1.0"), ("3.0", "1.0")]
    for r in rows:
        assert (r["dataset"], r["db"], r["metric"]) == ("synthetic", db, label)
        assert (r["n"], r["n_ref"], r["feature_extractor"], r["resolution"]) == ("8", "40", "toy-judge", "64")
        assert math.isfinite(float(r["fid"])) and float(r["fid"]) >= 0
    assert "not Inception" in (out / "results.md").read_text()
    # the reference statistics are keyed on the judge's weights digest and the 64px protocol resolution (the
    # module's cache is shared: another test may have added the 32px entry first)
    (stats,) = [p.name for p in toy["cache"].iterdir() if p.is_dir() and "toy-judge" in p.name and "__64px__" in p.name]
    from evaluation.features import file_digest

    assert f"toy-judge-{file_digest(toy['judge'] / 'judge.safetensors')}" in stats and "__64px__n40__" in stats


def test_identical_sets_have_judge_fid_zero(toy, tmp_path):
    """All validation images handed in as the 'generated' folder: FID against the reference set ~ 0."""
    from reimagen.retrieval.base import KnowledgeBase

    kb = KnowledgeBase.from_parquet(toy["root"] / "validation.parquet")
    kb.root = str(toy["root"])
    folder = tmp_path / "copies"
    folder.mkdir()
    for i, pid in enumerate(kb.ids):
        kb.image(i).save(folder / f"{pid}__0.png")
    out = tmp_path / "same"
    a = args(toy, out, "--db", "none")
    a[a.index("--model") + 1], a[a.index("--num-prompts") + 1] = str(folder), "40"
    res = runner.invoke(app, a)
    assert res.exit_code == 0, res.output
    (row,) = measured(out)
    same = float(row["fid"])
    assert row["n"] == "40" and abs(same) < 1e-6, same
    # while a model's images are far away under the same (untrained, so small-scale) features
    a2 = args(toy, tmp_path / "model", "--db", "none", "--guidance-64", "1", "--steps", "2")
    a2[a2.index("--num-prompts") + 1] = "40"
    assert runner.invoke(app, a2).exit_code == 0
    other = float(measured(tmp_path / "model")[0]["fid"])
    assert abs(same) < 1e-3 * other


@pytest.mark.parametrize("case, needles", [
    ("no-root", ["--dataset synthetic needs --dataset-root", "reimagen-eval toy build"]),
    ("missing-no-build", ["holds no synthetic world", "reimagen-eval toy build --out"]),
    ("foreign-folder", ["is not a synthetic world", "reimagen-eval toy build --out"]),
    ("bad-option", ["bad --dataset-option", "colour"]),
    ("no-judge", ["no toy-world judge weights", "REIMAGEN_TOY_JUDGE", "reimagen-eval toy judge"]),
])
def test_bad_input_is_one_red_line_exit_2_and_writes_nothing(toy, tmp_path, monkeypatch, case, needles):
    out = tmp_path / "out"
    a = args(toy, out, "--db", "none")
    if case == "no-root":
        i = a.index("--dataset-root")
        del a[i:i + 2]
    elif case == "missing-no-build":
        a = args(toy, out, "--db", "none", "-O", "build=false", root=tmp_path / "nowhere")
    elif case == "foreign-folder":
        (tmp_path / "coco").mkdir()
        (tmp_path / "coco" / "annotations.json").write_text("{}")
        a = args(toy, out, "--db", "none", root=tmp_path / "coco")
    elif case == "bad-option":
        a += ["-O", "colour=red"]
    elif case == "no-judge":
        monkeypatch.setenv("REIMAGEN_TOY_JUDGE", str(tmp_path / "nojudge"))
    res = runner.invoke(app, a)
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not out.exists() and not (tmp_path / "nowhere").exists()
    if case == "foreign-folder":
        assert sorted(p.name for p in (tmp_path / "coco").iterdir()) == ["annotations.json"]


def test_a_rerun_at_another_resolution_measures_again(toy, tmp_path):
    """--resolution changes every feature, not the images: a rerun in the same folder keeps the images and
    measures at the new resolution instead of returning the cached numbers of the old one."""
    out = tmp_path / "out"
    a = args(toy, out, "--db", "none", "--guidance-64", "1", "--steps", "2")
    assert runner.invoke(app, a).exit_code == 0
    (r64,) = measured(out)
    images = {p: p.stat().st_mtime_ns for p in (out / "base").rglob("*.png")}
    res = runner.invoke(app, [*a, "--resolution", "32"])
    assert res.exit_code == 0, res.output
    (r32,) = measured(out)
    assert (r64["resolution"], r32["resolution"]) == ("64", "32") and r32["fid"] != r64["fid"]
    assert {p: p.stat().st_mtime_ns for p in (out / "base").rglob("*.png")} == images  # not redrawn
    assert sorted(p.name.rsplit("__", 1)[1] for p in (out / "metrics").glob("*/*") if p.is_dir()) == ["32px", "64px"]
    # the same numbers as a fresh run at 32 px: no features of the 64 px run were reused
    fresh = tmp_path / "fresh"
    assert runner.invoke(app, [*args(toy, fresh, "--db", "none", "--guidance-64", "1", "--steps", "2"),
                               "--resolution", "32"]).exit_code == 0
    assert float(measured(fresh)[0]["fid"]) == pytest.approx(float(r32["fid"]), rel=1e-6)
