"""One run folder, one writer: an advisory ``fcntl.flock`` on ``OUT/.lock/rank<R>.lock`` for as long as a
process writes the folder, with its holder (host, pid, start time, command) written in the lock file.

* A second process on the same folder (and rank) waits for the lock (``wait=True``, ``--wait``) or is refused
  with the holder's name.
* The kernel drops a flock when its process dies, so a dead process's lock is taken over at once; its stale
  holder record is replaced (and named in ``RunLock.took_over``).
* The ranks of one torchrun job write one folder side by side, as they always did: each rank locks its own
  file, so a second job of the same world size meets the first one's locks rank by rank. (Jobs of different
  world sizes on one folder are not kept apart; their images are the same bytes and are written atomically.)

flock works on local file systems and on NFS (Linux emulates it with POSIX locks there since 2.6.12).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

LOCK_DIR = ".lock"
_HELD: dict[str, dict] = {}  # lock files this process holds -> its record (re-entrant: a command's run locks once)
_WAIT = {"default": False}


def wait_for_locks(wait: bool) -> None:
    """What ``run_lock(wait=None)`` does in this process: a command's ``--wait`` sets it once."""
    _WAIT["default"] = bool(wait)


class RunLockedError(RuntimeError):
    """Another live process writes this run folder."""


def _holder_text(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096).decode("utf-8", "replace")
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on {h['host']} (started {h['started']}: {h.get('command', '?')})"
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def run_lock(folder: str | Path, rank: int = 0, wait: bool | None = None, poll: float = 1.0,
             timeout: float | None = None) -> Iterator[dict]:
    """Hold the writer's lock of ``folder`` (made if missing) for rank ``rank``; yields the holder record, with
    ``took_over`` naming a dead holder whose record was found."""
    path = Path(folder) / LOCK_DIR / f"rank{rank}.lock"
    key = str(path.resolve())
    wait = _WAIT["default"] if wait is None else wait
    if key in _HELD:  # flock would refuse this process its own lock through a second descriptor
        yield _HELD[key]
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    start = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder_text(fd)
                if not wait:
                    raise RunLockedError(f"{folder} is being written by {holder}; wait for it (--wait), or write "
                                         "to another output folder") from None
                if timeout is not None and time.monotonic() - start > timeout:
                    raise RunLockedError(f"{folder} is still being written by {holder} after {timeout:.0f} s")
                time.sleep(poll)
        stale = os.fstat(fd).st_size > 0
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now().isoformat(timespec="seconds"),
                  "command": " ".join(sys.argv)[:300], "took_over": _holder_text(fd) if stale else None}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(record).encode())
        _HELD[key] = record
        try:
            yield record
        finally:
            del _HELD[key]
            os.ftruncate(fd, 0)  # a clean exit leaves no holder to report as stale
    finally:
        os.close(fd)  # releases the flock


__all__ = ["LOCK_DIR", "RunLockedError", "run_lock", "wait_for_locks"]
