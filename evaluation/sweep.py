"""The FID sweep of Sec. 4.1 / Table 1: prompts -> retrieval -> generation over guidance grids -> metrics.

    sweep = FidSweep(SweepConfig(dataset="coco", dataset_root="/data/coco", db="coco-train", model="ckpt/64",
                                 sr_model="ckpt/sr256", out="runs/fid-coco"))
    sweep.validate()     # every check that needs no writing: bad input fails here, before OUT exists
    result = sweep.run() # generation (this process's shard), then metrics and the tables (rank 0)

Layout of the output folder::

    OUT/fid.json                      every setting that affects the images (a rerun with others is refused)
    OUT/prompts.jsonl                 the drawn prompts (prompt_id, text)
    OUT/neighbours.json               retrieved neighbour ids per prompt (computed once, shared by all points)
    OUT/base/w64_<w>/                 base-stage (64x64) images, made ONCE per 64-stage weight ...
    OUT/images/w64_<w>__wsr_<v>/      ... and reused by every super-resolution weight (the final images)
    OUT/metrics/<point>/<backend>__<res>px/  features, statistics and metrics.json of one sweep point
    OUT/results.csv, results.md, fid_vs_guidance.png

Every image folder is a ``reimagen.pipelines.generate`` run folder (``<prompt_id>__0.png``, ``run.json``): images are
written as they are made, a rerun skips them, and processes started by torchrun / accelerate (RANK,
WORLD_SIZE) each make their share; rank 0 waits for the others' images, then computes the metrics.
Guidance is standard (non-interleaved) classifier-free guidance on both conditions, ``JointGuidance(w)``, as in
Sec. 4.1; without a database, plain text CFG.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from reimagen.diffusion.solvers import check_sampler
from reimagen.utils.atomic import write_json, write_jsonl
from reimagen.pipelines.generate import Job, image_name
from reimagen.pipelines.plugins import build_generator, infer_kind, parse_model

from . import metric_set as ms
from . import metrics as mt
from .metric_set import METRIC_COLUMNS
from .protocol_manifest import protocol_manifest
from .datasets import FidDataset, default_resolution, open_dataset
from .protocol import FID, ZS_FID
from .sweep_setup import (NAMED_DBS, PAPER_GRID_64, PAPER_GRID_SR, Database, Point,  # noqa: F401  (re-exported)
                          SuperResolutionGenerator, SweepConfig, _sha, checkpoint_identity, fmt_w,
                          parse_grid)

MANIFEST = "fid.json"
PROMPTS = "prompts.jsonl"
NEIGHBOURS = "neighbours.json"
UNREADABLE = "reference_unreadable.json"


def _examples(bad: dict[str, str], n: int = 3) -> str:
    """A few "file (why)" of an unreadable_images answer, for an error message."""
    return "; ".join(f"{r} ({why})" for r, why in list(bad.items())[:n])


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------
class FidSweep:
    def __init__(self, cfg: SweepConfig, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.log = log or (lambda msg: None)
        self.notes: list[str] = []
        self.validated = False

    # -- 1. validation: no writes ------------------------------------------------------------------
    def validate(self) -> "FidSweep":
        from .backends import make_backend
        from .features import resolve_extractor
        from reimagen.utils.launch import shard_from_env

        c = self.cfg
        self.rank, self.world = shard_from_env()
        if c.k < 1:
            raise ValueError(f"--k must be >= 1, got {c.k}")
        from reimagen.utils.precision import check_precision

        check_precision(c.precision, c.device)
        self.resolution = int(c.resolution) if c.resolution is not None else default_resolution(c.dataset)
        if self.resolution < 16:
            raise ValueError(f"--resolution must be >= 16, got {self.resolution}")
        if c.batch_size < 1 or c.feature_batch_size < 1 or c.workers < 0:
            raise ValueError("batch sizes must be >= 1 and --workers >= 0")
        if c.steps < 1 or (c.sr_steps is not None and c.sr_steps < 1):
            raise ValueError("--steps and --sr-steps must be >= 1")
        check_sampler(c.sampler, max(c.steps, c.sr_steps or 0))
        if c.label not in ("auto", FID, ZS_FID):
            raise ValueError(f"--label must be auto, {FID} or {ZS_FID}, got {c.label!r}")
        self.retriever_name = self._retriever_name()
        self.metrics = ms.parse_metrics(c.metrics)
        if "kid" in self.metrics and (c.kid_subsets < 1 or c.kid_subset_size < 2):
            raise ValueError("--kid-subsets must be >= 1 and --kid-subset-size >= 2")
        if c.bootstrap < 0:
            raise ValueError(f"--bootstrap must be >= 0 (0: no intervals), got {c.bootstrap}")
        self.grid_64 = parse_grid(c.guidance_64, "--guidance-64")
        self.grid_sr = parse_grid(c.guidance_sr, "--guidance-sr")
        self.device = c.device
        if c.device == "cuda" and "LOCAL_RANK" in os.environ:
            self.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        self.backend = make_backend(c.backend, resolve_extractor(c.feature_extractor), c.mode, self.device,
                                    c.inception_weights, self.resolution)
        self.backends = ms.MetricBackends.build(self.backend, self.metrics, dict(c.metric_weights), self.device,
                                                self.resolution)
        self.stats_dir = mt.stats_cache_dir(c.stats_cache)

        # The dataset: prompts and the reference set (names the missing files and where to get them).
        self.dataset: FidDataset = open_dataset(c.dataset, c.dataset_root, c.num_prompts, c.seed,
                                                **dict(c.dataset_options))
        if len(self.dataset.reference) < 2:
            raise ValueError(f"the reference set of {c.dataset} has {len(self.dataset.reference)} images; "
                             "FID needs at least 2")
        self.jobs = [Job(p.prompt_id, p.text, 0) for p in self.dataset.prompts]
        if len(self.jobs) < 2:
            raise ValueError(f"--num-prompts must be >= 2 for FID statistics, got {len(self.jobs)}")
        ms.check_sample_sizes(self.metrics, len(self.jobs), len(self.dataset.reference), c.kid_subset_size,
                              c.bootstrap)
        for j in self.jobs:
            image_name(j.prompt_id, 0)  # prompt ids must be file-name safe

        # The model.
        if not c.model:
            raise ValueError("--model is required: a Re-Imagen checkpoint folder, a diffusers pipeline, or a "
                             "folder of images named by prompt id")
        self.spec = parse_model(c.model, c.model_args)  # the one model grammar; refuses unknown kinds, bad args
        self.kind, self.model = self.spec.kind, self.spec.target
        self._validate_model()

        # The database.
        self.db = self._open_database()
        if self.db.kb is not None and self.kind != "reimagen" and self.kind != "folder":
            raise ValueError(f"--db {c.db}: a {self.kind} baseline uses no retrieval; pass --db none")
        if self.db.kb is not None and self.kind == "reimagen":
            if not self.base_cfg.neighbour_attention:
                raise ValueError(f"{self.model} has no neighbour attention (a text-only stage); pass --db none")
            if len(self.db.kb) == 0:
                raise ValueError(f"database {c.db} is empty")
            if self.retriever_name == "clip" and c.index is None and not c.clip_pretrained:
                raise ValueError("--retriever clip needs CLIP weights (--clip-pretrained TAG_OR_PATH) or a prebuilt "
                                 "--index built with `reimagen-eval index build --retriever clip`")
        self.label = c.label if c.label != "auto" else (FID if self.db.in_domain else ZS_FID)

        # An existing output folder must hold this very sweep.
        self.manifest = self._manifest()
        mf = self.out / MANIFEST
        if mf.is_file():
            old = json.loads(mf.read_text())
            if old != self.manifest:
                diff = sorted(k for k in set(old) | set(self.manifest) if old.get(k) != self.manifest.get(k))
                raise ValueError(f"{self.out} holds a sweep with other settings (differing: {', '.join(diff)}); "
                                 "use another --out or delete it")
        self.points = self._plan()

        # Every argument is checked: now the downloads and model loads (Inception weights fail here, not after
        # hours of sampling).
        self.backends.load()
        self.clip_encoder = self._clip_encoder()
        self._load_models()
        self.validated = True
        return self

    def _retriever_name(self) -> str:
        """--retriever, or the kind of the saved --index (bm25, clip, precomputed); they must agree."""
        c = self.cfg
        if c.retriever is not None and c.retriever not in ("bm25", "clip"):
            raise ValueError(f"unknown retriever {c.retriever!r}; choose bm25 or clip")
        if not c.index:
            return c.retriever or "bm25"
        mf = Path(c.index) / "manifest.json"
        if not mf.is_file():
            raise FileNotFoundError(f"--index {c.index} is not a saved retriever (no manifest.json); build one with "
                                    "`reimagen-eval index build`")
        kind = str(json.loads(mf.read_text()).get("kind"))
        family = "bm25" if kind.startswith("bm25") else kind
        if c.retriever is not None and family != c.retriever:
            raise ValueError(f"--index {c.index} is a {kind} retriever but --retriever is {c.retriever}")
        return family

    def _validate_model(self) -> None:
        """The model's configuration only (config.json, the image folder); weights load in ``_load_models``."""
        c = self.cfg
        self.base_model = self.sr = self.folder_gen = self.base_cfg = self.sr_cfg = None
        if self.kind == "reimagen":
            from reimagen.models.config import UNetConfig
            from reimagen.models.checkpoint import read_checkpoint_config

            self.base_cfg = UNetConfig.from_dict(read_checkpoint_config(self.model)["unet"])
            if self.base_cfg.is_super_resolution:
                raise ValueError(f"--model {self.model} is a super-resolution stage; give the base (64x64) stage as "
                                 "--model and the super-resolution stage as --sr-model")
            if c.sr_model:
                if infer_kind(c.sr_model) != "reimagen":
                    raise ValueError(f"--sr-model {c.sr_model} is not a Re-Imagen checkpoint folder")
                self.sr_cfg = UNetConfig.from_dict(read_checkpoint_config(c.sr_model)["unet"])
                if not self.sr_cfg.is_super_resolution:
                    raise ValueError(f"--sr-model {c.sr_model} is not a super-resolution stage")
                if self.sr_cfg.lowres_size != self.base_cfg.image_size:
                    raise ValueError(f"--sr-model expects {self.sr_cfg.lowres_size}px inputs but the base stage makes "
                                     f"{self.base_cfg.image_size}px images")
        else:
            if c.sr_model:
                raise ValueError("--sr-model only applies to Re-Imagen checkpoints")
            if self.kind == "folder":
                from reimagen.pipelines.generate import FolderGenerator

                self.folder_gen = FolderGenerator(self.model)
                n_images = sum(1 for f in Path(self.model).iterdir()
                               if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
                if n_images < len(self.jobs):
                    raise ValueError(f"{self.model} holds {n_images} images, fewer than the {len(self.jobs)} prompts "
                                     "requested (--num-prompts)")
                missing = self.folder_gen.missing(self.jobs)
                if missing:
                    eg = ", ".join(image_name(j.prompt_id, 0) for j in missing[:3])
                    raise ValueError(f"{self.model} has no image for {len(missing)} of the {len(self.jobs)} prompt ids "
                                     f"(e.g. {eg}); images are named <prompt_id>__0.png (or <prompt_id>.png)")
                bad = mt.unreadable_images([str(self.folder_gen.path_of(j)) for j in self.jobs], label=str(self.model))
                if bad:
                    eg = _examples(bad)
                    raise ValueError(f"{len(bad)} images of {self.model} cannot be decoded (e.g. {eg}); every prompt "
                                     "needs its image: regenerate or replace them")

    def _load_models(self) -> None:
        c = self.cfg
        if self.kind == "reimagen":
            from reimagen.models.checkpoint import load_stage

            self.base_model, self.base_encoder = load_stage(self.model, device=self.device)
            if c.sr_model:
                self.sr, self.sr_encoder = load_stage(c.sr_model, device=self.device)
        else:  # diffusers or python: one loaded model, one run folder per guidance point
            self.generator = build_generator(self.spec, device=self.device)

    def _open_database(self) -> Database:
        from reimagen.retrieval.readers import open_knowledge_base

        c, ds = self.cfg, self.dataset
        db = c.db.strip()
        if db == "none":
            if c.index:
                raise ValueError("--index needs a database (--db)")
            return Database("none")
        if db == ds.in_domain_db:
            return Database(db, ds.open_in_domain(), True, f"{ds.name} train split")
        if db in NAMED_DBS:
            root = c.db_root
            if db == "laion" and root is None and c.index:
                mf = Path(c.index) / "manifest.json"
                if not mf.is_file():
                    raise FileNotFoundError(f"--index {c.index} is not a saved retriever (no manifest.json)")
                src = json.loads(mf.read_text()).get("source") or ""
                if not src:
                    raise ValueError(f"--index {c.index} does not record its knowledge base; pass --db-root")
                return Database(db, open_knowledge_base(src), False, src)
            if root is None:
                hint = ("a folder (or glob) of LAION-400M webdataset shards made by img2dataset, or --index with a "
                        "retriever built over them" if db == "laion" else f"the {db.split('-')[0]} dataset folder")
                raise ValueError(f"--db {db} needs --db-root: {hint}")
            from reimagen.retrieval import readers

            if db == "coco-train":
                kb = readers.read_coco(root, "train2014", progress=False)
            elif db == "wikiimages-train":
                kb = readers.read_wikiimages(root, "train", progress=False)
            else:
                kb = readers.read_webdataset(root, progress=False)
            return Database(db, kb, False, str(root))
        if ":" in db or db.endswith(".parquet"):
            kb = open_knowledge_base(db)
            fmt, split = kb.meta.get("format"), str(kb.meta.get("split", ""))
            same = fmt in ds.in_domain_formats
            if same and split and "train" not in split:
                raise ValueError(f"--db {db} is the {split} split of {ds.name}: retrieving from the evaluation data "
                                 "would leak the reference images; use the train split")
            train = ds.meta.get("train_split")
            if same and train and split != train:
                raise ValueError(f"--db {db} is {ds.name} {split}, which overlaps {ds.split} (e.g. COCO train2017 "
                                 f"holds the val2014 images); use {train}")
            return Database(db, kb, bool(same and "train" in split), db)
        raise ValueError(f"unknown database {db!r}; choose none, {ds.in_domain_db}, laion, another named database "
                         f"({', '.join(n for n in NAMED_DBS if n not in ('none', ds.in_domain_db, 'laion'))}, "
                         "with --db-root), or a knowledge base FORMAT:PATH / table.parquet")

    def _clip_encoder(self):
        c = self.cfg
        if not c.clip_pretrained:
            self.notes.append("CLIP score skipped: no CLIP weights given (--clip-pretrained TAG_OR_PATH).")
            return None
        try:
            from reimagen.retrieval.clip import ClipEncoder

            return ClipEncoder(c.clip_model, c.clip_pretrained, device=self.device)
        except (RuntimeError, OSError, ValueError, ImportError) as err:
            self.notes.append(f"CLIP score skipped: {str(err).splitlines()[0][:300]}")
            return None

    def _manifest(self) -> dict[str, Any]:
        c, ds = self.cfg, self.dataset
        model: dict[str, Any] = {"kind": self.kind}
        if self.kind == "reimagen":
            model["base"] = checkpoint_identity(self.model)
            model["sr"] = checkpoint_identity(c.sr_model) if c.sr_model else None
        else:
            model["path"] = self.model if self.kind in ("diffusers", "python") and not Path(self.model).exists() \
                else str(Path(self.model).resolve())
            model.update({k: v for k, v in sorted(self.spec.args.items())})
        uses_db = self.db.kb is not None and self.kind == "reimagen"
        return {"format_version": 1, "dataset": ds.name, "split": ds.split,
                "dataset_options": {k: str(v) for k, v in sorted(dict(c.dataset_options).items())},
                "num_prompts": len(self.jobs), "seed": c.seed,
                "prompts_sha": _sha([(j.prompt_id, j.prompt) for j in self.jobs]),
                "db": self.db.name, "db_source": self.db.source,
                "retriever": self.retriever_name if uses_db else None, "k": c.k if uses_db else None,
                "index": str(Path(c.index).resolve()) if (uses_db and c.index) else None,
                "model": model, "steps": c.steps if self.kind == "reimagen" else self.spec.args.get("steps"),
                "sr_steps": (c.sr_steps or c.steps) if self.sr_cfg is not None else None,
                "sampler": c.sampler if self.kind == "reimagen" else None,
                "sr_aug_level": c.sr_aug_level if self.sr_cfg is not None else None}

    def generator_record(self) -> dict[str, Any]:
        """What made the images (protocol.json, results.md): kind, model, scheduler, steps, guidance, size."""
        c = self.cfg
        if self.kind == "reimagen":
            sr = self.sr_cfg is not None
            return {"kind": "reimagen", "model": self.model + (f" + {c.sr_model}" if sr else ""),
                    "scheduler": c.sampler, "steps": f"{c.steps} / {c.sr_steps or c.steps}" if sr else c.steps,
                    "guidance": "standard CFG, the sweep's weights", "size": (self.sr_cfg or self.base_cfg).image_size}
        gen = self.folder_gen if self.kind == "folder" else self.generator
        rec = gen.record()
        if self.kind == "diffusers" and "guidance" not in self.spec.args:
            rec["guidance"] = "the sweep's --guidance-64 weights"
        return rec

    def _plan(self) -> list[Point]:
        if self.kind == "folder":
            return [Point("folder", None, None, Path(self.cfg.model))]
        if self.kind == "diffusers":
            grid = [self.spec.args["guidance"]] if "guidance" in self.spec.args else self.grid_64
            return [Point(f"cfg_{fmt_w(w)}", w, None, self.out / "images" / f"cfg_{fmt_w(w)}") for w in grid]
        if self.kind == "python":
            return [Point("python", None, None, self.out / "images" / "python")]
        pts = []
        for w in self.grid_64:
            base = self.out / "base" / f"w64_{fmt_w(w)}"
            if self.sr_cfg is None:
                pts.append(Point(f"w64_{fmt_w(w)}", w, None, base, None))
            else:
                for v in self.grid_sr:
                    name = f"w64_{fmt_w(w)}__wsr_{fmt_w(v)}"
                    pts.append(Point(name, w, v, self.out / "images" / name, base))
        return pts

    # -- 2. running ---------------------------------------------------------------------------------
    def image_paths(self, point: Point) -> list[str]:
        if self.kind == "folder":
            return [str(self.folder_gen.path_of(j)) for j in self.jobs]
        return [str(point.folder / image_name(j.prompt_id, j.sample_index)) for j in self.jobs]

    def run(self) -> dict[str, Any]:
        if not self.validated:
            self.validate()
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / MANIFEST, self.manifest, **mt.JSON_FORMAT)
        write_jsonl(self.out / PROMPTS, ({"prompt_id": j.prompt_id, "text": j.prompt} for j in self.jobs))
        if self.rank == 0:
            self._check_reference()  # before hours of sampling, not after
        if self.kind != "folder":
            self._generate()
        if self.rank != 0:
            self.log(f"rank {self.rank}/{self.world}: generated this process's images; rank 0 computes the metrics")
            return {"rank": self.rank, "rows": [], "notes": self.notes}
        self._wait_for_images()
        return {"rank": 0, "rows": self._metrics(), "notes": self.notes}

    def _check_reference(self) -> None:
        """Reference images that cannot be decoded are left out of the statistics, listed in
        reference_unreadable.json and counted in every result row (n_ref_unreadable)."""
        ds = self.dataset
        bad = mt.unreadable_images(ds.reference, ds.reference_root, f"{ds.name}-{ds.split}", max(2, self.cfg.workers),
                                   self.cfg.progress, cache=self.stats_dir)
        self.reference = [r for r in ds.reference if r not in bad]
        write_json(self.out / UNREADABLE, bad, **mt.JSON_FORMAT)
        if bad:
            eg = _examples(bad)
            note = (f"{len(bad)} of {len(ds.reference)} reference images cannot be decoded and are left out of the "
                    f"statistics (listed in {self.out / UNREADABLE}; e.g. {eg}); re-download them to use them")
            self.notes.append(note)
            self.log(note)
        if len(self.reference) < 2:
            raise ValueError(f"only {len(self.reference)} of the {len(ds.reference)} reference images can be decoded; "
                             "FID needs at least 2")

    def _check_neighbour_images(self, table) -> None:
        """Every retrieved neighbour image decodes, checked once before any sampling: a corrupt one is refused by
        name (not found hours later, mid-sweep)."""
        kb = self.db.kb
        ids = sorted({n for ids, _ in table.values() for n in ids})
        bad = mt.unreadable_images([kb.absolute_ref(kb.index_of(i)) for i in ids], label="neighbour images",
                                   workers=max(2, self.cfg.workers), progress=self.cfg.progress)
        if bad:
            eg = _examples(bad)
            raise ValueError(f"{len(bad)} of the {len(ids)} retrieved neighbour images of database {self.db.name} "
                             f"cannot be decoded (e.g. {eg}); re-download them, or rebuild the database's index from "
                             "a knowledge base read with ?verify=true, which leaves undecodable images out")

    def _neighbours_table(self) -> dict[str, tuple[list[str], list[float]]]:
        c = self.cfg
        path = self.out / NEIGHBOURS
        want = {"db": self.db.name, "source": self.db.source, "retriever": self.retriever_name, "k": c.k,
                "prompts_sha": self.manifest["prompts_sha"], "index": self.manifest["index"]}
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("key") == want:
                return {pid: (row[0], row[1]) for pid, row in data["rows"].items()}
        retriever = self._retriever()
        self.log(f"retrieving {c.k} neighbours for {len(self.jobs)} prompts from {self.db.name} "
                 f"({self.retriever_name})")
        rows: dict[str, Any] = {}
        for start in range(0, len(self.jobs), 1024):
            chunk = self.jobs[start:start + 1024]
            res = retriever.search([j.prompt for j in chunk], c.k, query_ids=[j.prompt_id for j in chunk])
            for j, ids, scores in zip(chunk, res.ids, res.scores):
                rows[j.prompt_id] = [list(ids), [float(s) for s in scores]]
        missing = {n for ids, _ in rows.values() for n in ids if n not in self.db.kb}
        if missing:
            raise ValueError(f"the retriever returned {len(missing)} ids that are not in database {self.db.name} "
                             f"(e.g. {sorted(missing)[:3]}); was --index built over another knowledge base?")
        write_json(path, {"key": want, "rows": rows}, **mt.JSON_FORMAT)
        return {pid: (r[0], r[1]) for pid, r in rows.items()}

    def _retriever(self):
        c = self.cfg
        if c.index:
            from reimagen.retrieval.base import load_retriever

            return load_retriever(c.index)
        if self.retriever_name == "bm25":
            from reimagen.retrieval.bm25 import BM25Retriever

            return BM25Retriever.from_knowledge_base(self.db.kb)
        from reimagen.retrieval.clip import ClipRetriever

        return ClipRetriever.build(self.db.kb, model_name=c.clip_model, pretrained=c.clip_pretrained,
                                   device=self.device, work_dir=self.out / "retrieval" / "clip-embeddings",
                                   progress=c.progress)

    def _neighbours_fn(self, table, size: int):
        from reimagen.pipelines.cascade import neighbours_from_result
        from reimagen.retrieval.base import SearchResult

        kb, k = self.db.kb, self.cfg.k

        def fn(jobs):
            rows = [table[j.prompt_id] for j in jobs]
            return neighbours_from_result(kb, SearchResult([r[0] for r in rows], [r[1] for r in rows]), k, size)

        return fn

    def _generate(self) -> None:
        from reimagen.pipelines.generate import generate_run

        c = self.cfg
        shard = (self.rank, self.world)
        common = {"sweep": {k: self.manifest[k] for k in ("dataset", "split", "prompts_sha", "db", "retriever", "k")}}
        if self.kind in ("diffusers", "python"):
            gen = self.generator
            for p in self.points:
                if p.w_64 is not None:
                    gen.guidance_scale = p.w_64  # one loaded pipeline, one run folder per guidance scale
                self.log(f"{p.name}: generating")
                generate_run(gen, self.jobs, p.folder, c.seed, None, c.batch_size, common, shard, c.progress)
            return
        from reimagen import Cascade, JointGuidance, SamplerSettings, Stage
        from reimagen.pipelines.generate import CascadeGenerator

        use_db = self.db.kb is not None
        table = self._neighbours_table() if use_db else None
        if table is not None:
            self._check_neighbour_images(table)
        base_nbrs = self._neighbours_fn(table, self.base_model.cfg.image_size) if use_db else None
        sr_nbrs = self._neighbours_fn(table, self.sr.cfg.image_size) if (use_db and self.sr is not None) else None
        base_settings = SamplerSettings(steps=c.steps, sampler=c.sampler)
        sr_settings = SamplerSettings(steps=c.sr_steps or c.steps, sampler=c.sampler, aug_level=c.sr_aug_level)
        for w in self.grid_64:
            base = self.out / "base" / f"w64_{fmt_w(w)}"
            stage = Stage(self.base_model, JointGuidance(w=w, use_neighbours=use_db), base_settings,
                          precision=c.precision)
            gen = CascadeGenerator(Cascade([stage], self.base_encoder))
            self.log(f"base stage w64={fmt_w(w)}: generating")
            generate_run(gen, self.jobs, base, c.seed, base_nbrs, c.batch_size, common, shard, c.progress)
            if self.sr is None:
                continue
            for v in self.grid_sr:
                p = self.out / "images" / f"w64_{fmt_w(w)}__wsr_{fmt_w(v)}"
                sr_gen = SuperResolutionGenerator(self.sr, self.sr_encoder, JointGuidance(w=v, use_neighbours=use_db),
                                                  sr_settings, base, f"base/w64_{fmt_w(w)}", precision=c.precision)
                self.log(f"SR stage w64={fmt_w(w)} wsr={fmt_w(v)}: generating from the cached base images")
                generate_run(sr_gen, self.jobs, p, c.seed, sr_nbrs, c.batch_size, common, shard, c.progress)

    def _wait_for_images(self) -> None:
        from reimagen.utils.launch import wait_for_others

        wait_for_others(lambda: sum(1 for p in self.points for f in self.image_paths(p) if not os.path.isfile(f)),
                        "images", self.cfg.wait_timeout, self.world, self.log)

    def _metrics(self) -> list[dict[str, Any]]:
        c, ds = self.cfg, self.dataset
        ref = {}
        for b in [self.backend, *self.backends.extra.values()]:
            self.log(f"reference statistics: {len(self.reference)} {ds.name} {ds.split} images ({b.key()}; cache "
                     f"{self.stats_dir})")
            ref[b.key()] = mt.reference_stats(b, ds.name, ds.split, self.reference, ds.reference_root,
                                              self.stats_dir, c.feature_batch_size, c.workers, c.progress)
        self.protocol = protocol_manifest(self, ref)
        texts = [j.prompt for j in self.jobs]
        rows = []
        for p in self.points:
            refs = self.image_paths(p)
            fp = mt.items_fingerprint(refs, with_mtime=True)
            folder = self.out / "metrics" / p.name
            want = {"fingerprint": fp, "protocol": self.protocol["id"], "metrics": list(self.metrics),
                    "kid": [c.kid_subsets, c.kid_subset_size, c.seed], "bootstrap": c.bootstrap,
                    "clip": [c.clip_model, c.clip_pretrained] if self.clip_encoder else None}
            mpath = folder / "metrics.json"
            if mpath.is_file() and json.loads(mpath.read_text()).get("key") == want:
                m = json.loads(mpath.read_text())["metrics"]
            else:
                self.log(f"{p.name}: {', '.join(self.metrics)} on {len(refs)} images")
                m = ms.point_metrics(self.metrics, self.backends, refs, ref, folder, fp, c, c.progress, p.name)
                if self.clip_encoder is not None:
                    m["clip_score"] = mt.clip_score(self.clip_encoder, refs, texts, self.resolution)
                write_json(mpath, {"key": want, "metrics": m, "protocol": self.protocol}, **mt.JSON_FORMAT)
            rows.append(self._row(p, m))
        return rows

    def _row(self, p: Point, m: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg
        uses_db = self.db.kb is not None
        if self.kind in ("diffusers", "python"):
            model = self.model
        else:
            model = "/".join(Path(self.model).resolve().parts[-2:]) + ("+sr" if self.sr is not None else "")
        return {"dataset": self.dataset.name, "split": self.dataset.split, "model": f"{self.kind}:{model}",
                "db": self.db.name, "retriever": self.retriever_name if uses_db else "-", "k": c.k if uses_db else 0,
                "w_64": p.w_64, "w_sr": p.w_sr, "metric": self.label,
                **{k: m.get(k) for k in METRIC_COLUMNS}, "kid_std": m.get("kid_std"),
                "clip_score": m.get("clip_score"), "n": m["n"], "n_ref": m["n_ref"],
                "n_ref_unreadable": len(self.dataset.reference) - len(self.reference),
                "backend": self.backend.name, "mode": self.backend.mode,
                "feature_extractor": self.backend.extractor_name(), "resolution": self.resolution,
                "point": p.name, "source": "measured", "protocol_id": self.protocol["id"]}


model_kind = infer_kind  # the kind of a bare --model path, by its name before the model grammar

__all__ = ["SweepConfig", "Point", "Database", "FidSweep", "SuperResolutionGenerator", "parse_grid", "fmt_w",
           "model_kind", "checkpoint_identity", "PAPER_GRID_64", "PAPER_GRID_SR", "NAMED_DBS"]
