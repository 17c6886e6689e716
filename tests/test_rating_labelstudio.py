"""Label Studio against a real server (label-studio 1.23.2 in its own venv, started on a free loopback port and
stopped by its PID): export twice (no duplicates), annotate through its API as two users' worth of annotations,
import into the ratings table and compare; local-files images are served under opaque names; the API key is
never printed. Plus offline checks of the labelling config and the annotation parser."""

from __future__ import annotations

import json
import urllib.request
import xml.etree.ElementTree as ET

import pytest
import typer
from typer.testing import CliRunner

from human_eval.cli import rate_app
from human_eval.labelstudio import annotations_to_rows, label_config, task_payloads
from human_eval.store import read_rows
from human_eval.tasks import build_study
from human_eval.testing import make_run, on_ci, start_labelstudio, stop


def test_label_config_is_xml_with_the_two_questions():
    for n in (1, 4):
        root = ET.fromstring(label_config(n))
        names = {c.get("name") for c in root.iter("Choices")}
        assert {"faithfulness", "photorealism"} <= names and (("best" in names) == (n > 1))
        assert len([i for i in root.iter("Image") if i.get("name") != "reference"]) == n


def test_payloads_are_blind(tmp_path):
    study = build_study([make_run(tmp_path / "secretmodel")], tmp_path / "study", "best-of-4")
    payloads, _ = task_payloads(study, "local-files", tmp_path / "docroot")
    text = json.dumps(payloads)
    assert "secretmodel" not in text and "__0" not in text and len(payloads) == 4
    with pytest.raises(ValueError, match="document-root"):
        task_payloads(study, "local-files", None)


def test_annotation_parser_refuses_foreign_and_incomplete(tmp_path):
    study = build_study([make_run(tmp_path / "m")], tmp_path / "study", "best")
    tid = sorted(study.tasks)[0]
    only = study.tasks[tid]["candidates"][0]["image_id"]
    yes = lambda n, v: {"from_name": n, "value": {"choices": [v]}}  # noqa: E731
    tasks = [{"id": 1, "data": {"reimagen_task_id": "../../x"}, "annotations": []},
             {"id": 2, "data": {"reimagen_task_id": "t_" + "0" * 20}, "annotations": []},
             {"id": 3, "data": {"reimagen_task_id": tid, "candidate_ids": [only]},
              "annotations": [{"completed_by": 5, "result": [yes("faithfulness", "Yes"), yes("photorealism", "No")]},
                              {"completed_by": 6, "result": [yes("faithfulness", "Yes")]},
                              {"completed_by": 7, "was_cancelled": True, "result": []}]}]
    rows, problems = annotations_to_rows(study, tasks)
    assert rows == [("labelstudio:5", tid, 1, 0, only, "labelstudio")]
    assert len(problems) == 3


def test_rate_all_config_and_annotations_give_every_images_answers(tmp_path):
    from human_eval.store import RatingStore, read_candidate_rows

    root = ET.fromstring(label_config(4, rate_all=True))
    names = {c.get("name") for c in root.iter("Choices")}
    assert names == {"best", *(f"{q}_{L}" for q in ("faithfulness", "photorealism") for L in "ABCD")}
    study = build_study([make_run(tmp_path / "m")], tmp_path / "study", "rate-all")
    tid = sorted(study.tasks)[0]
    cands = study.candidates_for("labelstudio", tid)
    yes = lambda n, v: {"from_name": n, "value": {"choices": [v]}}  # noqa: E731
    result = [yes(f"faithfulness_{L}", "Yes" if L == "C" else "No") for L in "ABCD"]
    result += [yes(f"photorealism_{L}", "Yes") for L in "ABCD"] + [yes("best", "C")]
    tasks = [{"id": 1, "data": {"reimagen_task_id": tid, "candidate_ids": cands},
              "annotations": [{"completed_by": 5, "result": result},
                              {"completed_by": 6, "result": result[:-2]}]}]  # lacks D's photorealism and the pick
    rows, problems = annotations_to_rows(study, tasks)
    assert len(rows) == 1 and rows[0][:5] == ("labelstudio:5", tid, 1, 1, cands[2]) and len(problems) == 1
    store = RatingStore(study)
    try:
        store.record_many(rows)
    finally:
        store.close()
    per = {r["image_id"]: r["faithfulness"] for r in read_candidate_rows(study.db_path)}
    assert per == {c: int(i == 2) for i, c in enumerate(cands)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ls")
    (root / "data").mkdir()
    (root / "docroot").mkdir()
    try:
        srv = start_labelstudio(root / "data", root / "docroot")
    except (RuntimeError, TimeoutError, OSError) as err:
        if on_ci():
            pytest.fail(f"Label Studio server unavailable: {err}")
        pytest.skip(f"Label Studio server unavailable: {err}")
    srv["docroot"] = root / "docroot"
    yield srv
    stop(srv["proc"])


@pytest.fixture
def cli(server, monkeypatch):
    monkeypatch.setenv("LABEL_STUDIO_URL", server["url"])
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", server["token"])
    app = typer.Typer()
    app.add_typer(rate_app, name="rate")
    return lambda *a: CliRunner().invoke(app, [str(x) for x in a])


def _annotate(server, project_id, answers):
    """answers: reimagen_task_id -> (best letter or None, faithfulness Yes/No, photorealism Yes/No)."""
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=server["url"], api_key=server["token"])
    tasks = {t.data["reimagen_task_id"]: t for t in ls.tasks.list(project=project_id, fields="all")}
    for tid, (best, f, p) in answers.items():
        target = "image_A"
        res = [{"from_name": "faithfulness", "to_name": target, "type": "choices", "value": {"choices": [f]}},
               {"from_name": "photorealism", "to_name": target, "type": "choices", "value": {"choices": [p]}}]
        if best:
            res.append({"from_name": "best", "to_name": target, "type": "choices", "value": {"choices": [best]}})
        ls.annotations.create(id=tasks[tid].id, result=res)
    return tasks


def test_export_is_idempotent_annotate_import_compare(server, cli, tmp_path):
    study = build_study([make_run(tmp_path / "secretmodel")], tmp_path / "study", "best-of-4")
    res = cli("rate", "labelstudio-export", "--study", study.folder, "--title", "e2e upload")
    assert res.exit_code == 0, res.output
    assert "4 tasks imported" in res.output and server["token"] not in res.output
    res = cli("rate", "labelstudio-export", "--study", study.folder, "--title", "e2e upload")
    assert res.exit_code == 0 and "0 tasks imported, 4 already there" in res.output
    project = json.loads((study.folder / "labelstudio.json").read_text())
    assert server["token"] not in json.dumps(project)
    tids = sorted(study.tasks)
    answers = {tids[0]: ("B", "Yes", "No"), tids[1]: ("D", "No", "Yes"), tids[2]: ("A", "Yes", "Yes")}
    ls_tasks = _annotate(server, project["project_id"], answers)
    assert len(ls_tasks) == 4  # no duplicates after two exports
    for _ in range(2):  # importing twice updates, never duplicates
        res = cli("rate", "labelstudio-import", "--study", study.folder)
        assert res.exit_code == 0, res.output
        assert "3 ratings" in res.output and server["token"] not in res.output
    rows = {r["task_id"]: r for r in read_rows(study.db_path)}
    assert set(rows) == set(answers)
    for tid, (best, f, p) in answers.items():
        r = rows[tid]
        assert r["rater"].startswith("labelstudio:") and r["source"] == "labelstudio"
        assert (r["faithfulness"], r["photorealism"]) == (int(f == "Yes"), int(p == "Yes"))
        assert r["chosen_image"] == study.candidates_for("labelstudio", tid)["ABCD".index(best)]
        assert ls_tasks[tid].data["candidate_ids"] == study.candidates_for("labelstudio", tid)
    res = cli("rate", "report", "--study", study.folder, "--out", tmp_path / "rep")
    assert res.exit_code == 0 and "0.67 ± 0.33" in res.output  # faithfulness All: 2 of 3, se sqrt(1/3)/sqrt(3)


def test_local_files_images_are_served_under_opaque_names(server, cli, tmp_path):
    study = build_study([make_run(tmp_path / "secretmodel", scored=True)], tmp_path / "study", "best")
    res = cli("rate", "labelstudio-export", "--study", study.folder, "--title", "e2e local",
              "--images", "local-files", "--document-root", server["docroot"])
    assert res.exit_code == 0, res.output
    from label_studio_sdk import LabelStudio

    ls = LabelStudio(base_url=server["url"], api_key=server["token"])
    pid = json.loads((study.folder / "labelstudio.json").read_text())["project_id"]
    task = next(iter(ls.tasks.list(project=pid, fields="all")))
    url = task.data["image_A"]
    assert url.startswith("/data/local-files/?d=reimagen/") and "secretmodel" not in url
    req = urllib.request.Request(server["url"] + url, headers={"Authorization": f"Token {server['token']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200 and r.read()[:4] == b"\x89PNG"


def test_wrong_key_and_unreachable_server_never_echo_the_key(server, cli, tmp_path, monkeypatch):
    study = build_study([make_run(tmp_path / "m")], tmp_path / "study", "best")
    bad = "f" * 40
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", bad)
    res = cli("rate", "labelstudio-export", "--study", study.folder)
    assert res.exit_code == 2 and "HTTP 401" in res.output and bad not in res.output
    res = cli("rate", "labelstudio-export", "--study", study.folder, "--url", "http://127.0.0.1:9",
              "--api-key", server["token"])
    assert res.exit_code == 2 and "Label Studio request failed" in res.output and server["token"] not in res.output
