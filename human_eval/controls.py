"""Quality controls of a rating study: control items with a known answer, repeated items, and the per-rater
quality table (HEIM mixes real photos among the generated ones; ImagenHub and most crowd studies add repeats).

Control items look like ordinary tasks to the rater (same fields, same number of candidate images; their images
are copied into the study under opaque names) and never count in Table 2, Figure 5, the agreement or the
correlations:

    photorealism   the task's prompt with the entity's own reference photos as the candidates: photorealism = 1
    faithfulness   the task's prompt and reference with ANOTHER entity's reference photos as the candidates:
                   faithfulness = 0 (the look is not the entity's)
    user           rows of ``--control-file`` (JSON lines): ``image`` (or ``images``), ``prompt``, optional
                   ``reference_image`` / ``reference_text``, and ``expected`` with ``faithfulness`` and / or
                   ``photorealism`` in {0, 1}; a row without an expected answer is refused
    repeat         a copy of an ordinary task under another id (same candidates): within-rater consistency

The quality table gives, per rater, the share of control answers as expected and the share of repeated tasks
answered alike on both criteria; ``rate report --exclude-failing`` drops the ratings of raters below the
thresholds (printed in the report) before anything is computed.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path
from typing import Any, Sequence

CONTROL_DIR = "controls"
KINDS = ("photorealism", "faithfulness", "user")
MIN_CONTROL_ACCURACY = 0.75
MIN_CONSISTENCY = 0.6


def is_rated_task(task: dict[str, Any]) -> bool:
    """An ordinary task: one that counts in Table 2 (not a control, not a repeat)."""
    return "control" not in task and "repeat_of" not in task


def _copy(study_dir: Path, src: str | Path, key: str) -> Path:
    """A copy of a control image under an opaque name (so a rater cannot tell it from the file name and every
    candidate has its own image id)."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"control image {src} does not exist")
    dst = study_dir / CONTROL_DIR / (hashlib.sha256(key.encode()).hexdigest()[:24] + src.suffix.lower())
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return dst


def read_control_file(path: str | Path) -> list[dict[str, Any]]:
    """User control items (see the module docstring), checked."""
    from .ids import read_jsonl

    rows = read_jsonl(Path(path))
    for n, r in enumerate(rows, 1):
        exp = r.get("expected")
        if not isinstance(exp, dict) or not exp or set(exp) - {"faithfulness", "photorealism"} \
                or any(v not in (0, 1) for v in exp.values()):
            raise ValueError(f"{path}:{n}: a control item needs its expected answer: \"expected\": "
                             "{\"faithfulness\": 0|1, \"photorealism\": 0|1} (one or both)")
        if not (r.get("image") or r.get("images")) or not r.get("prompt"):
            raise ValueError(f"{path}:{n}: a control item needs \"image\" (or \"images\") and \"prompt\"")
    return rows


def make_controls(tasks: list[dict[str, Any]], study_dir: Path, secret: str, images: dict[str, str], n: int,
                  repeats: int, user_rows: Sequence[dict[str, Any]] = (), seed: int = 0) -> list[dict[str, Any]]:
    """Control and repeated tasks for a study whose ordinary tasks are ``tasks`` (see the module docstring);
    their images are registered in ``images``."""
    from .ids import image_id, task_id

    rng = random.Random(seed)
    k = max(len(t["candidates"]) for t in tasks)
    refs = {}  # entity -> its reference photos (all of a run's rows list them)
    for t in tasks:
        if t.get("entity_id") and t.get("reference_paths"):
            refs.setdefault(t["entity_id"], t["reference_paths"])
    with_refs = [t for t in tasks if t.get("entity_id") in refs]
    out = []

    def cands(paths: Sequence[str], key: str) -> list[dict[str, Any]]:
        got = []
        for i in range(k):
            dst = _copy(study_dir, paths[i % len(paths)], f"{secret}/{key}/{i}")
            iid = image_id(secret, dst)
            images[iid] = str(dst.resolve())
            got.append({"image_id": iid, "sample_index": i, "selected": i == 0})
        return got

    def control(base: dict[str, Any], kind: str, i: int, paths: Sequence[str], expected: dict[str, int]) -> dict:
        tid = task_id(secret, "_control", f"{kind}-{i}")
        return {**{x: base.get(x) for x in ("entity_id", "name", "category", "prompt", "reference_text",
                                            "reference_image_id")},
                "task_id": tid, "model": "_control", "prompt_id": f"control-{kind}-{i}", "frequent": None,
                "split": None, "candidates": cands(paths, tid), "control": {"kind": kind, "expected": expected}}

    if n and len(with_refs) >= 2:
        for i, base in enumerate(rng.sample(with_refs, min(n, len(with_refs)))):
            out.append(control(base, "photorealism", i, refs[base["entity_id"]], {"photorealism": 1}))
        for i, base in enumerate(rng.sample(with_refs, min(n, len(with_refs)))):
            other = rng.choice([e for e in refs if e != base["entity_id"]])
            out.append(control(base, "faithfulness", i, refs[other], {"faithfulness": 0}))
    for i, row in enumerate(user_rows):
        ref = row.get("reference_image")
        ref_id = None
        if ref:
            dst = _copy(study_dir, ref, f"{secret}/user-ref/{i}")
            ref_id = image_id(secret, dst)
            images[ref_id] = str(dst.resolve())
        base = {"prompt": row["prompt"], "reference_text": row.get("reference_text", ""), "reference_image_id": ref_id,
                "category": row.get("category", "control"), "name": row.get("name")}
        out.append(control(base, "user", i, row.get("images") or [row["image"]], dict(row["expected"])))
    for i, base in enumerate(rng.sample(tasks, min(repeats, len(tasks)))):
        out.append({**base, "task_id": task_id(secret, "_repeat", str(i)), "repeat_of": base["task_id"]})
    return out


def rater_quality(study, rows: list[dict[str, Any]], min_control: float = MIN_CONTROL_ACCURACY,
                  min_consistency: float = MIN_CONSISTENCY) -> list[dict[str, Any]]:
    """Per rater: control answers as expected, repeats answered alike, and pass / fail against the thresholds."""
    by_rater: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_rater.setdefault(r["rater"], {})[r["task_id"]] = r
    out = []
    for rater, mine in sorted(by_rater.items()):
        right = total = 0
        for tid, r in mine.items():
            ctl = study.tasks.get(tid, {}).get("control")
            for crit, want in (ctl or {}).get("expected", {}).items():
                total += 1
                right += int(r[crit] == want)
        same = pairs = 0
        for tid, r in mine.items():
            orig = study.tasks.get(tid, {}).get("repeat_of")
            if orig and orig in mine:
                pairs += 1
                same += int(all(r[c] == mine[orig][c] for c in ("faithfulness", "photorealism")))
        acc = right / total if total else None
        cons = same / pairs if pairs else None
        ok = (acc is None or acc >= min_control) and (cons is None or cons >= min_consistency)
        out.append({"rater": rater, "ratings": sum(1 for t in mine if is_rated_task(study.tasks.get(t, {}))),
                    "control_answers": total, "control_accuracy": acc, "repeats": pairs, "consistency": cons,
                    "passes": ok})
    return out


def quality_settings(min_control: float, min_consistency: float) -> str:
    return (f"a rater passes with at least {min_control:.0%} of control answers as expected and at least "
            f"{min_consistency:.0%} of repeated tasks answered alike (where they rated any)")


__all__ = ["KINDS", "CONTROL_DIR", "MIN_CONTROL_ACCURACY", "MIN_CONSISTENCY", "is_rated_task", "read_control_file",
           "make_controls", "rater_quality", "quality_settings"]
