"""Opaque ids of a study (HMAC-SHA256 digests keyed by its secret) and its JSON-lines reader: what ``tasks`` and
``controls`` both build on."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any


def digest(secret: str, *parts: str, n: int) -> str:
    """The first ``n`` hex digits of HMAC-SHA256(secret, parts): ids, and the per-rater orders of ``tasks``."""
    msg = "\x1f".join(parts).encode("utf-8")
    return hmac.new(secret.encode("ascii"), msg, hashlib.sha256).hexdigest()[:n]


def task_id(secret: str, model: str, prompt_id: str) -> str:
    return "t_" + digest(secret, "task", model, prompt_id, n=20)


def image_id(secret: str, path: str | Path) -> str:
    return "i_" + digest(secret, "image", str(Path(path).resolve()), n=24)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
    return rows


__all__ = ["digest", "task_id", "image_id", "read_jsonl"]
