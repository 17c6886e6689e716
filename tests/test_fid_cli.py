"""`reimagen-eval fid` end to end (evaluation/cli.py, sweep.py, results.py) on a tiny COCO-format fixture written
here, a tiny random Re-Imagen cascade saved as checkpoints, and a random-conv feature extractor injected through
the backends' custom-extractor APIs: in-domain and zero-shot rows, base images made once per 64-stage weight,
a SIGKILLed run that resumes to the same images and FID, two processes that make the images of one, and bad
input that exits 2 without writing anything."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from evaluation.cli import fid
from reimagen.models.config import get_preset
from reimagen.models.text import TinyTextEncoder
from reimagen.models.checkpoint import save_checkpoint
from reimagen.models.unet import ReImagenUNet

REPO = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)
app.command()(fid)  # registered the way reimagen_eval/cli.py registers it


@app.callback()
def _root() -> None:
    """test app"""


runner = CliRunner()
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
THINGS = ["dog", "cat", "car", "tree", "house", "boat"]
N_PROMPTS = 24


def write_coco(root: Path, n_val: int = 40, n_train: int = 24, seed: int = 0) -> Path:
    """COCO layout: annotations/captions_{val,train}2014.json and {val,train}2014/*.jpg; 1-2 captions per image,
    colour words matching the image colour (val image ids from 1000, train from 5000)."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split, n, base in (("val2014", n_val, 1000), ("train2014", n_train, 5000)):
        (root / split).mkdir(exist_ok=True)
        images, anns = [], []
        for i in range(n):
            iid, colour, thing = base + i, list(COLOURS)[i % 4], THINGS[i % 6]
            h, w = int(rng.integers(24, 40)), int(rng.integers(24, 40))
            arr = np.empty((h, w, 3), np.uint8)
            arr[:] = COLOURS[colour]
            arr = np.clip(arr.astype(int) + rng.integers(-30, 30, arr.shape), 0, 255).astype(np.uint8)
            name = f"COCO_{split}_{iid:012d}.jpg"
            Image.fromarray(arr).save(root / split / name, quality=95)
            images.append({"id": iid, "file_name": name, "height": h, "width": w})
            for c in range(1 + i % 2):
                anns.append({"id": ann_id, "image_id": iid, "caption": f"a {colour} {thing} number {c}"})
                ann_id += 1
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images,
                                                                                  "annotations": anns}))
    return root


def write_webqa(root: Path, n: int = 40, seed: int = 0) -> Path:
    """A WebQA release in miniature: WebQA_train_val.json (image facts), imgs.tsv (id<TAB>base64 JPEG) and
    imgs.lineidx (byte offsets)."""
    import base64
    import io

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    facts, data, offsets = [], bytearray(), []
    for i in range(n):
        iid, colour = 30000000 + i, list(COLOURS)[i % 4]
        facts.append({"image_id": iid, "title": f"title {i}", "caption": f"a {colour} {THINGS[i % 6]} on a hill"})
        arr = np.clip(np.array(COLOURS[colour]) + rng.integers(-30, 30, (28, 36, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG")
        offsets.append(len(data))
        data += str(iid).encode() + b"\t" + base64.b64encode(buf.getvalue()) + b"\n"
    (root / "WebQA_train_val.json").write_text(json.dumps({"g1": {"Q": "q", "A": ["a"], "img_posFacts": facts,
                                                                  "img_negFacts": []}}))
    (root / "imgs.tsv").write_bytes(bytes(data))
    (root / "imgs.lineidx").write_text("".join(f"{o}\n" for o in offsets))
    return root


def write_models(folder: Path) -> dict[str, Path]:
    """tiny-16 base and tiny-sr32 super-resolution stages with TinyTextEncoder(dim=32), perturbed so that their
    outputs depend on the inputs (several output layers are zero-initialised)."""
    out = {}
    for name, preset, seed in (("base", "tiny-16", 0), ("sr", "tiny-sr32", 1)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ReImagenUNet(get_preset(preset))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        out[name] = save_checkpoint(folder / name, model, TinyTextEncoder(dim=32, seed=seed))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fidworld")
    return {"coco": write_coco(root / "coco"), **write_models(root / "models"), "cache": root / "cache",
            "root": root}


def base_args(world, out, *extra) -> list[str]:
    return ["--dataset", "coco", "--dataset-root", str(world["coco"]), "--model", str(world["base"]),
            "--num-prompts", str(N_PROMPTS), "--batch-size", "4", "--feature-extractor", "random-conv-16",
            "--resolution", "64", "--kid-subsets", "5", "--kid-subset-size", "10", "--stats-cache", str(world["cache"]),
            "--no-progress",
            "--out", str(out), *[str(e) for e in extra]]


def run(*args):
    return runner.invoke(app, ["fid", *[str(a) for a in args]])


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def measured(out: Path) -> list[dict[str, str]]:
    return [r for r in read_rows(out) if r["source"] == "measured"]


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("[!.]*__0.png"))}


# ----------------------------------------------------------------------------------------------
# In-process runs
# ----------------------------------------------------------------------------------------------
def test_in_domain_sweep_writes_tidy_results_and_makes_base_images_once_per_64_weight(world, tmp_path):
    out = tmp_path / "run"
    res = run(*base_args(world, out, "--sr-model", world["sr"], "--db", "coco-train", "--guidance-64", "1,2",
                         "--guidance-sr", "1,4", "--steps", "3"))
    assert res.exit_code == 0, res.output
    rows = measured(out)
    assert {(r["w_64"], r["w_sr"]) for r in rows} == {("1.0", "1.0"), ("1.0", "4.0"), ("2.0", "1.0"), ("2.0", "4.0")}
    assert all(r["metric"] == "FID" and r["db"] == "coco-train" and r["retriever"] == "bm25" and r["k"] == "2"
               and r["n"] == str(N_PROMPTS) and r["n_ref"] == "40" and float(r["fid"]) > 0 and r["kid"] for r in rows)
    best = [r for r in rows if r["best"] == "True"]
    assert len(best) == 1 and float(best[0]["fid"]) == min(float(r["fid"]) for r in rows)
    paper = [r for r in read_rows(out) if r["source"] == "reported (paper)"]
    assert any(r["model"].startswith("Re-Imagen (") and r["fid"] == "5.25" for r in paper)
    md = (out / "results.md").read_text()
    assert "reported (paper)" in md and "5.25" in md and "CLIP score skipped" in md
    assert (out / "fid_vs_guidance.png").stat().st_size > 1000
    # the neighbours come from the train split (image ids 5000+), never from the validation images
    table = json.loads((out / "neighbours.json").read_text())["rows"]
    assert len(table) == N_PROMPTS and all(n.startswith("50") for ids, _ in table.values() for n in ids)
    # one base folder per 64-stage weight; every SR folder is made from one of them
    assert sorted(p.name for p in (out / "base").iterdir()) == ["w64_1", "w64_2"]
    for p in (out / "images").iterdir():
        assert json.loads((p / "run.json").read_text())["base"] == "base/" + p.name.split("__")[0]
    # a rerun with one more SR weight reuses the base images and the finished points
    stamps = {p: p.stat().st_mtime_ns for p in (out / "base").rglob("*.png")}
    old = pixels(out / "images" / "w64_1__wsr_4")
    res = run(*base_args(world, out, "--sr-model", world["sr"], "--db", "coco-train", "--guidance-64", "1,2",
                         "--guidance-sr", "1,4,6", "--steps", "3"))
    assert res.exit_code == 0, res.output
    assert {p: p.stat().st_mtime_ns for p in (out / "base").rglob("*.png")} == stamps
    new = pixels(out / "images" / "w64_1__wsr_4")
    assert new.keys() == old.keys() and all(np.array_equal(new[k], old[k]) for k in old)
    assert len(measured(out)) == 6 and len(pixels(out / "images" / "w64_2__wsr_6")) == N_PROMPTS
    # the same images measured by the other backend: no new image is made, and the numbers are close
    res = run(*base_args(world, out, "--sr-model", world["sr"], "--db", "coco-train", "--guidance-64", "1,2",
                         "--guidance-sr", "1,4,6", "--steps", "3", "--backend", "torch-fidelity"))
    assert res.exit_code == 0, res.output
    assert {p: p.stat().st_mtime_ns for p in (out / "base").rglob("*.png")} == stamps
    tf = {r["point"]: float(r["fid"]) for r in measured(out)}
    assert all(r["backend"] == "torch-fidelity" for r in measured(out))
    assert len(tf) == 6 and all(v > 0 for v in tf.values())


def test_zero_shot_single_stage_sweep_without_database(world, tmp_path):
    out = tmp_path / "zs"
    res = run(*base_args(world, out, "--db", "none", "--guidance-64", "1,1.5", "--steps", "2"))
    assert res.exit_code == 0, res.output
    rows = measured(out)
    assert [(r["w_64"], r["w_sr"], r["metric"], r["retriever"]) for r in rows] == \
        [("1.0", "", "ZS-FID", "-"), ("1.5", "", "ZS-FID", "-")]
    assert not (out / "neighbours.json").exists() and not (out / "images").exists()
    md = (out / "results.md").read_text()
    assert "Imagen (3B)" in md and "7.27" in md  # the zero-shot column of Table 1 beside the best row
    # a folder of images made elsewhere, named by prompt id, gives the same FID as the sweep point itself
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    for name, arr in pixels(out / "base" / "w64_1.5").items():
        Image.fromarray(arr).save(folder / name.replace("__0.png", ".png"))  # <prompt_id>.png is accepted too
    res = run(*[a if a != str(world["base"]) else str(folder) for a in base_args(world, tmp_path / "from-folder")])
    assert res.exit_code == 0, res.output
    (row,) = measured(tmp_path / "from-folder")
    assert row["w_64"] == "" and row["metric"] == "ZS-FID"
    assert float(row["fid"]) == pytest.approx(float(rows[1]["fid"]), rel=1e-9)


def test_zero_shot_with_a_prebuilt_index_over_an_out_of_domain_collection(world, tmp_path):
    """--db laion --index DIR: the knowledge base is the one the index records (here a small parquet collection
    standing in for LAION shards); the rows are zero-shot."""
    from reimagen.retrieval.base import KnowledgeBase
    from reimagen.retrieval.bm25 import BM25Retriever

    rng = np.random.default_rng(3)
    (tmp_path / "web").mkdir()
    texts = [f"a photo of a {c} {t} outdoors" for c in COLOURS for t in THINGS]
    for i, t in enumerate(texts):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "web" / f"w{i}.png")
    kb = KnowledgeBase([f"web{i}" for i in range(len(texts))], texts, [f"w{i}.png" for i in range(len(texts))],
                       name="web", root=tmp_path / "web")
    table = kb.to_parquet(tmp_path / "web" / "kb.parquet")
    BM25Retriever.from_knowledge_base(kb).save(tmp_path / "index", source=str(table))
    out = tmp_path / "laion"
    res = run(*base_args(world, out, "--db", "laion", "--index", tmp_path / "index", "--guidance-64", "1.5",
                         "--steps", "2", "--k", "1"))
    assert res.exit_code == 0, res.output
    (row,) = measured(out)
    assert (row["db"], row["retriever"], row["k"], row["metric"]) == ("laion", "bm25", "1", "ZS-FID")
    rows = json.loads((out / "neighbours.json").read_text())["rows"]
    assert all(len(ids) <= 1 and all(n.startswith("web") for n in ids) for ids, _ in rows.values())
    res = run(*base_args(world, tmp_path / "x", "--db", "laion", "--index", tmp_path / "index", "--retriever", "clip"))
    assert res.exit_code == 2 and "is a bm25 retriever but --retriever is clip" in res.output


def test_wikiimages_prompts_come_from_the_seeded_validation_split_and_the_reference_is_read_from_imgs_tsv(world,
                                                                                                       tmp_path):
    webqa = write_webqa(tmp_path / "webqa")
    out = tmp_path / "wiki"
    args = [a if a != str(world["coco"]) else str(webqa) for a in base_args(world, out)]
    args = [a if a != "coco" else "wikiimages" for a in args]
    args = [a if a != str(N_PROMPTS) else "12" for a in args]
    res = run(*args, "-O", "val_size=20", "--db", "wikiimages-train", "--guidance-64", "1.5", "--steps", "2")
    assert res.exit_code == 0, res.output
    (row,) = measured(out)
    assert (row["dataset"], row["metric"], row["n"], row["n_ref"]) == ("wikiimages", "FID", "12", "20")
    from reimagen.retrieval.readers import read_wikiimages

    val = set(read_wikiimages(webqa, "val", seed=0, val_size=20, num_prompts=0, progress=False).ids)
    prompts = [json.loads(line)["prompt_id"] for line in (out / "prompts.jsonl").read_text().splitlines()]
    table = json.loads((out / "neighbours.json").read_text())["rows"]
    assert len(prompts) == 12 and set(prompts) <= val
    assert all(n not in val for ids, _ in table.values() for n in ids)  # retrieval from the train split only
    assert "5.88" in (out / "results.md").read_text()  # WikiImages FID-20K of Table 1 beside the best row



def test_the_val_size_remedy_is_spelled_for_fid_and_following_it_gets_past_the_error(world, tmp_path):
    """The reader suggests a smaller val_size; fid spells it as its own option (not the knowledge-base spec's
    ?val_size=N, which fid's --dataset-root does not take), and the suggested command gets past the error."""
    import re

    webqa = write_webqa(tmp_path / "webqa", n=20)
    args = [a if a != str(world["coco"]) else str(webqa) for a in base_args(world, tmp_path / "wiki")]
    args = [a if a != "coco" else "wikiimages" for a in args]
    args = [a if a != str(N_PROMPTS) else "2" for a in args] + ["--metrics", "fid", "--steps", "2"]
    res = run(*args)
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "?val_size" not in text, text
    remedy = re.search(r"--dataset-option (val_size=\d+)", text)
    assert remedy, text
    res = run(*args, "--dataset-option", remedy.group(1))
    assert "pass a smaller val_size" not in " ".join(res.output.split()), res.output
    assert res.exit_code == 0, res.output

# ----------------------------------------------------------------------------------------------
# Bad input: exit 2, one red line, nothing written
# ----------------------------------------------------------------------------------------------
def _broken_coco(tmp_path, world, what: str) -> Path:
    import shutil

    root = tmp_path / f"coco-{what}"
    shutil.copytree(world["coco"], root)
    if what == "no-annotations":
        (root / "annotations" / "captions_val2014.json").unlink()
    elif what == "no-images":
        shutil.rmtree(root / "val2014")
    else:
        sorted((root / "val2014").iterdir())[3].unlink()
    return root


@pytest.mark.parametrize("case, needles", [
    ("unknown-dataset", ["unknown dataset 'cifar'", "coco", "wikiimages"]),
    ("synthetic-foreign-root", ["is not a synthetic world", "reimagen-eval toy build --out"]),
    ("unknown-db", ["unknown database 'bogus'", "coco-train", "laion"]),
    ("laion-without-shards", ["--db laion needs --db-root"]),
    ("no-annotations", ["captions_val2014.json", "annotations_trainval2014.zip", "cocodataset.org"]),
    ("no-images", ["val2014", "images.cocodataset.org/zips/val2014.zip"]),
    ("missing-reference-image", ["1 of the 40 images", "val2014.zip"]),
    ("too-many-prompts", ["60 captions, fewer than the 500 prompts requested"]),
    ("folder-missing-ids", ["no image for 20 of the 24 prompt ids"]),
    ("folder-too-few-images", ["holds 3 images, fewer than the 24 prompts"]),
    ("bad-grid", ["--guidance-64", "comma-separated numbers"]),
    ("diffusers-offline", ["could not load the diffusers pipeline", "huggingface-cli download"]),
    # the default Inception extractor, whose weights this machine cannot download: the user's own mistake is named
    # first, before any download or model load
    ("inception-unknown-db", ["unknown database 'no-such-db'"]),
    ("inception-missing-root", ["MISSING"]),
    ("inception-missing-model", ["--model", "MISSING", "does not exist"]),
    ("damaged-checkpoint", ["config.json is not valid JSON", "damaged"]),
    ("half-set-launcher", ["RANK=1 is set but WORLD_SIZE is not"]),
])
def test_bad_input_is_one_red_line_exit_2_and_writes_nothing(world, tmp_path, case, needles):
    out = tmp_path / "out"
    cache_before = sorted(p.name for p in world["cache"].glob("*")) if world["cache"].exists() else []
    args = base_args(world, out)
    swap = {}
    if case == "unknown-dataset":
        swap["coco"] = "cifar"
    elif case == "synthetic-foreign-root":
        swap["coco"] = "synthetic"
    elif case == "unknown-db":
        args += ["--db", "bogus"]
    elif case == "laion-without-shards":
        args += ["--db", "laion"]
    elif case in ("no-annotations", "no-images", "missing-reference-image"):
        swap[str(world["coco"])] = str(_broken_coco(tmp_path, world, case))
    elif case == "too-many-prompts":
        swap[str(N_PROMPTS)] = "500"
    elif case.startswith("folder"):
        folder = tmp_path / "imgs"
        folder.mkdir()
        rng = np.random.default_rng(0)
        n = 3 if case == "folder-too-few-images" else N_PROMPTS
        from evaluation.datasets import open_dataset

        prompt_ids = [p.prompt_id for p in open_dataset("coco", world["coco"], N_PROMPTS, 0).prompts]
        for i in range(n):  # the first 4 prompts have an image, the rest of the folder is unrelated
            name = f"{prompt_ids[i]}__0.png" if i < 4 else f"unrelated{i}.png"
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / name)
        swap[str(world["base"])] = str(folder)
    elif case == "bad-grid":
        args += ["--guidance-64", "1,x"]
    elif case == "diffusers-offline":
        swap[str(world["base"])] = "stabilityai/sd-turbo"
    elif case.startswith("inception-"):
        swap["random-conv-16"] = "inception"
        if case == "inception-unknown-db":
            args += ["--db", "no-such-db"]
        else:
            swap[str(world["coco"] if case == "inception-missing-root" else world["base"])] = str(tmp_path / "MISSING")
    elif case == "damaged-checkpoint":
        import shutil

        shutil.copytree(world["base"], tmp_path / "damaged")
        (tmp_path / "damaged" / "config.json").write_text('{"unet": ')
        swap[str(world["base"])] = str(tmp_path / "damaged")
    env = {"RANK": "1"} if case == "half-set-launcher" else None
    args = [swap.get(a, a) for a in args]
    res = runner.invoke(app, ["fid", *[str(a) for a in args]], env=env)
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not out.exists()
    after = sorted(p.name for p in world["cache"].glob("*")) if world["cache"].exists() else []
    assert after == cache_before


def test_a_corrupt_reference_image_is_listed_counted_and_left_out(world, tmp_path):
    """A reference JPEG that cannot be decoded is found before any image is generated, left out of the
    reference statistics, listed in reference_unreadable.json and counted in every result row."""
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(world["coco"], root)
    bad = sorted((root / "val2014").iterdir())[5]
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    out = tmp_path / "run"
    args = [str(root) if a == str(world["coco"]) else a for a in base_args(world, out, "--guidance-64", "1",
                                                                           "--steps", "2")]
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert list(json.loads((out / "reference_unreadable.json").read_text())) == [str(bad)]
    rows = measured(out)
    assert [(r["n_ref"], r["n_ref_unreadable"]) for r in rows] == [("39", "1")]
    assert "1 of 40 reference images cannot be decoded" in (out / "results.md").read_text()


def test_a_corrupt_neighbour_image_is_refused_before_any_image_is_made(world, tmp_path):
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(world["coco"], root)
    for f in (root / "train2014").iterdir():  # every train image: whichever the prompts retrieve
        f.write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    out = tmp_path / "run"
    args = [str(root) if a == str(world["coco"]) else a for a in base_args(world, out, "--db", "coco-train",
                                                                           "--guidance-64", "1", "--steps", "2")]
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert "retrieved neighbour images of database coco-train cannot be decoded" in " ".join(res.output.split())
    assert "COCO_train2014_" in res.output
    assert not (out / "base").exists()  # no sampling happened


# ----------------------------------------------------------------------------------------------
# Subprocesses: SIGKILL and resume, two processes
# ----------------------------------------------------------------------------------------------
SUB = ["--db", "coco-train", "--guidance-64", "1,2", "--guidance-sr", "3", "--steps", "6"]


def _cmd(world, out):
    return [sys.executable, "-m", "evaluation.cli", "fid", *base_args(world, out, "--sr-model", world["sr"], *SUB)]


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    env.update(extra)
    return env


def _final_bytes(out: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted((out / "images").glob("*/[!.]*.png"))}


def _final_images(out: Path) -> dict[str, np.ndarray]:
    return {f"{p.name}/{k}": v for p in sorted((out / "images").iterdir()) for k, v in pixels(p).items()}


@pytest.fixture(scope="module")
def uninterrupted(world):
    out = world["root"] / "uninterrupted"
    proc = subprocess.run(_cmd(world, out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


def test_run_killed_mid_generation_resumes_to_the_same_images_and_fid(world, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(world, out), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = out / "base" / "w64_1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(first.glob("[!.]*__0.png")):
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    made = len(list((out / "base").rglob("[!.]*__0.png"))) + len(list(out.glob("images/*/[!.]*__0.png")))
    assert 0 < made < 2 * 2 * N_PROMPTS  # killed mid-generation
    assert not (out / "results.csv").exists()
    again = subprocess.run(_cmd(world, out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    want, got = _final_images(uninterrupted), _final_images(out)
    assert len(want) == 2 * N_PROMPTS and got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want) and _final_bytes(out) == _final_bytes(uninterrupted)
    assert {r["point"]: r["fid"] for r in measured(out)} == {r["point"]: r["fid"] for r in measured(uninterrupted)}
    kids = {r["point"]: float(r["kid"]) for r in measured(uninterrupted)}
    assert all(float(r["kid"]) == pytest.approx(kids[r["point"]], rel=1e-9) for r in measured(out))


@pytest.mark.parametrize("world_size", [2, 3])
def test_several_processes_make_exactly_the_images_of_one(world, uninterrupted, tmp_path, world_size):
    out = tmp_path / "many"
    procs = [subprocess.Popen(_cmd(world, out), cwd=REPO, env=_env(RANK=str(r), WORLD_SIZE=str(world_size)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world_size)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * world_size, outs
    assert "rank 0 computes the metrics" in outs[1][1]
    want, got = _final_images(uninterrupted), _final_images(out)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert _final_bytes(out) == _final_bytes(uninterrupted)  # the PNG files themselves, not only their pixels
    assert {r["point"]: r["fid"] for r in measured(out)} == {r["point"]: r["fid"] for r in measured(uninterrupted)}
