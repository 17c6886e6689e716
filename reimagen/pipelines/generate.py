"""Generating images at scale for the benchmarks (FID sweeps, EntityDrawBench): resumable, shardable, deterministic.

A run folder holds one PNG per (prompt id, sample index), named ``<prompt_id>__<sample_index>.png``, and a
``run.json`` manifest of every setting that affects the images. Images are written as they are made (to a
temporary name, then renamed), so a killed run loses at most the batch in flight; a rerun skips what exists;
a rerun with different settings is refused. Several processes (``torchrun`` / ``accelerate launch`` set
RANK and WORLD_SIZE) split the work into fixed blocks of ``batch_size`` consecutive jobs and each takes whole
blocks: a block is always sampled as one batch, whatever the world size and whatever a resumed run already
made, so the float kernels (not bitwise equal across batch shapes on every CPU) see the same inputs and every
PNG has the same bytes as in one uninterrupted process. Every image is a function of (prompt id, sample index,
seed) alone (see ``reimagen.pipelines.sampling``) up to that rounding; the block size is recorded in ``run.json``.

Generators behind one interface (``ImageGenerator.generate``):
    CascadeGenerator   a Re-Imagen cascade, with retrieved neighbours
    DiffusersGenerator a text-only ``diffusers`` pipeline (baselines such as Stable Diffusion)
    FolderGenerator    images made elsewhere, read from a folder named by prompt id
"""

from __future__ import annotations

import abc
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..utils.atomic import replacing_path, write_json
from ..utils.launch import shard_from_env
from ..utils.runlock import run_lock
from .cascade import Cascade, Neighbours, to_uint8

Tensor = torch.Tensor
MANIFEST = "run.json"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


def image_name(prompt_id: str, sample_index: int) -> str:
    """File name of one generated image; prompt ids must be file-name safe (letters, digits, . _ -)."""
    if not _SAFE_ID.match(prompt_id) or prompt_id in (".", ".."):
        raise ValueError(f"prompt id {prompt_id!r} is not file-name safe (use letters, digits, '.', '_', '-')")
    return f"{prompt_id}__{sample_index}.png"


@dataclass(frozen=True)
class Job:
    """One image to make."""

    prompt_id: str
    prompt: str
    sample_index: int


class ImageGenerator(abc.ABC):
    """Makes images for jobs; ``neighbours`` is given for generators that use retrieval."""

    uses_neighbours: bool = False

    @abc.abstractmethod
    def generate(self, jobs: Sequence[Job], neighbours: Neighbours | None, seed: int) -> Tensor:
        """(len(jobs), 3, H, W) in [0, 1]."""

    def describe(self) -> dict[str, Any]:
        """Settings recorded in the run manifest."""
        return {"generator": type(self).__name__}

    def record(self) -> dict[str, Any]:
        """What made the images, for the records (run.json, images.jsonl, protocol.json, the tables): kind,
        model, scheduler, steps, guidance, size."""
        return {"kind": type(self).__name__, "model": None, "scheduler": None, "steps": None, "guidance": None,
                "size": None}


def _precision(precision: str) -> dict[str, str]:
    """{"precision": ...} unless fp32, so that run folders made before the option existed still resume."""
    return {} if precision == "fp32" else {"precision": precision}


class CascadeGenerator(ImageGenerator):
    """A Re-Imagen cascade (``reimagen.Cascade``); image = f(prompt id, sample index, seed)."""

    def __init__(self, cascade: Cascade, settings: dict[str, Any] | None = None, paths: Sequence[str] = ()):
        self.cascade = cascade
        self.settings = settings or {}
        self.paths = [str(p) for p in paths]  # the stage checkpoints, for the records
        self.uses_neighbours = any(st.guidance.needs_neighbours for st in cascade.stages)

    def generate(self, jobs: Sequence[Job], neighbours: Neighbours | None, seed: int) -> Tensor:
        return self.cascade.sample([j.prompt for j in jobs], neighbours if self.uses_neighbours else None, seed=seed,
                                   prompt_ids=[j.prompt_id for j in jobs],
                                   sample_indices=[j.sample_index for j in jobs]).images

    def describe(self) -> dict[str, Any]:
        stages = [{"name": st.name, "guidance": repr(st.guidance), "settings": repr(st.settings),
                   "config": st.model.cfg.to_dict(), **_precision(st.precision)} for st in self.cascade.stages]
        return {"generator": "cascade", "stages": stages, "text_encoder": self.cascade.text_encoder.spec(),
                **self.settings}

    def record(self) -> dict[str, Any]:
        st = self.cascade.stages
        return {"kind": "reimagen", "model": " + ".join(self.paths) or " + ".join(s.name for s in st),
                "scheduler": " / ".join(s.settings.sampler for s in st),
                "steps": " / ".join(str(s.settings.steps) for s in st),
                "guidance": " / ".join(repr(s.guidance) for s in st), "size": st[-1].model.cfg.image_size}


class DiffusersGenerator(ImageGenerator):
    """A text-only ``diffusers`` pipeline as a baseline; the generator of each image is seeded from
    (seed, prompt id, sample index), so it too is independent of batching."""

    def __init__(self, pipeline_id: str, device: str = "cpu", num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, size: int | None = None, dtype: torch.dtype = torch.float32,
                 scheduler: str | None = None):
        from ..utils.compat import patch_torchvision_if_broken

        patch_torchvision_if_broken()
        try:
            from diffusers import DiffusionPipeline

            self.pipe = DiffusionPipeline.from_pretrained(pipeline_id, dtype=dtype).to(device)
        except (OSError, ValueError) as err:
            raise RuntimeError(f"could not load the diffusers pipeline {pipeline_id!r} ({err}); on a machine with "
                               f"internet run `huggingface-cli download {pipeline_id} --local-dir PATH` and pass PATH") from None
        self.scheduler = scheduler
        if scheduler:  # another scheduler class of diffusers, from the pipeline's scheduler config
            import diffusers

            cls = getattr(diffusers, scheduler, None)
            if cls is None or not hasattr(cls, "from_config"):
                raise ValueError(f"--model-arg scheduler={scheduler}: diffusers has no scheduler class of that name "
                                 "(e.g. DPMSolverMultistepScheduler, EulerDiscreteScheduler, DDIMScheduler)")
            self.pipe.scheduler = cls.from_config(self.pipe.scheduler.config)
        self.pipeline_id, self.device = pipeline_id, device
        self.steps, self.guidance_scale, self.size = num_inference_steps, guidance_scale, size

    def generate(self, jobs: Sequence[Job], neighbours: Neighbours | None, seed: int) -> Tensor:
        from ..utils.seeding import sample_seed

        gens = [torch.Generator(device=self.device).manual_seed(sample_seed(seed, j.prompt_id, j.sample_index))
                for j in jobs]
        kw = {"height": self.size, "width": self.size} if self.size else {}
        out = self.pipe([j.prompt for j in jobs], generator=gens, num_inference_steps=self.steps,
                        guidance_scale=self.guidance_scale, output_type="np", **kw).images
        return torch.from_numpy(np.asarray(out)).permute(0, 3, 1, 2).float().clamp(0, 1)

    def describe(self) -> dict[str, Any]:
        return {"generator": "diffusers", "pipeline": self.pipeline_id, "steps": self.steps,
                "guidance_scale": self.guidance_scale, "size": self.size,
                **({"scheduler": self.scheduler} if self.scheduler else {})}

    def record(self) -> dict[str, Any]:
        size = self.size
        unet, vae_scale = getattr(self.pipe, "unet", None), getattr(self.pipe, "vae_scale_factor", None)
        if size is None and unet is not None and vae_scale:
            size = int(unet.config.sample_size) * int(vae_scale)  # the pipeline's default height / width
        return {"kind": "diffusers", "model": self.pipeline_id, "scheduler": type(self.pipe.scheduler).__name__,
                "steps": self.steps, "guidance": self.guidance_scale, "size": size}


class FolderGenerator(ImageGenerator):
    """Images made elsewhere: ``<folder>/<prompt_id>__<i>.png`` (or ``<prompt_id>.png`` for sample 0,
    also .jpg). ``missing(jobs)`` lists what the folder lacks, so a caller can fail before any work."""

    def __init__(self, folder: str | Path, size: int | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image folder {self.folder} does not exist")
        self.size = size

    def path_of(self, job: Job) -> Path | None:
        stems = [f"{job.prompt_id}__{job.sample_index}"] + ([job.prompt_id] if job.sample_index == 0 else [])
        for stem in stems:
            for ext in (".png", ".jpg", ".jpeg", ".webp"):
                p = self.folder / f"{stem}{ext}"
                if p.is_file():
                    return p
        return None

    def missing(self, jobs: Sequence[Job]) -> list[Job]:
        return [j for j in jobs if self.path_of(j) is None]

    def generate(self, jobs: Sequence[Job], neighbours: Neighbours | None, seed: int) -> Tensor:
        from PIL import Image

        from .cascade import image_to_tensor

        out = []
        for j in jobs:
            p = self.path_of(j)
            if p is None:
                raise FileNotFoundError(f"{self.folder} has no image for prompt {j.prompt_id} sample {j.sample_index}")
            with Image.open(p) as im:
                arr = np.array(im.convert("RGB"))
            size = self.size or min(arr.shape[:2])
            out.append((image_to_tensor(arr, size) + 1) / 2)
        return torch.stack(out).clamp(0, 1)

    def describe(self) -> dict[str, Any]:
        return {"generator": "folder", "folder": str(self.folder.resolve())}

    def record(self) -> dict[str, Any]:
        return {"kind": "folder", "model": str(self.folder.resolve()), "scheduler": "pre-generated", "steps": None,
                "guidance": None, "size": self.size}


# ----------------------------------------------------------------------------------------------
# The run folder
# ----------------------------------------------------------------------------------------------
RECORD_ONLY = ("model_record",)


def check_run_manifest(out: str | Path, manifest: dict[str, Any]) -> bool:
    """Refuse (ValueError naming the differing settings) a run folder made with other settings; True if
    ``out`` already holds a run with exactly these settings. Writes nothing, so callers can check before
    writing their own metadata."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return False
    old, new = json.loads(path.read_text()), json.loads(json.dumps(manifest, default=str))
    for key in RECORD_ONLY:  # recorded, not compared: folders made before it existed still resume
        old.pop(key, None)
        new.pop(key, None)
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ValueError(f"{out} holds a run with other settings (differing: {', '.join(diff)}); "
                         "use another output folder or delete it")
    return True


def run_manifest(generator: ImageGenerator, seed: int, settings: dict[str, Any] | None, batch_size: int) -> dict[str, Any]:
    """What ``run.json`` holds: the seed, the generator's description, the caller's settings and the block size."""
    return {"seed": seed, **generator.describe(), **(settings or {}), "block_size": batch_size,
            "model_record": generator.record()}


def _check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    if not check_run_manifest(out, manifest):
        write_json(out / MANIFEST, manifest, indent=2, sort_keys=True, default=str)


def generate_run(
    generator: ImageGenerator,
    jobs: Sequence[Job],
    out: str | Path,
    seed: int = 0,
    neighbours_for: Callable[[Sequence[Job]], Neighbours | None] | None = None,
    batch_size: int = 8,
    settings: dict[str, Any] | None = None,
    shard: tuple[int, int] | None = None,
    progress: bool = True,
    wait: bool | None = None,
) -> dict[str, int]:
    """Make every job's image in ``out`` (skipping those that exist); returns counts {made, skipped, total}.

    ``neighbours_for(jobs)`` returns the retrieved neighbours of a batch (or None without retrieval).
    ``settings`` (JSON-serialisable) join the generator's description in ``run.json``. ``shard`` =
    (rank, world size), default from the environment: this process makes the blocks b of ``batch_size`` jobs
    with b % world == rank (see ``job_blocks``); a block with any image missing is sampled whole and its missing
    images are written. While it writes, this process holds ``out``'s lock for its rank (``utils.runlock``):
    another run on the folder is refused, or waits (``wait``; None: the command's ``--wait``) and then
    finds the images made.
    """
    out = Path(out)
    names = [image_name(j.prompt_id, j.sample_index) for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate (prompt id, sample index) among the jobs")
    rank, world = shard or shard_from_env()
    with run_lock(out, rank, wait=wait):
        return _generate(generator, jobs, out, names, seed, neighbours_for, batch_size, settings, (rank, world),
                         progress)


def _generate(generator, jobs, out: Path, names, seed, neighbours_for, batch_size, settings, shard, progress):
    rank, world = shard
    _check_manifest(out, run_manifest(generator, seed, settings, batch_size))
    mine = job_blocks(len(jobs), batch_size, rank, world)
    todo = [{i for i in block if not (out / names[i]).exists()} for block in mine]
    total = sum(len(block) for block in mine)
    counts = {"made": 0, "skipped": total - sum(len(t) for t in todo), "total": total}
    from PIL import Image
    from rich.progress import Progress

    with Progress(disable=not progress, transient=False) as prog:
        task = prog.add_task(f"generating (shard {rank}/{world})", total=total, completed=counts["skipped"])
        for block, missing in zip(mine, todo):
            if not missing:
                continue
            batch = [jobs[i] for i in block]
            nbrs = neighbours_for(batch) if (neighbours_for is not None and generator.uses_neighbours) else None
            images = to_uint8(generator.generate(batch, nbrs, seed))
            for i, arr in zip(block, images):
                if i in missing:
                    with replacing_path(out / names[i]) as tmp:
                        Image.fromarray(arr).save(tmp)
            counts["made"] += len(missing)
            prog.update(task, advance=len(missing))
    return counts


def job_blocks(n_jobs: int, block_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The blocks of job indices process ``rank`` of ``world`` makes: jobs are cut into consecutive blocks of
    ``block_size`` (the last may be shorter) and block b goes to rank b % world. A block's composition depends
    only on (n_jobs, block_size), never on the world size or on what exists already."""
    if block_size < 1:
        raise ValueError(f"batch size must be >= 1, got {block_size}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    starts = range(0, n_jobs, block_size)
    return [list(range(s, min(s + block_size, n_jobs))) for b, s in enumerate(starts) if b % world == rank]
