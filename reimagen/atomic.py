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

Text is written as UTF-8 bytes (no newline translation). ``write_json`` and ``write_jsonl`` pass their keyword
arguments to ``json.dumps`` unchanged, so each caller keeps its own format (``indent``, ``sort_keys``,
``ensure_ascii``, ``default``).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any, Iterable, Iterator

import numpy as np


@contextlib.contextmanager
def replacing_path(path: str | os.PathLike) -> Iterator[Path]:
    """The temporary name ``.{stem}.tmp{pid}{suffix}`` in ``path``'s folder (made if missing), for a library to
    write the file; renamed to ``path`` when the block ends without an error, removed (if it exists) otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
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


__all__ = ["replacing_path", "write_bytes", "write_text", "write_json", "write_jsonl", "save_npz"]
