"""The ratings table: SQLite in WAL mode, one row per (rater, task); re-submitting updates that row.

Writers are the Streamlit app (authenticated by a rater token from the rater list: no anonymous writes) and the
Label Studio import (raters ``labelstudio:<user>``); the toy world's simulated raters (``human_eval.simulate``)
write rows with ``source = 'simulated'`` and raters ``sim-judge-<k>``. Every answer is committed at once, so a
closed browser loses at most the answer that was never submitted. Many processes may write at once (WAL + busy timeout + retries).
"""

from __future__ import annotations

import hmac
import sqlite3
import time
from pathlib import Path
from typing import Any

from reimagen.utils.atomic import DiskFullError

from .tasks import Study, check_image_id, check_task_id

SCHEMA = """
CREATE TABLE IF NOT EXISTS ratings (
    rater         TEXT NOT NULL,
    task_id       TEXT NOT NULL,
    faithfulness  INTEGER NOT NULL CHECK (faithfulness IN (0, 1)),
    photorealism  INTEGER NOT NULL CHECK (photorealism IN (0, 1)),
    chosen_image  TEXT,
    source        TEXT NOT NULL DEFAULT 'app',
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    n_submits     INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (rater, task_id)
)
"""
#: ``--mode rate-all``: the rater's answers for every candidate of a task (the ratings row holds the chosen one's).
CANDIDATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS candidate_ratings (
    rater         TEXT NOT NULL,
    task_id       TEXT NOT NULL,
    image_id      TEXT NOT NULL,
    faithfulness  INTEGER NOT NULL CHECK (faithfulness IN (0, 1)),
    photorealism  INTEGER NOT NULL CHECK (photorealism IN (0, 1)),
    updated_at    REAL NOT NULL,
    PRIMARY KEY (rater, task_id, image_id)
)
"""
CANDIDATE_UPSERT = """
INSERT INTO candidate_ratings (rater, task_id, image_id, faithfulness, photorealism, updated_at)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (rater, task_id, image_id) DO UPDATE SET
    faithfulness = excluded.faithfulness, photorealism = excluded.photorealism, updated_at = excluded.updated_at
"""
UPSERT = """
INSERT INTO ratings (rater, task_id, faithfulness, photorealism, chosen_image, source, created_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (rater, task_id) DO UPDATE SET
    faithfulness = excluded.faithfulness, photorealism = excluded.photorealism,
    chosen_image = excluded.chosen_image, source = excluded.source, updated_at = excluded.updated_at,
    n_submits = ratings.n_submits + 1
"""
#: ``source`` of ratings made by ``human_eval.simulate`` (the judge CNN, not a person).
SIM_SOURCE = "simulated"
COLUMNS = ("rater", "task_id", "faithfulness", "photorealism", "chosen_image", "source", "created_at", "updated_at",
           "n_submits")


def connect(path: str | Path, timeout: float = 60.0) -> sqlite3.Connection:
    con = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    con.execute(SCHEMA)
    con.execute(CANDIDATE_SCHEMA)
    return con


def _binary(value: Any, what: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if value in (0, 1) and not isinstance(value, float):
        return int(value)
    raise ValueError(f"{what} must be 0 or 1, got {value!r}")


class RatingStore:
    """Validated writes and reads of a study's ratings."""

    def __init__(self, study: Study, raters: dict[str, str] | None = None, db_path: str | Path | None = None):
        self.study = study
        self.raters = dict(raters or {})  # token -> rater id
        self.path = Path(db_path or study.db_path)
        self.con = connect(self.path)

    def close(self) -> None:
        self.con.close()

    # -- identity --------------------------------------------------------------------------------------
    def authenticate(self, token: str) -> str:
        """The rater id of a token; unknown or empty tokens are refused (constant-time comparison)."""
        found = None
        token = (token or "").strip()
        for known, rater in self.raters.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = rater
        if not token or found is None:
            raise PermissionError("unknown rater token")
        return found

    # -- writes ----------------------------------------------------------------------------------------
    def validate(self, task_id: str, faithfulness: Any, photorealism: Any, chosen_image: str | None) -> tuple:
        check_task_id(task_id)
        if task_id not in self.study.tasks:
            raise KeyError(f"unknown task id {task_id}")
        f, p = _binary(faithfulness, "faithfulness"), _binary(photorealism, "photorealism")
        cands = [c["image_id"] for c in self.study.tasks[task_id]["candidates"]]
        if chosen_image is None:
            if len(cands) != 1:
                raise ValueError(f"task {task_id}: pick the best of the {len(cands)} images before rating")
            chosen_image = cands[0]
        check_image_id(chosen_image)
        if chosen_image not in cands:
            raise ValueError(f"image {chosen_image} is not a candidate of task {task_id}")
        return task_id, f, p, chosen_image

    def validate_all(self, task_id: str, chosen_image: str | None, per_image: dict[str, tuple]) -> tuple:
        """``--mode rate-all``: an answer for every candidate and a pick; the ratings row is the pick's answers."""
        cands = [c["image_id"] for c in self.study.tasks[task_id]["candidates"]] if task_id in self.study.tasks else []
        if set(per_image) != set(cands):
            raise ValueError(f"task {task_id}: rate every one of its {len(cands)} images (got {len(per_image)})")
        if chosen_image not in per_image:
            raise ValueError(f"task {task_id}: pick the best of the {len(cands)} images")
        f, p = per_image[chosen_image]
        return self.validate(task_id, f, p, chosen_image)

    def submit(self, token: str, task_id: str, faithfulness: Any, photorealism: Any,
               chosen_image: str | None = None, per_image: dict[str, tuple] | None = None) -> dict[str, Any]:
        """A rater's answer (authenticated by token). Returns the stored row."""
        rater = self.authenticate(token)
        return self.record(rater, task_id, faithfulness, photorealism, chosen_image, source="app", per_image=per_image)

    def record(self, rater: str, task_id: str, faithfulness: Any, photorealism: Any, chosen_image: str | None = None,
               source: str = "app", per_image: dict[str, tuple] | None = None) -> dict[str, Any]:
        """Upsert one validated row for an already identified rater (the app after login, Label Studio import).
        A ``rate-all`` study also needs ``per_image``: image id -> (faithfulness, photorealism) of every candidate
        (the row's two answers are then the chosen image's)."""
        self.record_many([(rater, task_id, faithfulness, photorealism, chosen_image, source, per_image)])
        return self.get(rater, task_id)

    def record_many(self, rows: list[tuple]) -> int:
        """Upsert many (rater, task_id, f, p, chosen, source[, per_image]) rows in one transaction (all validated
        first)."""
        now = time.time()
        checked, per = [], []
        for row in rows:
            rater, tid, f, p, chosen, source = row[:6]
            per_image = row[6] if len(row) > 6 else None
            if not rater:
                raise PermissionError("anonymous ratings are not accepted")
            if self.study.mode == "rate-all":
                if per_image is None:
                    raise ValueError(f"task {tid}: this study rates every image (rate-all): give each one's answers")
                per_image = {check_image_id(i): (_binary(a, "faithfulness"), _binary(b, "photorealism"))
                             for i, (a, b) in per_image.items()}
                checked.append((rater, *self.validate_all(tid, chosen, per_image), source, now, now))
                per += [(rater, tid, i, a, b, now) for i, (a, b) in per_image.items()]
            else:
                checked.append((rater, *self.validate(tid, f, p, chosen), source, now, now))
        self._write(checked, per)
        return len(checked)

    def _write(self, rows: list[tuple], per_image: list[tuple] = ()) -> None:
        for attempt in range(20):
            try:
                self.con.execute("BEGIN IMMEDIATE")
                try:
                    self.con.executemany(UPSERT, rows)
                    self.con.executemany(CANDIDATE_UPSERT, per_image)
                    self.con.execute("COMMIT")
                except BaseException:
                    if self.con.in_transaction:  # SQLITE_FULL has rolled it back already
                        self.con.execute("ROLLBACK")
                    raise
                return
            except sqlite3.OperationalError as err:
                if "disk is full" in str(err) or "disk I/O error" in str(err):  # SQLITE_FULL, or ENOSPC on the WAL
                    raise DiskFullError(self.path) from err  # the transaction was rolled back: nothing half-written
                if "locked" not in str(err) and "busy" not in str(err):
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise RuntimeError("the ratings database stayed locked; try again")

    # -- reads -----------------------------------------------------------------------------------------
    def get(self, rater: str, task_id: str) -> dict[str, Any] | None:
        cur = self.con.execute(f"SELECT {', '.join(COLUMNS)} FROM ratings WHERE rater = ? AND task_id = ?",
                               (rater, task_id))
        row = cur.fetchone()
        return dict(zip(COLUMNS, row)) if row else None

    def get_candidates(self, rater: str, task_id: str) -> dict[str, tuple[int, int]]:
        """A rater's answers for each candidate of a task (rate-all studies; empty otherwise)."""
        cur = self.con.execute("SELECT image_id, faithfulness, photorealism FROM candidate_ratings "
                               "WHERE rater = ? AND task_id = ?", (rater, task_id))
        return {i: (f, p) for i, f, p in cur.fetchall()}

    def done_by(self, rater: str) -> set[str]:
        return {r[0] for r in self.con.execute("SELECT task_id FROM ratings WHERE rater = ?", (rater,))}

    def rows(self) -> list[dict[str, Any]]:
        return read_rows(self.path)


def read_candidate_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every candidate's answers of a ``rate-all`` study (empty for the other modes)."""
    if not Path(path).is_file():
        return []
    con = connect(path)
    try:
        cur = con.execute("SELECT rater, task_id, image_id, faithfulness, photorealism FROM candidate_ratings "
                          "ORDER BY task_id, rater, image_id")
        return [dict(zip(("rater", "task_id", "image_id", "faithfulness", "photorealism"), r)) for r in cur]
    finally:
        con.close()


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """All ratings of a database (read-only use)."""
    if not Path(path).is_file():
        return []
    con = connect(path)
    try:
        cur = con.execute(f"SELECT {', '.join(COLUMNS)} FROM ratings ORDER BY task_id, rater")
        return [dict(zip(COLUMNS, r)) for r in cur.fetchall()]
    finally:
        con.close()
