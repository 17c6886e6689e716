"""Blind rating tasks from EntityDrawBench run folders (paper Sec. 4.2, Table 2).

A *study* folder holds everything the raters' side needs, and nothing that names a model to the rater:

    study.json      settings: mode, the runs (model name -> run folder), a per-study secret (never shown)
    tasks.jsonl     one task per (model, prompt): opaque task id, prompt, category, frequency split (the
                    boolean ``frequent``, and ``split`` where the run gives one: world runs),
                    reference text / image id, candidate image ids (+ their CLIP scores for the report)
    images.json     opaque image id -> absolute file path (server side only)
    ratings.sqlite  the ratings (human_eval.store)
    simulated.json  only where simulated raters rated (human_eval.simulate): how they were made

Three protocols:

    best        rate the image that ``entitydraw-score`` pre-selected as the best of 4 (``selected``)
    best-of-4   the paper's protocol: the rater picks the best of the 4 samples, then rates it
    rate-all    the rater rates every one of the 4 samples and picks the best: the report can then say what Table 2
                would be under the rater's pick, under an automatic reranker's pick and for "any of the 4"

Ids are HMAC-SHA256 digests keyed by the study secret, so neither a task id nor an image id reveals the model, the
run folder or the file name; the order of tasks (and of the 4 candidates) is a per-rater permutation.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .ids import digest, image_id, read_jsonl, task_id

MODES = ("best", "best-of-4", "rate-all")
#: Automatic scores an image row of a run may carry (entitydraw-score, the world judge), copied to its candidate
#: for the report's correlations: CLIP-T / CLIP-I, DINO subject similarity, a VQA-style faithfulness, and the toy
#: world's stand-ins for the last two (judge-feature subject similarity, the judge's P(faithful)).
SCORE_KEYS = ("clip_t", "clip_i", "dino_i", "vqa", "subject_sim", "judge_faithful")
STUDY_FILE = "study.json"
TASKS_FILE = "tasks.jsonl"
IMAGE_MAP_FILE = "images.json"
DB_FILE = "ratings.sqlite"
RATERS_FILE = "raters.txt"
#: Opaque ids: a prefix and lowercase hex; nothing else is accepted where an id comes from outside.
TASK_ID_RE = re.compile(r"^t_[0-9a-f]{20}$")
IMAGE_ID_RE = re.compile(r"^i_[0-9a-f]{24}$")
RATER_RE = re.compile(r"^[A-Za-z0-9_.@:+-]{1,64}$")
_MODEL_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")
#: Rater ids of simulated raters (human_eval.simulate); refused in rater lists so no person can use one.
SIM_RATER_PREFIX = "sim-judge-"


def check_image_id(value: str) -> str:
    """Refuse anything that is not an opaque image id (path separators, ``..``, file names, ...)."""
    if not isinstance(value, str) or "/" in value or "\\" in value or ".." in value or not IMAGE_ID_RE.match(value):
        raise ValueError(f"invalid image id {value[:80]!r}: expected an opaque id like i_<24 hex digits>")
    return value


def check_task_id(value: str) -> str:
    if not isinstance(value, str) or not TASK_ID_RE.match(value):
        raise ValueError(f"invalid task id {str(value)[:80]!r}: expected t_<20 hex digits>")
    return value


def parse_run_specs(specs: Sequence[str | Path]) -> dict[str, Path]:
    """``RUN_DIR`` or ``NAME=RUN_DIR`` -> {model name: run folder}; the default name is the folder's name."""
    runs: dict[str, Path] = {}
    for spec in specs:
        spec = str(spec)
        name, _, path = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        folder = Path(path).expanduser().resolve()
        if not (folder / "images.jsonl").is_file():
            raise FileNotFoundError(f"{folder} is not an EntityDrawBench run folder (no images.jsonl); "
                                    "make one with `reimagen-eval entitydraw`")
        name = name or folder.name
        if not _MODEL_RE.match(name):
            raise ValueError(f"model name {name!r}: use letters, digits and _ . + - (at most 64)")
        if name in runs:
            raise ValueError(f"model name {name!r} given twice; name runs with NAME=RUN_DIR")
        runs[name] = folder
    if not runs:
        raise ValueError("give at least one run folder")
    return runs


def atomic_write_text(path: Path, text: str) -> Path:
    """``reimagen.utils.atomic.write_text``, imported here rather than at the top: ``import reimagen`` loads torch,
    which the rating app (it imports this module) does without."""
    from reimagen.utils import atomic

    return atomic.write_text(path, text)


def _run_tasks(model: str, run: Path, mode: str, secret: str, images: dict[str, str]) -> list[dict[str, Any]]:
    rows = read_jsonl(run / "images.jsonl")
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        for key in ("image", "prompt_id", "category", "prompt"):
            if key not in r:
                raise ValueError(f"{run / 'images.jsonl'}: a row lacks {key!r}")
        by_prompt.setdefault(str(r["prompt_id"]), []).append(r)
    tasks = []
    for pid, group in sorted(by_prompt.items()):
        group.sort(key=lambda r: int(r.get("sample_index", 0)))
        cands = []
        for r in group:
            path = (run / r["image"]).resolve()
            if not path.is_file():
                raise FileNotFoundError(f"{run}: image {r['image']} listed in images.jsonl is missing")
            iid = image_id(secret, path)
            images[iid] = str(path)
            cands.append({"image_id": iid, "sample_index": int(r.get("sample_index", 0)),
                          **{k: r.get(k) for k in SCORE_KEYS if r.get(k) is not None},
                          "selected": bool(r.get("selected"))})
        if mode == "best":
            chosen = [c for c in cands if c["selected"]]
            if len(chosen) != 1:
                raise ValueError(f"run {model} ({run}): prompt {pid} has no pre-selected best image; score the run "
                                 "with `reimagen-eval entitydraw-score` or use --mode best-of-4")
            cands = chosen
        first = group[0]
        ref_id = None
        ref = first.get("reference_image")
        ref_paths = [str(p) for p in (Path(x) if Path(x).is_absolute() else run / x
                                      for x in first.get("reference_images") or ([ref] if ref else [])) if p.is_file()]
        if ref:
            ref_path = Path(ref) if Path(ref).is_absolute() else run / ref
            if ref_path.is_file():
                ref_id = image_id(secret, ref_path)
                images[ref_id] = str(ref_path.resolve())
        tasks.append({
            "task_id": task_id(secret, model, pid), "model": model, "prompt_id": pid,
            "entity_id": first.get("entity_id"), "name": first.get("name"), "category": first["category"],
            "prompt": first["prompt"], "frequent": first.get("frequent"), "frequency_rank": first.get("frequency_rank"),
            "split": first.get("split"),  # world runs: frequent | infrequent | unseen (the report's Figure 5)
            "reference_text": first.get("reference_text") or "", "reference_image_id": ref_id, "candidates": cands,
            "reference_paths": ref_paths,  # server side only: the source of control items
        })
    if not tasks:
        raise ValueError(f"run {model} ({run}) has no images")
    return tasks


def build_study(run_specs: Sequence[str | Path], study: str | Path, mode: str = "best", controls: int = 0,
                repeats: int = 0, control_file: str | Path | None = None) -> "Study":
    """Write (or refresh) a study folder. Rerunning with the same runs, mode and controls keeps the secret, hence
    every id and every rating; other settings are refused (start a new study folder). ``controls`` control items
    of each kind and ``repeats`` repeated tasks are added, and the items of ``control_file``
    (``human_eval.controls``)."""
    from .controls import make_controls, read_control_file

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if controls < 0 or repeats < 0:
        raise ValueError("--controls and --repeats must be >= 0")
    user_rows = read_control_file(control_file) if control_file else []
    runs = parse_run_specs(run_specs)
    study = Path(study)
    meta_path = study / STUDY_FILE
    runs_json = {k: str(v) for k, v in runs.items()}
    qc = {"controls": controls, "repeats": repeats, "control_file": str(Path(control_file).resolve())
          if control_file else None}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        old_qc = meta.get("quality", {"controls": 0, "repeats": 0, "control_file": None})
        if meta.get("mode") != mode or meta.get("runs") != runs_json or old_qc != qc:
            raise ValueError(f"{study} is a study of other runs or another mode or other controls ({meta.get('mode')}: "
                             f"{', '.join(meta.get('runs', {}))}; {old_qc}); use a new --study folder")
    else:
        meta = {"version": 1, "mode": mode, "runs": runs_json, "secret": secrets.token_hex(32), "quality": qc}
    images: dict[str, str] = {}
    tasks = [t for name, run in runs.items() for t in _run_tasks(name, run, mode, meta["secret"], images)]
    study.mkdir(parents=True, exist_ok=True)
    tasks += make_controls(tasks, study, meta["secret"], images, controls, repeats, user_rows)
    atomic_write_text(study / TASKS_FILE, "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks))
    atomic_write_text(study / IMAGE_MAP_FILE, json.dumps(images, indent=1))
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    try:
        os.chmod(meta_path, 0o600)  # holds the secret
    except OSError:
        pass
    return Study.load(study)


@dataclass
class Study:
    """A loaded study folder (read-only view)."""

    folder: Path
    mode: str
    runs: dict[str, str]
    secret: str
    tasks: dict[str, dict[str, Any]]
    images: dict[str, str]

    @classmethod
    def load(cls, folder: str | Path) -> "Study":
        folder = Path(folder)
        if not (folder / STUDY_FILE).is_file():
            raise FileNotFoundError(f"{folder} is not a rating study (no {STUDY_FILE}); make one with "
                                    "`reimagen-eval rate tasks RUN_DIR ... --study DIR`")
        meta = json.loads((folder / STUDY_FILE).read_text())
        tasks = {t["task_id"]: t for t in read_jsonl(folder / TASKS_FILE)}
        images = json.loads((folder / IMAGE_MAP_FILE).read_text())
        return cls(folder, meta["mode"], meta["runs"], meta["secret"], tasks, images)

    @property
    def db_path(self) -> Path:
        return self.folder / DB_FILE

    def order_for(self, rater: str) -> list[str]:
        """The rater's own permutation of the task ids (stable across sessions, different between raters)."""
        return sorted(self.tasks, key=lambda t: digest(self.secret, "order", rater, t, n=16))

    def candidates_for(self, rater: str, task_id: str) -> list[str]:
        """The task's candidate image ids in this rater's order."""
        ids = [c["image_id"] for c in self.tasks[task_id]["candidates"]]
        return sorted(ids, key=lambda i: digest(self.secret, "cand", rater, task_id, i, n=16))

    def image_path(self, image: str) -> Path:
        """The file behind an opaque image id; anything else (paths, ``..``, unknown ids) is refused."""
        check_image_id(image)
        if image not in self.images:
            raise KeyError(f"unknown image id {image}")
        return Path(self.images[image])

    def rater_view(self, task_id: str) -> dict[str, Any]:
        """What the rater may see of a task: no model name, run folder, file name or score."""
        t = self.tasks[task_id]
        return {"task_id": task_id, "prompt": t["prompt"], "entity": t.get("name"),
                "reference_text": t["reference_text"],
                "reference_image_id": t["reference_image_id"],
                "candidate_ids": [c["image_id"] for c in t["candidates"]]}


# ------------------------------------------------------------------------------------------------ raters

def read_raters(path: str | Path) -> dict[str, str]:
    """A rater list: one ``RATER_ID TOKEN`` per line (``#`` comments). Returns {token: rater id}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rater list {path} not found; make one with `reimagen-eval rate raters`")
    out: dict[str, str] = {}
    seen: set[str] = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected 'RATER_ID TOKEN'")
        rater, token = parts
        if not RATER_RE.match(rater) or rater.startswith("labelstudio:"):
            raise ValueError(f"{path}:{n}: bad rater id (letters, digits, _ . @ + - only)")
        if rater.startswith(SIM_RATER_PREFIX):
            raise ValueError(f"{path}:{n}: rater ids starting with {SIM_RATER_PREFIX!r} are kept for simulated raters")
        if len(token) < 12:
            raise ValueError(f"{path}:{n}: the token of {rater} is too short (at least 12 characters)")
        if rater in seen or token in out:
            raise ValueError(f"{path}:{n}: rater id or token repeated")
        seen.add(rater)
        out[token] = rater
    if not out:
        raise ValueError(f"rater list {path} is empty")
    return out


def make_raters(names: Iterable[str], path: str | Path) -> Path:
    """Write a rater list with fresh random tokens (file mode 600). Refuses to overwrite."""
    path = Path(path)
    if path.exists():
        raise ValueError(f"{path} exists; refusing to overwrite a rater list")
    names = list(names)
    for n in names:
        if not RATER_RE.match(n):
            raise ValueError(f"bad rater id {n!r} (letters, digits, _ . @ + - only)")
        if n.startswith(SIM_RATER_PREFIX):
            raise ValueError(f"rater ids starting with {SIM_RATER_PREFIX!r} are kept for simulated raters")
    if len(set(names)) != len(names) or not names:
        raise ValueError("give distinct rater ids")
    atomic_write_text(path, "".join(f"{n} {secrets.token_urlsafe(18)}\n" for n in names))
    os.chmod(path, 0o600)
    return path
