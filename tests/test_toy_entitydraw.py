"""EntityDrawBench on the toy world (entitydrawbench/world.py and the --world paths of entitydrawbench/cli.py).

A tiny world (8 entities: 1 frequent, 4 infrequent, 2 unseen) built in a temporary folder, a tiny-16 base stage
and a tiny-sr32 super-resolution stage with random weights, 2 sampling steps, and an untrained judge saved as
the trained one is. The images and verdicts mean nothing; the tests check the machinery: the run folder, the
prompts per split, the neighbours, resume, the judge's fields and the per-split tables, sweeps and refusals.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from conftest import make_model, randomize
from entitydrawbench.cli import register
from reimagen.models.text import TinyTextEncoder
from reimagen.models.checkpoint import save_checkpoint

SPEC = dict(seed=0, n_entities=8, n_unseen=2, corpus_size=200, zipf_s=3.0, zipf_q=0.0, n_references=3,
            validation_size=8)
FAST = ["--steps", "2", "--sr-steps", "2", "--batch-size", "8"]


@pytest.fixture(scope="module")
def tw(tmp_path_factory):
    from toyworld.build import build_world_files
    from toyworld.judge import Judge, save_judge
    from toyworld.world import World, WorldSpec

    root = tmp_path_factory.mktemp("toyedb")
    world = World(WorldSpec(**SPEC))
    build_world_files(world, root / "world", progress=False)
    enc = TinyTextEncoder(dim=32, seed=0).eval()
    save_checkpoint(root / "base", randomize(make_model("tiny-16", seed=0)), enc)
    save_checkpoint(root / "sr", randomize(make_model("tiny-sr32", seed=1), seed=1), enc)
    torch.manual_seed(0)
    save_judge(Judge().eval(), root / "judge", {"world": world.fingerprint(), "test_accuracy": {"shape": 0.2}})
    app = typer.Typer()
    register(app)
    return {"root": root, "world": world, "wdir": root / "world", "judge": root / "judge", "app": app}


def invoke(tw, *args, env=None):
    return CliRunner().invoke(tw["app"], [str(a) for a in args], env=env)


def world_args(tw, out, *extra):
    return ["entitydraw", "--world", tw["wdir"], "--model", tw["root"] / "base", "--model", tw["root"] / "sr",
            "--k", "2", "--eta", "0.5", "--out", out, "--per-split", "2", "--samples-per-prompt", "2",
            "--judge", tw["judge"], *FAST, *extra]


def rows_of(run):
    return [json.loads(line) for line in (run / "images.jsonl").read_text().splitlines()]


def pixels(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*__*.png"))}


@pytest.fixture(scope="module")
def run(tw):
    out = tw["root"] / "run"
    res = invoke(tw, *world_args(tw, out))
    assert res.exit_code == 0, res.output
    return out, res


def test_per_split_limits_one_split_differently(tw):
    from entitydrawbench.cli import parse_per_split
    from entitydrawbench.world import WorldBench

    assert parse_per_split("3") == 3 and parse_per_split(None) is None
    assert parse_per_split("1,unseen=2") == {"frequent": 1, "infrequent": 1, "unseen": 2}
    assert parse_per_split("infrequent=3") == {"infrequent": 3}  # the others whole
    bench = WorldBench.open(tw["wdir"])
    full = bench.prompt_table()
    rows = bench.prompt_table({"infrequent": 3, "unseen": 1})
    by = {s: [r["prompt_id"] for r in rows if r["split"] == s] for s in ("frequent", "infrequent", "unseen")}
    first = {s: [r["prompt_id"] for r in full if r["split"] == s] for s in by}
    assert by == {"frequent": first["frequent"], "infrequent": first["infrequent"][:3], "unseen": first["unseen"][:1]}
    assert len(by["infrequent"]) == 3 < len(first["infrequent"])


def test_world_run_folder_prompts_per_split_and_metadata(tw, run):
    out, res = run
    splits = tw["world"].frequency_splits()
    assert {k: len(v) for k, v in splits.items()} == {"frequent": 1, "infrequent": 4, "unseen": 2}
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    # --per-split 2: the first 2 entities of each split (all of the frequent one)
    want = {s: ids[:2] for s, ids in splits.items()}
    assert {s: [p["entity_id"] for p in prompts if p["split"] == s] for s in want} == want
    assert all(p["prompt_id"] == f"{p['split']}-{p['entity_id']}" for p in prompts)
    # the prompts are the world's bench prompts (the same scene as in the full set, whatever --per-split)
    bench = {bp.id: bp for bp in tw["world"].bench_prompts()}
    for p in prompts:
        bp = bench[p["prompt_id"]]
        assert p["prompt"] == bp.text and (p["count"], p["position"], p["background"]) == (
            bp.scene.count, bp.scene.position, bp.scene.background)
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["benchmark"] == "entitydrawbench-toyworld-v1" and manifest["world"] == tw["world"].fingerprint()
    assert manifest["k"] == 2 and manifest["n_prompts"] == 5 and manifest["samples_per_prompt"] == 2
    assert "InterleavedGuidance(w_p=3.0, w_n=3.0, eta=0.5)" in manifest["stages"][0]["guidance"]  # world defaults
    from entitydrawbench.world import WORLD_DEFAULTS

    assert f"sampler='{WORLD_DEFAULTS['sampler']}'" in manifest["stages"][0]["settings"]
    imgs = pixels(out)
    assert len(imgs) == 10 and all(a.shape == (32, 32, 3) for a in imgs.values())
    rows = rows_of(out)
    assert sorted(r["image"] for r in rows) == sorted(imgs)
    counts = tw["world"].corpus_counts
    for r in rows:
        assert r["image"] == f"{r['prompt_id']}__{r['sample_index']}.png" and r["category"] == r["split"]
        assert r["frequent"] == {"frequent": True, "infrequent": False, "unseen": None}[r["split"]]
        assert r["frequency_score"] == counts[r["entity_id"]] and r["name"] in r["prompt"]
        assert len(r["reference_images"]) == 3 and r["reference_image"] == r["reference_images"][0]
        assert all((out / "references").resolve() / p.rsplit("/", 1)[1] == type(out)(p) for p in r["reference_images"])
    assert "s per image" in res.output.replace("\n", " ")
    # judged automatically (a judge was given and the run is complete)
    assert all(isinstance(r["faithful"], bool) for r in rows) and (out / "summary.md").is_file()


def test_neighbours_of_an_unseen_entity_are_its_own_reference_pairs(tw, run):
    out, _ = run
    world = tw["world"]
    unseen = [r for r in rows_of(out) if r["split"] == "unseen"]
    assert unseen and all(not world.by_id[r["entity_id"]].seen for r in unseen)
    for r in unseen:
        eid = r["entity_id"]
        assert r["neighbour_ids"] == [f"{eid}:0", f"{eid}:1"]
        assert r["neighbour_texts"] == [world.reference_caption(eid)] * 2
        # the reference files are the world's renders of this entity's reference scenes
        idx = [i for i, s in enumerate(world.references) if s.entity == eid]
        for i, path in zip(idx, r["reference_images"]):
            assert np.array_equal(np.asarray(Image.open(path).convert("RGB")),
                                  world.render(world.references[i], ("references", i)))


def test_resume_makes_identical_images_and_other_settings_are_refused(tw, run, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(run[0], out)
    victims = sorted(out.glob("*__*.png"))[::2]
    for p in victims:
        p.unlink()
    res = invoke(tw, *world_args(tw, out))
    assert res.exit_code == 0 and f"made {len(victims)}" in res.output.replace("\n", " "), res.output
    ref, got = pixels(run[0]), pixels(out)
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)
    before = (out / "images.jsonl").read_bytes()
    res = invoke(tw, *world_args(tw, out, "--w-text", "5"))
    assert res.exit_code == 2 and "other settings" in res.output
    assert (out / "images.jsonl").read_bytes() == before


def test_judge_scoring_adds_fields_and_the_per_split_tables_add_up(tw, run, tmp_path):
    import pandas as pd

    from toyworld.judge import load_judge, verdicts
    from toyworld.world import Scene

    out = tmp_path / "scored"
    shutil.copytree(run[0], out)
    plain = [{k: v for k, v in r.items() if k not in ("look_ok", "scene_ok", "faithful", "attributes_ok", "judge",
                                                      "judge_match", "selected", "select_score", "judge_faithful",
                                                      "subject_sim")}
             for r in rows_of(out)]
    res = invoke(tw, "entitydraw-score", out, "--judge", tw["judge"], "--label", "reimagen")
    assert res.exit_code == 0, res.output
    rows = rows_of(out)
    assert [{k: r[k] for k in p} for r, p in zip(rows, plain)] == plain  # only fields were added
    for r in rows:
        assert r["faithful"] == (r["look_ok"] and r["scene_ok"])
        assert set(r["judge"]) == {"shape", "body", "pattern", "pattern_colour", "background", "count", "position"}
        assert r["look_ok"] == all(r["judge_match"][a] for a in ("shape", "body", "pattern", "pattern_colour")
                                   if a in r["judge_match"])
        assert r["scene_ok"] == all(r["judge_match"][a] for a in ("background", "count", "position"))
        assert r["attributes_ok"] == f"{sum(r['judge_match'].values())}/{len(r['judge_match'])}"
    # independently: the judge on one image, read at the world's size as the scorer reads it (this tiny cascade
    # draws 32 px; the world's images are 64 px)
    from toyworld.world import IMAGE_SIZE

    r = rows[3]
    im = Image.open(out / r["image"]).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255
    v = verdicts(load_judge(tw["judge"]), tw["world"], x, [Scene(r["entity_id"], r["count"], r["position"],
                                                                  r["background"])])[0]
    assert (v.look_ok, v.scene_ok, v.faithful) == (r["look_ok"], r["scene_ok"], r["faithful"])
    # the automatic scores: P(faithful) = the product of the asked values' probabilities; features' cosine
    judge = load_judge(tw["judge"]).eval()
    with torch.no_grad():
        logits = judge(x)
        ref = torch.from_numpy(np.array(Image.open(out / r["reference_image"]).convert("RGB"))).permute(2, 0, 1)
        cos = torch.nn.functional.cosine_similarity(judge.features(x), judge.features(ref[None].float() / 255))
    from toyworld.judge import HEADS, judged_attributes
    from toyworld.world import scene_attributes

    truth = scene_attributes(tw["world"], Scene(r["entity_id"], r["count"], r["position"], r["background"]))
    want = np.prod([float(logits[a][0].softmax(-1)[HEADS[a].index(truth[a])]) for a in judged_attributes(truth)])
    assert r["judge_faithful"] == pytest.approx(want, abs=2e-6) and r["subject_sim"] == pytest.approx(float(cos),
                                                                                                     abs=2e-6)
    assert all(0 <= x["judge_faithful"] <= 1 and -1 <= x["subject_sim"] <= 1 for x in rows)
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    for group in by_prompt.values():
        chosen = [r for r in group if r["selected"]]
        assert len(chosen) == 1 and chosen[0]["faithful"] == any(r["faithful"] for r in group)
    csv = pd.read_csv(out / "summary.csv")
    assert set(csv.model) == {"reimagen"} and set(csv.split) == {"frequent", "infrequent", "unseen", "all"}
    for selection, total in (("per_image", len(rows)), ("best_of_n", len(by_prompt))):
        for metric in ("faithful", "look_ok", "scene_ok"):
            sub = csv[(csv.selection == selection) & (csv.metric == metric)].set_index("split")
            assert sub.loc["all", "n"] == total
            assert sub.loc[["frequent", "infrequent", "unseen"], "n"].sum() == total
            assert sub.loc["all", "mean"] * total == pytest.approx(
                (sub.loc[["frequent", "infrequent", "unseen"], "mean"] * sub.loc[["frequent", "infrequent", "unseen"],
                                                                               "n"]).sum())
            members = [r for r in rows if selection == "per_image" or r["selected"]]
            assert sub.loc["unseen", "mean"] == pytest.approx(
                np.mean([r[metric] for r in members if r["split"] == "unseen"]))
    shape = csv[(csv.metric == "attr:shape") & (csv.split == "all")]
    assert shape["mean"].item() == pytest.approx(np.mean([r["judge_match"]["shape"] for r in rows]))
    attrs = csv[csv.metric.str.startswith("attr:") & csv["sem"].notna()]  # rates with 95% intervals inside [0, 1]
    assert len(attrs) and (attrs.ci_lo <= attrs["mean"]).all() and (attrs["mean"] <= attrs.ci_hi).all()
    assert (attrs.ci_lo >= 0).all() and (attrs.ci_hi <= 1).all()
    md = (out / "summary.md").read_text()
    assert "| Model | Frequent | Infrequent | Unseen | All |" in md and "not human raters" in md
    assert "clustered by prompt" in md
    assert (out / "summary.png").stat().st_size > 10_000
    scores = json.loads((out / "scores.json").read_text())
    assert scores["n_scored"] == len(rows) and scores["judge"]["world"] == tw["world"].fingerprint()


def test_best_of_n_and_rates_with_known_verdicts(tw, run, tmp_path, monkeypatch):
    """With scripted verdicts the selection and every rate are known exactly."""
    import toyworld.judge as judge_mod
    from entitydrawbench.world import load_world_judge, score_world_run

    out = tmp_path / "scripted"
    shutil.copytree(run[0], out)
    script = {}  # image -> (look_ok, scene_ok)
    for r in rows_of(out):
        if r["split"] == "unseen":
            script[r["image"]] = (False, r["sample_index"] == 1)  # never faithful
        else:
            script[r["image"]] = (True, r["sample_index"] == 1)  # faithful only in sample 1
    order = iter(rows_of(out))  # judge_rows judges the rows in file order

    def fake(judge, world, images, scenes):
        out_ = []
        for _ in scenes:
            r = next(order)
            look, scene = script[r["image"]]
            out_.append(judge_mod.Verdict(look, scene, {a: None for a in judge_mod.ATTRIBUTES}))
        return out_

    monkeypatch.setattr(judge_mod, "verdicts", fake)
    judge, info = load_world_judge(tw["judge"], tw["world"].fingerprint())
    summary = score_world_run(out, judge=judge, judge_info=info, label="m")
    rows = rows_of(out)
    assert all(r["selected"] == (r["sample_index"] == 1) for r in rows if r["split"] != "unseen")
    rec = {(r["selection"], r["metric"], r["split"]): r for r in summary["records"]}
    assert rec[("best_of_n", "faithful", "frequent")]["mean"] == 1.0
    assert rec[("best_of_n", "faithful", "unseen")]["mean"] == 0.0
    assert rec[("per_image", "faithful", "infrequent")]["mean"] == 0.5
    assert rec[("per_image", "look_ok", "all")]["mean"] == pytest.approx(6 / 10)
    assert rec[("best_of_n", "faithful", "all")]["mean"] == pytest.approx(3 / 5)
    # per image, the error is clustered by prompt: scene_ok is 0.5 within every prompt, so the prompts do not vary
    # (the i.i.d. formula would say std([0, 1] * 5) / sqrt(10) = 0.17); best of N has one image per prompt
    assert rec[("per_image", "scene_ok", "all")]["sem"] == pytest.approx(0.0, abs=1e-12)
    best = [1.0 if r["split"] != "unseen" else 0.0 for r in rows if r["selected"]]
    assert rec[("best_of_n", "faithful", "all")]["sem"] == pytest.approx(np.std(best, ddof=1) / np.sqrt(len(best)))


def test_summary_compares_runs_with_and_without_retrieval(tw, run, tmp_path):
    import pandas as pd

    without = tmp_path / "without"
    res = invoke(tw, *world_args(tw, without, "--no-retrieval"))
    assert res.exit_code == 0, res.output
    manifest = json.loads((without / "run.json").read_text())
    assert "use_neighbours=False" in manifest["stages"][0]["guidance"] and "k" not in manifest
    assert all(r["neighbour_ids"] == [] and len(r["reference_images"]) == 3 for r in rows_of(without))
    res = invoke(tw, "entitydraw-summary", f"retrieval={run[0]}", f"text-only={without}", "--out", tmp_path / "cmp")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "cmp.md").read_text()
    assert "| retrieval |" in md and "| text-only |" in md and (tmp_path / "cmp.png").stat().st_size > 10_000
    csv = pd.read_csv(tmp_path / "cmp.csv")
    # per model: 2 selections x (3 judged rates + 2 automatic scores) x 4 groups, and 7 attribute rates x 4
    # groups (per image)
    assert set(csv.model) == {"retrieval", "text-only"} and len(csv) == 2 * (2 * 5 * 4 + 7 * 4)
    ok = csv.dropna(subset=["ci_lo"])
    assert len(ok) and ((ok.ci_lo <= ok["mean"] + 1e-12) & (ok["mean"] <= ok.ci_hi + 1e-12)).all()
    other = tmp_path / "other-seed"  # the same run recorded under another seed: another protocol
    shutil.copytree(without, other)
    manifest = json.loads((other / "run.json").read_text())
    (other / "run.json").write_text(json.dumps(dict(manifest, seed=manifest["seed"] + 1)))
    res = invoke(tw, "entitydraw-summary", f"retrieval={run[0]}", f"other={other}", "--out", tmp_path / "mixed")
    assert res.exit_code == 2 and "different protocols" in res.output and "seed" in res.output
    assert not (tmp_path / "mixed.md").exists()
    res = invoke(tw, "entitydraw-summary", f"retrieval={run[0]}", f"other={other}", "--out", tmp_path / "mixed",
                 "--allow-different")
    assert res.exit_code == 0 and "PROTOCOLS DIFFER: other differs from retrieval in seed" in (
        tmp_path / "mixed.md").read_text()
    unjudged = tmp_path / "unjudged"
    shutil.copytree(without, unjudged)
    (unjudged / "scores.json").unlink()
    res = invoke(tw, "entitydraw-summary", f"a={run[0]}", f"b={unjudged}", "--out", tmp_path / "bad")
    assert res.exit_code == 2 and "not judged yet" in res.output


def test_sweeps_over_eta_and_guidance(tw, tmp_path):
    import pandas as pd

    common = ["--world", tw["wdir"], "--model", tw["root"] / "base", "--per-split", "1", "--samples-per-prompt", "1",
              "--judge", tw["judge"], *FAST]
    out = tmp_path / "sweep"
    res = invoke(tw, "entitydraw-sweep", "--param", "eta", "--values", "0,1", "--out", out, *common)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out / "sweep_eta.csv")
    assert list(table["eta"]) == [0.0, 1.0] and list(table["prompts"]) == [3, 3]
    assert {"look_ok_all", "scene_ok_all", "faithful_all", "faithful_unseen_best"} <= set(table.columns)
    md = (out / "sweep_eta.md").read_text()
    assert (out / "sweep_eta.png").stat().st_size > 10_000 and "Figure 8" in md
    # the per-attribute rates are in the markdown too: all splits, unseen in brackets, as in the CSV
    attr_rows = md.split("## Per attribute")[1].strip().splitlines()[4:]
    assert len(attr_rows) == 2 and attr_rows[0].startswith("| 0.0 | ")
    assert f"{table['attr:body_all'][0]:.2f} ({table['attr:body_unseen'][0]:.2f})" in attr_rows[0]
    a, b = pixels(out / "eta=0.0"), pixels(out / "eta=1.0")
    assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)  # eta reaches the sampler
    res = invoke(tw, "entitydraw-sweep", "--param", "guidance", "--values", "joint,weighted,interleaved",
                 "--out", out, *common)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out / "sweep_guidance.csv")
    assert list(table["guidance"]) == ["joint", "weighted", "interleaved"]
    kinds = [json.loads((out / f"guidance={g}" / "run.json").read_text())["stages"][0]["guidance"]
             for g in table["guidance"]]
    assert kinds[0].startswith("JointGuidance") and kinds[1].startswith("WeightedGuidance")
    assert kinds[2].startswith("InterleavedGuidance") and (out / "sweep_guidance.png").is_file()
    res = invoke(tw, "entitydraw-sweep", "--param", "guidance", "--values", "joint,best", "--out", out, *common)
    assert res.exit_code == 2 and "unknown guidance 'best'" in res.output


def test_k_above_the_references_is_topped_up_from_the_world_kb(tw, tmp_path):
    out = tmp_path / "k4"
    res = invoke(tw, "entitydraw", "--world", tw["wdir"], "--model", tw["root"] / "base", "--k", "4", "--kb",
                 tw["wdir"] / "kb.parquet", "--per-split", "1", "--samples-per-prompt", "1", "--out", out,
                 "--judge", tw["judge"], *FAST)
    assert res.exit_code == 0, res.output
    rows = {r["split"]: r for r in rows_of(out)}
    freq = rows["frequent"]
    name = tw["world"].by_id[freq["entity_id"]].name
    assert freq["neighbour_ids"][:3] == [f"{freq['entity_id']}:{j}" for j in range(3)]
    # the 4th is a corpus pair of the same entity (BM25 on its name), not one of its reference pairs again
    assert len(freq["neighbour_ids"]) == 4 and freq["neighbour_ids"][3].startswith("c")
    assert name in freq["neighbour_texts"][3]
    # an unseen entity has no corpus pair: the slot stays empty (masked)
    assert len(rows["unseen"]["neighbour_ids"]) == 3
    assert "fewer than k = 4" in res.output.replace("\n", " ")


@pytest.mark.parametrize("extra, message", [
    (["--k", "4"], "the world has 3 reference pairs per entity"),
    (["--eta", "1.5"], "Invalid value for '--eta'"),
    (["--per-split", "0"], "per-split limit must be >= 1"),
    (["--per-split", "2,rare=3"], "unknown frequency split 'rare'"),
    (["--per-split", "2,unseen=x"], "'unseen=x' is not N or SPLIT=N"),
    (["--references", "."], "cannot be used with --world"),
    (["--categories", "dogs"], "cannot be used with --world"),
])
def test_bad_input_is_one_red_line_and_writes_nothing(tw, tmp_path, extra, message):
    out = tmp_path / "run"
    res = invoke(tw, *world_args(tw, out, *extra))
    assert res.exit_code == 2, res.output
    assert message in res.output.replace("\n", " ") and "Traceback" not in res.output
    assert not out.exists()


def test_missing_world_folder_other_worlds_judge_and_judge_without_world(tw, run, tmp_path):
    from toyworld.judge import Judge, save_judge

    out = tmp_path / "run"
    res = invoke(tw, "entitydraw", "--world", tmp_path / "nowhere", "--model", tw["root"] / "base", "--out", out)
    assert res.exit_code == 2 and "does not exist" in res.output and "toy build" in res.output
    assert not out.exists()
    res = invoke(tw, "entitydraw", "--per-split", "1", "--model", tw["root"] / "base", "--out", out, *FAST)
    assert res.exit_code == 2 and "need --world" in res.output and not out.exists()
    save_judge(Judge(), tmp_path / "other_judge", {"world": "0123456789abcdef"})
    res = invoke(tw, "entitydraw-score", run[0], "--judge", tmp_path / "other_judge")
    assert res.exit_code == 2 and "trained on world 0123456789abcdef" in res.output
    res = invoke(tw, "entitydraw-score", run[0], "--judge", tmp_path / "no_judge")
    assert res.exit_code == 2 and "no judge weights" in res.output
