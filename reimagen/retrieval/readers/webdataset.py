"""img2dataset / webdataset tar shards (LAION-400M, the out-of-domain database)."""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from ..base import KnowledgeBase
from ._common import IMAGE_EXTENSIONS, _as_bool, _image_bytes_ok, _make_kb, _ref_under, _track
from ._registry import register_reader


# ----------------------------------------------------------------------------------------------
# webdataset / img2dataset tar shards (LAION-400M, the OOD database)
# ----------------------------------------------------------------------------------------------
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's convention: key = path up to the first dot


def _expand_shards(path: str | Path) -> tuple[Path, list[Path]]:
    p = str(path)
    if any(c in p for c in "*?["):
        shards = sorted(Path(s) for s in glob.glob(p, recursive=True) if os.path.isfile(s))
        parts = Path(p).parts
        fixed = [s for s in parts[:next(i for i, s in enumerate(parts) if any(c in s for c in "*?["))]]
        root = Path(os.path.abspath(Path(*fixed))) if fixed else Path(os.getcwd())
        if not shards:
            raise FileNotFoundError(f"no shard matches {p}")
    elif os.path.isdir(p):
        root = Path(p)
        shards = sorted(Path(s) for s in glob.glob(os.path.join(p, "**", "*.tar"), recursive=True))
        if not shards:
            raise FileNotFoundError(f"no .tar shards in {p}")
    elif os.path.isfile(p):
        root, shards = Path(p).parent, [Path(p)]
    else:
        raise FileNotFoundError(f"webdataset shards not found: {p} (give a folder of .tar shards, a glob, or a .tar)")
    return root, shards


@register_reader("webdataset")
def read_webdataset(path: str | Path, verify: bool = False, progress: bool = True) -> KnowledgeBase:
    """img2dataset / webdataset output: a folder (searched recursively for ``.tar``), a glob (e.g.
    ``/data/laion/0000*.tar``; webdataset's brace notation ``{00000..00099}`` is not expanded, and in an
    ``open_knowledge_base`` spec ``?`` starts the options, so use ``*`` or ``[...]``) or one ``.tar`` shard.
    Samples are grouped by key (webdataset's convention: the member path up to the first dot of its file name):
    ``KEY.jpg``/``.jpeg``/``.png``/``.webp`` (the image), ``KEY.txt`` (the caption) and ``KEY.json`` (metadata;
    its ``"caption"`` is used when there is no .txt).

    Read with the standard library's ``tarfile``, not the ``webdataset`` package: the reader only needs member
    names and the small .txt/.json members, and ``tarfile`` skips over image data by seeking, whereas a webdataset
    pipeline reads every image's bytes into memory; references ``tar://<shard>#<member>`` are also resolved by
    ``tarfile`` in ``load_image``. The root is the folder (or the fixed part of the glob); shard paths are
    relative to it.

    id = KEY, or ``"<shard path without .tar>/KEY"`` for keys that occur in more than one shard. Skipped, per
    sample: ``"no image member"``, ``"no caption"``, ``"corrupt image"`` (``verify=True`` only). A shard that
    cannot be read as a tar file is a ValueError naming it.
    """
    verify, progress = _as_bool(verify, "verify"), _as_bool(progress, "progress")
    root, shards = _expand_shards(path)
    skipped: Counter = Counter()
    rows: list[tuple[str, str, str, str]] = []  # (key, shard rel path, text, ref)
    for shard in _track(shards, "reading shards", progress, total=len(shards)):
        rel = _ref_under(shard, root)
        samples: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(shard, "r:*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    match = _WDS_KEY.match(m.name)
                    if not match:
                        continue
                    key, ext = match.group(1), match.group(2).lower()
                    s = samples.setdefault(key, {})
                    if "." + ext in IMAGE_EXTENSIONS:
                        s.setdefault("image", m)
                    elif ext == "txt":
                        s["txt"] = tf.extractfile(m).read().decode("utf-8", "replace")
                    elif ext == "json":
                        try:
                            obj = json.loads(tf.extractfile(m).read().decode("utf-8", "replace"))
                            s["json"] = obj if isinstance(obj, dict) else {}
                        except json.JSONDecodeError:
                            s["json"] = {}
                for key, s in samples.items():
                    if "image" not in s:
                        skipped["no image member"] += 1
                        continue
                    text = " ".join(str(s.get("txt") or "").split())
                    if not text:
                        text = " ".join(str((s.get("json") or {}).get("caption") or "").split())
                    if not text:
                        skipped["no caption"] += 1
                        continue
                    if verify and not _image_bytes_ok(tf.extractfile(s["image"]).read()):
                        skipped["corrupt image"] += 1
                        continue
                    rows.append((key, rel, text, f"tar://{rel}#{s['image'].name}"))
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ValueError(f"{shard}: cannot read as a tar shard ({err})") from None
    shards_of: dict[str, set[str]] = {}
    for key, rel, _, _ in rows:
        shards_of.setdefault(key, set()).add(rel)
    ids = [key if len(shards_of[key]) == 1 else f"{rel[:-4] if rel.endswith('.tar') else rel}/{key}"
           for key, rel, _, _ in rows]
    collided = sum(1 for k in shards_of if len(shards_of[k]) > 1)
    meta = {"format": "webdataset", "shards": len(shards), "keys_in_several_shards": collided}
    name = f"webdataset-{Path(os.path.abspath(root)).name}"
    return _make_kb(ids, [r[2] for r in rows], [r[3] for r in rows], name=name, root=root, skipped=skipped,
                    meta=meta, source=path)

