"""human_eval: blind tasks, the SQLite ratings store (validation, security, 8 concurrent writers), the reports
(Table 2 numbers, Fleiss' kappa / Krippendorff's alpha on published examples) and the `rate` CLI."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import sqlite3

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from human_eval.cli import rate_app
from human_eval.report import collect, majority, mean_se, table2, write_report
from human_eval.stats import correlations, fleiss_kappa, krippendorff_alpha, units_matrix
from human_eval.store import RatingStore, read_rows
from human_eval.tasks import Study, build_study, make_raters, read_raters
from human_eval.testing import make_run

TOKENS = {"alice": "alice-token-0001", "bob": "bob-token-00002", "carol": "carol-token-0003"}


@pytest.fixture
def world(tmp_path):
    runs = {"reimagen": make_run(tmp_path / "reimagen", seed=0), "imagen": make_run(tmp_path / "imagen", seed=1)}
    raters = tmp_path / "raters.txt"
    raters.write_text("# rater token\n" + "".join(f"{r} {t}\n" for r, t in TOKENS.items()))
    study = build_study([f"{k}={v}" for k, v in runs.items()], tmp_path / "study", "best")
    return {"tmp": tmp_path, "runs": runs, "study": study, "raters": raters,
            "store": RatingStore(study, read_raters(raters))}


def test_tasks_are_blind_and_ids_opaque(world):
    study = world["study"]
    assert len(study.tasks) == 8  # 2 models x 2 categories x 2 entities
    for tid in study.tasks:
        view = json.dumps(study.rater_view(tid))
        for secret_word in ("reimagen", "imagen", str(world["tmp"]), ".png", "__"):
            assert secret_word not in view
    assert all(len(t["candidates"]) == 1 and t["candidates"][0]["selected"] for t in study.tasks.values())


def test_rebuilding_the_study_keeps_ids_and_other_runs_are_refused(world):
    again = build_study([f"{k}={v}" for k, v in world["runs"].items()], world["tmp"] / "study", "best")
    assert set(again.tasks) == set(world["study"].tasks) and again.images == world["study"].images
    with pytest.raises(ValueError, match="other runs or another mode"):
        build_study([f"{k}={v}" for k, v in world["runs"].items()], world["tmp"] / "study", "best-of-4")


def test_order_is_a_per_rater_permutation(world):
    study = world["study"]
    a, b = study.order_for("alice"), study.order_for("bob")
    assert sorted(a) == sorted(b) == sorted(study.tasks) and a != b and a == study.order_for("alice")


def test_best_mode_needs_a_selection_best_of_4_does_not(tmp_path):
    run = make_run(tmp_path / "raw", scored=False)
    with pytest.raises(ValueError, match="no pre-selected best"):
        build_study([run], tmp_path / "s1", "best")
    study = build_study([run], tmp_path / "s2", "best-of-4")
    assert all(len(t["candidates"]) == 4 for t in study.tasks.values())
    tid = next(iter(study.tasks))
    assert sorted(study.candidates_for("a", tid)) == sorted(c["image_id"] for c in study.tasks[tid]["candidates"])


def test_submit_resubmit_updates_one_row(world):
    store, tid = world["store"], sorted(world["study"].tasks)[0]
    store.submit(TOKENS["alice"], tid, 1, 0)
    row = store.submit(TOKENS["alice"], tid, 0, 1)  # double submit / change of mind
    assert (row["faithfulness"], row["photorealism"], row["n_submits"]) == (0, 1, 2)
    assert len(read_rows(world["study"].db_path)) == 1
    assert sqlite3.connect(world["study"].db_path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("token", ["", "nobody-token-0000", "alice-token-000", " "])
def test_unknown_token_is_refused_and_nothing_written(world, token):
    with pytest.raises(PermissionError):
        world["store"].submit(token, sorted(world["study"].tasks)[0], 1, 1)
    assert read_rows(world["study"].db_path) == []


@pytest.mark.parametrize("task_id,err", [("t_" + "0" * 20, KeyError), ("../etc/passwd", ValueError),
                                         ("t_XYZ", ValueError), ("", ValueError)])
def test_bad_task_ids_are_refused(world, task_id, err):
    with pytest.raises(err):
        world["store"].submit(TOKENS["alice"], task_id, 1, 1)


@pytest.mark.parametrize("image", ["../../etc/passwd", "i_/abc", "i_" + "a" * 22 + "..", "a\\b", "reimagen/x.png",
                                   "i_" + "0" * 24])
def test_bad_image_ids_are_refused(world, image):
    with pytest.raises((ValueError, KeyError)):
        world["study"].image_path(image)
    with pytest.raises(ValueError):
        world["store"].submit(TOKENS["alice"], sorted(world["study"].tasks)[0], 1, 1, image)


@pytest.mark.parametrize("f,p", [(2, 1), (1, -1), ("1", 0), (0.5, 1), (None, 1)])
def test_bad_values_are_refused(world, f, p):
    with pytest.raises(ValueError):
        world["store"].submit(TOKENS["alice"], sorted(world["study"].tasks)[0], f, p)


def test_rater_list_validation(tmp_path):
    bad = tmp_path / "bad.txt"
    for text, msg in [("alice short\n", "too short"), ("alice tok-000000000 x\n", "RATER_ID TOKEN"),
                      ("a tok-000000000001\na tok-000000000002\n", "repeated"), ("# only\n", "empty"),
                      ("../x tok-000000000001\n", "bad rater id")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=msg):
            read_raters(bad)
    out = make_raters(["r1", "r2"], tmp_path / "new.txt")
    assert len(read_raters(out)) == 2 and (out.stat().st_mode & 0o777) == 0o600
    with pytest.raises(ValueError, match="refusing to overwrite"):
        make_raters(["r3"], out)


def _writer(args):
    study_dir, raters, worker, n = args
    study = Study.load(study_dir)
    store = RatingStore(study, read_raters(raters))
    tids = sorted(study.tasks)
    for i in range(n):
        store.submit(f"worker-token-{worker:04d}", tids[i], (i + worker) % 2, i % 2)
    store.close()
    return n


def test_eight_processes_fifty_ratings_each_all_rows_kept(tmp_path):
    run = make_run(tmp_path / "run", categories=("dogs", "foods", "birds", "broader", "landmarks"), per_category=10)
    study = build_study([run], tmp_path / "study", "best")
    assert len(study.tasks) == 50
    raters = tmp_path / "raters.txt"
    raters.write_text("".join(f"w{k} worker-token-{k:04d}\n" for k in range(8)))
    RatingStore(study).close()  # create the table once
    with mp.get_context("spawn").Pool(8) as pool:
        done = pool.map(_writer, [(str(study.folder), str(raters), k, 50) for k in range(8)])
    assert done == [50] * 8
    rows = read_rows(study.db_path)
    assert len(rows) == 400 and len({(r["rater"], r["task_id"]) for r in rows}) == 400
    assert all(r["faithfulness"] == (sorted(study.tasks).index(r["task_id"]) + int(r["rater"][1:])) % 2 for r in rows)


# ---------------------------------------------------------------------------------------------- reports

def test_mean_se_and_majority_by_hand():
    m, se, n = mean_se([1, 1, 0, 1])  # mean .75; s^2 = (3 * .0625 + .5625) / 3 = .25; se = .5 / 2
    assert (m, n) == (0.75, 4) and se == pytest.approx(0.25)
    assert [majority(v) for v in ([1, 1, 0], [0, 1], [0, 0, 1], [1])] == [1.0, 0.5, 0.0, 1.0]


def oracle_fleiss_kappa(rows):
    """Fleiss (1971) written out: the test oracle of statsmodels' implementation."""
    m = sum(rows[0])
    n, k = len(rows), len(rows[0])
    p_j = [sum(r[j] for r in rows) / (n * m) for j in range(k)]
    p_i = [(sum(c * c for c in r) - m) / (m * (m - 1)) for r in rows]
    p_bar, p_e = sum(p_i) / n, sum(p * p for p in p_j)
    return (p_bar - p_e) / (1 - p_e)


def oracle_krippendorff_alpha_nominal(units):
    """Krippendorff's coincidence-matrix computation written out: the test oracle of the krippendorff package."""
    from collections import Counter, defaultdict

    units = [list(u) for u in units if len(u) >= 2]
    coinc = defaultdict(float)
    for u in units:
        cnt = Counter(u)
        for a in cnt:
            for b in cnt:
                coinc[(a, b)] += cnt[a] * (cnt[b] - (a == b)) / (len(u) - 1)
    n_c = defaultdict(float)
    for (a, _), v in coinc.items():
        n_c[a] += v
    n = sum(n_c.values())
    d_o = sum(v for (a, b), v in coinc.items() if a != b)
    d_e = sum(n_c[a] * n_c[b] for a in n_c for b in n_c if a != b) / (n - 1)
    return 1 - d_o / d_e


def test_fleiss_kappa_wikipedia_example_and_the_oracle():
    # Fleiss (1971) worked example as on Wikipedia: 10 subjects, 14 raters, 5 categories -> kappa = 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert fleiss_kappa(table) == pytest.approx(0.2099, abs=5e-4) == oracle_fleiss_kappa(table)
    assert fleiss_kappa([[2, 0], [0, 2], [2, 0]]) == pytest.approx(1.0)
    assert fleiss_kappa([[3, 0], [3, 0]]) is None  # one category only: undefined
    with pytest.raises(ValueError):
        fleiss_kappa([[2, 0], [1, 2]])
    rng = np.random.default_rng(0)
    for _ in range(5):
        ones = rng.integers(0, 4, 30)
        t = [[int(o), 3 - int(o)] for o in ones]
        assert fleiss_kappa(t) == pytest.approx(oracle_fleiss_kappa(t), rel=1e-12)


def test_krippendorff_alpha_published_example_and_the_oracle():
    # Krippendorff (2011), "Computing Krippendorff's alpha-reliability", nominal example with missing data: 0.743
    units = [[1, 1, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4], [4, 4, 4, 4],
             [1, 1, 2, 1], [2, 2, 2, 2], [5, 5, 5], [1, 1], [3]]
    assert krippendorff_alpha(units_matrix(units)) == pytest.approx(0.743, abs=5e-4)
    rng = np.random.default_rng(1)
    for _ in range(5):
        units = [list(rng.integers(0, 2, int(rng.integers(2, 5)))) for _ in range(25)]
        assert krippendorff_alpha(units_matrix(units)) == pytest.approx(oracle_krippendorff_alpha_nominal(units),
                                                                        rel=1e-9)


def test_correlations_come_with_intervals_that_hold_them():
    from scipy import stats

    rng = np.random.default_rng(2)
    y = rng.normal(size=80)
    x = (y + rng.normal(size=80) > 0).astype(float)
    c = correlations(x, y)
    assert c["pearson_r"] == pytest.approx(stats.pearsonr(x, y)[0]) and c["n"] == 80
    assert c["kendall_tau"] == pytest.approx(stats.kendalltau(x, y)[0])
    for k, lo, hi in (("pearson_r", "pearson_lo", "pearson_hi"), ("spearman_rho", "spearman_lo", "spearman_hi"),
                      ("kendall_tau", "kendall_lo", "kendall_hi")):
        assert c[lo] < c[k] < c[hi] and c[lo] > 0, k  # a clear positive relation
    assert correlations([1, 1, 1], [0.1, 0.2, 0.3])["pearson_r"] is None  # constant ratings


def test_table2_numbers_match_a_hand_computation(world):
    study, store = world["study"], world["store"]
    mine = sorted(t for t, v in study.tasks.items() if v["model"] == "reimagen")
    by_cat = {tid: study.tasks[tid]["category"] for tid in mine}
    # alice rates every reimagen task: dogs 1,1 ; birds 1,0. bob and carol agree on one task, disagree on another
    for tid in mine:
        f = 0 if by_cat[tid] == "birds" and tid == max(t for t in mine if by_cat[t] == "birds") else 1
        store.submit(TOKENS["alice"], tid, f, 1)
    store.submit(TOKENS["bob"], mine[0], store.get("alice", mine[0])["faithfulness"], 0)
    store.submit(TOKENS["carol"], mine[0], store.get("alice", mine[0])["faithfulness"], 0)
    data = collect(study)
    t2 = {r["model"]: r for r in table2(study, data["votes"])}
    r = t2["reimagen"]
    assert r["faithfulness_dogs"] == 1.0 and r["faithfulness_dogs_se"] == 0.0
    assert r["faithfulness_birds"] == 0.5 and r["faithfulness_birds_se"] == pytest.approx(0.5)  # s = .7071, /sqrt 2
    assert r["faithfulness_all"] == 0.75 and r["faithfulness_all_se"] == pytest.approx(0.25)
    # photorealism of mine[0]: alice 1, bob 0, carol 0 -> majority 0; the others 1 -> 3/4
    assert r["photorealism_all"] == 0.75 and r["n_tasks"] == 4
    assert t2["imagen"]["n_tasks"] == 0 and t2["imagen"]["faithfulness_all"] is None
    out = write_report(study, world["tmp"] / "report")
    names = {p.name for p in out["files"]}
    assert {"table2.csv", "report.md", "figure5.png", "agreement.csv", "score_correlation.csv"} <= names
    assert (world["tmp"] / "report" / "figure5.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(open(world["tmp"] / "report" / "table2.csv")))
    assert float(rows[0]["faithfulness_all"]) == 0.75
    assert "| reimagen | 1.00 ± 0.00 | 0.50 ± 0.50 | 0.75 ± 0.25 | 0.75 ± 0.25 | 4 |" in out["markdown"]
    agree = {a["criterion"]: a for a in out["agreement"]}
    assert agree["faithfulness"]["tasks_with_2plus_raters"] == 1
    clip = {(c["criterion"], c["score"]): c for c in out["scores"]}
    assert clip[("faithfulness", "clip_t")]["n"] == 6
    assert not list((world["tmp"] / "report").glob(".*tmp*"))


def test_clip_correlation_matches_scipy(world):
    from scipy import stats

    study, store = world["study"], world["store"]
    tids = sorted(study.tasks)
    for k, tid in enumerate(tids):
        store.submit(TOKENS["alice"], tid, k % 2, (k // 2) % 2)
    corr = {(c["criterion"], c["score"]): c for c in write_report(study, world["tmp"] / "rep")["scores"]}
    xs = [k % 2 for k in range(len(tids))]
    ys = [study.tasks[t]["candidates"][0]["clip_t"] for t in tids]
    assert corr[("faithfulness", "clip_t")]["pearson_r"] == pytest.approx(stats.pearsonr(xs, ys)[0])


# ---------------------------------------------------------------------------------------------- CLI

@pytest.fixture
def cli():
    app = typer.Typer()
    app.add_typer(rate_app, name="rate")
    return lambda *a: CliRunner().invoke(app, [str(x) for x in a])


def test_cli_tasks_raters_report(world, cli, tmp_path):
    res = cli("rate", "tasks", f"m1={world['runs']['reimagen']}", "--study", tmp_path / "s", "--mode", "best-of-4")
    assert res.exit_code == 0, res.output
    assert "8 tasks" not in res.output and "4 tasks" in res.output
    res = cli("rate", "raters", "x", "y", "--out", tmp_path / "r.txt")
    assert res.exit_code == 0 and len(read_raters(tmp_path / "r.txt")) == 2
    res = cli("rate", "report", "--study", tmp_path / "s", "--out", tmp_path / "rep")
    assert res.exit_code == 2 and "no ratings" in res.output
    world["store"].submit(TOKENS["bob"], sorted(world["study"].tasks)[0], 1, 1)
    res = cli("rate", "report", "--study", world["study"].folder, "--out", tmp_path / "rep")
    assert res.exit_code == 0, res.output
    assert "Table 2" in res.output and (tmp_path / "rep" / "report.md").exists()


@pytest.mark.parametrize("args,msg", [
    (["rate", "tasks", "/nonexistent/[red]run", "--study", "S"], "not an EntityDrawBench run folder"),
    (["rate", "tasks", "RUN", "--study", "S", "--mode", "best-of-5"], "unknown mode"),
    (["rate", "report", "--study", "/nonexistent", "--out", "O"], "not a rating study"),
    (["rate", "serve", "RUN", "--study", "S", "--raters", "/nonexistent.txt"], "rater list"),
    (["rate", "serve", "RUN", "--study", "S", "--raters", "R", "--port", "0"], "port must be"),
    (["rate", "labelstudio-export", "--study", "STUDY"], "no Label Studio URL"),
    (["rate", "labelstudio-import", "--study", "STUDY", "--url", "http://127.0.0.1:9"], "labelstudio.json"),
])
def test_cli_bad_input_is_one_red_line_and_exit_2(world, cli, args, msg, monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_URL", raising=False)
    sub = {"RUN": str(world["runs"]["reimagen"]), "S": str(world["tmp"] / "new"), "R": str(world["raters"]),
           "STUDY": str(world["study"].folder)}
    res = cli(*[sub.get(a, a) for a in args])
    assert res.exit_code == 2, res.output
    assert msg in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 or "error:" in res.output.splitlines()[0]
