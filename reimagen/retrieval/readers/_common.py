"""Helpers every reader shares: option parsing, progress, decode checks, references under a root."""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..base import CorruptImageError, KnowledgeBase, load_image_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on", "y", "t"):
        return True
    if s in ("0", "false", "no", "off", "n", "f", "", "none"):
        return False
    raise ValueError(f"{name}={value!r}: expected a boolean (true/false/1/0)")


def _as_int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def _optional(value: Any) -> Any:
    """``None`` for a missing option (also the strings "" and "none" of a query string)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return value


def _track(seq: Iterable, description: str, progress: bool, total: int | None = None) -> Iterable:
    if not progress:
        return seq
    from rich.progress import track

    return track(seq, description=description, total=total, transient=True)


def _image_bytes_ok(data: bytes) -> bool:
    """True if ``data`` decodes as an image: PIL ``verify`` (structure, PNG CRCs) and a full ``load``
    (catches truncated JPEGs, which ``verify`` alone lets through)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001  (PIL raises many kinds of errors on bad data)
        return False


def _image_ref_ok(ref: str, root: str | Path) -> bool:
    try:
        return _image_bytes_ok(load_image_bytes(ref, root))
    except (CorruptImageError, OSError):
        return False


def _image_file_ok(path: str | Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return _image_bytes_ok(fh.read())
    except OSError:
        return False


def _make_kb(ids: Sequence[str], texts: Sequence[str], refs: Sequence[str], *, name: str, root: str | Path,
             skipped: Counter | dict, meta: dict[str, Any], source: str | Path) -> KnowledgeBase:
    """A KnowledgeBase whose duplicate-id error names the source file."""
    try:
        return KnowledgeBase(ids, texts, refs, name=name, root=root, skipped=dict(skipped), meta=meta)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def _ref_under(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root`` if it lies inside it, else absolute (a valid reference either way)."""
    ap, ar = os.path.abspath(path), os.path.abspath(root)
    try:
        if os.path.commonpath([ap, ar]) == ar:
            return os.path.relpath(ap, ar)
    except ValueError:  # different drives
        pass
    return ap

