"""`reimagen-eval fid --metrics fid,kid,fd-dinov2,cmmd,clip-fid`: torch-fidelity's own DINOv2 and CLIP extractors
run offline on random weights placed where real users put the real ones (a torch.hub cache holding a tiny
DINOv2 stand-in, OpenAI-format TorchScript CLIP files), every value with a 95% interval, each checked against an
independent computation on the cached features, the protocol manifest, and the bad input of the new options."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from evaluation.metrics import feature_stats, frechet_distance_scipy, read_all
from test_fid_cli import N_PROMPTS, base_args, run, world  # noqa: F401  (the fixture)

pytestmark = pytest.mark.filterwarnings("ignore:Matrix is singular")

HUBCONF = '''import torch
from torch import nn

dependencies = ["torch"]


def dinov2_vitl14(**kwargs):
    """A tiny stand-in with DINOv2's call signature: (B, 3, 224, 224) normalised -> (B, 24)."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 7, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 24))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net
'''


def write_clip(path: Path, embed_dim: int, seed: int) -> Path:
    """A random ViT CLIP saved as OpenAI's TorchScript files are (torch-fidelity rebuilds it from the state dict)."""
    from reimagen.utils.compat import patch_torchvision_if_broken

    patch_torchvision_if_broken()
    from torch_fidelity.feature_extractor_clip import CLIPVisual

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.visual = CLIPVisual(embed_dim, 32, 1, 64, 16).visual
            self.text_projection = nn.Parameter(torch.randn(8, embed_dim))

        def forward(self, x):
            return x

    torch.jit.save(torch.jit.trace(Holder(), torch.zeros(1)), str(path))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric-weights")
    repo = root / "torch" / "hub" / "facebookresearch_dinov2_main"
    repo.mkdir(parents=True)
    (repo / "hubconf.py").write_text(HUBCONF)
    return {"torch_home": root / "torch", "cmmd": write_clip(root / "ViT-L-14-336px.pt", 16, 1),
            "clip-fid": write_clip(root / "ViT-B-32.pt", 12, 2)}


ALL = "fid,kid,fd-dinov2,cmmd,clip-fid"


def _run(world, weights, out, *extra):
    args = [*base_args(world, out, "--db", "none", "--guidance-64", "1", "--steps", "2"), "--metrics", ALL,
            "--weights", f"cmmd={weights['cmmd']}", "--weights", f"clip-fid={weights['clip-fid']}",
            "--bootstrap", "30", *extra]
    import os

    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(weights["torch_home"])
    try:
        return run(*args)
    finally:
        if old is None:
            del os.environ["TORCH_HOME"]
        else:
            os.environ["TORCH_HOME"] = old


@pytest.fixture(scope="module")
def sweep(world, weights, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("allmetrics") / "out"
    res = _run(world, weights, out)
    assert res.exit_code == 0, res.output
    return out


def _row(out: Path) -> dict[str, str]:
    with open(out / "results.csv") as fh:
        (row,) = [r for r in csv.DictReader(fh) if r["source"] == "measured"]
    return row


def _features(out: Path, extractor: str) -> np.ndarray:
    (f,) = [p for p in (out / "metrics").glob(f"*/*{extractor}*/features.npy")]
    return read_all(f)


def _reference(world, extractor: str) -> Path:
    (f,) = list(Path(world["cache"]).glob(f"coco-val2014__*{extractor}*/features.npy"))
    return f


def test_every_metric_has_a_value_inside_its_95_interval(sweep):
    row = _row(sweep)
    for col in ("fid", "kid", "fd_dinov2", "cmmd", "clip_fid"):
        v, lo, hi = float(row[col]), float(row[col + "_lo"]), float(row[col + "_hi"])
        assert lo < v < hi and hi - lo < max(1.0, 2 * abs(v)), (col, lo, v, hi)
    assert int(row["n"]) == N_PROMPTS and row["protocol_id"]
    md = (sweep / "results.md").read_text()
    assert "FD-DINOv2" in md and "CMMD" in md and "CLIP-FID" in md and "[" in md


def test_cmmd_and_the_frechet_distances_equal_independent_computations_on_the_cached_features(sweep, world):
    row = _row(sweep)
    # float64: CMMD is a difference of kernel means near 1, scaled by 1000 (float32 sums are off by ~1e-3 here)
    x = _features(sweep, "clip-vit-l-14-336px").astype(np.float64)
    y = read_all(_reference(world, "clip-vit-l-14-336px")).astype(np.float64)
    x, y = x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True)
    k = lambda a, b: np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / 200.0)  # noqa: E731  (sigma = 10)
    assert float(row["cmmd"]) == pytest.approx(1000 * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()),
                                               rel=1e-6, abs=1e-9)
    assert x.shape[1] == 16  # the ViT-L/14@336 file's embedding width: the weights given were used
    for col, name in (("fd_dinov2", "dinov2-vit-l-14"), ("clip_fid", "clip-vit-b-32")):
        g, r = _features(sweep, name), read_all(_reference(world, name))
        want = frechet_distance_scipy(g.mean(0), np.cov(g, rowvar=False), r.mean(0), np.cov(r, rowvar=False))
        assert float(row[col]) == pytest.approx(want, rel=1e-4), col
        assert feature_stats(_reference(world, name))[2] == 40


def test_the_protocol_manifest_records_what_the_numbers_depend_on(sweep):
    m = json.loads((sweep / "protocol.json").read_text())
    assert m["reference"]["n"] == 40 and m["reference"]["dataset"] == "coco" and len(m["reference"]["stats"]) == 4
    assert m["preprocessing"]["resolution"] == 64 and m["images"] == {"format": ["png"], "n": N_PROMPTS,
                                                                      "prompt_seed": 0}
    ex = m["extractors"]
    assert set(ex) == {"fid/kid", "fd-dinov2", "cmmd", "clip-fid"}
    assert ex["cmmd"]["extractor"] == "clip-vit-l-14-336px" and ex["cmmd"]["key"].startswith("clip-vit-l-14-336px-")
    assert "unresolved" not in json.dumps(ex)
    assert m["versions"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    assert m["id"] == _row(sweep)["protocol_id"]
    point = json.loads(next((sweep / "metrics").glob("*/metrics.json")).read_text())
    assert point["protocol"]["id"] == m["id"]


@pytest.mark.parametrize("extra, needles", [
    (["--metrics", "fid,nope"], ["unknown metric 'nope'", "fd-dinov2"]),
    (["--weights", "cmmd"], ["METRIC=PATH"]),
    (["--weights", "fd-dinov2=x.pt"], ["torch.hub"]),
    (["--weights", "cmmd=MISSING.pt"], ["MISSING.pt", "does not exist"]),
    (["--kid-subset-size", "500"], ["--kid-subset-size 500", "24 generated"]),
])
def test_bad_metric_options_exit_2_before_anything_is_written(world, weights, tmp_path, extra, needles):  # noqa: F811
    out = tmp_path / "out"
    res = _run(world, weights, out, *extra)
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert all(n in text for n in needles), res.output
    assert not out.exists()


def test_missing_dinov2_and_clip_weights_are_named_before_any_image(world, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch"))
    monkeypatch.setenv("REIMAGEN_CACHE", str(tmp_path / "empty-cache"))
    for metric, needles in (("fd-dinov2", ["dinov2_vitl14", "torch.hub.load", "facebookresearch_dinov2_main"]),
                            ("cmmd", ["ViT-L-14-336px", "openaipublic", "--weights"])):
        out = tmp_path / metric
        res = run(*base_args(world, out, "--db", "none", "--guidance-64", "1", "--steps", "2"), "--metrics", metric)
        assert res.exit_code == 2, res.output
        text = " ".join(res.output.split())
        assert all(n in text for n in needles), res.output
        assert not out.exists()


def test_fid_table_combines_runs_of_one_protocol_and_refuses_others(sweep, world, weights, tmp_path):  # noqa: F811
    import shutil

    from evaluation.cli import fid_table
    from typer.testing import CliRunner
    import typer

    app = typer.Typer()
    app.command()(fid_table)
    twin = tmp_path / "twin"
    shutil.copytree(sweep, twin)
    res = CliRunner().invoke(app, [str(sweep), str(twin), "--out", str(tmp_path / "both")])
    assert res.exit_code == 0, res.output
    with open(tmp_path / "both" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and {r["comparable"] for r in rows} == {"yes"} and rows[0]["cmmd"] == rows[1]["cmmd"]
    # the table shows each value with its interval, as the run's own results.md does
    fid_cell = (tmp_path / "both" / "results.md").read_text().splitlines()[-1].split(" | ")[3]
    shown = [float(x) for x in re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", fid_cell).groups()]
    assert shown == pytest.approx([float(rows[1][c]) for c in ("fid", "fid_lo", "fid_hi")], rel=1e-3)
    assert f"| {fid_cell} |" in (twin / "results.md").read_text()
    other = tmp_path / "other"  # the same run measured at another resolution: another protocol
    res = _run(world, weights, other, "--resolution", "32", "--metrics", "fid")
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, [str(sweep), str(other), "--out", str(tmp_path / "mixed")])
    assert res.exit_code != 0 and "different protocols" in " ".join(res.output.split())
    assert "preprocessing" in " ".join(res.output.split()) and not (tmp_path / "mixed").exists()
    res = CliRunner().invoke(app, [str(sweep), str(other), "--out", str(tmp_path / "mixed"), "--allow-different"])
    assert res.exit_code == 0, res.output
    with open(tmp_path / "mixed" / "results.csv") as fh:
        marks = [r["comparable"] for r in csv.DictReader(fh)]
    assert marks[0] == "yes" and marks[1].startswith("NO: protocol")
