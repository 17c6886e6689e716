"""Streamlit rating app for EntityDrawBench (paper Sec. 4.2: best of 4, faithfulness and photorealism, 1/0).

Started by ``reimagen-eval rate serve RUN_DIR ...`` (which runs ``streamlit run`` on 127.0.0.1); the study folder
and the rater list come from the environment variables ``REIMAGEN_RATING_STUDY`` and ``REIMAGEN_RATING_RATERS``
(or ``streamlit run app.py -- STUDY RATERS``).

Raters sign in with their token; every answer is written to SQLite at once (a closed browser loses nothing that
was saved) and a returning rater starts at their first unrated task. Images are passed to Streamlit as bytes, so
the browser only sees Streamlit's hashed media URLs: no model name, run folder or file name. Keyboard: Tab moves
between fields, arrow keys choose an option, Enter / Space presses the focused button.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import streamlit as st

from human_eval.store import RatingStore
from human_eval.tasks import RATERS_FILE, TASKS_FILE, Study, read_raters

FAITHFULNESS = ("**Faithfulness** = 1 if the image is faithful to *both* the entity's appearance (compare with the "
                "reference image and text) *and* the text prompt; otherwise 0.")
PHOTOREALISM = "**Photorealism** = 1 if the image is moderately realistic without noticeable artifacts; otherwise 0."
F_OPTIONS = ("Faithful", "Not faithful")
P_OPTIONS = ("Photorealistic", "Not photorealistic")
LETTERS = "ABCDEFGH"


def _paths() -> tuple[Path, Path]:
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    study = os.environ.get("REIMAGEN_RATING_STUDY") or (args[0] if args else "")
    if not study:
        raise FileNotFoundError("no study folder: set REIMAGEN_RATING_STUDY or pass it after `--`")
    raters = os.environ.get("REIMAGEN_RATING_RATERS") or (args[1] if len(args) > 1 else str(Path(study) / RATERS_FILE))
    return Path(study), Path(raters)


@st.cache_resource
def _load(study: str, raters: str, stamp: tuple) -> tuple[Study, dict[str, str]]:
    """Cached per (study, rater list, their modification times): edits to either take effect on the next page."""
    return Study.load(study), read_raters(raters)


def _store() -> RatingStore:
    study_dir, raters_path = _paths()
    stamp = tuple(p.stat().st_mtime if p.exists() else 0 for p in (raters_path, study_dir / TASKS_FILE))
    study, raters = _load(str(study_dir), str(raters_path), stamp)
    return RatingStore(study, raters)


def _login(store: RatingStore) -> None:
    st.title("EntityDrawBench human evaluation")
    with st.form("login"):
        token = st.text_input("Rater token", type="password", key="token_input")
        if st.form_submit_button("Sign in", type="primary"):
            try:
                rater = store.authenticate(token)
            except PermissionError:
                st.error("Unknown rater token.")
                return
            st.session_state.rater, st.session_state.token = rater, token.strip()
            st.rerun()


def _first_open(order: list[str], done: set[str], start: int = 0) -> int:
    for i in list(range(start, len(order))) + list(range(0, start)):
        if order[i] not in done:
            return i
    return len(order)


def _image(store: RatingStore, image_id: str | None, caption: str | None = None) -> None:
    if image_id is None:
        st.caption("(no reference image)")
        return
    st.image(store.study.image_path(image_id).read_bytes(), caption=caption, width="stretch")


def _task(store: RatingStore, rater: str, task_id: str) -> None:
    view = store.study.rater_view(task_id)
    cands = store.study.candidates_for(rater, task_id)
    prev = store.get(rater, task_id)
    st.subheader(f"Prompt: {view['prompt']}")
    ref_col, gen_col = st.columns([1, 3 if len(cands) > 1 else 1])
    with ref_col:
        st.markdown(f"**Reference: {view['entity'] or ''}**")
        _image(store, view["reference_image_id"])
        st.caption(view["reference_text"] or "(no reference text)")
    with gen_col:
        st.markdown("**Generated image" + ((": rate every one, then pick the best**" if store.study.mode == "rate-all"
                                            else "s: pick the best one, then rate it**") if len(cands) > 1 else "**"))
        cols = st.columns(len(cands))
        for letter, col, iid in zip(LETTERS, cols, cands):
            with col:
                _image(store, iid, caption=letter if len(cands) > 1 else None)
    rate_all = store.study.mode == "rate-all"
    with st.form(f"rate_{task_id}"):
        chosen = None
        per: dict[str, tuple] = {}
        if rate_all:  # every image rated, then the best picked
            prev_all = store.get_candidates(rater, task_id)
            for letter, iid in zip(LETTERS, cands):
                old = prev_all.get(iid)
                a, b = st.columns(2)
                per[iid] = (a.radio(f"{letter}: faithfulness", F_OPTIONS, index=None if old is None else 1 - old[0],
                                    horizontal=True, key=f"faith_{letter}_{task_id}"),
                            b.radio(f"{letter}: photorealism", P_OPTIONS, index=None if old is None else 1 - old[1],
                                    horizontal=True, key=f"photo_{letter}_{task_id}"))
        if len(cands) > 1:
            letters = list(LETTERS[:len(cands)])
            idx = cands.index(prev["chosen_image"]) if prev and prev["chosen_image"] in cands else None
            chosen = st.radio("Best image", letters, index=idx, horizontal=True, key=f"best_{task_id}")
        f = p = None
        if not rate_all:
            f = st.radio("Faithfulness", F_OPTIONS, index=None if prev is None else 1 - prev["faithfulness"],
                         horizontal=True, key=f"faith_{task_id}")
            p = st.radio("Photorealism", P_OPTIONS, index=None if prev is None else 1 - prev["photorealism"],
                         horizontal=True, key=f"photo_{task_id}")
        if st.form_submit_button("Save and next", type="primary", key="save"):
            missing = (any(None in v for v in per.values()) if rate_all else (f is None or p is None))
            if missing or (len(cands) > 1 and chosen is None):
                st.warning("Answer every question before saving.")
                return
            pick = cands[LETTERS.index(chosen)] if chosen else None
            answers = {i: (int(a == F_OPTIONS[0]), int(b == P_OPTIONS[0])) for i, (a, b) in per.items()} or None
            if rate_all:
                f, p = (F_OPTIONS[1 - answers[pick][0]], P_OPTIONS[1 - answers[pick][1]])
            try:
                store.submit(st.session_state.token, task_id, int(f == F_OPTIONS[0]), int(p == P_OPTIONS[0]),
                             pick, per_image=answers)
            except PermissionError:
                st.session_state.clear()
                st.error("Your token is no longer valid; sign in again.")
                return
            order = store.study.order_for(rater)
            st.session_state.pos = _first_open(order, store.done_by(rater), order.index(task_id) + 1)
            st.session_state.saved = task_id
            st.rerun()


def main() -> None:
    st.set_page_config(page_title="EntityDrawBench rating", layout="wide")
    try:
        store = _store()
    except (FileNotFoundError, ValueError) as err:
        st.error(f"The rating study cannot be opened: {err}")
        return
    try:
        if "rater" not in st.session_state:
            _login(store)
            return
        rater = st.session_state.rater
        order = store.study.order_for(rater)
        done = store.done_by(rater)
        if "pos" not in st.session_state:  # a new session resumes at the first unrated task
            st.session_state.pos = _first_open(order, done)
        pos = st.session_state.pos
        with st.sidebar:
            st.markdown(f"Signed in as **{rater}**")
            st.markdown("### Criteria")
            st.markdown(FAITHFULNESS)
            st.markdown(PHOTOREALISM)
            st.caption("Keyboard: Tab moves between fields, arrow keys choose, Enter or Space presses a button. "
                       "Every answer is saved at once; you can close the page and come back.")
            if st.button("Sign out", key="signout"):
                st.session_state.clear()
                st.rerun()
        st.progress(len(done) / len(order), text=f"{len(done)} of {len(order)} tasks rated")
        if st.session_state.pop("saved", None):
            st.toast("Saved")
        nav_prev, nav_next = st.columns(2)
        if nav_prev.button("Previous task", key="prev", disabled=pos == 0):
            st.session_state.pos = max(0, pos - 1)
            st.rerun()
        if nav_next.button("Next task", key="next", disabled=pos >= len(order) - 1):
            st.session_state.pos = min(len(order) - 1, pos + 1)
            st.rerun()
        if pos >= len(order):
            st.success(f"All {len(order)} tasks are rated. Thank you! Use 'Previous task' to change an answer.")
            return
        st.caption(f"Task {pos + 1} of {len(order)}" + (" (already rated: saving updates it)"
                                                          if order[pos] in done else ""))
        _task(store, rater, order[pos])
    finally:
        store.close()


main()
