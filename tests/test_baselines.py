"""Any text-to-image model on every benchmark (reimagen/pipelines/plugins.py): the model grammar KIND:TARGET with
--model-arg, on `sample`, `fid` and `entitydraw` (toy world and open benchmark), with a tiny random diffusers
Stable Diffusion pipeline built offline (tests/tiny_diffusers.py) and python: plug-ins (tests/plugin_models.py).
The images mean nothing; the tests check that every kind runs, what the records say, and the refusals."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from conftest import make_model, randomize
from entitydrawbench.cli import register
from reimagen.models.checkpoint import save_checkpoint
from reimagen.models.text import TinyTextEncoder
from reimagen.pipelines.plugins import parse_model
from reimagen_eval.cli import app as main_app
from test_fid_cli import write_coco
from test_toy_entitydraw import SPEC
from tiny_diffusers import make_tiny_sd_pipeline

runner = CliRunner()
FAST_SD = ["--model-arg", "steps=2", "--model-arg", "size=32"]


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A tiny SD pipeline, a Re-Imagen base stage, a tiny toy world with an (untrained) judge, a tiny COCO."""
    from toyworld.build import build_world_files
    from toyworld.judge import Judge, save_judge
    from toyworld.world import World, WorldSpec

    root = tmp_path_factory.mktemp("baselines")
    world = World(WorldSpec(**SPEC))
    build_world_files(world, root / "world", progress=False)
    torch.manual_seed(0)
    save_judge(Judge().eval(), root / "judge", {"world": world.fingerprint(), "test_accuracy": {"shape": 0.2}})
    save_checkpoint(root / "base", randomize(make_model("tiny-16", seed=0)), TinyTextEncoder(dim=32, seed=0).eval())
    edb = typer.Typer()
    register(edb)
    return {"root": root, "sd": make_tiny_sd_pipeline(root / "sd", size=32), "world": root / "world",
            "judge": root / "judge", "base": root / "base", "coco": write_coco(root / "coco"), "edb": edb}


def _edb(kit, *args):
    return runner.invoke(kit["edb"], [str(a) for a in args])


def _world_run(kit, out, *model):
    return _edb(kit, "entitydraw", "--world", kit["world"], *model, "--per-split", "1", "--samples-per-prompt", "2",
                "--judge", kit["judge"], "--out", out)


def _rows(run):
    return [json.loads(line) for line in (run / "images.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- the grammar

def test_the_grammar_reads_every_kind_and_refuses_what_does_not_apply(kit, tmp_path):
    assert parse_model(f"reimagen:{kit['base']}").kind == "reimagen"
    spec = parse_model(f"diffusers:{kit['sd']}", ["steps=3", "guidance=2.5", "dtype=bf16", "scheduler=X"])
    assert spec.args == {"steps": 3, "guidance": 2.5, "dtype": "bf16", "scheduler": "X"}
    assert parse_model("diffusers:org/name").target == "org/name"  # a hub id is not checked here (offline)
    assert parse_model(f"folder:{tmp_path}", ["size=64"]).args == {"size": 64}
    assert parse_model("python:plugin_models:solid", ["size=8", "tag=x", "flag=true"]).args == \
        {"size": 8, "tag": "x", "flag": True}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_model(str(kit["base"])).kind == "reimagen"  # a bare checkpoint: no warning
    with pytest.warns(FutureWarning, match=f"--model diffusers:{kit['sd']}"):
        assert parse_model(str(kit["sd"])).kind == "diffusers"
    for spec, args, needle in [
        ("dalle:x", [], "unknown model kind 'dalle'"),
        (f"reimagen:{tmp_path / 'nope'}", [], "no such folder"),
        (f"folder:{tmp_path}", ["scheduler=DDIM"], "--model-arg scheduler does not apply to folder:"),
        (f"reimagen:{kit['base']}", ["steps=2"], "it takes none"),
        (f"diffusers:{kit['sd']}", ["steps=two"], "steps must be a positive integer"),
        (f"diffusers:{kit['sd']}", ["dtype=int8"], "dtype=int8"),
        ("python:plugin_models", [], "python:MODULE:FUNCTION"),
        (f"diffusers:{kit['sd']}", ["steps"], "write KEY=VALUE"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=needle):
            parse_model(spec, args)


# ---------------------------------------------------------------------------------------------- entitydraw

def test_a_diffusers_pipeline_on_the_toy_world_is_judged_and_recorded(kit, tmp_path):
    out = tmp_path / "sd-world"
    res = _world_run(kit, out, "--model", f"diffusers:{kit['sd']}", *FAST_SD)
    assert res.exit_code == 0, res.output
    rows = _rows(out)
    assert rows and all(r["generator"] == "diffusers" and r["generator_model"] == str(kit["sd"]) for r in rows)
    assert all(r["faithful"] is not None for r in rows)  # 32 px images judged at the world's 64 px
    rec = json.loads((out / "run.json").read_text())["model_record"]
    assert rec == {"kind": "diffusers", "model": str(kit["sd"]), "scheduler": "DDIMScheduler", "steps": 2,
                   "guidance": 7.5, "size": 32}
    assert Image.open(out / rows[0]["image"]).size == (32, 32)
    md = (out / "summary.md").read_text()
    assert "What made the images" in md and "DDIMScheduler" in md


def test_prompts_export_then_a_folder_and_a_plugin_run_the_world_and_a_summary_says_kinds_mix(kit, tmp_path):
    from plugin_models import solid

    res = _edb(kit, "entitydraw-prompts", "--world", kit["world"], "--per-split", "1", "--samples-per-prompt", "2",
               "--out", tmp_path / "prompts.jsonl")
    assert res.exit_code == 0, res.output
    prompts = _rows_of(tmp_path / "prompts.jsonl")
    folder = tmp_path / "made-elsewhere"
    folder.mkdir()
    for p in prompts:  # what a user's own script does with the export: one file per listed name and seed
        for name, im in zip(p["files"], solid([p["prompt"]] * len(p["seeds"]), p["seeds"], size=64)):
            im.save(folder / name)
    res = _world_run(kit, tmp_path / "folder-run", "--model", f"folder:{folder}")
    assert res.exit_code == 0, res.output
    res = _world_run(kit, tmp_path / "plugin-run", "--model", "python:plugin_models:solid", "--model-arg", "size=64")
    assert res.exit_code == 0, res.output
    a, b = _rows(tmp_path / "folder-run"), _rows(tmp_path / "plugin-run")
    assert {r["generator"] for r in a} == {"folder"} and {r["generator"] for r in b} == {"python"}
    # the exported seeds are the ones a plug-in gets: the same pixels either way
    for ra, rb in zip(a, b):
        assert (Image.open(tmp_path / "folder-run" / ra["image"]).tobytes()
                == Image.open(tmp_path / "plugin-run" / rb["image"]).tobytes())
    assert json.loads((tmp_path / "folder-run" / "run.json").read_text())["model_record"]["scheduler"] == \
        "pre-generated"
    res = _edb(kit, "entitydraw-summary", f"folder={tmp_path / 'folder-run'}", f"plugin={tmp_path / 'plugin-run'}",
               "--out", tmp_path / "summary")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "summary.md").read_text()
    assert "MIXED GENERATOR KINDS (folder, python)" in md and "python:plugin_models:solid" in md


def _rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_open_benchmark_takes_a_plugin_and_the_old_spellings_warn(kit, tmp_path):
    out = tmp_path / "open"
    res = _edb(kit, "entitydraw", "--model", "python:plugin_models:solid", "--per-category", "1",
               "--samples-per-prompt", "1", "--out", out)
    assert res.exit_code == 0, res.output
    assert {r["generator"] for r in _rows(out)} == {"python"}
    res = _edb(kit, "entitydraw", "--diffusers", kit["sd"], "--diffusers-steps", "2", "--size", "32",
               "--per-category", "1", "--samples-per-prompt", "1", "--out", tmp_path / "old")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert f"use --model diffusers:{kit['sd']}" in text and "use --model-arg steps=2" in text
    assert "use --model-arg size=32" in text
    assert json.loads((tmp_path / "old" / "run.json").read_text())["model_record"]["steps"] == 2


@pytest.mark.parametrize("model, extra, needle", [
    ("python:plugin_models:too_few", [], "python:plugin_models:too_few returned 5 images for 6 prompts"),
    ("python:plugin_models:wrong_size", [], "python:plugin_models:wrong_size returned a 16x12 image"),
    ("python:plugin_models:broken", [], "python:plugin_models:broken raised RuntimeError: the GPU caught fire"),
    ("python:plugin_models:NOT_CALLABLE", [], "'NOT_CALLABLE' is not callable"),
    ("python:no_such_module:f", [], "cannot import 'no_such_module'"),
    ("stable:diffusion", [], "unknown model kind 'stable'"),
    ("folder:/no/such/folder", [], "no such folder"),
    ("python:plugin_models:solid", ["--steps", "4"], "--steps only apply to a Re-Imagen cascade"),
])
def test_bad_models_are_named_without_a_traceback_and_leave_no_image(kit, tmp_path, model, extra, needle):
    out = tmp_path / "bad"
    res = _world_run(kit, out, "--model", model, *extra)
    assert res.exit_code != 0
    text = " ".join(res.output.split())
    assert needle in text, text
    assert "Traceback" not in res.output
    assert not list(out.glob("*.png")) if out.exists() else True


# ---------------------------------------------------------------------------------------------- fid and sample

def _fid(kit, out, *model):
    return runner.invoke(main_app, ["fid", "--dataset", "coco", "--dataset-root", str(kit["coco"]), *map(str, model),
                                    "--num-prompts", "12", "--batch-size", "4", "--feature-extractor",
                                    "random-conv-16", "--resolution", "32", "--kid-subsets", "2",
                                    "--kid-subset-size", "6", "--stats-cache", str(kit["root"] / "cache"),
                                    "--no-progress", "--out", str(out)])


def test_fid_records_a_diffusers_pipeline_and_refuses_cascade_options_by_name(kit, tmp_path):
    res = _fid(kit, tmp_path / "fid-sd", "--model", f"diffusers:{kit['sd']}", *FAST_SD, "--guidance-64", "1,4")
    assert res.exit_code == 0, res.output
    protocol = json.loads((tmp_path / "fid-sd" / "protocol.json").read_text())
    assert protocol["model"]["kind"] == "diffusers" and protocol["model"]["scheduler"] == "DDIMScheduler"
    assert protocol["model"]["steps"] == 2 and protocol["model"]["size"] == 32
    md = (tmp_path / "fid-sd" / "results.md").read_text()
    assert f"diffusers model {kit['sd']} (DDIMScheduler, 2 steps" in md and "(ddpm)" not in md
    assert sorted(p.name for p in (tmp_path / "fid-sd" / "images").iterdir()) == ["cfg_1", "cfg_4"]
    res = _fid(kit, tmp_path / "fid-sd-old", "--model", str(kit["sd"]), "--steps", "2", "--model-arg", "size=32",
               "--guidance-64", "1")  # 0.1's spellings: a bare pipeline folder, --steps as its steps
    assert res.exit_code == 0, res.output
    assert "use --model-arg steps=2" in " ".join(res.output.split())
    assert json.loads((tmp_path / "fid-sd-old" / "protocol.json").read_text())["model"]["steps"] == 2
    for extra, name in ((["--sr-model", kit["base"]], "--sr-model"), (["--sampler", "ddim"], "--sampler"),
                        (["--guidance-sr", "3"], "--guidance-sr")):
        res = _fid(kit, tmp_path / "refused", "--model", f"diffusers:{kit['sd']}", *extra)
        assert res.exit_code != 0 and f"{name} only apply to a Re-Imagen cascade" in " ".join(res.output.split())
        assert not (tmp_path / "refused").exists()


def test_fid_and_sample_take_a_python_plugin(kit, tmp_path):
    res = _fid(kit, tmp_path / "fid-py", "--model", "python:plugin_models:solid", "--model-arg", "size=32")
    assert res.exit_code == 0, res.output
    protocol = json.loads((tmp_path / "fid-py" / "protocol.json").read_text())
    assert protocol["model"]["kind"] == "python" and protocol["model"]["size"] == 32
    assert "python model python:plugin_models:solid" in (tmp_path / "fid-py" / "results.md").read_text()
    folder = f"folder:{tmp_path / 'fid-py' / 'images' / 'python'}"
    res = _fid(kit, tmp_path / "fid-folder", "--model", folder, "--model-arg", "size=32")
    assert res.exit_code != 0 and "size does not apply to fid's folder:" in " ".join(res.output.split())
    res = _fid(kit, tmp_path / "fid-folder", "--model", folder)
    assert res.exit_code == 0, res.output
    res = runner.invoke(main_app, ["fid-table", str(tmp_path / "fid-py"), str(tmp_path / "fid-folder"), "--out",
                                   str(tmp_path / "table")])
    assert res.exit_code == 0, res.output
    assert "MIXED GENERATOR KINDS" in (tmp_path / "table" / "results.md").read_text()
    out = tmp_path / "sample-py"
    res = runner.invoke(main_app, ["sample", "--model", "python:plugin_models:solid", "--prompt", "a red thing",
                                   "--num-samples", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["model_record"]["kind"] == "python"
    assert (out / "sheets" / "p0000.png").is_file() and len(list(out.glob("p0000__*.png"))) == 2
    res = runner.invoke(main_app, ["sample", "--model", "python:plugin_models:solid", "--prompt", "x",
                                   "--w-p", "5", "--out", str(tmp_path / "no")])
    assert res.exit_code != 0 and "--w-p only apply to a Re-Imagen cascade" in " ".join(res.output.split())


def test_sample_with_a_diffusers_pipeline(kit, tmp_path):
    out = tmp_path / "sample-sd"
    res = runner.invoke(main_app, ["sample", "--model", f"diffusers:{kit['sd']}", *FAST_SD, "--prompt", "a dog",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "run.json").read_text())["model_record"]
    assert rec["kind"] == "diffusers" and rec["steps"] == 2 and rec["size"] == 32
    assert Image.open(out / "p0000__0.png").size == (32, 32)
