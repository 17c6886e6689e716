"""Faults a full disk and a shared run folder bring ([hardening]): a full disk is a named error, never a
traceback, and the rerun after freeing space resumes; one run folder has one writer (a lock that names its
holder, waits with --wait, and is taken over from a dead process); removed options keep working with a warning.
The training faults of a cluster (signals, torchrun restarts, a kill mid-checkpoint) are in test_scale_train.py."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import make_model, randomize
from reimagen.models.checkpoint import save_checkpoint, write_checkpoint
from reimagen.models.text import TinyTextEncoder
from reimagen.utils.atomic import DiskFullError, replacing_path, write_json
from reimagen.utils.cliutil import DEPRECATED_OPTIONS
from reimagen.utils.runlock import RunLockedError, run_lock
from reimagen_eval.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return save_checkpoint(root / "ckpt", randomize(make_model("tiny-16")), TinyTextEncoder(dim=32, seed=0).eval())


def _sample_args(ckpt, out, *extra):
    return ["sample", "--checkpoint", str(ckpt), "--prompt", "a red thing", "--prompt", "a blue thing",
            "--prompt", "a green thing", "--no-retrieval", "--guidance", "joint", "--steps", "2",
            "--num-samples", "2", "--out", str(out), *extra]


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ----------------------------------------------------------------------------------------------
# A full disk
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 512 KiB tmpfs (the test runs as root, as CI does); skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?); the write primitives are tested with injected ENOSPC")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(mnt: Path, leave: int) -> Path:
    """A file that leaves ``leave`` bytes free on ``mnt``."""
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_a_full_disk_in_sample_is_named_and_the_run_resumes_after_freeing_space(ckpt, small_disk):
    out = small_disk / "run"
    filler = _fill(small_disk, 16 * 1024)  # run.json and a few images fit; the rest do not
    res = runner.invoke(app, _sample_args(ckpt, out))
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)  # no traceback
    text = _one_line(res.output)
    assert "the disk is full" in text and str(out) in text and "rerun the same command" in text, text
    for png in out.glob("*.png"):  # what was written before stays valid
        with Image.open(png) as im:
            im.load()
    assert not list(out.rglob(".*.tmp*")), "a temporary file was left behind"
    filler.unlink()
    res = runner.invoke(app, _sample_args(ckpt, out))
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("p*__*.png"))) == 6 and len(list((out / "sheets").glob("*.png"))) == 3


def test_a_full_disk_while_training_keeps_the_last_checkpoint_and_the_rerun_resumes(tmp_path, small_disk):
    from test_scale_train import _table

    table = _table(tmp_path / "data", n=8)

    def args(out, steps):
        return ["train", "--triples", str(table), "--preset", "tiny-16", "--steps", str(steps), "--batch-size", "4",
                "--ckpt-every", "2", "--log-every", "1", "--out", str(out)]

    assert runner.invoke(app, args(tmp_path / "probe", 2)).exit_code == 0
    size = sum(f.stat().st_size for f in (tmp_path / "probe").rglob("*") if f.is_file())
    # room for one checkpoint and the log, not for the next one staged beside it
    subprocess.run(["mount", "-o", f"remount,size={int(size * 1.5) // 4096 * 4096 + 65536}", str(small_disk)],
                   check=True)
    out = small_disk / "train"
    res = runner.invoke(app, args(out, 4))
    text = _one_line(res.output)
    assert res.exit_code == 2 and "the disk is full" in text and "last.tmp" in text, text
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert json.loads((out / "last" / "config.json").read_text())["step"] == 2  # the previous checkpoint, whole
    subprocess.run(["mount", "-o", f"remount,size={size * 4 // 4096 * 4096}", str(small_disk)], check=True)
    res = runner.invoke(app, args(out, 4))  # more space: the rerun resumes at step 2
    assert res.exit_code == 0, res.output
    assert json.loads((out / "last" / "config.json").read_text())["step"] == 4
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_the_atomic_writer_names_the_destination_and_keeps_the_old_file(tmp_path):
    dest = tmp_path / "sub" / "run.json"
    write_json(dest, {"old": 1})
    with pytest.raises(DiskFullError) as info:
        with replacing_path(dest) as tmp:
            tmp.write_bytes(b"partial")
            _enospc()
    assert info.value.filename == str(dest) and "the disk is full" in str(info.value)
    assert json.loads(dest.read_text()) == {"old": 1} and [p.name for p in dest.parent.iterdir()] == ["run.json"]
    with pytest.raises(DiskFullError):  # PIL writes through a handle: its bare OSError names no file
        with replacing_path(tmp_path / "img.png") as tmp, open(tmp, "wb") as fh:
            fh.write(b"x")
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_checkpoint_that_does_not_fit_is_named_and_the_previous_one_stays(tmp_path, monkeypatch):
    import reimagen.models.checkpoint as ck

    model = make_model("tiny-16")
    last = save_checkpoint(tmp_path / "last", model, TinyTextEncoder(dim=32, seed=0))
    before = (last / "ema.safetensors").read_bytes() if (last / "ema.safetensors").exists() else None
    monkeypatch.setattr(ck, "save_file", _enospc)
    with pytest.raises(DiskFullError, match="last.tmp"):
        write_checkpoint(last, model.cfg, {"name": "tiny"}, {"model": model.state_dict(), "ema": None}, step=7)
    assert json.loads((last / "config.json").read_text())["step"] == 0
    assert before is None or (last / "ema.safetensors").read_bytes() == before


def test_a_full_ratings_database_is_named_and_rolls_back(tmp_path, monkeypatch):
    """SQLITE_FULL for real: the database may not grow past its current pages."""
    from human_eval import store as st

    real = st.connect

    def tiny(path, timeout=60.0):
        con = real(path, timeout)
        con.execute("PRAGMA journal_mode=DELETE")
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        con.execute(f"PRAGMA max_page_count={pages}")
        return con

    class Study:  # what RatingStore reads of a study
        mode, tasks, db_path = "pick-one", {}, tmp_path / "ratings.db"

    store = st.RatingStore(Study(), db_path=tmp_path / "ratings.db")
    store.con.close()
    monkeypatch.setattr(st, "connect", tiny)
    store = st.RatingStore(Study(), db_path=tmp_path / "ratings.db")
    rows = [(f"r{i}", f"t{i}", 1, 1, None, "x" * 2000, 0.0, 0.0) for i in range(50)]
    with pytest.raises(DiskFullError, match="ratings.db"):
        store._write(rows)
    assert store.con.execute("SELECT COUNT(*) FROM ratings").fetchone()[0] == 0  # nothing half-written


def test_a_bare_full_disk_error_in_any_command_is_one_named_line(capsys):
    import typer

    from reimagen.utils.cliutil import friendly

    @friendly
    def command():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/x.parquet")

    with pytest.raises(typer.Exit) as info:
        command()
    err = _one_line(capsys.readouterr().err)
    assert info.value.exit_code == 2 and "the disk is full" in err and "/data/out/x.parquet" in err, err


# ----------------------------------------------------------------------------------------------
# One run folder, one writer
# ----------------------------------------------------------------------------------------------
HOLDER = """
import sys, time
from reimagen.utils.runlock import run_lock
with run_lock(sys.argv[1]):
    open(sys.argv[2], "w").close()
    time.sleep(float(sys.argv[3]))
"""


def _hold(folder: Path, seconds: float, tmp_path: Path) -> subprocess.Popen:
    ready = tmp_path / f"ready-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(ready), str(seconds)], cwd=REPO)
    deadline = time.time() + 60
    while not ready.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert ready.exists()
    return proc


def test_a_second_writer_is_refused_with_the_holders_name_or_waits_with_wait(ckpt, tmp_path):
    out = tmp_path / "run"
    holder = _hold(out, 600, tmp_path)
    try:
        res = runner.invoke(app, _sample_args(ckpt, out))
        text = _one_line(res.output)
        assert res.exit_code == 2 and f"pid {holder.pid}" in text and "--wait" in text, text
        assert not list(out.glob("*.png"))
    finally:
        holder.kill()
        holder.wait()
    holder = _hold(out, 3, tmp_path)  # --wait: proceeds once the holder is done
    res = runner.invoke(app, _sample_args(ckpt, out, "--wait"))
    holder.wait()
    assert res.exit_code == 0, res.output
    assert len(list(out.glob("*.png"))) == 6


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    holder = _hold(tmp_path / "run", 600, tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with run_lock(tmp_path / "run") as record:
        assert f"pid {holder.pid}" in record["took_over"]
    with run_lock(tmp_path / "run") as record:
        assert record["took_over"] is None  # a clean exit leaves no stale holder


def test_the_lock_is_reentrant_within_a_process_and_per_rank(tmp_path):
    with run_lock(tmp_path, rank=0):
        with run_lock(tmp_path, rank=0):  # a command's run, then its generate_run
            pass
        with run_lock(tmp_path, rank=1):  # torchrun's ranks write one folder side by side
            pass
    holder = _hold(tmp_path, 600, tmp_path)
    try:
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            with run_lock(tmp_path, rank=0, wait=True, poll=0.05, timeout=0.3):
                pass
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------------------------
# Deprecated spellings
# ----------------------------------------------------------------------------------------------
def test_the_deprecated_spellings_are_listed_and_still_accepted():
    assert DEPRECATED_OPTIONS == {"fid --no-kid": ("--metrics without kid, e.g. --metrics fid", "0.3")}
    for spelling, (new, until) in DEPRECATED_OPTIONS.items():
        command, option = spelling.split()
        res = runner.invoke(app, [command, option, "--dataset", "no-such-dataset", "--model", "/nonexistent/m",
                                  "--out", "/nonexistent/x"])
        text = _one_line(res.output)
        assert "No such option" not in text, text
        assert f"{spelling} is deprecated" in text and new in text and until in text, text
        assert res.exit_code == 2 and "error:" in text  # then the command goes on, to its checks of the rest


def test_no_kid_means_the_metrics_without_kid():
    from evaluation.cli import without_kid

    assert without_kid("fid,kid") == "fid"
    assert without_kid("kid, fid ,cmmd") == "fid,cmmd"
