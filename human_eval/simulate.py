"""Simulated raters for the synthetic world: the judge CNN answers the rating app's questions.

This is a **simulation** and is labelled as one everywhere: rater ids are ``sim-judge-<k>``, rows carry
``source = 'simulated'`` in the ratings table, ``simulated.json`` in the study records how they were made, and the
report says how many ratings are simulated (``rate report --sources human`` leaves them out). It exists so that
the Table 2 / Figure 5 / agreement reports are exercised end to end on world runs, where the truth is known.

Per task, each simulated rater answers exactly what a human answers in the app, through the same store API
(``RatingStore.record_many``: the same validation, one row per rater and task):

1. **The scene the prompt asks for** is parsed from the prompt text against the world's own caption templates
   (every entity x count x position x background x template, exact match after case/whitespace folding), then
   checked against the task's entity id. Why the text and not ``World.bench_prompts(seed)`` by prompt id: the
   bench prompts' scenes come from one random stream over all prompts in split order, so they depend on the bench
   seed, ``per_split`` and the split thresholds, none of which a study records; the text is what a rater is shown
   and what faithfulness is judged against ("the scene matches the text"), and world captions state count,
   background and position in full.
2. **Faithfulness** is ``Verdict.faithful`` of ``toyworld.judge.verdicts``: the entity's look (shape, body
   colour, pattern, pattern colour) reads as the entity's AND the scene (background, count, position) as the
   text says: the paper's definition (Sec. 4.2).
3. **Photorealism** ("moderately realistic without noticeable artifacts") is the judge's confidence: the least
   certain of its attribute readings (min over heads of the top softmax probability) must reach the
   ``quantile`` (default 5 %) of the same statistic over fresh clean renders of the world. An image counts as
   photorealistic when the judge reads it as confidently as 95 % of real renders; artifacts, smears and
   off-distribution colours lower the confidence. It is a proxy of "looks like a clean render of this world",
   nothing more, calibrated so that clean renders score ~0.95 (the paper's models score .92-.98).
4. **Rater noise**: each rater perceives each answer of each image through an independent flip with probability
   ``noise`` (default 0.1), drawn from sha256(seed, rater, task, image): answers are deterministic, independent of
   the order of work, and raters disagree now and then, so inter-rater agreement is meaningful (with flip
   probability e, two raters agree on a binary answer with probability (1 - e)^2 + e^2).
5. **Best of 4** (``--mode best-of-4``): the rater picks the candidate it perceives best (faithful, then
   photorealistic, then the judge's confidence; ties by its own candidate order) and rates that one; with
   ``--mode rate-all`` it also records its answers for every candidate.

Rerunning is an idempotent skip: a rater's already rated tasks are left alone (reported as skipped), so nothing
is submitted twice; ``force=True`` re-rates them (the store then counts a resubmission in ``n_submits``). A rerun
with other settings (judge weights, noise, seed, world) for raters that already have ratings is refused unless
``force``, so one rater's ratings never mix two settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .store import SIM_SOURCE, RatingStore
from .tasks import SIM_RATER_PREFIX, Study, atomic_write_text

SETTINGS_FILE = "simulated.json"
#: Reader facts that define a rater's answers (with world, noise and seed); others are only recorded.
SETTING_KEYS = ("reader", "judge_sha256", "photoreal_quantile", "calibration_renders")


@dataclass(frozen=True)
class Reading:
    """What a simulated rater sees in one image, before its own noise."""

    faithful: bool
    photoreal: bool
    realism: float = 1.0  # the judge's confidence (tie-break of best-of-4)
    look_ok: bool | None = None
    scene_ok: bool | None = None


#: A reader: images (N, H, W, 3) uint8 and the scenes their prompts asked for -> one Reading per image. It may
#: carry an ``info`` dict (recorded in simulated.json).
Reader = Callable[[np.ndarray, Sequence[Any]], Sequence[Reading]]


def sim_raters(n: int) -> list[str]:
    if not 1 <= n <= 99:
        raise ValueError(f"the number of simulated raters must be in 1..99, got {n}")
    return [f"{SIM_RATER_PREFIX}{k}" for k in range(1, n + 1)]


# ---------------------------------------------------------------------------------------------- the world

def _fold(text: str) -> str:
    return " ".join(str(text).split()).casefold()


class SceneIndex:
    """Prompt text -> the Scene it asks for, by exact match against every caption the world can write."""

    def __init__(self, world):
        from toyworld.world import BACKGROUNDS, COUNTS, POSITIONS, Scene

        self.world = world
        self.index: dict[str, Any] = {}
        ambiguous: set[str] = set()
        for e in world.entities:
            for count in COUNTS:
                for position in POSITIONS:
                    for bg in BACKGROUNDS:
                        scene = Scene(e.id, count, position, bg)
                        for variant in range(3):  # World.caption's templates with everything mentioned
                            key = _fold(world.caption(scene, variant))
                            if key in self.index and self.index[key] != scene:
                                ambiguous.add(key)
                            self.index[key] = scene
        for key in ambiguous:
            del self.index[key]

    def scene_of(self, task: dict[str, Any]):
        scene = self.index.get(_fold(task["prompt"]))
        if scene is None:
            raise ValueError(f"prompt {task['prompt_id']} ({task['prompt']!r}) is not a caption of this world that "
                             "states count, background and position; is --world the world of these runs?")
        eid = task.get("entity_id")
        if eid not in (None, "") and eid != scene.entity:
            raise ValueError(f"prompt {task['prompt_id']}: the text names entity {scene.entity} "
                             f"({self.world.by_id[scene.entity].name}) but the run says {eid}")
        return scene


# ---------------------------------------------------------------------------------------------- the judge

class JudgeReader:
    """Readings from the judge CNN: faithfulness from ``verdicts``, photorealism from its calibrated confidence."""

    def __init__(self, judge, world, quantile: float = 0.05, calibration: int = 256, seed: int = 0,
                 info: dict[str, Any] | None = None):
        if not 0 <= quantile < 1:
            raise ValueError(f"the photorealism quantile must be in [0, 1), got {quantile}")
        if calibration < 10:
            raise ValueError(f"calibrate on at least 10 renders, got {calibration}")
        self.judge, self.world, self.quantile, self.calibration, self.seed = judge.eval(), world, quantile, \
            calibration, seed
        self._threshold: float | None = None
        self.info = {"reader": "judge", **(info or {}), "photoreal_quantile": quantile,
                     "calibration_renders": calibration}

    @classmethod
    def from_path(cls, path: str | Path, world, **kwargs) -> "JudgeReader":
        from toyworld.judge import judge_info, load_judge

        judge = load_judge(path)  # FileNotFoundError with the command that trains one
        ji = judge_info(path)
        info: dict[str, Any] = {"judge": ji["path"], "judge_sha256": ji["sha256"]}
        if ji["min_test_accuracy"] is not None:
            info["judge_min_test_accuracy"] = ji["min_test_accuracy"]
        return cls(judge, world, info=info, **kwargs)

    def _tensor(self, images: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255

    def confidence(self, images: np.ndarray) -> np.ndarray:
        """Per image: min over attribute heads of the top softmax probability (the least certain reading)."""
        import torch

        x = self._tensor(images)
        out = []
        with torch.no_grad():
            for i in range(0, x.shape[0], 256):
                logits = self.judge(x[i:i + 256])
                probs = torch.stack([lg.softmax(1).max(1).values for lg in logits.values()], 1)
                out.append(probs.min(1).values)
        return torch.cat(out).numpy().astype(float)

    @property
    def threshold(self) -> float:
        """The ``quantile`` of the confidence of fresh clean renders of random scenes (seeded)."""
        if self._threshold is None:
            from toyworld.world import render_many

            rng = np.random.default_rng(int.from_bytes(hashlib.sha256(
                f"sim-rater-calibration\x1f{self.seed}".encode()).digest()[:8], "little"))
            ents = self.world.entities
            picks = rng.integers(0, len(ents), self.calibration)
            scenes = [self.world.random_scene(ents[int(i)].id, rng) for i in picks]
            conf = self.confidence(render_many(self.world, scenes, f"sim-rater-calibration-{self.seed}"))
            self._threshold = float(np.quantile(conf, self.quantile))
            self.info["photoreal_threshold"] = round(self._threshold, 6)
        return self._threshold

    def __call__(self, images: np.ndarray, scenes: Sequence[Any]) -> list[Reading]:
        from toyworld.judge import verdicts

        vs = verdicts(self.judge, self.world, self._tensor(images), list(scenes))
        conf = self.confidence(images)
        tau = self.threshold
        return [Reading(v.faithful, bool(c >= tau), float(c), v.look_ok, v.scene_ok) for v, c in zip(vs, conf)]


def _load_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BOX if im.size[0] > size else Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- the raters

def _flip(seed: int, rater: str, task_id: str, image: str) -> np.random.Generator:
    h = hashlib.sha256("\x1f".join(("sim-rater", str(seed), rater, task_id, image)).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def _answers(reading: Reading, rng: np.random.Generator, noise: float) -> tuple[bool, bool]:
    u = rng.random(2)
    return reading.faithful != bool(u[0] < noise), reading.photoreal != bool(u[1] < noise)


def simulate(study: Study, world, reader: Reader, n_raters: int = 3, noise: float = 0.1, seed: int = 0,
             force: bool = False, batch_size: int = 256) -> dict[str, Any]:
    """Have ``n_raters`` simulated raters rate every task of ``study`` (see the module docstring).

    Returns {"raters", "written", "skipped", "per_rater": {rater: (written, skipped)}, "settings"}."""
    if not 0 <= noise < 0.5:
        raise ValueError(f"noise (flip probability) must be in [0, 0.5), got {noise}")
    raters = sim_raters(n_raters)
    # What must not change between runs of one rater (the judge's path may: its digest is what counts).
    settings = {"world": world.fingerprint(), "noise": noise, "seed": seed,
                **{k: v for k, v in (getattr(reader, "info", None) or {}).items() if k in SETTING_KEYS}}
    store = RatingStore(study)
    try:
        done = {r: (set() if force else store.done_by(r) & set(study.tasks)) for r in raters}
        recorded = _read_settings(study)
        clash = [r for r in raters if done[r] and recorded.get(r, {}).get("settings") not in (None, settings)]
        if clash:
            raise ValueError(f"{', '.join(clash)} already rated this study with other settings "
                             f"({_diff(recorded[clash[0]]['settings'], settings)}); rerun with --force to re-rate, "
                             "or use a new study folder")
        todo = sorted({tid for r in raters for tid in study.tasks if tid not in done[r]})
        index = SceneIndex(world) if todo else None
        wanted = [(tid, c["image_id"]) for tid in todo for c in study.tasks[tid]["candidates"]]
        scenes = {tid: index.scene_of(study.tasks[tid]) for tid in todo}
        readings: dict[tuple[str, str], Reading] = {}
        from toyworld.world import IMAGE_SIZE

        for i in range(0, len(wanted), batch_size):
            chunk = wanted[i:i + batch_size]
            imgs = np.stack([_load_image(study.image_path(iid), IMAGE_SIZE) for _, iid in chunk])
            got = list(reader(imgs, [scenes[tid] for tid, _ in chunk]))
            if len(got) != len(chunk):
                raise RuntimeError(f"the reader returned {len(got)} readings for {len(chunk)} images")
            readings.update(zip(chunk, got))
        per_rater: dict[str, tuple[int, int]] = {}
        info = dict(getattr(reader, "info", None) or {})
        for rater in raters:
            rows = []
            for tid in study.order_for(rater):
                if tid in done[rater]:
                    continue
                cands = study.candidates_for(rater, tid)
                seen = []
                for k, iid in enumerate(cands):
                    r = readings[(tid, iid)]
                    f, p = _answers(r, _flip(seed, rater, tid, iid), noise)
                    seen.append((f, p, r.realism, -k, iid))
                f, p, _, _, iid = max(seen)
                per_image = {x[4]: (int(x[0]), int(x[1])) for x in seen} if study.mode == "rate-all" else None
                rows.append((rater, tid, int(f), int(p), iid if len(cands) > 1 else None, SIM_SOURCE, per_image))
            if rows:
                store.record_many(rows)
                recorded[rater] = {"settings": settings, "details": info, "updated_at": time.time()}
            per_rater[rater] = (len(rows), len(done[rater]))
        _write_settings(study, recorded)
    finally:
        store.close()
    return {"raters": raters, "written": sum(w for w, _ in per_rater.values()),
            "skipped": sum(s for _, s in per_rater.values()), "per_rater": per_rater, "settings": settings}


def _diff(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "unknown"


def _read_settings(study: Study) -> dict[str, Any]:
    path = study.folder / SETTINGS_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text()).get("raters", {})


def _write_settings(study: Study, raters: dict[str, Any]) -> None:
    doc = {"note": "SIMULATED ratings: the toy world's judge CNN plus per-rater noise stand in for human raters "
                   "(human_eval/simulate.py). They are not human judgements.", "raters": raters}
    atomic_write_text(study.folder / SETTINGS_FILE, json.dumps(doc, indent=1, sort_keys=True))


def simulated_note(study: Study) -> str | None:
    """One line for reports: how the simulated ratings of a study were made."""
    raters = _read_settings(study)
    if not raters:
        return None
    s = next(iter(raters.values()))
    d, st = s.get("details", {}), s.get("settings", {})
    bits = [f"{len(raters)} simulated rater(s) ({', '.join(sorted(raters))})", f"reader {d.get('reader', '?')}"]
    if d.get("judge_min_test_accuracy") is not None:
        bits.append(f"judge min test accuracy {d['judge_min_test_accuracy']:.3f}")
    if d.get("photoreal_threshold") is not None:
        bits.append(f"photorealism = confidence >= {d['photoreal_threshold']:.3f} "
                    f"(the {d.get('photoreal_quantile')} quantile of clean renders)")
    bits.append(f"flip noise {st.get('noise')}, seed {st.get('seed')}")
    if any(r.get("settings") != st for r in raters.values()):
        bits.append("NOTE: the simulated raters were made with different settings (see simulated.json)")
    return "; ".join(bits)
