"""Prompt -> retrieved neighbours -> images in one call (Sec. 3): a cascade, a retriever and its knowledge base.

    pipe = ReImagenPipeline.from_pretrained("runs/my-pipeline")        # or an id on the Hugging Face Hub
    out = pipe(["Two Chortai are running on the field."], k=2, num_samples=4, seed=0)
    out.images[0]       # the prompt's 4 PIL images
    out.neighbours[0]   # the K pairs it retrieved: id, text, score, image reference

An image is a function of (prompt id, sample index, seed), with the prompts' ids p0000, p0001, ... unless given,
and of the batch it is sampled in: ``batch_size`` cuts the (prompt, sample) jobs into the same blocks as the run
folders of ``reimagen-eval sample`` / ``entitydraw`` / ``fid``, so the same settings give the same bytes.

A pipeline folder (``save_pretrained`` / ``from_pretrained``)::

    pipeline.json       {"format": "reimagen-pipeline", "version": 1,
                         "stages": [{"path": "stage0", "guidance": {...}, "settings": {...}}, ...],
                         "index": "index" or null, "knowledge_base": a knowledge-base spec or null}
    stage0/, stage1/    stage checkpoints (config.json with the text encoder's spec, weights)
    index/              a saved retriever (``reimagen-eval index build``; manifest.json records its source)

The knowledge base's images are not copied: ``knowledge_base`` names it (a .parquet table or FORMAT:PATH), relative
paths resolved against the folder; ``from_pretrained(..., knowledge_base=...)`` points elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..diffusion.guidance import guidance_from_dict, guidance_to_dict
from .cascade import Cascade, Neighbours
from .sampling import SamplerSettings

PIPELINE_FILE = "pipeline.json"
FORMAT = "reimagen-pipeline"


@dataclass
class PipelineOutput:
    prompt_ids: list[str]
    images: list[list[Any]]  # per prompt, its samples as PIL images
    neighbours: list[list[dict]]  # per prompt, the retrieved pairs: id, text, score, image (empty without retrieval)
    tensors: torch.Tensor  # (prompts * samples, 3, H, W) in [0, 1], prompt-major


class ReImagenPipeline:
    """A cascade with the retriever and knowledge base that feed it."""

    def __init__(self, cascade: Cascade, retriever: Any = None, knowledge_base: Any = None,
                 knowledge_base_spec: str | None = None):
        if retriever is not None and knowledge_base is None:
            raise ValueError("a retriever needs its knowledge base (the images and texts its ids name)")
        self.cascade, self.retriever, self.knowledge_base = cascade, retriever, knowledge_base
        self.knowledge_base_spec = knowledge_base_spec

    @property
    def neighbour_size(self) -> int:
        return max(st.model.cfg.image_size for st in self.cascade.stages)

    # -- retrieval -----------------------------------------------------------------------------------
    def retrieve(self, prompts: Sequence[str], k: int) -> list[list[dict]]:
        """The top-k knowledge-base pairs of each prompt: id, text, score and image reference."""
        if self.retriever is None:
            raise ValueError("this pipeline has no retriever: build one (reimagen-eval index build) or sample "
                             "with retrieval=False")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        kb = self.knowledge_base
        if k > len(kb):
            raise ValueError(f"k = {k} but the index holds {len(kb)} pairs")
        res = self.retriever.search(list(prompts), k)
        rows = []
        for ids, scores in zip(res.ids, res.scores):
            rows.append([{"id": i, "text": kb.texts[kb.index_of(i)], "score": float(s),
                          "image": kb.absolute_ref(kb.index_of(i))} for i, s in zip(ids, scores)])
        return rows

    def neighbours_of(self, rows: Sequence[Sequence[dict]], k: int) -> Neighbours:
        """``Neighbours`` at the cascade's largest size for retrieved rows (fewer than k: masked slots)."""
        from ..retrieval.base import SearchResult
        from .cascade import neighbours_from_result

        result = SearchResult([[n["id"] for n in row] for row in rows], [[n["score"] for n in row] for row in rows])
        return neighbours_from_result(self.knowledge_base, result, k, self.neighbour_size)

    # -- sampling ------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompts: Sequence[str] | str, k: int = 2, num_samples: int = 4, seed: int = 0,
                 prompt_ids: Sequence[str] | None = None, retrieval: bool = True, batch_size: int = 8,
                 queries: Sequence[str] | None = None, progress: bool = False) -> PipelineOutput:
        """``num_samples`` images per prompt with the top-``k`` neighbours retrieved for it (``queries``, default
        the prompts themselves, are what retrieval searches with: e.g. an entity's name); ``retrieval=False``
        samples the cascade text-only."""
        from PIL import Image

        from .cascade import to_uint8

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = [f"p{i:04d}" for i in range(len(prompts))] if prompt_ids is None else [str(p) for p in prompt_ids]
        if len(ids) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(ids)} prompt ids")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if queries is not None and len(queries) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(queries)} queries")
        rows = self.retrieve(list(queries or prompts), k) if retrieval else [[] for _ in prompts]
        cascade = self.cascade if retrieval else self.cascade.without_retrieval()
        jobs = [(i, s) for i in range(len(prompts)) for s in range(num_samples)]
        nbrs = self.neighbours_of([rows[i] for i, _ in jobs], k) if retrieval else None
        out = cascade.sample([prompts[i] for i, _ in jobs], nbrs, seed=seed, prompt_ids=[ids[i] for i, _ in jobs],
                             sample_indices=[s for _, s in jobs], batch_size=batch_size, progress=progress)
        arrays = to_uint8(out.images)
        images = [[Image.fromarray(arrays[i * num_samples + s]) for s in range(num_samples)]
                  for i in range(len(prompts))]
        return PipelineOutput(ids, images, rows, out.images)

    # -- the folder ----------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the pipeline folder (see the module docstring) atomically: to ``<folder>.tmp``, then renamed."""
        from ..models.checkpoint import save_checkpoint

        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        stages = []
        for i, st in enumerate(self.cascade.stages):
            save_checkpoint(tmp / f"stage{i}", st.model, self.cascade.text_encoder)
            stages.append({"path": f"stage{i}", "guidance": guidance_to_dict(st.guidance),
                           "settings": asdict(st.settings)})
        index = None
        if self.retriever is not None:
            self.retriever.save(tmp / "index", source=self.knowledge_base_spec or "")
            index = "index"
        meta = {"format": FORMAT, "version": 1, "stages": stages, "index": index,
                "knowledge_base": self.knowledge_base_spec}
        (tmp / PIPELINE_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if folder.exists():
            old = folder.with_name(folder.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        return folder

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        knowledge_base: str | None = None, precision: str = "fp32") -> "ReImagenPipeline":
        """Load a pipeline folder, or download one from the Hugging Face Hub (``owner/name``) when online.
        ``knowledge_base`` overrides the folder's knowledge-base spec; ``precision``: fp32, or bf16 / fp16
        autocast (``reimagen.utils.precision``)."""
        folder = pipeline_folder(path)
        meta = read_pipeline_json(folder)
        guidance = [guidance_from_dict(s["guidance"]) for s in meta["stages"]]
        settings = [SamplerSettings(**s["settings"]) for s in meta["stages"]]
        retriever = kb = None
        spec = knowledge_base or meta.get("knowledge_base")
        if meta.get("index"):
            from ..retrieval.base import load_retriever

            index = folder / meta["index"]
            kb, spec = index_knowledge_base(spec, index, folder)
            retriever = load_retriever(index)
        cascade = Cascade.from_checkpoints([folder / s["path"] for s in meta["stages"]], guidance, settings,
                                           device=device, precision=precision)
        return cls(cascade, retriever, kb, spec)


def read_pipeline_json(folder: Path) -> dict:
    """A pipeline folder's pipeline.json, with every stage folder it names present."""
    f = Path(folder) / PIPELINE_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{folder} is not a pipeline folder (no {PIPELINE_FILE}); write one with "
                                "ReImagenPipeline.save_pretrained or `reimagen-eval sample --save-pipeline`")
    try:
        meta = json.loads(f.read_text())
    except ValueError as err:
        raise ValueError(f"{f} is not valid JSON ({err})") from None
    if meta.get("format") != FORMAT or not meta.get("stages"):
        raise ValueError(f"{f} is not a {FORMAT} file (format {meta.get('format')!r}, no stages)")
    for s in meta["stages"]:
        if not (Path(folder) / s["path"] / "config.json").is_file():
            raise FileNotFoundError(f"{folder} lacks its stage checkpoint {s['path']}/config.json")
    if meta.get("index") and not (Path(folder) / meta["index"] / "manifest.json").is_file():
        raise FileNotFoundError(f"{folder} lacks its index {meta['index']}/manifest.json")
    return meta


def pipeline_folder(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        return p
    parts = str(path).split("/")
    if len(parts) != 2 or str(path).startswith((".", "/", "~")):
        raise FileNotFoundError(f"pipeline folder {path} does not exist (nor is it a Hub id such as owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=str(path)))
    except Exception as err:  # noqa: BLE001  (offline, unknown repo, no access: one message)
        raise FileNotFoundError(f"pipeline {path}: not a local folder, and the Hub download failed "
                                f"({str(err).splitlines()[0][:200]}); on a machine with internet run "
                                f"`huggingface-cli download {path} --local-dir DIR` and pass DIR") from None


def index_knowledge_base(spec: str | None, index: Path, folder: Path):
    """The knowledge base of an index: ``spec`` (relative paths against the pipeline folder), else the source the
    index recorded; a missing one names every place looked at."""
    from ..retrieval.readers import open_knowledge_base

    recorded = json.loads((index / "manifest.json").read_text()).get("source") or None
    tried = []
    for cand in [c for c in (spec, recorded) if c]:
        for s in ([cand] if ":" in cand.split("/")[0] or Path(cand).is_absolute() else [str(folder / cand), cand]):
            tried.append(s)
            try:
                return open_knowledge_base(s), s
            except FileNotFoundError:
                continue
    raise FileNotFoundError(f"the knowledge base of index {index} was not found (looked for: "
                            f"{', '.join(tried) or 'nothing: neither the pipeline nor the index names one'}); "
                            "pass it with --kb SPEC (knowledge_base=SPEC)")


__all__ = ["ReImagenPipeline", "PipelineOutput", "read_pipeline_json", "pipeline_folder", "index_knowledge_base",
           "PIPELINE_FILE"]
