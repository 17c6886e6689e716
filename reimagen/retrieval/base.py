"""Knowledge bases and the retriever interface (Sec. 3.2: c_n = top-k pairs of B by gamma(p, B); Sec. 4).

A knowledge base B is a collection of (id, text, image reference) pairs. Image references are strings so that
a collection can be stored as a table; ``load_image`` resolves them lazily:

    /abs/path.jpg or rel/path.jpg        a file (relative to the knowledge base's root)
    tsv://<file>#<byte offset>           a line "id<TAB>base64" of a TSV (WebQA's imgs.tsv + imgs.lineidx)
    tar://<shard.tar>#<member name>      a member of a webdataset / img2dataset tar shard

A retriever answers "top-k ids and scores for a batch of queries". It is built once, saved to a folder with a
``manifest.json`` recording its kind, source and parameters, and loaded later with ``load_retriever``.
"""

from __future__ import annotations

import abc
import base64
import functools
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence



class OptionError(ValueError):
    """Bad input whose remedy is one of a reader's options. Its text spells the remedy as in a knowledge-base
    spec (``FORMAT:PATH?key=value``); a command that takes the option another way (``fid --dataset-option
    key=value``) re-spells it with ``respell``, so that the suggested fix is one the user can type."""

    MARK = "{remedy}"

    def __init__(self, message: str, option: str, value: Any):
        self.message, self.option, self.value = message, option, value
        super().__init__(message.replace(self.MARK, f"?{option}={value}"))

    def respell(self, spell: Callable[[str, Any], str]) -> ValueError:
        return ValueError(self.message.replace(self.MARK, spell(self.option, self.value)))

class CorruptImageError(ValueError):
    """An image reference that exists but cannot be decoded."""


# ----------------------------------------------------------------------------------------------
# Image references
# ----------------------------------------------------------------------------------------------
def load_image_bytes(ref: str, root: str | Path | None = None) -> bytes:
    """The raw bytes behind an image reference (see the module docstring)."""
    if ref.startswith("tsv://"):
        path, _, offset = ref[len("tsv://"):].rpartition("#")
        with open(_resolve(path, root), "rb") as fh:
            fh.seek(int(offset))
            line = fh.readline().rstrip(b"\r\n")
        _, _, b64 = line.partition(b"\t")
        try:
            return base64.b64decode(b64, validate=False)
        except ValueError as err:
            raise CorruptImageError(f"{ref}: invalid base64 ({err})") from None
    if ref.startswith("tar://"):
        path, _, member = ref[len("tar://"):].rpartition("#")
        full = _resolve(path, root)
        try:
            st = os.stat(full)
            offset, size = _tar_members(full, st.st_mtime_ns, st.st_size)[member]
        except KeyError:
            raise FileNotFoundError(f"{member} is not a file in {path}") from None
        with open(full, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)
    with open(_resolve(ref, root), "rb") as fh:
        return fh.read()


@functools.lru_cache(maxsize=64)
def _tar_members(path: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size) of an uncompressed tar shard, scanned once per process (and again
    if the file changes: mtime and size are part of the cache key), so that loading many images of one
    shard does not rescan its headers every time."""
    with tarfile.open(path) as tf:
        out = {m.name: (m.offset_data, m.size) for m in tf.getmembers() if m.isfile()}
    with open(path, "rb") as fh:  # compressed shards (.tar.gz) have no usable offsets
        if fh.read(2) == b"\x1f\x8b":
            raise ValueError(f"{path}: compressed tar shards are not supported for random access; use plain .tar")
    return out


def load_image(ref: str, root: str | Path | None = None):
    """Decode an image reference to an RGB PIL image; CorruptImageError if it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    data = load_image_bytes(ref, root)
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise CorruptImageError(f"{ref}: cannot decode image ({err})") from None
    return im.convert("RGB")


def unreadable_images(refs: Sequence[str], root: str | Path | None = None, workers: int = 2,
                      on_done: Callable[[int], None] | None = None) -> dict[str, str]:
    """{reference: why} of the images among ``refs`` that are missing or cannot be decoded, found by decoding
    each one (``load_image``) on ``workers`` threads (PIL releases the GIL while decoding); ``on_done(1)`` after
    each image (a progress bar)."""
    from concurrent.futures import ThreadPoolExecutor

    def why(ref: str) -> str | None:
        try:
            load_image(ref, root)
        except (OSError, ValueError, SyntaxError) as err:  # CorruptImageError, a missing file, PIL's broken PNG
            return (str(err).splitlines() or [type(err).__name__])[0][:300]
        return None

    bad: dict[str, str] = {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for ref, reason in zip(refs, pool.map(why, refs, chunksize=64)):
            if reason is not None:
                bad[ref] = reason
            if on_done is not None:
                on_done(1)
    return bad


def _resolve(path: str, root: str | Path | None) -> str:
    if root is None or os.path.isabs(path):
        return path
    return os.path.join(str(root), path)


# ----------------------------------------------------------------------------------------------
# Knowledge bases
# ----------------------------------------------------------------------------------------------
class KnowledgeBase:
    """(id, text, image reference) pairs with lazy image loading and a record of what a reader skipped."""

    def __init__(self, ids: Sequence[str], texts: Sequence[str], image_refs: Sequence[str], name: str = "",
                 root: str | Path | None = None, skipped: dict[str, int] | None = None,
                 meta: dict[str, Any] | None = None):
        if not (len(ids) == len(texts) == len(image_refs)):
            raise ValueError(f"{len(ids)} ids, {len(texts)} texts and {len(image_refs)} image references")
        self.ids = [str(i) for i in ids]
        self.texts = [str(t) for t in texts]
        self.image_refs = [str(r) for r in image_refs]
        self.name = name
        self.root = str(root) if root is not None else None
        self.skipped: dict[str, int] = dict(skipped or {})
        self.meta: dict[str, Any] = dict(meta or {})
        self._index: dict[str, int] = {}
        for i, pid in enumerate(self.ids):
            if pid in self._index:
                raise ValueError(f"knowledge base {name or '(unnamed)'} has duplicate id {pid!r} "
                                 f"(rows {self._index[pid]} and {i})")
            self._index[pid] = i

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"KnowledgeBase({self.name!r}, {len(self)} pairs, skipped={self.skipped})"

    def index_of(self, pid: str) -> int:
        try:
            return self._index[pid]
        except KeyError:
            raise KeyError(f"id {pid!r} is not in knowledge base {self.name or '(unnamed)'}") from None

    def __contains__(self, pid: str) -> bool:
        return pid in self._index

    def absolute_ref(self, i: int) -> str:
        """Row i's image reference with its file path made absolute (valid without knowing the root)."""
        ref = self.image_refs[i]
        for scheme in ("tsv://", "tar://"):
            if ref.startswith(scheme):
                path, _, rest = ref[len(scheme):].rpartition("#")
                return f"{scheme}{os.path.abspath(_resolve(path, self.root))}#{rest}"
        return os.path.abspath(_resolve(ref, self.root))

    def image(self, i: int):
        """The RGB PIL image of row i (decoded on demand)."""
        return load_image(self.image_refs[i], self.root)

    def subset(self, rows: Sequence[int], name: str | None = None) -> "KnowledgeBase":
        return KnowledgeBase([self.ids[i] for i in rows], [self.texts[i] for i in rows],
                             [self.image_refs[i] for i in rows], name or self.name, self.root, self.skipped, self.meta)

    def skip_report(self) -> str:
        if not self.skipped:
            return f"{self.name or 'knowledge base'}: {len(self)} pairs, nothing skipped"
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{self.name or 'knowledge base'}: {len(self)} pairs; skipped {sum(self.skipped.values())}: {parts}"

    # -- storage --------------------------------------------------------------------------------
    def to_parquet(self, path: str | Path) -> Path:
        """Write id, text, image columns (+ metadata) atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        table = pa.table({"id": self.ids, "text": self.texts, "image": self.image_refs})
        meta = {"name": self.name, "root": self.root, "skipped": self.skipped, "meta": self.meta}
        table = table.replace_schema_metadata({b"reimagen": json.dumps(meta).encode()})
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def from_parquet(cls, path: str | Path) -> "KnowledgeBase":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not Path(path).is_file():
            raise FileNotFoundError(f"knowledge-base table {path} does not exist")
        try:
            table = pq.read_table(path)
        except pa.ArrowException as err:
            raise ValueError(f"{path} cannot be read as a parquet table ({err})") from None
        missing = {"id", "text", "image"} - set(table.column_names)
        if missing:
            raise ValueError(f"{path} lacks columns {sorted(missing)}; a knowledge-base table has id, text, image")
        raw = (table.schema.metadata or {}).get(b"reimagen")
        meta = json.loads(raw) if raw else {}
        return cls(table.column("id").to_pylist(), table.column("text").to_pylist(), table.column("image").to_pylist(),
                   meta.get("name", Path(path).stem), meta.get("root", str(Path(path).parent)), meta.get("skipped"),
                   meta.get("meta"))


# ----------------------------------------------------------------------------------------------
# Retrievers
# ----------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """Per query, up to k neighbour ids, best first, and their scores (a query may get fewer than k,
    or none, e.g. an empty query or one with no known term)."""

    ids: list[list[str]]
    scores: list[list[float]]

    def __len__(self) -> int:
        return len(self.ids)


MANIFEST = "manifest.json"


class Retriever(abc.ABC):
    """Top-k (id, score) for a batch of text queries over one knowledge base."""

    kind: str = ""

    @abc.abstractmethod
    def search(self, queries: Sequence[str], k: int, exclude_ids: Sequence[str | None] | None = None,
               query_ids: Sequence[str] | None = None) -> SearchResult:
        """Top-k per query, best first; ``exclude_ids[i]`` (e.g. the query's own id) never appears in row i.
        ``query_ids`` name the queries; text retrievers ignore them, precomputed neighbours are looked up by them."""

    @abc.abstractmethod
    def _save(self, folder: Path) -> dict[str, Any]:
        """Write the index files into ``folder``; return the parameters to record in the manifest."""

    @classmethod
    @abc.abstractmethod
    def _load(cls, folder: Path, manifest: dict[str, Any], mmap: bool = True) -> "Retriever":
        ...

    def save(self, folder: str | Path, source: str = "") -> Path:
        """Save atomically: written to ``<folder>.tmp`` and renamed, with a manifest of kind, source, parameters."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        params = self._save(tmp)
        manifest = {"kind": self.kind, "source": source, "params": params,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "format_version": 1}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return folder


RETRIEVERS: dict[str, type[Retriever]] = {}
_BUILTIN = {"bm25": "bm25", "bm25-rank": "bm25", "clip": "clip", "precomputed": "precomputed"}  # kind -> module


def register_retriever(cls: type[Retriever]) -> type[Retriever]:
    RETRIEVERS[cls.kind] = cls
    return cls


def load_retriever(folder: str | Path, mmap: bool = True) -> Retriever:
    folder = Path(folder)
    mf = folder / MANIFEST
    if not mf.is_file():
        raise FileNotFoundError(f"{folder} is not a saved index (no {MANIFEST}); build one with `reimagen-eval index build`")
    manifest = json.loads(mf.read_text())
    kind = manifest.get("kind")
    if kind not in RETRIEVERS and kind in _BUILTIN:
        import importlib

        importlib.import_module(f"{__package__}.{_BUILTIN[kind]}")  # registers it; only this kind's deps are needed
    if kind not in RETRIEVERS:
        raise ValueError(f"{mf}: unknown retriever kind {kind!r}; known: {sorted(RETRIEVERS)}")
    return RETRIEVERS[kind]._load(folder, manifest, mmap=mmap)
