"""Generating EntityDrawBench images (paper Sec. 4.2): 4 images per prompt, for any model.

    Re-Imagen     a cascade of trained stages; the neighbours c_n of a prompt are its entity's reference
                  pair(s), topped up by BM25 from a knowledge base when k exceeds them. Paper defaults:
                  interleaved guidance (Eq. 6) on the base stage with w_p = w_n = 30, eta = 0.5, 256 steps;
                  super-resolution stages with joint guidance 5.0 and 3.0 and 128 and 32 steps.
    text-only     a ``diffusers`` pipeline (Imagen / DALL-E 2 / Stable Diffusion stand-ins) or a Re-Imagen
                  cascade run without retrieval.
    images        made elsewhere, read from a folder (``<prompt_id>__<i>.png``); a folder that lacks any
                  image is refused before anything is written.

The run folder (``reimagen.pipelines.generate.generate_run``) holds ``<prompt_id>__<i>.png`` for i = 0..3 and ``run.json``
(every setting that affects the images; a rerun with other settings is refused, a rerun with the same settings
resumes, RANK / WORLD_SIZE shard it). This module adds

    prompts.jsonl   the prompt table of the run (prompt, template, frequency score / rank / split)
    images.jsonl    one row per image: image file, prompt id, sample index, entity, category, prompt,
                    frequency split, reference image path(s) and text, the neighbours used (ids, texts, image paths);
                    ``entitydraw-score`` adds clip_t, clip_i and the best-of-N selection
    skipped.json    entities left out, with the reason (no reference image when retrieval is required)
    provenance.json where things came from (checkpoint, reference and knowledge-base paths); unlike run.json it
                    is not compared on resume, so a run continues after its inputs are moved or copied
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .entities import CATEGORIES, Entity, load_entities, read_jsonl, select, write_json, write_jsonl
from .prompts import BENCHMARK, build_prompt_table
from .references import ReferencePair, load_references, references_fingerprint

IMAGES_FILE = "images.jsonl"
PROMPTS_FILE = "prompts.jsonl"
SKIPPED_FILE = "skipped.json"
TOPUP_QUERIES = ("name", "prompt")


@dataclass(frozen=True)
class RunConfig:
    """Everything an EntityDrawBench run needs besides the model. Defaults are the paper's (Sec. 4.2)."""

    seed: int = 0  # image = f(prompt id, sample index, seed)
    prompt_seed: int = 0  # the template draw of each entity
    samples_per_prompt: int = 4  # "generate four images", rated best of 4
    categories: tuple[str, ...] = CATEGORIES
    per_category: int | None = None  # first N entities of each category (quick runs, sweeps)
    k: int = 2  # neighbours per prompt (Table 2: K = 2)
    eta: float = 0.5  # interleave ratio (Eq. 6; Sec. 4.3: ~0.5 is the sweet spot)
    guidance: str = "interleaved"  # base stage: interleaved | weighted | joint
    w_text: float = 30.0  # w_p (and w of joint guidance)
    w_neighbours: float = 30.0  # w_n
    steps: int = 256  # base stage
    sr_guidance: tuple[float, ...] = (5.0, 3.0)  # per super-resolution stage
    sr_steps: tuple[int, ...] = (128, 32)
    sr_aug_level: float = 0.0
    sampler: str = "ddpm"
    retrieval: bool = True  # False: a Re-Imagen cascade sampled text-only
    kb: str | None = None  # knowledge base for BM25 top-up when k exceeds an entity's reference pairs
    kb_index: str | None = None  # a saved BM25 index of that knowledge base (else built in memory)
    topup_query: str = "name"  # the BM25 query of the top-up: the entity name or the prompt
    allow_fewer_neighbours: bool = False  # without a kb: pad to k with masked (ignored) slots
    strict: bool = False  # fail instead of skipping entities without a reference
    frequency_source: str = "wordfreq"
    caption_column: str | None = None
    batch_size: int = 8
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 | fp16 autocast of the cascade (GPU)

    def check(self) -> None:
        """Validate before any model is loaded or file written."""
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        from reimagen.utils.precision import check_precision

        check_precision(self.precision, self.device)
        if not (0.0 <= self.eta <= 1.0):
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples per prompt must be >= 1, got {self.samples_per_prompt}")
        if self.steps < 1 or any(s < 1 for s in self.sr_steps):
            raise ValueError("sampling steps must be >= 1")
        if self.guidance not in ("interleaved", "weighted", "joint"):
            raise ValueError(f"unknown guidance {self.guidance!r}; choose interleaved, weighted or joint")
        if self.topup_query not in TOPUP_QUERIES:
            raise ValueError(f"unknown top-up query {self.topup_query!r}; choose {' or '.join(TOPUP_QUERIES)}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.per_category is not None and self.per_category < 1:
            raise ValueError(f"per-category limit must be >= 1, got {self.per_category}")
        for w in (self.w_text, self.w_neighbours, *self.sr_guidance):
            if not (w >= 0):
                raise ValueError(f"guidance weights must be >= 0, got {w}")


# ----------------------------------------------------------------------------------------------
# Generators
# ----------------------------------------------------------------------------------------------
def cascade_generator(checkpoints: Sequence[str | Path], cfg: RunConfig):
    """A ``CascadeGenerator`` of trained stage checkpoints (base first) with the paper's EntityDrawBench
    sampling settings (see RunConfig)."""
    from reimagen.pipelines.cascade import Cascade
    from reimagen.models.config import UNetConfig
    from reimagen.pipelines.generate import CascadeGenerator
    from reimagen.diffusion.guidance import JointGuidance, make_guidance
    from reimagen.pipelines.sampling import SamplerSettings
    from reimagen.models.checkpoint import checkpoint_digest, read_checkpoint_config

    if not checkpoints:
        raise ValueError("no model: pass --model CHECKPOINT (repeat for super-resolution stages)")
    for p in checkpoints:
        if not Path(p).is_dir():
            raise FileNotFoundError(f"model checkpoint folder {p} does not exist")
    n_sr = len(checkpoints) - 1
    if n_sr > len(cfg.sr_guidance) or n_sr > len(cfg.sr_steps):
        raise ValueError(f"{n_sr} super-resolution stages but guidance weights {list(cfg.sr_guidance)} and steps "
                         f"{list(cfg.sr_steps)}: give one value per stage (--sr-guidance, --sr-steps)")
    if cfg.retrieval and not UNetConfig.from_dict(read_checkpoint_config(checkpoints[0])["unet"]).neighbour_attention:
        raise ValueError(f"{checkpoints[0]} has no neighbour attention: run it with --no-retrieval")
    if cfg.retrieval:
        base_g = make_guidance(cfg.guidance, w_text=cfg.w_text, w_neighbours=cfg.w_neighbours, eta=cfg.eta,
                               lam=cfg.eta)  # weighted guidance mixes with --eta as its lam (Appendix E)
    else:
        base_g = JointGuidance(w=cfg.w_text, use_neighbours=False)
    guidance = [base_g] + [JointGuidance(w=cfg.sr_guidance[i], use_neighbours=cfg.retrieval) for i in range(n_sr)]
    settings = [SamplerSettings(steps=cfg.steps, sampler=cfg.sampler)]
    settings += [SamplerSettings(steps=cfg.sr_steps[i], sampler=cfg.sampler, aug_level=cfg.sr_aug_level)
                 for i in range(n_sr)]
    cascade = Cascade.from_checkpoints(checkpoints, guidance, settings, device=cfg.device, precision=cfg.precision)
    gen = CascadeGenerator(cascade, settings={"checkpoints": [checkpoint_digest(p) for p in checkpoints]},
                           paths=checkpoints)
    gen.provenance = {"checkpoints": [str(Path(p).resolve()) for p in checkpoints]}  # not compared on resume
    return gen


# ----------------------------------------------------------------------------------------------
# Neighbours: the entity's reference pairs, topped up by BM25
# ----------------------------------------------------------------------------------------------
@dataclass
class NeighbourPlan:
    """The k neighbours of every prompt: (kind, id, text, image source) with kind "ref" or "kb"."""

    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    short: dict[str, int] = field(default_factory=dict)  # prompt id -> slots left empty (masked)


def plan_neighbours(prompts: Sequence[dict], pairs: dict[str, list[ReferencePair]], cfg: RunConfig) -> NeighbourPlan:
    plan = NeighbourPlan()
    need = [p for p in prompts if len(pairs.get(p["entity_id"], [])) < cfg.k]
    kb = retriever = None
    if need and cfg.kb:
        from reimagen.retrieval.base import load_retriever
        from reimagen.retrieval.readers import open_knowledge_base

        try:
            kb = open_knowledge_base(cfg.kb)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"knowledge base {cfg.kb} not found ({err})") from None
        if len(kb) == 0:
            raise ValueError(f"knowledge base {cfg.kb} is empty")
        if cfg.kb_index:
            retriever = load_retriever(cfg.kb_index)
        else:
            from reimagen.retrieval.bm25 import BM25Retriever

            retriever = BM25Retriever.from_knowledge_base(kb)
    elif need and not cfg.allow_fewer_neighbours:
        few = min(len(pairs.get(p["entity_id"], [])) for p in need)
        raise ValueError(f"k = {cfg.k} but {len(need)} entities have fewer reference pairs (as few as {few}): "
                         "pass --kb SPEC to top them up by BM25 from a knowledge base (the paper's retrieval), "
                         "add reference images <id>__1.jpg ..., lower --k, or pass --allow-fewer-neighbours "
                         "to leave the missing slots empty (masked)")
    topups: dict[str, list[tuple[str, str]]] = {}
    if retriever is not None:
        queries = [p["name"] if cfg.topup_query == "name" else p["prompt"] for p in need]
        # a knowledge base may hold the reference pairs themselves (the toy world's kb.parquet): ask for enough
        # results to skip those and still fill k slots
        extra = max((len(pairs.get(p["entity_id"], [])) for p in need), default=0)
        res = retriever.search(queries, min(cfg.k + extra, len(kb)))
        for p, ids in zip(need, res.ids):
            topups[p["prompt_id"]] = [(i, kb.texts[kb.index_of(i)]) for i in ids if i in kb]
    for p in prompts:
        own = pairs.get(p["entity_id"], [])[: cfg.k]
        own_ids = {r.kb_id for r in pairs.get(p["entity_id"], []) if r.kb_id}
        row = [{"kind": "ref", "id": f"{p['entity_id']}:{j}", "text": r.text, "image": str(r.path)}
               for j, r in enumerate(own)]
        for kid, text in topups.get(p["prompt_id"], []):
            if len(row) >= cfg.k:
                break
            if kid in own_ids:
                continue
            row.append({"kind": "kb", "id": kid, "text": text, "image": kb.absolute_ref(kb.index_of(kid))})
        plan.rows[p["prompt_id"]] = row
        if len(row) < cfg.k:
            plan.short[p["prompt_id"]] = cfg.k - len(row)
    return plan


class NeighbourProvider:
    """``neighbours_for(jobs)`` for ``generate_run``: each prompt's planned neighbours as a ``Neighbours``
    batch at ``size`` px, loaded once per prompt and kept for the last ``CACHE`` prompts (the samples of a prompt
    are consecutive jobs; memory stays bounded at 1024 px)."""

    CACHE = 64

    def __init__(self, plan: NeighbourPlan, k: int, size: int):
        self.plan, self.k, self.size = plan, k, size
        self._cache: dict[str, tuple] = {}

    def check(self) -> None:
        """Decode every planned neighbour image once, before any sampling: a missing or corrupt file is refused
        with its name (``CorruptImageError`` / ``FileNotFoundError``), not found after hours of generation."""
        from reimagen.retrieval.base import unreadable_images

        refs = sorted({n["image"] for row in self.plan.rows.values() for n in row[: self.k]})
        bad = unreadable_images(refs)  # CorruptImageError's message starts with the file's name
        if bad:
            raise ValueError(f"{len(bad)} neighbour images cannot be read: {'; '.join(list(bad.values())[:5])}; "
                             "re-fetch them (entitydraw-fetch), replace them, or remove them so that their entities "
                             "are skipped")

    def _row(self, prompt_id: str):
        if prompt_id not in self._cache:
            if len(self._cache) >= self.CACHE:
                self._cache.pop(next(iter(self._cache)))  # the oldest prompt
            import torch

            from reimagen.pipelines.cascade import image_to_tensor
            from reimagen.retrieval.base import load_image

            images = torch.zeros(self.k, 3, self.size, self.size)
            texts = [""] * self.k
            mask = torch.zeros(self.k, dtype=torch.bool)
            for j, n in enumerate(self.plan.rows[prompt_id][: self.k]):
                images[j] = image_to_tensor(load_image(n["image"]), self.size)
                texts[j], mask[j] = n["text"], True
            self._cache[prompt_id] = (images, texts, mask)
        return self._cache[prompt_id]

    def __call__(self, jobs):
        import torch

        from reimagen.pipelines.cascade import Neighbours

        rows = [self._row(j.prompt_id) for j in jobs]
        mask = torch.stack([r[2] for r in rows])
        return Neighbours(torch.stack([r[0] for r in rows]), [list(r[1]) for r in rows],
                          None if bool(mask.all()) else mask)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    out: Path
    counts: dict[str, int]
    skipped: dict[str, str]
    n_prompts: int
    short_neighbours: dict[str, int]


def _entity_digest(prompts: Sequence[dict]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(f"{p['prompt_id']}\0{p['prompt']}\0".encode())
    return h.hexdigest()[:16]


def run_entitydraw(generator, out: str | Path, cfg: RunConfig, references: str | Path | None = None,
                   entities: Sequence[Entity] | None = None, shard: tuple[int, int] | None = None,
                   progress: bool = True, log=None) -> RunResult:
    """Plan (prompts, references, neighbours), check everything, then generate into ``out`` (resumable)."""
    cfg.check()
    manifest = list(entities) if entities is not None else load_entities()
    ents = select(manifest, cfg.categories, cfg.per_category)
    if not ents:
        raise ValueError("no entities selected")
    chosen = {e.id for e in ents}
    # The frequency split is a property of the benchmark: computed over the whole manifest, then subset.
    table = [r for r in build_prompt_table(manifest, seed=cfg.prompt_seed, frequency_source=cfg.frequency_source,
                                           caption_column=cfg.caption_column) if r["prompt_id"] in chosen]
    needs_refs = bool(getattr(generator, "uses_neighbours", False))
    pairs: dict[str, list[ReferencePair]] = {}
    missing: dict[str, str] = {}
    if references is not None:
        pairs, missing = load_references(references, ents)
    elif needs_refs:
        raise ValueError("this model retrieves: pass --references FOLDER (fetched with entitydraw-fetch, or a "
                         "folder of images named by entity id), or run it with --no-retrieval")
    skipped: dict[str, str] = {}
    if needs_refs:
        skipped = {eid: f"no reference image ({why})" for eid, why in missing.items()}
        if skipped and cfg.strict:
            first = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5])
            raise ValueError(f"{len(skipped)} entities have no reference image and --strict is set "
                             f"(e.g. {first}); fetch them or drop --strict to skip and list them")
    prompts = [p for p in table if p["prompt_id"] not in skipped]
    if not prompts:
        raise ValueError(f"every selected entity lacks a reference image ({len(skipped)} skipped); see "
                         "entitydraw-fetch")
    refs_digest = references_fingerprint({eid: pairs[eid] for eid in (p["entity_id"] for p in prompts)
                                          if eid in pairs}) if needs_refs else None
    return run_prompts(generator, out, cfg, prompts, pairs, skipped=skipped, references_digest=refs_digest,
                       provenance={"references": str(Path(references).resolve()) if references else None},
                       shard=shard, progress=progress, log=log)


def run_prompts(generator, out: str | Path, cfg: RunConfig, prompts: Sequence[dict],
                pairs: dict[str, list[ReferencePair]], skipped: dict[str, str] | None = None,
                references_digest: str | None = None, benchmark: dict[str, Any] | None = None,
                provenance: dict[str, Any] | None = None, prepare=None, shard: tuple[int, int] | None = None,
                progress: bool = True, log=None) -> RunResult:
    """Generate a prompt table (rows as ``build_prompt_table``'s, extra fields listed in ``EXTRA_FIELDS`` are
    copied to images.jsonl) with the entities' reference pairs as neighbours into ``out`` (resumable).

    ``benchmark`` replaces the benchmark's identity in run.json (default: the open EntityDrawBench);
    ``references_digest`` identifies the reference pairs (their contents); ``prepare(out)`` runs after the run
    folder has been checked, before any image is made (the toy world writes its reference images there)."""
    from reimagen.pipelines.generate import FolderGenerator, Job, check_run_manifest, generate_run, image_name, run_manifest

    cfg.check()
    say = log or (lambda msg: None)
    out = Path(out)
    skipped = dict(skipped or {})
    needs_refs = bool(getattr(generator, "uses_neighbours", False))
    plan = plan_neighbours(prompts, pairs, cfg) if needs_refs else NeighbourPlan()
    jobs = [Job(p["prompt_id"], p["prompt"], i) for p in prompts for i in range(cfg.samples_per_prompt)]
    if isinstance(generator, FolderGenerator):
        lack = generator.missing(jobs)
        if lack:
            eg = ", ".join(image_name(j.prompt_id, j.sample_index) for j in lack[:5])
            raise ValueError(f"image folder {generator.folder} lacks {len(lack)} of {len(jobs)} images (e.g. {eg}); "
                             "nothing was written")

    # Metadata first (deterministic content, the same from every shard), then the images.
    size = _neighbour_size(generator)
    settings = {**(benchmark or {"benchmark": BENCHMARK}), "prompt_seed": cfg.prompt_seed,
                "samples_per_prompt": cfg.samples_per_prompt, "prompts": _entity_digest(prompts),
                "n_prompts": len(prompts)}
    if needs_refs:
        settings.update(k=cfg.k, neighbours=_plan_digest(plan), references=references_digest,
                        topup_query=cfg.topup_query if cfg.kb else None)
    rows = _image_rows(prompts, pairs, plan, cfg)
    manifest = run_manifest(generator, cfg.seed, settings, cfg.batch_size)
    for r in rows:  # what made each image, on every row
        r.update(generator=manifest["model_record"]["kind"], generator_model=manifest["model_record"]["model"])
    check_run_manifest(out, manifest)  # before writing anything
    provider = NeighbourProvider(plan, cfg.k, size) if needs_refs else None
    if provider is not None and prepare is None:  # (prepare writes the toy world's references: checked after it)
        provider.check()
    out.mkdir(parents=True, exist_ok=True)
    if prepare is not None:
        prepare(out)
        if provider is not None:
            provider.check()
    write_jsonl(out / PROMPTS_FILE, prompts)
    write_json(out / SKIPPED_FILE, skipped)
    write_json(out / "provenance.json", {**getattr(generator, "provenance", {}), **(provenance or {}),
                                         "kb": cfg.kb, "kb_index": cfg.kb_index})
    if not (out / IMAGES_FILE).is_file() or _unscored(out / IMAGES_FILE) != rows:
        write_jsonl(out / IMAGES_FILE, rows)
    if skipped:
        say(f"skipped {len(skipped)} entities without a reference image (listed in {out / SKIPPED_FILE})")
    if plan.short:
        say(f"{len(plan.short)} prompts have fewer than k = {cfg.k} neighbours (empty slots are masked)")
    counts = generate_run(generator, jobs, out, seed=cfg.seed, neighbours_for=provider, batch_size=cfg.batch_size,
                          settings=settings, shard=shard, progress=progress)
    return RunResult(out, counts, skipped, len(prompts), dict(plan.short))


def _neighbour_size(generator) -> int:
    cascade = getattr(generator, "cascade", None)
    return max(st.model.cfg.image_size for st in cascade.stages) if cascade is not None else 64


def _plan_digest(plan: NeighbourPlan) -> str:
    """Digest of every prompt's neighbour ids and texts (not paths: a moved reference folder or knowledge base
    is the same run; image contents are covered by the references fingerprint)."""
    rows = {pid: [(n["id"], n["text"]) for n in row] for pid, row in plan.rows.items()}
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


#: Fields the scorers add to images.jsonl (CLIP proxies; the toy world's judge): not part of the run's plan.
SCORE_FIELDS = ("clip_t", "clip_i", "selected", "select_score", "look_ok", "scene_ok", "faithful",
                "attributes_ok", "judge", "judge_match")
#: Prompt-table fields copied to images.jsonl when present (the toy world's split and scene).
EXTRA_FIELDS = ("split", "count", "position", "background", "world")


def _unscored(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in SCORE_FIELDS} for r in read_jsonl(path)]


def _image_rows(prompts: Sequence[dict], pairs: dict[str, list[ReferencePair]], plan: NeighbourPlan,
                cfg: RunConfig) -> list[dict]:
    from reimagen.pipelines.generate import image_name

    rows = []
    for p in prompts:
        refs = pairs.get(p["entity_id"], [])
        nb = plan.rows.get(p["prompt_id"], [])
        for i in range(cfg.samples_per_prompt):
            rows.append({
                "image": image_name(p["prompt_id"], i), "prompt_id": p["prompt_id"], "sample_index": i,
                "entity_id": p["entity_id"], "name": p["name"], "category": p["category"], "prompt": p["prompt"],
                "template_index": p["template_index"], "frequency_score": p["frequency_score"],
                "frequency_rank": p["frequency_rank"], "frequent": p["frequent"],
                "frequency_source": p["frequency_source"],
                "reference_image": str(refs[0].path) if refs else None,
                "reference_images": [str(r.path) for r in refs], "reference_text": p["reference_text"],
                "neighbour_ids": [n["id"] for n in nb], "neighbour_texts": [n["text"] for n in nb],
                "neighbour_images": [n["image"] for n in nb], "seed": cfg.seed,
                **{k: p[k] for k in EXTRA_FIELDS if k in p},
            })
    return rows


def read_run(run: str | Path) -> tuple[dict, list[dict]]:
    """(run.json, images.jsonl rows) of a run folder."""
    run = Path(run)
    if not (run / IMAGES_FILE).is_file() or not (run / "run.json").is_file():
        raise FileNotFoundError(f"{run} is not an EntityDrawBench run folder (no run.json / {IMAGES_FILE}); "
                                "make one with `reimagen-eval entitydraw`")
    return json.loads((run / "run.json").read_text()), read_jsonl(run / IMAGES_FILE)


__all__ = ["RunConfig", "RunResult", "cascade_generator", "plan_neighbours", "NeighbourProvider",
           "run_entitydraw", "run_prompts", "read_run", "SCORE_FIELDS", "EXTRA_FIELDS", "IMAGES_FILE", "PROMPTS_FILE",
           "SKIPPED_FILE"]
