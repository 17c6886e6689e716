"""Run folders for the benchmarks (reimagen/generate.py): resumable, refuse other settings, shards add up."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_model, randomize
from reimagen import Cascade, InterleavedGuidance, JointGuidance, Neighbours, SamplerSettings, Stage
from reimagen.generate import CascadeGenerator, FolderGenerator, Job, generate_run, image_name


@pytest.fixture()
def generator(text_encoder):
    model = randomize(make_model("tiny-16"))
    return CascadeGenerator(Cascade([Stage(model, InterleavedGuidance(2.0, 2.0, 0.5), SamplerSettings(steps=2))],
                                    text_encoder))


JOBS = [Job(f"p{i}", f"prompt number {i}", s) for i in range(3) for s in range(2)]


def _nbrs(jobs):
    """Each prompt's neighbours depend on its prompt id only, as retrieval's do."""
    imgs = [torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(int(j.prompt_id[1:]))) * 2 - 1 for j in jobs]
    return Neighbours(torch.stack(imgs), [["a", "b"]] * len(jobs))


def _pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_rerun_skips_existing_images_and_manifest_records_settings(generator, tmp_path):
    first = generate_run(generator, JOBS, tmp_path, seed=3, neighbours_for=_nbrs, batch_size=4, progress=False)
    assert first == {"made": 6, "skipped": 0, "total": 6}
    assert sorted(_pixels(tmp_path)) == sorted(image_name(j.prompt_id, j.sample_index) for j in JOBS)
    (tmp_path / image_name("p1", 0)).unlink()
    again = generate_run(generator, JOBS, tmp_path, seed=3, neighbours_for=_nbrs, batch_size=4, progress=False)
    assert again == {"made": 1, "skipped": 5, "total": 6}
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["seed"] == 3 and manifest["generator"] == "cascade"


def test_other_settings_are_refused(generator, tmp_path):
    generate_run(generator, JOBS[:2], tmp_path, seed=0, neighbours_for=_nbrs, progress=False)
    with pytest.raises(ValueError, match="seed"):
        generate_run(generator, JOBS[:2], tmp_path, seed=1, neighbours_for=_nbrs, progress=False)


def test_two_shards_make_exactly_the_images_of_one_process(generator, tmp_path):
    generate_run(generator, JOBS, tmp_path / "one", seed=0, neighbours_for=_nbrs, batch_size=6, progress=False)
    for rank in (1, 0):
        c = generate_run(generator, JOBS, tmp_path / "two", seed=0, neighbours_for=_nbrs, batch_size=2,
                         shard=(rank, 2), progress=False)
        assert c["total"] == 3
    one, two = _pixels(tmp_path / "one"), _pixels(tmp_path / "two")
    assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)


def test_shards_are_pixel_identical_without_retrieval(text_encoder, tmp_path):
    model = randomize(make_model("tiny-16"))
    gen = CascadeGenerator(Cascade([Stage(model, JointGuidance(2.0, use_neighbours=False), SamplerSettings(steps=2))],
                                   text_encoder))
    generate_run(gen, JOBS, tmp_path / "one", seed=0, batch_size=6, progress=False)
    for rank in (0, 1):
        generate_run(gen, JOBS, tmp_path / "two", seed=0, batch_size=1, shard=(rank, 2), progress=False)
    one, two = _pixels(tmp_path / "one"), _pixels(tmp_path / "two")
    assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)
    assert not np.array_equal(one[image_name("p0", 0)], one[image_name("p0", 1)])


def test_folder_generator_lists_missing_images_and_reads_present_ones(tmp_path):
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(tmp_path / "p0__0.png")
    Image.fromarray(np.full((20, 20, 3), 10, np.uint8)).save(tmp_path / "p1.jpg")
    gen = FolderGenerator(tmp_path, size=16)
    assert gen.missing(JOBS) == [j for j in JOBS if (j.prompt_id, j.sample_index) not in {("p0", 0), ("p1", 0)}]
    imgs = gen.generate([JOBS[0], JOBS[2]], None, seed=0)
    assert imgs.shape == (2, 3, 16, 16)
    assert abs(float(imgs[0].mean()) - 200 / 255) < 0.01 and float(imgs[1].mean()) < 0.1


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".."])
def test_unsafe_prompt_ids_are_rejected(bad):
    with pytest.raises(ValueError, match="file-name safe"):
        image_name(bad, 0)
