"""Write a file under a temporary name in its folder, then rename it into place.

The rule of this project's developers' guide: results are written to a temporary name and renamed, so nothing
is ever half-written. A run killed mid-write, a full disk or an object json cannot serialise leaves the
destination as it was (its previous content, or no file), never a truncated file that a rerun or a resumed run
would take for finished. ``os.replace`` within one folder is atomic; the temporary file
``.{stem}.tmp{pid}{suffix}`` sits next to the destination (same file system), is hidden, differs between
processes, so two writers never share one, and keeps the destination's suffix, so a library that picks its
format by the file name (PIL ``save``, matplotlib ``savefig``) writes the right one. If writing fails, the
temporary file is removed and the error passes on.

``replacing_path`` yields that temporary name for a library that writes the file itself (PIL, matplotlib,
pyarrow, safetensors, tarfile); the other helpers write through a file handle on it.

A full disk (ENOSPC, or a quota: EDQUOT) becomes ``DiskFullError`` naming the destination: libraries that write
through a handle (PIL, safetensors) raise a bare ``OSError`` that names no file.

Text is written as UTF-8 bytes (no newline translation). ``write_json`` and ``write_jsonl`` pass their keyword
arguments to ``json.dumps`` unchanged, so each caller keeps its own format (``indent``, ``sort_keys``,
``ensure_ascii``, ``default``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import numpy as np

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write failed because the disk (or the quota) is full; ``filename`` is what was being written."""

    def __init__(self, path: str | os.PathLike, cause: OSError | None = None):
        reason = (cause.strerror if cause is not None and cause.strerror else "No space left on device")
        super().__init__(errno.ENOSPC, f"the disk is full ({reason}) while writing {path}: free space (or write "
                         "elsewhere) and rerun the same command; what was written before stays valid and the run "
                         "resumes", str(path))

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(err: BaseException, path: str | os.PathLike | None = None) -> bool:
    """An OSError with ENOSPC / EDQUOT, or a library's error that says so in words (safetensors' SafetensorError
    "No space left on device (os error 28)"), or torch.save's short write ("unexpected pos", no errno) on a
    file system with under 1 MiB left at ``path``."""
    if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
        return True
    text = str(err)
    if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
        return True
    return "unexpected pos" in text and path is not None and _free_bytes(Path(path)) < 1 << 20


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def disk_full_names(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a full-disk error of the block (``is_disk_full``) as ``DiskFullError(path)``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if is_disk_full(err, path):
            raise DiskFullError(path, err if isinstance(err, OSError) else None) from err
        raise


@contextlib.contextmanager
def replacing_path(path: str | os.PathLike) -> Iterator[Path]:
    """The temporary name ``.{stem}.tmp{pid}{suffix}`` in ``path``'s folder (made if missing), for a library to
    write the file; renamed to ``path`` when the block ends without an error, removed (if it exists) otherwise."""
    path = Path(path)
    with disk_full_names(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        with disk_full_names(path):
            yield tmp
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def _replacing(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file handle on ``replacing_path``'s temporary name (closed before the rename)."""
    with replacing_path(path) as tmp, open(tmp, "wb") as fh:
        yield fh


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with _replacing(path) as fh:
        fh.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` as UTF-8."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """``json.dumps(obj, **dumps_kwargs)`` as UTF-8 (serialised before the temporary file is opened)."""
    return write_text(path, json.dumps(obj, **dumps_kwargs))


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any], **dumps_kwargs: Any) -> Path:
    """One ``json.dumps(row, **dumps_kwargs)`` and a newline per row; ``rows`` may be a generator (streamed)."""
    with _replacing(path) as fh:
        for row in rows:
            fh.write((json.dumps(row, **dumps_kwargs) + "\n").encode("utf-8"))
    return Path(path)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """``np.savez`` (uncompressed); written through a file handle, so numpy does not append ``.npz``."""
    with _replacing(path) as fh:
        np.savez(fh, **arrays)
    return Path(path)


__all__ = ["DiskFullError", "disk_full_names", "is_disk_full", "replacing_path", "write_bytes", "write_text", "write_json",
           "write_jsonl", "save_npz"]
