"""Simulated raters on the synthetic world (human_eval.simulate): a study of two fake world runs ("with retrieval"
draws each prompt's entity, "without" draws the right scene with a wrong entity), rated by simulated raters, gives a
Table 2 / Figure 5 by frequency split. The raters' reader is injected (an oracle that knows what each image shows),
so the tests run without trained judge weights; one test uses the shipped judge when it is there."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from human_eval.cli import rate_app
from human_eval.report import write_report
from human_eval.simulate import JudgeReader, Reading, SceneIndex, simulate
from human_eval.store import SIM_SOURCE, RatingStore, read_rows
from human_eval.tasks import build_study, make_raters, read_raters
from toyworld import WEIGHTS as SHIPPED
from toyworld.build import load_world
from toyworld.world import Scene, World, WorldSpec, render_many

SPEC = WorldSpec(n_entities=24, n_unseen=4, corpus_size=600, zipf_s=1.3, zipf_q=3.0)  # a steep tail: all three splits
SPLIT_KW = {"frequent_min": 40, "infrequent_max": 15}  # 5 frequent, 7 infrequent, 4 unseen entities
WEIGHTS = SHIPPED / "judge"  # the judge ships with the repository: no skip when it is missing


@pytest.fixture(scope="module")
def tiny():
    world = World(SPEC)
    return world, world.bench_prompts(**SPLIT_KW)


def _wrong_entity(world: World, eid: str) -> str:
    ids = [e.id for e in world.entities]
    return ids[(ids.index(eid) + 7) % len(ids)]


def make_world_run(folder: Path, world: World, prompts, correct, samples: int = 1, scored: bool = True) -> dict:
    """A run folder in entitydraw's format; ``correct(sample_index) -> bool`` says whether a sample draws the
    prompt's entity (else another entity, in the prompt's scene). Returns {image bytes: the scene drawn}."""
    folder.mkdir(parents=True)
    refs = folder / "_refs"
    refs.mkdir()
    truth, rows = {}, []
    for p in prompts:
        ref = refs / f"{p.entity}.png"
        Image.fromarray(world.render(Scene(p.entity, 1, "left", "grass"), ("ref", p.entity))).save(ref)
        drawn = [p.scene if correct(i) else Scene(_wrong_entity(world, p.entity), p.scene.count, p.scene.position,
                                                   p.scene.background) for i in range(samples)]
        imgs = render_many(world, drawn, f"{folder.name}-{p.id}")
        for i, (scene, img) in enumerate(zip(drawn, imgs)):
            name = f"{p.id}__{i}.png"
            Image.fromarray(img).save(folder / name)
            truth[img.tobytes()] = scene
            # entitydrawbench/world.py's rows: category = split, frequent True / False / None (unseen)
            row = {"image": name, "prompt_id": p.id, "sample_index": i, "entity_id": p.entity,
                   "name": world.by_id[p.entity].name, "category": p.split, "split": p.split,
                   "frequent": {"frequent": True, "infrequent": False}.get(p.split), "prompt": p.text,
                   "count": p.scene.count, "position": p.scene.position, "background": p.scene.background,
                   "reference_image": str(ref), "reference_images": [str(ref)],
                   "reference_text": world.reference_caption(p.entity)}
            if scored:
                row.update(selected=i == 0, clip_t=0.3, clip_i=0.5)
            rows.append(row)
    (folder / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "run.json").write_text(json.dumps({"benchmark": "toy", "samples_per_prompt": samples}))
    return truth


class Oracle:
    """An exact reader: looks up what each image really shows and compares it with the scene the simulator says
    the prompt asked for (so a wrong prompt -> scene mapping shows up as wrong verdicts)."""

    info = {"reader": "oracle"}

    def __init__(self, world: World, truth: dict):
        self.world, self.truth, self.calls = world, truth, 0

    def __call__(self, images, scenes):
        self.calls += 1
        out = []
        for img, asked in zip(images, scenes):
            drawn = self.truth[np.ascontiguousarray(img).tobytes()]
            look = self.world.by_id[drawn.entity].look == self.world.by_id[asked.entity].look
            scene = (drawn.count, drawn.position, drawn.background) == (asked.count, asked.position, asked.background)
            out.append(Reading(look and scene, True, 1.0, look, scene))
        return out


def _world_root(tmp: Path, world: World) -> Path:
    root = tmp / "world"
    root.mkdir()
    (root / "world.json").write_text(json.dumps({"spec": asdict(world.spec), "fingerprint": world.fingerprint()}))
    return root


@pytest.fixture
def setup(tmp_path, tiny):
    world, prompts = tiny
    truth = {}
    truth.update(make_world_run(tmp_path / "with", world, prompts, lambda i: True))
    truth.update(make_world_run(tmp_path / "without", world, prompts, lambda i: False))
    study = build_study([f"with-retrieval={tmp_path / 'with'}", f"without-retrieval={tmp_path / 'without'}"],
                        tmp_path / "study", "best")
    return {"tmp": tmp_path, "world": world, "prompts": prompts, "study": study, "oracle": Oracle(world, truth),
            "root": _world_root(tmp_path, world)}


def test_scene_index_maps_every_bench_prompt_back_to_its_scene(tiny):
    world, prompts = tiny
    index = SceneIndex(world)
    for p in prompts:
        task = {"prompt_id": p.id, "prompt": "  " + p.text.upper() + " ", "entity_id": p.entity}
        assert index.scene_of(task) == p.scene
        assert index.scene_of({**task, "entity_id": None}) == p.scene  # the text alone is enough
    p = prompts[0]
    with pytest.raises(ValueError, match="names entity"):
        index.scene_of({"prompt_id": p.id, "prompt": p.text, "entity_id": _wrong_entity(world, p.entity)})
    with pytest.raises(ValueError, match="not a caption of this world"):
        index.scene_of({"prompt_id": "x", "prompt": "a photo of a dog on the moon.", "entity_id": None})


def test_simulated_raters_give_table2_and_figure5_by_split(setup):
    study, world, prompts = setup["study"], setup["world"], setup["prompts"]
    res = simulate(study, world, setup["oracle"], n_raters=3, noise=0.1, seed=0)
    n = len(prompts)
    assert res["raters"] == ["sim-judge-1", "sim-judge-2", "sim-judge-3"]
    assert res["written"] == 3 * 2 * n and res["skipped"] == 0
    rows = read_rows(study.db_path)
    assert len(rows) == 3 * 2 * n
    assert all(r["source"] == SIM_SOURCE and r["rater"].startswith("sim-judge-") and r["n_submits"] == 1
               for r in rows)
    rep = write_report(study, setup["tmp"] / "report")
    t2 = {r["model"]: r for r in rep["table2"]}
    good, bad = t2["with-retrieval"], t2["without-retrieval"]
    assert good["faithfulness_all"] > bad["faithfulness_all"]
    assert good["faithfulness_all"] >= 0.75 and bad["faithfulness_all"] <= 0.25  # majority of 3 at 10 % flips
    per_split = {s: sum(p.split == s for p in prompts) for s in ("frequent", "infrequent", "unseen")}
    for r in (good, bad):
        assert r["n_tasks"] == n == sum(r[f"faithfulness_{s}_n"] for s in per_split)
        assert {s: r[f"faithfulness_{s}_n"] for s in per_split} == per_split
    md = rep["markdown"]
    # Table 2: the world runs' categories are their splits, in split order
    assert "| Model | Frequent | Infrequent | Unseen | All | Photorealism (All) | Tasks |" in md
    assert "SIMULATED raters" in md and "not human judgements" in md
    assert "| Model | Frequent | Infrequent | Unseen |" in md and "by entity frequency split" in md
    assert "3 simulated rater(s)" in md and "flip noise 0.1" in md
    agree = {a["criterion"]: a for a in rep["agreement"]}
    assert agree["faithfulness"]["tasks_with_2plus_raters"] == 2 * n
    assert agree["faithfulness"]["fleiss_raters_per_task"] == 3 and agree["faithfulness"]["fleiss_kappa"] > 0.3
    votes = next(p for p in rep["files"] if p.name == "majority_votes.csv").read_text()
    assert "unseen" in votes and "n_simulated" in votes
    settings = json.loads((study.folder / "simulated.json").read_text())
    assert "SIMULATED" in settings["note"] and set(settings["raters"]) == set(res["raters"])


def test_noise_free_raters_are_exact_per_split(setup):
    study = setup["study"]
    simulate(study, setup["world"], setup["oracle"], n_raters=2, noise=0.0)
    t2 = {r["model"]: r for r in write_report(study, setup["tmp"] / "rep")["table2"]}
    for s in ("frequent", "infrequent", "unseen"):
        assert t2["with-retrieval"][f"faithfulness_{s}"] == 1.0
        assert t2["without-retrieval"][f"faithfulness_{s}"] == 0.0
    assert t2["with-retrieval"]["photorealism_all"] == 1.0


def test_rerun_is_an_idempotent_skip_force_rerates_other_settings_are_refused(setup):
    study, world, oracle = setup["study"], setup["world"], setup["oracle"]
    first = simulate(study, world, oracle, n_raters=2, noise=0.2, seed=3)
    before = {(r["rater"], r["task_id"]): r for r in read_rows(study.db_path)}
    calls = oracle.calls
    again = simulate(study, world, oracle, n_raters=2, noise=0.2, seed=3)
    assert again["written"] == 0 and again["skipped"] == first["written"]
    assert oracle.calls == calls  # nothing left to read
    after = {(r["rater"], r["task_id"]): r for r in read_rows(study.db_path)}
    assert after == before  # no double submission: n_submits and updated_at unchanged
    more = simulate(study, world, oracle, n_raters=3, noise=0.2, seed=3)  # one more rater: only it rates
    assert more["per_rater"]["sim-judge-3"] == (len(study.tasks), 0) and more["skipped"] == first["written"]
    with pytest.raises(ValueError, match="other settings.*noise"):
        simulate(study, world, oracle, n_raters=2, noise=0.3, seed=3)
    forced = simulate(study, world, oracle, n_raters=2, noise=0.2, seed=3, force=True)
    assert forced["written"] == first["written"]
    rows = {(r["rater"], r["task_id"]): r for r in read_rows(study.db_path)}
    for key, r in before.items():  # same seed, same answers; the store counts the resubmission
        assert (rows[key]["faithfulness"], rows[key]["photorealism"]) == (r["faithfulness"], r["photorealism"])
        assert rows[key]["n_submits"] == 2


def test_best_of_4_raters_pick_the_faithful_candidate(tmp_path, tiny):
    world, prompts = tiny
    prompts = prompts[:4]
    truth = make_world_run(tmp_path / "mixed", world, prompts, lambda i: i == 2, samples=4, scored=False)
    study = build_study([tmp_path / "mixed"], tmp_path / "study", "best-of-4")
    simulate(study, world, Oracle(world, truth), n_raters=2, noise=0.0)
    rows = read_rows(study.db_path)
    assert len(rows) == 2 * len(prompts) and all(r["faithfulness"] == 1 for r in rows)
    for r in rows:
        assert study.image_path(r["chosen_image"]).name.endswith("__2.png")


def test_reports_keep_human_and_simulated_ratings_apart(setup):
    study = setup["study"]
    simulate(study, setup["world"], setup["oracle"], n_raters=1, noise=0.0)
    with pytest.raises(ValueError, match="no human ratings"):
        write_report(study, setup["tmp"] / "h", sources="human")
    store = RatingStore(study, {"alice-token-0001": "alice"})
    store.submit("alice-token-0001", sorted(study.tasks)[0], 1, 1)
    store.close()
    mixed = write_report(study, setup["tmp"] / "all")["markdown"]
    assert "human evaluation" in mixed and "Warning: " in mixed and "are SIMULATED" in mixed
    human = write_report(study, setup["tmp"] / "h", sources="human")
    assert "SIMULATED" not in human["markdown"] and sum(r["n_tasks"] for r in human["table2"]) == 1


def test_rater_lists_refuse_simulated_rater_ids(tmp_path):
    bad = tmp_path / "raters.txt"
    bad.write_text("sim-judge-1 some-long-token-0001\n")
    with pytest.raises(ValueError, match="simulated raters"):
        read_raters(bad)
    with pytest.raises(ValueError, match="simulated raters"):
        make_raters(["sim-judge-9"], tmp_path / "new.txt")


def test_load_world_checks_the_manifest(tmp_path, tiny):
    world, _ = tiny
    root = _world_root(tmp_path, world)
    assert load_world(root).fingerprint() == world.fingerprint() == load_world(root / "world.json").fingerprint()
    with pytest.raises(FileNotFoundError, match="toy build"):
        load_world(tmp_path / "nowhere")
    (root / "world.json").write_text(json.dumps({"spec": asdict(world.spec), "fingerprint": "0" * 16}))
    with pytest.raises(ValueError, match="the world code changed"):
        load_world(root)


# ---------------------------------------------------------------------------------------------- CLI

@pytest.fixture
def cli():
    app = typer.Typer()
    app.add_typer(rate_app, name="rate")
    return lambda *a: CliRunner().invoke(app, [str(x) for x in a])


def test_cli_missing_judge_weights_is_one_clear_error(setup, cli):
    res = cli("rate", "simulate", "--study", setup["study"].folder, "--world", setup["root"],
              "--judge", setup["tmp"] / "no-judge")
    assert res.exit_code == 2, res.output
    assert "no judge weights" in res.output and "toy judge" in res.output and "Traceback" not in res.output
    assert read_rows(setup["study"].db_path) == []
    res = cli("rate", "simulate", "--study", setup["study"].folder, "--world", setup["tmp"] / "nowhere")
    assert res.exit_code == 2 and "no world.json" in res.output


def test_cli_simulate_then_report(setup, cli, monkeypatch):
    monkeypatch.setattr(JudgeReader, "from_path", classmethod(lambda cls, path, world, **kw: setup["oracle"]))
    args = ("rate", "simulate", "--study", setup["study"].folder, "--world", setup["root"], "--raters", "3")
    res = cli(*args)
    assert res.exit_code == 0, res.output
    n = 3 * len(setup["study"].tasks)
    assert f"{n} ratings written, 0 already rated" in res.output and "SIMULATED" in res.output
    res = cli(*args)
    assert res.exit_code == 0 and f"0 ratings written, {n} already rated and skipped" in res.output
    res = cli("rate", "report", "--study", setup["study"].folder, "--out", setup["tmp"] / "rep")
    assert res.exit_code == 0, res.output
    assert "SIMULATED raters" in res.output and "| Model | Frequent | Infrequent | Unseen |" in res.output
    assert (setup["tmp"] / "rep" / "figure5.png").read_bytes()[:4] == b"\x89PNG"
    res = cli("rate", "report", "--study", setup["study"].folder, "--out", setup["tmp"] / "rep", "--sources", "x")
    assert res.exit_code == 2 and "unknown sources" in res.output


def test_shipped_judge_rates_correct_renders_as_faithful(setup):
    reader = JudgeReader.from_path(WEIGHTS, setup["world"], calibration=64)
    res = simulate(setup["study"], setup["world"], reader, n_raters=1, noise=0.0)
    assert res["written"] == len(setup["study"].tasks)
    t2 = {r["model"]: r for r in write_report(setup["study"], setup["tmp"] / "rep")["table2"]}
    assert t2["with-retrieval"]["faithfulness_all"] >= 0.9 and t2["without-retrieval"]["faithfulness_all"] <= 0.1
    assert t2["with-retrieval"]["photorealism_all"] >= 0.6  # clean renders; the threshold is their 5 % quantile
    assert 0 < reader.info["photoreal_threshold"] <= 1 and "judge_sha256" in reader.info


def test_control_items_and_repeats_score_the_raters_and_never_count_in_table2(setup):
    world, prompts, tmp = setup["world"], setup["prompts"], setup["tmp"]
    oracle = setup["oracle"]
    for p in prompts:  # the oracle also knows the reference photos (the controls' images)
        ref = np.asarray(Image.open(tmp / "with" / "_refs" / f"{p.entity}.png").convert("RGB"))
        oracle.truth[ref.tobytes()] = Scene(p.entity, 1, "left", "grass")
    runs = [f"with-retrieval={tmp / 'with'}", f"without-retrieval={tmp / 'without'}"]
    study = build_study(runs, tmp / "qc", "best", controls=3, repeats=4)
    kinds = [t.get("control", {}).get("kind") for t in study.tasks.values()]
    assert kinds.count("photorealism") == 3 and kinds.count("faithfulness") == 3
    assert sum("repeat_of" in t for t in study.tasks.values()) == 4 and len(study.tasks) == 2 * len(prompts) + 10
    for tid, t in study.tasks.items():  # a control looks like any task to the rater
        assert set(study.rater_view(tid)) == set(study.rater_view(next(iter(study.tasks))))
        assert "control" not in json.dumps(study.rater_view(tid)) and "_refs" not in json.dumps(study.rater_view(tid))
    simulate(study, world, oracle, n_raters=3, noise=0.0, seed=0)  # exact readers: every control as expected
    store = RatingStore(study)
    try:  # a careless rater: every control answered against its expected answer
        for tid, t in study.tasks.items():
            exp = t.get("control", {}).get("expected", {})
            store.record("mallory", tid, 1 - exp.get("faithfulness", 0), 1 - exp.get("photorealism", 0))
    finally:
        store.close()
    rep = write_report(study, tmp / "rep")
    q = {r["rater"]: r for r in rep["quality"]}
    assert q["mallory"]["control_accuracy"] == 0 and not q["mallory"]["passes"]
    assert all(q[r]["passes"] and q[r]["control_accuracy"] == 1 and q[r]["repeats"] == 4 and q[r]["consistency"] == 1
               for r in ("sim-judge-1", "sim-judge-2", "sim-judge-3"))
    t2 = {r["model"]: r for r in rep["table2"]}
    assert set(t2) == {"with-retrieval", "without-retrieval"} and all(r["n_tasks"] == len(prompts) for r in t2.values())
    assert "Failing raters are kept" in rep["markdown"] and "| mallory |" in rep["markdown"]
    clean = write_report(study, tmp / "rep2", exclude_failing=True)
    assert "Excluded from every table above: mallory" in clean["markdown"]
    assert clean["table2"][0]["faithfulness_all"] >= rep["table2"][0]["faithfulness_all"]  # mallory said 1 vs 0
    bad = tmp / "controls.jsonl"
    bad.write_text(json.dumps({"image": str(tmp / "with" / "_refs" / f"{prompts[0].entity}.png"), "prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="needs its expected answer"):
        build_study(runs, tmp / "qc2", "best", control_file=bad)
    assert not (tmp / "qc2").exists()


def test_rate_all_compares_the_raters_pick_with_the_reranker_and_any_of_four(tmp_path, tiny):
    from human_eval.store import read_candidate_rows

    world, prompts = tiny
    truth = make_world_run(tmp_path / "four", world, prompts, lambda i: i == 2, samples=4)  # only sample 2 is right
    study = build_study([f"reimagen={tmp_path / 'four'}"], tmp_path / "study", "rate-all")
    simulate(study, world, Oracle(world, truth), n_raters=2, noise=0.0, seed=0)
    assert len(read_candidate_rows(study.db_path)) == 2 * 4 * len(prompts)  # every image of every task
    rep = write_report(study, tmp_path / "rep")
    (b,) = rep["best_of_n"]
    # the raters pick the right sample (faithful), the reranker marked sample 0 (selected, wrong); any of 4: right
    assert (b["faithfulness_human"], b["faithfulness_reranker"], b["faithfulness_any"]) == (1.0, 0.0, 1.0)
    assert b["pick_agreement"] == 0.0 and b["picks_compared"] == 2 * len(prompts)
    assert "Raters' pick | Reranker's pick | Any of N" in rep["markdown"]
    with pytest.raises(ValueError, match="rate every one"):
        store = RatingStore(study)
        try:
            tid = next(iter(study.tasks))
            store.record("x", tid, 1, 1, study.tasks[tid]["candidates"][0]["image_id"],
                         per_image={study.tasks[tid]["candidates"][0]["image_id"]: (1, 1)})
        finally:
            store.close()
