"""The Streamlit rating app: AppTest flows (login, blind page, save, resume, re-submit, best-of-4) and a real
server on 127.0.0.1 driven by headless Chromium through playwright (login, rate, row in SQLite, screenshot)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from streamlit.testing.v1 import AppTest

from human_eval.store import read_rows
from human_eval.tasks import build_study
from human_eval.testing import CHROMIUM_ARGS, REPO, free_port, make_run, stop, wait_http

APP = str(REPO / "human_eval" / "app.py")
TOKEN = "alice-token-0001"


def _study(tmp_path, mode="best"):
    run = make_run(tmp_path / "secretmodel", seed=0, scored=True)
    study = build_study([run], tmp_path / "study", mode)
    raters = tmp_path / "raters.txt"
    raters.write_text(f"alice {TOKEN}\nbob bob-token-000002\n")
    return study, raters


def _app(monkeypatch, study, raters):
    monkeypatch.setenv("REIMAGEN_RATING_STUDY", str(study.folder))
    monkeypatch.setenv("REIMAGEN_RATING_RATERS", str(raters))
    return AppTest.from_file(APP, default_timeout=30)


def _login(at, token=TOKEN):
    at.run()
    at.text_input(key="token_input").input(token)
    at.button[0].click().run()
    return at


def _texts(at) -> str:
    return " ".join(str(e.value) for e in [*at.markdown, *at.subheader, *at.caption, *at.title])


def test_unknown_token_is_refused(tmp_path, monkeypatch):
    study, raters = _study(tmp_path)
    at = _login(_app(monkeypatch, study, raters), "wrong-token-123456")
    assert at.error and "Unknown rater token" in at.error[0].value
    assert "rater" not in at.session_state and read_rows(study.db_path) == []


def test_rate_save_resume_and_resubmit(tmp_path, monkeypatch):
    study, raters = _study(tmp_path)
    at = _login(_app(monkeypatch, study, raters))
    assert not at.exception, at.exception
    text = _texts(at)
    assert "Faithfulness" in text and "Photorealism" in text and "moderately realistic" in text  # criteria shown
    assert "secretmodel" not in text and str(tmp_path) not in text  # blind
    assert at.get("progress")[0].proto.value == 0
    order = study.order_for("alice")
    # saving without answering everything is refused
    at.button(key="save").click().run()
    assert at.warning and read_rows(study.db_path) == []
    at.radio(key=f"faith_{order[0]}").set_value("Faithful")
    at.radio(key=f"photo_{order[0]}").set_value("Not photorealistic")
    at.button(key="save").click().run()
    rows = read_rows(study.db_path)
    assert [(r["rater"], r["task_id"], r["faithfulness"], r["photorealism"]) for r in rows] == [
        ("alice", order[0], 1, 0)]
    assert at.session_state["pos"] == 1
    # a new session (closed browser) resumes at the first unrated task
    at2 = _login(_app(monkeypatch, study, raters))
    assert at2.session_state["pos"] == 1 and f"faith_{order[1]}" in [r.key for r in at2.radio]
    # going back shows the saved answer; saving again updates the same row
    at2.button(key="prev").click().run()
    assert at2.radio(key=f"faith_{order[0]}").value == "Faithful"
    at2.radio(key=f"faith_{order[0]}").set_value("Not faithful")
    at2.button(key="save").click().run()
    rows = read_rows(study.db_path)
    assert len(rows) == 1 and rows[0]["faithfulness"] == 0 and rows[0]["n_submits"] == 2


def test_best_of_4_pick_then_rate(tmp_path, monkeypatch):
    study, raters = _study(tmp_path, "best-of-4")
    at = _login(_app(monkeypatch, study, raters), "bob-token-000002")
    tid = study.order_for("bob")[0]
    at.radio(key=f"best_{tid}").set_value("C")
    at.radio(key=f"faith_{tid}").set_value("Not faithful")
    at.radio(key=f"photo_{tid}").set_value("Photorealistic")
    at.button(key="save").click().run()
    row = read_rows(study.db_path)[0]
    assert row["chosen_image"] == study.candidates_for("bob", tid)[2]  # "C" = the third in bob's order
    assert (row["faithfulness"], row["photorealism"]) == (0, 1)


def test_rate_all_rates_every_image_then_picks(tmp_path, monkeypatch):
    from human_eval.store import read_candidate_rows

    study, raters = _study(tmp_path, "rate-all")
    at = _login(_app(monkeypatch, study, raters))
    tid = study.order_for("alice")[0]
    cands = study.candidates_for("alice", tid)
    for k, letter in enumerate("ABCD"):
        at.radio(key=f"faith_{letter}_{tid}").set_value("Faithful" if k % 2 else "Not faithful")
        if letter != "D":
            at.radio(key=f"photo_{letter}_{tid}").set_value("Photorealistic")
    at.radio(key=f"best_{tid}").set_value("B")
    at.button(key="save").click().run()
    assert at.warning and read_rows(study.db_path) == []  # D's photorealism is missing
    at.radio(key=f"photo_D_{tid}").set_value("Not photorealistic")
    at.button(key="save").click().run()
    row = read_rows(study.db_path)[0]
    assert row["chosen_image"] == cands[1] and (row["faithfulness"], row["photorealism"]) == (1, 1)  # B's answers
    per = {r["image_id"]: (r["faithfulness"], r["photorealism"]) for r in read_candidate_rows(study.db_path)}
    assert per == {cands[0]: (0, 1), cands[1]: (1, 1), cands[2]: (0, 1), cands[3]: (1, 0)}


def test_all_done_message(tmp_path, monkeypatch):
    study, raters = _study(tmp_path)
    from human_eval.store import RatingStore
    from human_eval.tasks import read_raters

    store = RatingStore(study, read_raters(raters))
    for tid in study.tasks:
        store.submit(TOKEN, tid, 1, 1)
    at = _login(_app(monkeypatch, study, raters))
    assert at.success and "All 4 tasks are rated" in at.success[0].value


# ---------------------------------------------------------------------------------------------- browser

@pytest.fixture
def server(tmp_path, chromium):
    study, raters = _study(tmp_path)
    port = free_port()
    # the CLI end to end: `rate serve` builds/reuses the study and runs `streamlit run` on 127.0.0.1
    cmd = [sys.executable, "-m", "human_eval.cli", "serve", str(tmp_path / "secretmodel"), "--study",
           str(study.folder), "--raters", str(raters), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "serve.log", "wb"))
    try:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health", 60, proc)
        yield {"url": f"http://127.0.0.1:{port}", "study": study}
    finally:
        stop(proc)


def test_browser_login_rate_and_screenshot(server, chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    study = server["study"]
    shot = tmp_path / "rated.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server["url"], wait_until="domcontentloaded")
            box = page.get_by_label("Rater token")
            box.wait_for(timeout=30000)
            box.fill(TOKEN)
            box.press("Enter")  # keyboard: Enter submits the sign-in form
            page.get_by_text("Faithful", exact=True).wait_for(timeout=30000)
            # the developer menu is not for raters (`rate serve` runs streamlit with client.toolbarMode minimal)
            assert page.locator('[data-testid="stAppDeployButton"]').count() == 0
            assert page.get_by_role("button", name="Deploy").count() == 0
            html = page.content()
            i = html.find("secretmodel")
            assert i < 0, html[max(0, i - 300):i + 100]
            assert "__0.png" not in html and "_refs" not in html
            page.get_by_text("Faithful", exact=True).click()
            page.get_by_text("Photorealistic", exact=True).click()
            page.get_by_role("button", name="Save and next").click()
            page.get_by_text("1 of 4 tasks rated").wait_for(timeout=30000)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    rows = read_rows(study.db_path)
    first = study.order_for("alice")[0]
    assert [(r["rater"], r["task_id"], r["faithfulness"], r["photorealism"]) for r in rows] == [("alice", first, 1, 1)]
    assert shot.stat().st_size > 1000 and shot.read_bytes()[:4] == b"\x89PNG"
