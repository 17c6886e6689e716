"""The run folders a report reads, each turned into plain rows (JSON for the page); images stay paths here and
become thumbnails in ``site.py``.

    entitydraw  run.json + images.jsonl         (``reimagen-eval entitydraw``; the toy world's judged runs too)
    fid         fid.json (+ results.csv, protocol.json, images/<point>/)   (``reimagen-eval fid``)
    sample      run.json + prompts.json (+ neighbours.json, sheets/)       (``reimagen-eval sample``)
    rating      table2.csv + report.md                                     (``reimagen-eval rate report``)
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from human_eval.ids import read_jsonl  # names the file and line of a row that is not JSON

KINDS = ("entitydraw", "fid", "sample", "rating")
# per-image fields shown as scores (booleans as marks, numbers rounded); the judge's attributes come separately
SCORE_FIELDS = ("faithful", "look_ok", "scene_ok", "judge_faithful", "subject_sim", "clip_t", "clip_i", "dino_i",
                "vqa", "select_score")


class ReportError(ValueError):
    """A run folder the report cannot use (unknown kind, unreadable records); the message names it."""


@dataclass
class Run:
    name: str
    path: Path
    kind: str
    manifest: dict[str, Any] = field(default_factory=dict)


def detect_kind(path: Path) -> str:
    if not path.is_dir():
        raise ReportError(f"{path}: no such run folder")
    if (path / "fid.json").is_file():
        return "fid"
    if (path / "run.json").is_file() and (path / "images.jsonl").is_file():
        return "entitydraw"
    if (path / "run.json").is_file() and (path / "prompts.json").is_file():
        return "sample"
    if (path / "table2.csv").is_file() and (path / "report.md").is_file():
        return "rating"
    raise ReportError(f"{path} is not a run folder the report knows: expected an EntityDrawBench run (run.json + "
                      "images.jsonl), an FID sweep (fid.json), a `sample` run (run.json + prompts.json) or a "
                      "`rate report` folder (table2.csv + report.md)")


def open_runs(specs: list[str]) -> list[Run]:
    """``PATH`` or ``NAME=PATH`` per run; the kind of each is detected, names must be unique."""
    runs, names = [], set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name or spec, spec
        if name in names:
            raise ReportError(f"two runs are named {name!r}: name them NAME=PATH")
        names.add(name)
        p = Path(path)
        kind = detect_kind(p)
        manifest = _read_json(p / ("fid.json" if kind == "fid" else "run.json")) if kind != "rating" else {}
        runs.append(Run(name, p, kind, manifest))
    return runs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} cannot be read: {err}") from None


# ----------------------------------------------------------------------------------------------
# EntityDrawBench: one row per prompt, the runs side by side on their shared prompts
# ----------------------------------------------------------------------------------------------
def _neighbours(row: dict) -> list[dict]:
    """The neighbours an image was made with: recorded paths (``neighbour_images``, newer runs), else the entity's
    reference pairs for ids ``<entity>:<j>`` (the reference's j-th image)."""
    refs = row.get("reference_images") or []
    paths = row.get("neighbour_images") or []
    scores = row.get("neighbour_scores") or []
    out = []
    for j, (nid, text) in enumerate(zip(row.get("neighbour_ids") or [], row.get("neighbour_texts") or [])):
        image = paths[j] if j < len(paths) else None
        if image is None and nid.startswith(f"{row.get('entity_id')}:"):
            i = int(nid.rpartition(":")[2])
            image = refs[i] if i < len(refs) else None
        out.append({"id": nid, "text": text, "image": image, "score": scores[j] if j < len(scores) else None})
    return out


def _sample(path: Path, index: int, row: dict | None = None) -> dict:
    """One image of a row: its path, sample index, best-of-N mark, scores and the judge's readings (if scored)."""
    row = row or {}
    scores = {k: row[k] for k in SCORE_FIELDS if isinstance(row.get(k), (bool, int, float))}
    return {"image": str(path), "index": index, "best": bool(row.get("selected")), "scores": scores,
            "judge": row.get("judge_match") or {}, "read": row.get("judge") or {}}


def _image(row: dict, folder: Path) -> dict:
    return _sample(folder / row["image"], row.get("sample_index", 0), row)


def _best_value(images: list[dict]) -> float | None:
    """A prompt's best-of-N value for the disagreement view: faithful (judge) if present, else the select score."""
    for key in ("faithful", "select_score", "clip_t"):
        vals = [float(im["scores"][key]) for im in images if key in im["scores"]]
        if vals:
            return max(vals)
    return None


def entitydraw_rows(runs: list[Run]) -> dict[str, Any]:
    """Per shared prompt: its text, entity, split, category, references, then per run its neighbours and samples."""
    per_run: dict[str, dict[str, list[dict]]] = {}
    meta: dict[str, dict] = {}
    for run in runs:
        by_prompt: dict[str, list[dict]] = {}
        for row in read_jsonl(run.path / "images.jsonl"):
            by_prompt.setdefault(row["prompt_id"], []).append(row)
            meta.setdefault(row["prompt_id"], row)
        per_run[run.name] = by_prompt
    order = list(dict.fromkeys(pid for run in runs for pid in per_run[run.name]))
    shared = [pid for pid in order if all(pid in per_run[r.name] for r in runs)]
    rest = {r.name: len(per_run[r.name]) - len(shared) for r in runs}
    rows = []
    for pid in shared:
        m = meta[pid]
        cells, best = {}, []
        for run in runs:
            group = sorted(per_run[run.name][pid], key=lambda r: r.get("sample_index", 0))
            images = [_image(r, run.path) for r in group]
            cells[run.name] = {"neighbours": _neighbours(group[0]), "images": images}
            best.append(_best_value(images))
        vals = [b for b in best if b is not None]
        rows.append({"pid": pid, "prompt": m.get("prompt", ""), "entity": m.get("name", m.get("entity_id", "")),
                     "split": m.get("split") or ("frequent" if m.get("frequent") else "infrequent"),
                     "category": m.get("category", ""), "reference_text": m.get("reference_text", ""),
                     "references": list(m.get("reference_images") or ([m["reference_image"]] if
                                                                     m.get("reference_image") else [])),
                     "disagreement": round(max(vals) - min(vals), 6) if len(vals) > 1 else 0.0, "cells": cells})
    return {"rows": rows, "models": [r.name for r in runs], "unshared": rest}


# ----------------------------------------------------------------------------------------------
# FID sweeps: one grid per guidance point; sample runs: one row per prompt
# ----------------------------------------------------------------------------------------------
def fid_points(run: Run) -> dict[str, Any]:
    prompts = {}
    if (run.path / "prompts.jsonl").is_file():
        prompts = {r["prompt_id"]: r.get("text", r.get("prompt", "")) for r in read_jsonl(run.path / "prompts.jsonl")}
    points = {}
    images = run.path / "images"  # the final images (after SR); a one-stage sweep has only base/
    if not images.is_dir():
        images = run.path / "base"
    for folder in sorted(p for p in images.iterdir() if p.is_dir()) if images.is_dir() else []:
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        points[folder.name] = [{"image": str(f), "pid": f.stem.partition("__")[0],
                                "prompt": prompts.get(f.stem.partition("__")[0], "")} for f in files]
    return {"points": points, "n_prompts": len(prompts)}


def sample_rows(run: Run) -> dict[str, Any]:
    prompts = _read_json(run.path / "prompts.json")
    nbrs = _read_json(run.path / "neighbours.json") if (run.path / "neighbours.json").is_file() else {}
    n = int(run.manifest.get("samples_per_prompt") or 0)
    rows = []
    for p in prompts:
        pid = p["prompt_id"]
        made = {int(f.stem.rpartition("__")[2]) for f in run.path.glob(f"{glob.escape(pid)}__*.png")}
        # every sample the run asked for (one still missing is listed as such) and any beyond
        images = [_sample(run.path / f"{pid}__{i}.png", i) for i in sorted(made | set(range(n)))]
        sheet = run.path / "sheets" / f"{pid}.png"
        rows.append({"pid": pid, "prompt": p["prompt"], "entity": "", "split": "", "category": "",
                     "reference_text": "", "references": [], "disagreement": 0.0,
                     "sheet": str(sheet) if sheet.is_file() else None,
                     "cells": {run.name: {"neighbours": [{"id": x.get("id"), "text": x.get("text", ""),
                                                           "image": x.get("image"), "score": x.get("score")}
                                                          for x in nbrs.get(pid, [])], "images": images}}})
    return {"rows": rows, "models": [run.name], "unshared": {}}


__all__ = ["KINDS", "Run", "ReportError", "detect_kind", "open_runs", "entitydraw_rows", "fid_points", "sample_rows"]
