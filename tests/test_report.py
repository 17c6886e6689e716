"""`reimagen-eval report`: a static site of runs (reimagen_eval/report), read from real `sample` and `fid` runs
of tiny stages and EntityDrawBench run folders in the run format (human_eval.testing.make_run), then opened in
headless Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from human_eval.testing import CHROMIUM_ARGS, make_run
from reimagen_eval.cli import app
from reimagen_eval.report import ReportError, build_report
from test_fid_cli import write_coco, write_models

runner = CliRunner()


def _data(site: Path, section: str) -> dict:
    text = (site / "data" / f"{section}.js").read_text()
    return json.loads(text.rsplit("] = ", 1)[1].rstrip().rstrip(";"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two EntityDrawBench runs (the second lacks the birds), a `sample` run and a 2-point FID sweep."""
    root = tmp_path_factory.mktemp("report")
    a = make_run(root / "draw-a", categories=("dogs", "birds"), seed=0)
    b = make_run(root / "draw-b", categories=("dogs",), seed=1)
    models = write_models(root / "models")
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(root / "nb.png")
    res = runner.invoke(app, ["sample", "--checkpoint", str(models["base"]), "--prompt", "a red thing",
                              "--neighbour-image", str(root / "nb.png"), "--neighbour-text", "a thing",
                              "--prompt", "a blue thing", "--num-samples", "2", "--steps", "2",
                              "--out", str(root / "sample")])
    assert res.exit_code == 0, res.output
    coco = write_coco(root / "coco")
    res = runner.invoke(app, ["fid", "--dataset", "coco", "--dataset-root", str(coco), "--model", str(models["base"]),
                              "--num-prompts", "12", "--batch-size", "4", "--feature-extractor", "random-conv-16",
                              "--resolution", "64", "--kid-subsets", "2", "--kid-subset-size", "6",
                              "--guidance-64", "1,3", "--steps", "2", "--stats-cache", str(root / "cache"),
                              "--no-progress", "--out", str(root / "fid")])
    assert res.exit_code == 0, res.output
    return {"a": a, "b": b, "sample": root / "sample", "fid": root / "fid", "root": root}


@pytest.fixture(scope="module")
def site(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("site") / "report"
    res = runner.invoke(app, ["report", f"alpha={runs['a']}", f"beta={runs['b']}", f"s={runs['sample']}",
                              f"f={runs['fid']}", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_entitydraw_runs_side_by_side_on_their_shared_prompts(site, runs):
    data = _data(site, "entitydraw")
    assert data["models"] == ["alpha", "beta"]
    rows = data["rows"]
    # the dogs are in both runs; the birds only in alpha: left out and counted on the page
    assert sorted(r["pid"] for r in rows) == ["dogs-0-p0", "dogs-1-p0"]
    html = (site / "index.html").read_text()
    assert "2 prompt(s) only in alpha" in html
    for r in rows:
        assert [len(r["cells"][m]["images"]) for m in ("alpha", "beta")] == [4, 4]
        for m in ("alpha", "beta"):
            images = r["cells"][m]["images"]
            assert sum(im["best"] for im in images) == 1  # the best-of-N pick, marked
            assert all({"clip_t", "clip_i"} <= set(im["scores"]) for im in images)
            assert all((site / im["src"]).is_file() for im in images)
        assert (site / r["references"][0]["src"]).is_file()
        best = [max(im["scores"]["select_score"] for im in r["cells"][m]["images"]) for m in ("alpha", "beta")]
        assert r["disagreement"] == pytest.approx(abs(best[0] - best[1]), abs=1e-6)


def test_images_are_thumbnails_by_content_never_inlined(site, runs):
    html = (site / "index.html").read_text() + "".join(p.read_text() for p in (site / "data").glob("*.js"))
    assert "base64" not in html and "data:image" not in html
    thumbs = list((site / "thumbs").iterdir())
    # one file per distinct image content: distinct contents across the runs' images, references and sheets
    sources = [p for p in runs["root"].rglob("*.png") if "cache" not in p.parts]
    shown = _data(site, "entitydraw")["rows"]
    assert len(thumbs) == len({t.name for t in thumbs}) and len(thumbs) <= len(sources)
    assert all(re.fullmatch(r"[0-9a-f]{20}-\d+\.(png|jpg)", t.name) for t in thumbs)
    assert shown


def test_fid_grid_per_guidance_point_with_its_protocol_and_table(site, runs):
    data = _data(site, "fid-f")
    assert data["kind"] == "grid"
    assert len(data["points"]) == 2 and all(len(v) == 12 for v in data["points"].values())
    html = (site / "index.html").read_text()
    assert "protocol.json" in html and (site / "files" / "f-fid_vs_guidance.png").is_file()
    assert "<table" in html.split('id="fid-f"')[1]


def test_sample_run_rows_carry_their_samples(site):
    rows = _data(site, "sample-s")["rows"]
    assert [r["prompt"] for r in rows] == ["a red thing", "a blue thing"]
    assert all(len(r["cells"]["s"]["images"]) == 2 for r in rows)
    assert all([n["text"] for n in r["cells"]["s"]["neighbours"]] == ["a thing"] for r in rows)
    assert all(r["sheet"] and (site / r["sheet"]).is_file() for r in rows)


def test_missing_images_are_listed_and_a_rebuild_reuses_thumbnails(runs, tmp_path):
    import shutil

    run = shutil.copytree(runs["a"], tmp_path / "a")
    out = tmp_path / "rep"
    first = build_report([str(run)], out)
    assert first.thumbs_written > 0 and not first.missing
    (run / "dogs-0-p0__2.png").unlink()
    (run / "dogs-1-p0__0.png").write_bytes(b"not a png")
    second = build_report([str(run)], out)
    assert second.thumbs_written == 0 and second.thumbs_reused > 0  # the rest: from the previous site
    assert set(second.missing) == {str(run / "dogs-0-p0__2.png"), str(run / "dogs-1-p0__0.png")}
    html = (out / "index.html").read_text()
    assert "2 image(s) missing or unreadable" in html and "dogs-0-p0__2.png" in html
    cell = [r for r in _data(out, "entitydraw")["rows"] if r["pid"] == "dogs-0-p0"][0]["cells"]["a"]
    assert [im["src"] is None for im in cell["images"]] == [False, False, True, False]
    assert not list(tmp_path.glob(".rep.*"))  # no temporary folder left


def test_a_failed_build_leaves_the_previous_site(runs, tmp_path, monkeypatch):
    from reimagen_eval.report import site as site_mod

    out = tmp_path / "rep"
    build_report([str(runs["a"])], out)
    before = (out / "index.html").read_bytes()

    def boom():
        raise RuntimeError("template exploded")

    monkeypatch.setattr(site_mod, "_template", boom)
    with pytest.raises(RuntimeError):
        build_report([str(runs["a"]), str(runs["b"])], out)
    assert (out / "index.html").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


@pytest.mark.parametrize("case", ["unknown", "missing", "not-a-report", "same-name"])
def test_bad_input_names_the_folder_and_writes_nothing(runs, tmp_path, case):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "notes.txt").write_text("hello")
    out = tmp_path / "out"
    args, needle = {
        "unknown": ([str(odd)], "is not a run folder the report knows"),
        "missing": ([str(tmp_path / "nope")], "no such run folder"),
        "not-a-report": ([str(runs["a"]), "--out", str(odd)], "is not a report folder"),
        "same-name": ([f"x={runs['a']}", f"x={runs['b']}"], "two runs are named 'x'"),
    }[case]
    if "--out" not in args:
        args += ["--out", str(out)]
    res = runner.invoke(app, ["report", *args])
    assert res.exit_code != 0
    assert needle in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output
    assert not out.exists() and sorted(p.name for p in odd.iterdir()) == ["notes.txt"]
    with pytest.raises(ReportError):
        build_report(args[: args.index("--out")], args[args.index("--out") + 1])


# ---------------------------------------------------------------------------------------------- browser

def test_report_in_a_browser_filters_and_every_image_loads(site, chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "report.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((site / "index.html").as_uri())
            page.wait_for_selector("body[data-ready='1']")
            rows = page.locator("[data-testid=rows-entitydraw] article.row")
            assert rows.count() == 2
            # 2 prompts x (1 reference + 2 models x 4 samples); the runs record no neighbour image (a placeholder)
            assert page.locator("[data-testid=rows-entitydraw] img").count() == 2 * (1 + 2 * 4)
            assert page.locator("[data-testid=rows-entitydraw] .neighbour .missing").count() == 2 * 2
            page.select_option("[data-testid=filter-split]", "frequent")
            count = page.locator("[data-testid=count-entitydraw]")
            assert rows.count() == 1 and count.get_attribute("data-rows") == "1"
            page.select_option("[data-testid=filter-model]", "beta")
            assert page.locator("[data-testid=rows-entitydraw] .model-line").count() == 1
            page.select_option("[data-testid=filter-point]", index=1)
            assert page.locator("[data-testid=rows-fid-f] img").count() == 12
            # every image on the page resolves (lazy ones are asked to load now)
            page.evaluate("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; })")
            page.wait_for_function("[...document.images].every(i => i.complete)", timeout=20000)
            broken = page.evaluate("[...document.images].filter(i => !i.naturalWidth).map(i => i.src)")
            assert broken == []
            assert page.evaluate("document.images.length") >= 12 + 6
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # not blank
