"""EntityDrawBench on the synthetic long-tail world (``toyworld``): the paper's measurements, judged.

The paper's EntityDrawBench (Sec. 4.2, Appendix C) asks a model to draw rare entities in new scenes, with the
entity's own reference (image, text) pairs as the retrieved neighbours, and has humans rate the best of 4
images for *faithfulness*: the entity looks like its reference AND the scene is as the text says. Its claims:

* Table 2 / Figure 5: retrieval raises faithfulness, most of all for infrequent entities;
* Figure 7: more neighbours (K = 1, 2, 3) help a little;
* Figure 8: the interleave ratio eta trades scene correctness (text-enhanced steps) against entity
  faithfulness (neighbour-enhanced steps);
* Figure 13 (Appendix): interleaved guidance beats joint and weighted guidance.

This module runs the same protocol on a built toy world (``reimagen-eval toy build``), whose entities have
invented names and fixed looks, a long-tailed corpus, and 3 reference pairs each; the frequency splits
(frequent / infrequent / unseen) are counted from the world's corpus (``World.frequency_splits``). A trained
judge CNN (``toyworld.judge``) replaces the human raters: it reads the entity's look and the scene back from
each image, so faithfulness is measured, not proxied.

    WorldBench        a built world folder: prompts (``World.bench_prompts``), reference pairs
                      (``references.parquet`` / ``.tar``), checks that the folder matches the world code
    run_world         generate a run folder in the EntityDrawBench format (run.json, prompts.jsonl,
                      images.jsonl, ``<prompt_id>__<i>.png``) plus ``references/`` (the reference images as
                      PNG files, for human_eval studies and for re-reading)
    score_world_run   judge every image: look_ok, scene_ok, faithful, the readings; best-of-N per prompt;
                      per-split table (faithfulness, look, scene rates with standard errors) and bar chart
    summarize_world_runs  several runs (e.g. with and without retrieval) in one table and one Figure 5-style plot
    world_sweep       k (Figure 7), eta (Figure 8) or guidance (Figure 13): run + judge per value, table, plot

In images.jsonl a world run's ``category`` is its frequency split (so human_eval's per-category report is a
per-split one), ``frequent`` is True / False / None (unseen), and ``split``, ``count``, ``position``,
``background`` give the scene the prompt asks for.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np

import toyworld as _toy
from reimagen.diffusion.solvers import DEFAULT_SAMPLER, DEFAULT_SR_STEPS, DEFAULT_STEPS
from reimagen.utils import atomic
from toyworld.world import LOOK_ATTRIBUTES, SCENE_ATTRIBUTES

from .entities import read_jsonl, write_json, write_jsonl, write_text
from .references import ReferencePair
from .run import IMAGES_FILE, RunConfig, RunResult, read_run, run_prompts
from .summary import FIGURE, check_protocols, ci95, mean_sem, parse_values, run_protocol, savefig, wrap

WORLD_BENCHMARK = "entitydrawbench-toyworld-v1"
SPLITS: tuple[str, ...] = ("frequent", "infrequent", "unseen")
GROUPS: tuple[str, ...] = SPLITS + ("all",)
GROUP_TITLES = {"frequent": "Frequent", "infrequent": "Infrequent", "unseen": "Unseen", "all": "All"}
METRICS: tuple[str, ...] = ("faithful", "look_ok", "scene_ok")
#: Automatic scores of every image (continuous): the judge's P(faithful), a VQA-style score, and its feature
#: similarity to the reference image, the toy world's stand-in for DINO subject similarity.
AUTO_METRICS: tuple[str, ...] = ("judge_faithful", "subject_sim")
#: The metrics that are rates (their intervals are clipped to [0, 1]); subject similarity is a cosine.
RATE_METRICS: tuple[str, ...] = METRICS + ("judge_faithful",)
METRIC_TITLES = {"faithful": "Faithfulness (look and scene)", "look_ok": "Entity look as its reference",
                 "scene_ok": "Scene as the text", "judge_faithful": "Judge's P(faithful) (VQA-style score)",
                 "subject_sim": "Subject similarity to the reference (judge features, DINO's role)"}
SELECTIONS: tuple[str, ...] = ("best_of_n", "per_image")
#: The judge's attributes: the entity's look, then the scene.
ATTRIBUTES: tuple[str, ...] = LOOK_ATTRIBUTES + SCENE_ATTRIBUTES
#: The summary figure's last column, one per row: the look attributes retrieval carries most.
FIGURE_ATTRIBUTES: tuple[str, ...] = ("body", "shape")
ATTRIBUTE_TITLES = {"shape": "shape", "body": "body colour", "pattern": "pattern", "pattern_colour": "pattern colour"}
REFERENCES_DIR = "references"
SCORES_FILE = "scores.json"
#: Where ``reimagen-eval toy judge`` writes the shipped judge.
DEFAULT_JUDGE = (_toy.WEIGHTS / "judge").resolve()
#: Fast sampling defaults for the toy cascade (32 px base + 32 -> 64 SR) on a CPU: the measured default sampler
#: (reimagen.diffusion.solvers.DEFAULT_SAMPLER; it was DDIM 25 / 10). The paper's are 256 DDPM steps with
#: w = 30 for the base and 128 / 32 steps with w = 5 / 3 for the SR stages (Sec. 4.2).
WORLD_DEFAULTS: dict[str, Any] = {"steps": DEFAULT_STEPS, "sampler": DEFAULT_SAMPLER, "w_text": 3.0,
                                  "w_neighbours": 3.0, "sr_guidance": (3.0,), "sr_steps": (DEFAULT_SR_STEPS,)}
JUDGE_NOTE = ("Judged by the toy world's attribute-reading CNN (not human raters): faithful = the entity's look "
              "(shape, body colour, pattern, pattern colour) is its reference's AND the scene (background, count, "
              "position) is the prompt's, as the paper's faithfulness (Sec. 4.2). Best of N: per prompt the "
              "judge's best sample, faithful if any sample is.")


# ----------------------------------------------------------------------------------------------
# The world folder
# ----------------------------------------------------------------------------------------------
PerSplit = Union[int, Mapping[str, int], None]


def split_limits(per_split: PerSplit) -> dict[str, int | None]:
    """``per_split`` as a limit per frequency split (None: the whole split); refuses unknown splits and N < 1."""
    if per_split is None or isinstance(per_split, int):
        per_split = dict.fromkeys(SPLITS, per_split)
    unknown = sorted(set(per_split) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown frequency split {unknown[0]!r} in the per-split limits; the splits are "
                         f"{', '.join(SPLITS)}")
    bad = {k: v for k, v in per_split.items() if v is not None and v < 1}
    if bad:
        raise ValueError(f"per-split limit must be >= 1, got {bad}")
    return {s: per_split.get(s) for s in SPLITS}


@dataclass
class WorldBench:
    """A built world folder (``reimagen-eval toy build``) as an EntityDrawBench: prompts and reference pairs."""

    folder: Path
    world: Any  # toyworld.world.World
    fingerprint: str
    ref_ids: list[str]
    ref_texts: list[str]
    ref_images: list[str]
    ref_rows: dict[str, list[int]]  # entity id -> rows of references.parquet

    @classmethod
    def open(cls, folder: str | Path) -> "WorldBench":
        from reimagen.retrieval.base import KnowledgeBase
        from toyworld.build import load_world

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"world folder {folder} does not exist; build one with "
                                    f"`reimagen-eval toy build --out {folder}`")
        for name in ("world.json", "references.parquet", "references.tar"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} lacks {name}: not a built toy world (rebuild it with "
                                        f"`reimagen-eval toy build --out {folder}`)")
        world = load_world(folder)  # checks the spec and the fingerprint against the world code
        fp = world.fingerprint()
        kb = KnowledgeBase.from_parquet(folder / "references.parquet")
        ents = kb.meta.get("entities") or []
        if kb.meta.get("world") != fp or len(ents) != len(kb) or ents != [s.entity for s in world.references]:
            raise ValueError(f"{folder / 'references.parquet'} does not belong to this world ({fp}); rebuild it")
        return cls(folder, world, fp, kb.ids, kb.texts, kb.image_refs, world.reference_rows)

    @property
    def n_references(self) -> int:
        return self.world.spec.n_references

    def prompt_table(self, per_split: "PerSplit" = None, seed: int = 0) -> list[dict]:
        """The world's EntityDrawBench prompts (one per entity of each frequency split, a full scene caption),
        in the prompt-table format of ``entitydrawbench.prompts`` plus the scene. ``per_split`` keeps the first
        N of each split (a number, or a number per split name: a split not named is kept whole); a prompt's scene
        does not depend on it (it is the full set's)."""
        limits = split_limits(per_split)
        w = self.world
        counts = w.corpus_counts
        rank = {eid: r + 1 for r, eid in enumerate(sorted(counts, key=lambda e: (-counts[e], e)))}
        taken = dict.fromkeys(SPLITS, 0)
        rows = []
        for bp in w.bench_prompts(None, seed=seed):
            if limits.get(bp.split) is not None and taken[bp.split] >= limits[bp.split]:
                continue
            taken[bp.split] += 1
            e = w.by_id[bp.entity]
            rows.append({"prompt_id": bp.id, "entity_id": e.id, "name": e.name, "category": bp.split,
                         "prompt": bp.text, "template_index": 0, "reference_text": w.reference_caption(e.id),
                         "frequency_score": counts[e.id], "frequency_rank": rank[e.id],
                         "frequent": {"frequent": True, "infrequent": False}.get(bp.split),
                         "frequency_source": f"toy world {self.fingerprint}: corpus images per entity",
                         "split": bp.split, "count": bp.scene.count, "position": bp.scene.position,
                         "background": bp.scene.background, "world": self.fingerprint})
        return rows

    def _bytes(self, row: int) -> bytes:
        from reimagen.retrieval.base import load_image_bytes

        return load_image_bytes(self.ref_images[row], root=self.folder)

    def pairs(self, out: str | Path, entity_ids: Sequence[str]) -> dict[str, list[ReferencePair]]:
        """Each entity's reference pairs (its rows of references.parquet, in order) as files under
        ``out/references`` (written by ``materialize``); ``kb_id`` is the row's id, also an id of kb.parquet."""
        ref_dir = Path(out).resolve() / REFERENCES_DIR
        return {eid: [ReferencePair(ref_dir / f"{self.ref_ids[i]}.png", self.ref_texts[i], self.ref_ids[i])
                      for i in self.ref_rows.get(eid, [])] for eid in entity_ids}

    def materialize(self, out: str | Path, entity_ids: Sequence[str]) -> None:
        """Write the entities' reference images to ``out/references/<id>.png`` (atomically; present ones kept)."""
        ref_dir = Path(out) / REFERENCES_DIR
        ref_dir.mkdir(parents=True, exist_ok=True)
        for eid in entity_ids:
            for i in self.ref_rows.get(eid, []):
                dest = ref_dir / f"{self.ref_ids[i]}.png"
                if dest.is_file():
                    continue
                atomic.write_bytes(dest, self._bytes(i))

    def references_digest(self, entity_ids: Sequence[str]) -> str:
        """Digest of the entities' reference ids, texts and image bytes (as ``references_fingerprint``)."""
        h = hashlib.sha256()
        for eid in sorted(entity_ids):
            for i in self.ref_rows.get(eid, []):
                h.update(f"{eid}\0{self.ref_ids[i]}\0{self.ref_texts[i]}\0".encode())
                h.update(hashlib.sha256(self._bytes(i)).digest())
        return h.hexdigest()


def world_of_run(manifest: dict) -> Any:
    """The World a run was made on, rebuilt from its run.json (no world folder needed)."""
    from toyworld.world import rebuild_world

    return rebuild_world(manifest["world_spec"], manifest.get("world"), "the run", "rerun it")


def is_world_run(run: str | Path) -> bool:
    p = Path(run) / "run.json"
    return p.is_file() and json.loads(p.read_text()).get("benchmark") == WORLD_BENCHMARK


# ----------------------------------------------------------------------------------------------
# Generating
# ----------------------------------------------------------------------------------------------
def check_world_config(cfg: RunConfig, bench: WorldBench, retrieval: bool = True) -> None:
    """World-specific input checks (before any model is loaded or file written)."""
    cfg.check()
    if retrieval and cfg.k > bench.n_references and not cfg.kb and not cfg.allow_fewer_neighbours:
        raise ValueError(f"k = {cfg.k} but the world has {bench.n_references} reference pairs per entity: lower "
                         f"--k, pass --kb {bench.folder / 'kb.parquet'} to top them up by BM25 (the paper's "
                         "retrieval), or --allow-fewer-neighbours to leave the slots empty (masked)")


def run_world(generator, out: str | Path, cfg: RunConfig, bench: WorldBench, per_split: PerSplit = None,
              shard: tuple[int, int] | None = None, progress: bool = True, log=None) -> RunResult:
    """EntityDrawBench (Sec. 4.2) on the world: ``cfg.samples_per_prompt`` images per prompt of the first
    ``per_split`` entities of each split, the entity's reference pairs as neighbours (k <= 3; BM25 top-up from
    ``cfg.kb`` beyond). Resumable and shardable like ``run_entitydraw``; the run folder has its format."""
    check_world_config(cfg, bench, bool(getattr(generator, "uses_neighbours", False)))
    prompts = bench.prompt_table(per_split, cfg.prompt_seed)
    if not prompts:
        raise ValueError(f"the world {bench.folder} has no benchmark prompts")
    eids = sorted({p["entity_id"] for p in prompts})
    benchmark = {"benchmark": WORLD_BENCHMARK, "world": bench.fingerprint, "world_spec": asdict(bench.world.spec)}
    return run_prompts(generator, out, cfg, prompts, bench.pairs(out, eids),
                       references_digest=bench.references_digest(eids), benchmark=benchmark,
                       provenance={"world": str(bench.folder.resolve())},
                       prepare=lambda o: bench.materialize(o, eids), shard=shard, progress=progress, log=log)


def run_complete(run: str | Path) -> bool:
    run = Path(run)
    if not (run / IMAGES_FILE).is_file():
        return False
    return all((run / r["image"]).is_file() for r in read_jsonl(run / IMAGES_FILE))


# ----------------------------------------------------------------------------------------------
# Judging
# ----------------------------------------------------------------------------------------------
def load_world_judge(path: str | Path | None = None, world_fingerprint: str | None = None):
    """(judge, info) from a judge folder (default: the shipped one); refused if trained on another world."""
    from toyworld.judge import judge_info, load_judge

    path = Path(path) if path is not None else DEFAULT_JUDGE
    judge = load_judge(path)  # FileNotFoundError with a hint if absent
    info = judge_info(path)
    if world_fingerprint and info["world"] and info["world"] != world_fingerprint:
        raise ValueError(f"the judge at {path} was trained on world {info['world']}, the run is on world "
                         f"{world_fingerprint}; train one on this world (`reimagen-eval toy judge`)")
    if info["min_test_accuracy"] is not None:
        info["min_test_accuracy"] = round(info["min_test_accuracy"], 4)
    return judge, info


def _load_images(paths: Sequence[Path]):
    import torch
    from PIL import Image

    from toyworld.world import IMAGE_SIZE

    arrs = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (IMAGE_SIZE, IMAGE_SIZE):  # a baseline drawing at another size: judged at the world's
                im = im.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
            arrs.append(np.asarray(im))
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255


def judge_rows(judge, world, run: Path, rows: list[dict], batch_size: int = 64) -> None:
    """Add look_ok, scene_ok, faithful, attributes_ok ("k/n": attributes read as asked, of 6 or 7), judge_match
    (attribute -> read as asked; pattern_colour only for patterned entities) and the judge's readings to ``rows``
    in place (None for rows whose image is missing)."""
    from toyworld.judge import faithful_probability, feature_similarity, judged_attributes, verdicts
    from toyworld.world import Scene, scene_attributes

    for r in rows:
        r.update(look_ok=None, scene_ok=None, faithful=None, attributes_ok=None, judge=None, judge_match=None,
                 judge_faithful=None, subject_sim=None)
    present = [r for r in rows if (run / r["image"]).is_file()]
    for start in range(0, len(present), batch_size):
        batch = present[start:start + batch_size]
        scenes = [Scene(r["entity_id"], int(r["count"]), r["position"], r["background"]) for r in batch]
        images = _load_images([run / r["image"] for r in batch])
        p_faithful = faithful_probability(judge, world, images, scenes).tolist()
        refs = [r.get("reference_image") for r in batch]
        sim = [None] * len(batch)
        if all(refs):
            sim = feature_similarity(judge, images, _load_images([run / p for p in refs])).tolist()
        for r, s, v, pf, si in zip(batch, scenes, verdicts(judge, world, images, scenes), p_faithful, sim):
            truth = scene_attributes(world, s)
            keys = judged_attributes(truth)
            match = {a: bool(v.readings[a] == truth[a]) for a in keys}
            r.update(look_ok=bool(v.look_ok), scene_ok=bool(v.scene_ok), faithful=bool(v.faithful),
                     attributes_ok=f"{sum(match.values())}/{len(keys)}", judge_match=match,
                     judge={a: (int(x) if isinstance(x, (int, np.integer)) else x) for a, x in v.readings.items()},
                     judge_faithful=round(float(pf), 6), subject_sim=None if si is None else round(float(si), 6))


def select_by_judge(rows: list[dict]) -> None:
    """Best of N per prompt (the paper rates the best of 4): a faithful sample if any, else the one with look or
    scene right, else the most attributes right; ties to the lowest sample index. Sets ``selected`` and
    ``select_score`` (share of attributes right), as the CLIP scorer does, so human_eval's best mode works."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        r["selected"], r["select_score"] = False, None
        if r.get("faithful") is None:
            continue
        num, den = map(int, r["attributes_ok"].split("/"))
        r["select_score"] = round(num / den, 6)
        groups.setdefault(r["prompt_id"], []).append(r)
    for g in groups.values():
        best = max(g, key=lambda r: (r["faithful"], r["look_ok"] + r["scene_ok"], r["select_score"],
                                     -r["sample_index"]))
        best["selected"] = True


def score_world_run(run: str | Path, judge_path: str | Path | None = None, judge=None,
                    judge_info: dict | None = None, allow_partial: bool = False, label: str | None = None,
                    batch_size: int = 64) -> dict[str, Any]:
    """Judge every image of a world run, write the fields into images.jsonl (atomically), the best of N per
    prompt, and the per-split summary (``scores.json``, ``summary.csv/.md/.png``). Returns the summary."""
    run = Path(run)
    manifest, rows = read_run(run)
    if manifest.get("benchmark") != WORLD_BENCHMARK:
        raise ValueError(f"{run} is not a toy-world run (made with `entitydraw --world`); the judge reads only the "
                         "world's scenes: score EntityDrawBench runs with CLIP (drop --judge)")
    world = world_of_run(manifest)
    lack = [r["image"] for r in rows if not (run / r["image"]).is_file()]
    if lack and not allow_partial:
        raise ValueError(f"{run} lacks {len(lack)} of {len(rows)} images (e.g. {', '.join(lack[:3])}): finish "
                         "the run (rerun entitydraw with the same options) or pass --allow-partial")
    if judge is None:
        judge, judge_info = load_world_judge(judge_path, manifest.get("world"))
    judge_rows(judge, world, run, rows, batch_size)
    select_by_judge(rows)
    write_jsonl(run / IMAGES_FILE, rows)
    summary = summarize_world({label or run.name: rows}, judge_info or {})
    from .summary import generator_of

    summary["generators"] = {label or run.name: generator_of(manifest)}
    write_json(run / SCORES_FILE, {"judge": judge_info or {}, "note": JUDGE_NOTE, "n_images": len(rows),
                                   "n_scored": len(rows) - len(lack), "summary": summary["records"]})
    write_world_summary(summary, run / "summary")
    return summary


# ----------------------------------------------------------------------------------------------
# Summaries: Table 2 / Figure 5 per split
# ----------------------------------------------------------------------------------------------
def summarize_world(runs: dict[str, list[dict]], judge_info: dict) -> dict[str, Any]:
    """Per model (run label), selection (best of N: one image per prompt; per image: all samples), group
    (frequent, infrequent, unseen, all) and metric (faithful, look_ok, scene_ok): rate, standard error, n."""
    records = []
    for label, rows in runs.items():
        scored = [r for r in rows if r.get("faithful") is not None]
        for selection, subset in (("best_of_n", [r for r in scored if r.get("selected")]), ("per_image", scored)):
            for group in GROUPS:
                members = subset if group == "all" else [r for r in subset if r.get("split") == group]
                prompts = [r["prompt_id"] for r in members]  # a prompt's samples are not independent
                for metric in METRICS + AUTO_METRICS:
                    mean, sem, n = mean_sem([r.get(metric) for r in members], prompts)
                    lo, hi = ci95(mean, sem, (0.0, 1.0) if metric in RATE_METRICS else None)
                    records.append({"model": label, "selection": selection, "metric": metric, "split": group,
                                    "mean": mean, "sem": sem, "ci_lo": lo, "ci_hi": hi, "n": n})
                if selection == "per_image":  # finer than faithfulness: which attributes come out right
                    for a in ATTRIBUTES:
                        mean, sem, n = mean_sem([(r.get("judge_match") or {}).get(a) for r in members], prompts)
                        lo, hi = ci95(mean, sem, (0.0, 1.0))
                        records.append({"model": label, "selection": selection, "metric": f"attr:{a}",
                                        "split": group, "mean": mean, "sem": sem, "ci_lo": lo, "ci_hi": hi, "n": n})
    return {"judge": judge_info, "note": JUDGE_NOTE, "records": records, "models": list(runs)}


def find(records: list[dict], model: str, metric: str, split: str, selection: str = "best_of_n") -> dict | None:
    return next((r for r in records if r["model"] == model and r["metric"] == metric and r["split"] == split
                 and r["selection"] == selection), None)


def cell(rec: dict | None) -> str:
    if not rec or rec["mean"] is None:
        return "-"
    if rec.get("ci_lo") is None:
        return f"{rec['mean']:.3f} (n={rec['n']})"
    return f"{rec['mean']:.3f} [{rec['ci_lo']:.3f}, {rec['ci_hi']:.3f}] (n={rec['n']})"


def world_markdown(summary: dict[str, Any]) -> str:
    recs, models = summary["records"], summary["models"]
    groups = [g for g in GROUPS if any(r["split"] == g and r["n"] for r in recs)]
    head = "| Model | " + " | ".join(GROUP_TITLES[g] for g in groups) + " |"
    rule = "|---" * (len(groups) + 1) + "|"
    j = summary.get("judge") or {}
    lines = ["# EntityDrawBench on the toy world: judged faithfulness", "", f"**{summary['note']}**", "",
             *[f"> PROTOCOLS DIFFER: {n}" for n in summary.get("protocol_notes", [])],
             f"Judge: {j.get('path', '?')} (sha256 {j.get('sha256', '?')}, min. attribute accuracy on fresh "
             f"renders {j.get('min_test_accuracy', '?')}). Rate [95% interval] (n): mean +- 1.96 standard errors; "
             "per-image standard errors are clustered by prompt (a prompt's N samples are not independent), "
             "best-of-N ones are over prompts.", ""]
    for selection, what in (("best_of_n", "best of N samples per prompt (the paper rates the best of 4)"),
                            ("per_image", "every sample")):
        for metric in METRICS + (AUTO_METRICS if selection == "per_image" else ()):
            lines += [f"## {METRIC_TITLES[metric]}, {what}", "", head, rule]
            lines += [f"| {m} | " + " | ".join(cell(find(recs, m, metric, g, selection)) for g in groups) + " |"
                      for m in models]
            lines.append("")
    lines += ["## Attributes read as asked, every sample (look: shape, body, pattern, pattern colour; scene: "
              "background, count, position)", "",
              "| Model | Split | " + " | ".join(ATTRIBUTES) + " |", "|---" * (len(ATTRIBUTES) + 2) + "|"]
    for m in models:
        for g in groups:
            vals = [find(recs, m, f"attr:{a}", g, "per_image") for a in ATTRIBUTES]
            lines.append(f"| {m} | {GROUP_TITLES[g]} | " + " | ".join(
                "-" if not v or v["mean"] is None else f"{v['mean']:.2f}" for v in vals) + " |")
    lines.append("")
    from .summary import generators_markdown

    lines += generators_markdown(summary.get("generators", {}))
    return "\n".join(lines)


def write_world_summary(summary: dict[str, Any], stem: str | Path) -> list[Path]:
    """``<stem>.csv`` (long format), ``<stem>.md`` (tables) and ``<stem>.png`` (Figure 5-style bars)."""
    stem = Path(stem)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["model", "selection", "metric", "split", "mean", "sem", "ci_lo", "ci_hi", "n",
                                        "kind"], lineterminator="\n")
    w.writeheader()
    w.writerows({**r, "kind": "toy-world judge"} for r in summary["records"])
    return [write_text(stem.with_suffix(".csv"), buf.getvalue()),
            write_text(stem.with_suffix(".md"), world_markdown(summary)),
            plot_world_summary(summary, stem.with_suffix(".png"))]


def plot_world_summary(summary: dict[str, Any], path: str | Path) -> Path:
    """Figure 5-style grouped bars with 95% intervals: x = frequency split, one bar per model; columns
    faithfulness / look / scene, rows best of N / per image; a last column with the body colour (top) and the shape
    (bottom) drawn as the reference's, per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    recs, models = summary["records"], summary["models"]
    groups = [g for g in GROUPS if any(r["split"] == g and r["n"] for r in recs)]
    # columns: faithfulness, look, scene (best of N above, per image below), then the two look attributes that
    # retrieval carries most, per image (the strongest contrast at a small n)
    panels = [[(metric, selection) for metric in METRICS] + [(f"attr:{attr}", "per_image")]
              for selection, attr in zip(SELECTIONS, FIGURE_ATTRIBUTES)]
    fig, axes = plt.subplots(2, len(panels[0]), figsize=(18, 7.5), sharey=True, squeeze=False)
    width = 0.8 / max(1, len(models))
    for row, line in enumerate(panels):
        for col, (metric, selection) in enumerate(line):
            ax = axes[row][col]
            for mi, m in enumerate(models):
                rs = [find(recs, m, metric, g, selection) for g in groups]
                vals = [r["mean"] if r and r["mean"] is not None else np.nan for r in rs]
                errs = [[r["mean"] - r["ci_lo"] if r and r.get("ci_lo") is not None else 0.0 for r in rs],
                        [r["ci_hi"] - r["mean"] if r and r.get("ci_hi") is not None else 0.0 for r in rs]]
                x = np.arange(len(groups)) + (mi - (len(models) - 1) / 2) * width
                ax.bar(x, vals, width, yerr=errs, capsize=2, label=m)
            ax.set_xticks(np.arange(len(groups)))
            ax.set_xticklabels([GROUP_TITLES[g] for g in groups], fontsize=9)
            ax.set_ylim(0, 1.05)
            title = (METRIC_TITLES[metric] if metric in METRIC_TITLES
                     else f"Entity {ATTRIBUTE_TITLES[metric[5:]]} as its reference's")
            ax.set_title(f"{title}\n({'best of N' if selection == 'best_of_n' else 'per image'})", fontsize=9)
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.suptitle("EntityDrawBench on the toy world by entity frequency (Figure 5 shape)\n"
                 + wrap(summary["note"], 170), fontsize=9)
    fig.subplots_adjust(top=0.84, hspace=0.35)
    try:
        return savefig(fig, Path(path))
    finally:
        plt.close(fig)


def summarize_world_runs(runs: dict[str, str | Path], out: str | Path, allow_different: bool = False) -> dict[str, Any]:
    """One per-split table and plot over several judged world runs (e.g. with and without retrieval); runs of
    different protocols (world, prompts, samples, seed, judge) are refused unless ``allow_different``."""
    from .summary import generator_of

    loaded, judges, protocols, generators = {}, [], {}, {}
    for label, path in runs.items():
        path = Path(path)
        manifest, rows = read_run(path)
        generators[label] = generator_of(manifest)
        scores = path / SCORES_FILE
        meta = json.loads(scores.read_text()) if scores.is_file() else {}
        if "judge" not in meta or all(r.get("faithful") is None for r in rows):
            raise ValueError(f"{path} is not judged yet: run `reimagen-eval entitydraw-score {path}` first")
        judges.append(meta["judge"])
        loaded[label] = rows
        protocols[label] = run_protocol(manifest, {"judge": meta["judge"].get("sha256")})
    notes = check_protocols(protocols, allow_different)
    summary = summarize_world(loaded, judges[0])
    summary["protocol_notes"] = notes
    summary["generators"] = generators
    write_world_summary(summary, out)
    return summary


# ----------------------------------------------------------------------------------------------
# Sweeps: K (Figure 7), eta (Figure 8), guidance (Figure 13)
# ----------------------------------------------------------------------------------------------
def world_sweep(param: str, values: Sequence, cfg: RunConfig, make_generator: Callable[[RunConfig], Any],
                out: str | Path, bench: WorldBench, per_split: PerSplit = None,
                judge_path: str | Path | None = None, progress: bool = False, log=None) -> list[dict]:
    """One run per value in ``out/<param>=<value>``, each judged; ``out/sweep_<param>.csv/.md/.png``."""

    values = parse_values(param, values)
    for v in values:
        check_world_config(replace(cfg, **{param: v}), bench)
    out = Path(out)
    judge, info = load_world_judge(judge_path, bench.fingerprint)
    table = []
    for v in values:
        c = replace(cfg, **{param: v})
        run_dir = out / f"{param}={v}"
        res = run_world(make_generator(c), run_dir, c, bench, per_split, progress=progress, log=log)
        summary = score_world_run(run_dir, judge=judge, judge_info=info, label=f"{param}={v}")
        row: dict[str, Any] = {param: v, "run": str(run_dir), "prompts": res.n_prompts}
        for rec in summary["records"]:
            key = f"{rec['metric']}_{rec['split']}" + ("_best" if rec["selection"] == "best_of_n" else "")
            row[key], row[key + "_sem"] = rec["mean"], rec["sem"]
        table.append(row)
    _write_sweep_table(table, param, out, FIGURE[param], info)
    _plot_sweep(table, param, out / f"sweep_{param}.png", FIGURE[param])
    return table


def sweep_columns(param: str) -> list[str]:
    return [param, "prompts"] + [f"{m}_{g}{b}{s}" for b in ("", "_best") for m in METRICS for g in GROUPS
                                 for s in ("", "_sem")] + [f"attr:{a}_{g}" for a in ATTRIBUTES for g in GROUPS] \
        + ["run"]


def _write_sweep_table(table: list[dict], param: str, out: Path, figure: str, judge: dict) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=sweep_columns(param), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(table)

    def c(r, key):
        mean, sem = r.get(key), r.get(key + "_sem")
        return "-" if mean is None else (f"{mean:.3f}" if sem is None else f"{mean:.3f} ± {sem:.3f}")

    md = [f"# Toy-world sweep over {param}: {figure}", "", f"**{JUDGE_NOTE}**", "",
          f"Judge {judge.get('path')} (sha256 {judge.get('sha256')}).", "",
          "## Per image (all samples), all splits", "",
          f"| {param} | prompts | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |", "|---" * 5 + "|"]
    md += [f"| {r[param]} | {r['prompts']} | " + " | ".join(c(r, f"{m}_all") for m in METRICS) + " |"
           for r in table]
    md += ["", "## Faithfulness, best of N, per split", "",
           f"| {param} | " + " | ".join(GROUP_TITLES[g] for g in GROUPS) + " |", "|---" * 5 + "|"]
    md += [f"| {r[param]} | " + " | ".join(c(r, f"faithful_{g}_best") for g in GROUPS) + " |" for r in table]
    md += ["", "## Per image, per split (look / scene / faithful)", "",
           f"| {param} | " + " | ".join(GROUP_TITLES[g] for g in SPLITS) + " |", "|---" * 4 + "|"]
    md += [f"| {r[param]} | " + " | ".join(" / ".join("-" if r.get(f"{m}_{g}") is None else f"{r[f'{m}_{g}']:.2f}"
                                                      for m in ("look_ok", "scene_ok", "faithful"))
                                          for g in SPLITS) + " |" for r in table]
    md += ["", "## Per attribute: the judge reads it as asked (per image; all splits, unseen in brackets)", "",
           f"| {param} | " + " | ".join(ATTRIBUTES) + " |", "|---" * (1 + len(ATTRIBUTES)) + "|"]
    md += [f"| {r[param]} | " + " | ".join(_attr_cell(r, a) for a in ATTRIBUTES) + " |" for r in table]
    write_text(out / f"sweep_{param}.csv", buf.getvalue())
    write_text(out / f"sweep_{param}.md", "\n".join(md) + "\n")


def _attr_cell(row: dict, attr: str) -> str:
    v, u = row.get(f"attr:{attr}_all"), row.get(f"attr:{attr}_unseen")
    return "-" if v is None else f"{v:.2f}" + ("" if u is None else f" ({u:.2f})")


def _plot_sweep(table: list[dict], param: str, path: Path, figure: str) -> Path:
    """Per split (and all): entity look (faithfulness to the reference) and scene correctness per image, and
    faithfulness per image and best of N, against the swept value (Figure 8's trade-off for eta)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    labels = [str(r[param]) for r in table]
    numeric = param != "guidance"
    xs = [float(r[param]) for r in table] if numeric else list(range(len(table)))
    fig, axes = plt.subplots(1, len(GROUPS), figsize=(4 * len(GROUPS), 3.8), sharey=True)
    lines = (("look_ok", "", "-o", "entity look (per image)"), ("scene_ok", "", "-s", "scene (per image)"),
             ("faithful", "", "-^", "faithful (per image)"), ("faithful", "_best", "--^", "faithful (best of N)"))
    for ax, g in zip(axes, ("all",) + SPLITS):
        for metric, sel, style, name in lines:
            ys = [np.nan if r.get(f"{metric}_{g}{sel}") is None else r[f"{metric}_{g}{sel}"] for r in table]
            es = [r.get(f"{metric}_{g}{sel}_sem") or 0.0 for r in table]
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=2, label=name)
        ax.set_xticks(xs)
        ax.set_xticklabels(labels)
        ax.set_xlabel({"k": "K (neighbours)", "eta": "eta (share of text-enhanced steps)"}.get(param, param))
        ax.set_title(GROUP_TITLES[g], fontsize=10)
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Toy-world EntityDrawBench sweep over {param}: {figure} (judged, not human ratings)", fontsize=10)
    fig.subplots_adjust(top=0.84, wspace=0.12)
    try:
        return savefig(fig, path)
    finally:
        plt.close(fig)


__all__ = ["WORLD_BENCHMARK", "WORLD_DEFAULTS", "DEFAULT_JUDGE", "SPLITS", "METRICS", "WorldBench", "run_world",
           "run_complete", "is_world_run", "load_world_judge", "judge_rows", "select_by_judge", "score_world_run",
           "summarize_world", "summarize_world_runs", "write_world_summary", "world_sweep", "check_world_config"]
