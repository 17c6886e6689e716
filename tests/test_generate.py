"""Run folders for the benchmarks (reimagen/generate.py): resumable, refuse other settings, shards add up."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_model, randomize
from reimagen import Cascade, InterleavedGuidance, JointGuidance, Neighbours, SamplerSettings, Stage
from reimagen.pipelines.generate import CascadeGenerator, FolderGenerator, Job, generate_run, image_name


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


def _png_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.mark.parametrize("retrieval", [True, False])
@pytest.mark.parametrize("world", [2, 3])
def test_shards_make_the_bytes_of_one_process(generator, text_encoder, tmp_path, world, retrieval):
    """A process takes whole blocks of batch_size jobs, so each image is sampled in the batch it has in one
    process: the PNG bytes agree whatever the world size (ranks run in any order)."""
    gen, nbrs = generator, _nbrs
    if not retrieval:
        model = randomize(make_model("tiny-16"))
        gen, nbrs = CascadeGenerator(Cascade([Stage(model, JointGuidance(2.0, use_neighbours=False),
                                                    SamplerSettings(steps=2))], text_encoder)), None
    generate_run(gen, JOBS, tmp_path / "one", seed=0, neighbours_for=nbrs, batch_size=4, progress=False)
    totals = [generate_run(gen, JOBS, tmp_path / "many", seed=0, neighbours_for=nbrs, batch_size=4,
                           shard=(rank, world), progress=False)["total"] for rank in reversed(range(world))]
    assert sorted(totals, reverse=True) == ([4, 2] + [0] * (world - 2))  # whole blocks of 4 (the last is short)
    assert _png_bytes(tmp_path / "many") == _png_bytes(tmp_path / "one")
    assert not np.array_equal(_pixels(tmp_path / "one")[image_name("p0", 0)], _pixels(tmp_path / "one")[image_name("p0", 1)])


def test_a_run_stopped_mid_block_resumes_to_the_same_bytes(generator, tmp_path):
    """Images are renamed into place one by one, so a killed run leaves a block partly written: the rerun samples
    that block whole again (the same batch) and writes only what is missing; written images are not touched."""
    generate_run(generator, JOBS, tmp_path / "one", seed=0, neighbours_for=_nbrs, batch_size=4, progress=False)
    want = _png_bytes(tmp_path / "one")
    calls = []

    def stop_after_one(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the second block: nothing of it written
        return _nbrs(batch)

    with pytest.raises(KeyboardInterrupt):
        generate_run(generator, JOBS, tmp_path / "cut", seed=0, neighbours_for=stop_after_one, batch_size=4,
                     progress=False)
    cut = tmp_path / "cut"
    (cut / image_name("p1", 0)).unlink()  # the first block, killed after its first images were renamed
    kept = {p.name: p.stat().st_mtime_ns for p in cut.glob("*.png")}
    assert len(kept) == 3
    counts = generate_run(generator, JOBS, cut, seed=0, neighbours_for=_nbrs, batch_size=4, progress=False)
    assert counts == {"made": 3, "skipped": 3, "total": 6}
    assert {n: (cut / n).stat().st_mtime_ns for n in kept} == kept
    assert _png_bytes(cut) == want


def test_job_blocks_do_not_depend_on_the_world_size():
    from reimagen.pipelines.generate import job_blocks

    one = job_blocks(11, 4)
    assert one == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    for world in (2, 3, 5):
        shards = [job_blocks(11, 4, r, world) for r in range(world)]
        assert sorted(b for s in shards for b in s) == one
    with pytest.raises(ValueError, match="batch size"):
        job_blocks(3, 0)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0"}, "RANK=0 is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK 2 outside WORLD_SIZE 2"),
])
def test_a_half_set_launcher_environment_is_refused(env, message):
    from reimagen.utils.launch import shard_from_env

    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        shard_from_env(env)
    assert shard_from_env({}) == (0, 1) and shard_from_env({"RANK": "1", "WORLD_SIZE": "3"}) == (1, 3)


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
