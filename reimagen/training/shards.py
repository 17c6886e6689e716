"""Training shards: a triples table and its images as webdataset tar shards (the img2dataset / LAION layout).

Training on millions of KNN-ImageText pairs (Sec. 3.2) must read sequentially and never random-access the
knowledge base, so every sample carries its K neighbours with it. Sample ``<key>`` of ``shard-000042.tar``:

    <key>.jpg | <key>.png          the pair's image: the original bytes, or a JPEG resized to ``max_side``
    <key>.txt                      its caption
    <key>.json                     {"id", "row", "neighbor_ids", "neighbor_texts"}
    <key>.nbr0.jpg, .nbr1.png ...  its K neighbours' images, best first

``<key>`` is the row number in the table (nine digits): ids may hold dots or slashes, which webdataset keys may
not. Shard s holds table rows [s * samples_per_shard, (s + 1) * samples_per_shard); with RANK / WORLD_SIZE
set (torchrun) rank r writes shards s = r, r + W, ... Each shard is written to a temporary name and renamed,
with a sidecar ``shard-000042.json`` (sample count, SHA-256, what was skipped), so a rerun skips finished
shards. Rows whose image or a neighbour's image is missing or cannot be decoded are skipped and counted.
When every shard is done, ``manifest.json`` is written: a wids shard list (``shardlist``: url, nsamples,
filesize) plus K, the source table's fingerprint, the settings and the skip counts.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..utils.atomic import replacing_path, write_json

MANIFEST = "manifest.json"
FORMAT = "reimagen-shards/1"


@dataclass
class ShardSettings:
    samples_per_shard: int = 1000
    max_side: int | None = None       # None: the original bytes; else a JPEG whose longer side is at most this
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.max_side is not None and self.max_side < 8:
            raise ValueError(f"max_side must be >= 8 pixels, got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


@dataclass
class ShardReport:
    shards_written: int = 0
    shards_skipped: int = 0           # already finished by an earlier run (or another process)
    samples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    manifest: Path | None = None      # set once every shard of the table exists

    def __str__(self) -> str:
        bad = ", ".join(f"{v} {k}" for k, v in sorted(self.skipped.items())) or "none"
        done = f"manifest {self.manifest}" if self.manifest else "manifest not yet written (other shards pending)"
        return (f"{self.samples} samples in {self.shards_written} new shards ({self.shards_skipped} already done); "
                f"rows skipped: {bad}; {done}")


def read_table(path: str | Path):
    """A triples table (parquet, JSONL or CSV) with columns id, text, image, neighbor_ids; checked."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"triples table {path} does not exist")
    readers = {".parquet": pd.read_parquet, ".jsonl": lambda p: pd.read_json(p, lines=True),
               ".json": pd.read_json, ".csv": pd.read_csv}
    if path.suffix not in readers:
        raise ValueError(f"unsupported table format {path.suffix!r}: use .parquet, .jsonl or .csv")
    df = readers[path.suffix](path)
    missing = {"id", "text", "image", "neighbor_ids"} - set(df.columns)
    if missing:
        raise ValueError(f"triples table {path} lacks columns {sorted(missing)}; expected id, text, image, neighbor_ids")
    ids = df["id"].astype(str)
    if ids.duplicated().any():
        raise ValueError(f"triples table {path} has duplicate ids")
    return df


def neighbour_lists(column: Sequence[Any]) -> list[list[str]]:
    """The neighbor_ids column as lists of ids (lists, arrays or one "id1|id2" string per row)."""
    return [v.split("|") if isinstance(v, str) else [str(x) for x in v] for v in column]


def table_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def image_record(ref: str, root: Path, settings: ShardSettings) -> tuple[bytes, str]:
    """(bytes, extension) of one image for a shard: decoded once to check it; re-encoded only when needed.
    FileNotFoundError if missing, CorruptImageError if it cannot be decoded."""
    from PIL import Image

    from ..retrieval.base import CorruptImageError, load_image_bytes

    data = load_image_bytes(ref, root)
    try:
        im = Image.open(io.BytesIO(data))
        fmt = im.format
        im.load()
    except Exception as err:  # PIL raises many kinds (OSError, SyntaxError, ValueError) on damaged files
        raise CorruptImageError(f"{ref}: cannot decode image ({err})") from None
    too_big = settings.max_side is not None and max(im.size) > settings.max_side
    if fmt in ("JPEG", "PNG") and im.mode in ("RGB", "L") and not too_big:
        return data, "jpg" if fmt == "JPEG" else "png"
    im = im.convert("RGB")
    if too_big:
        im.thumbnail((settings.max_side, settings.max_side), Image.BICUBIC, reducing_gap=None)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=settings.jpeg_quality)
    return buf.getvalue(), "jpg"


def _shard_name(s: int) -> str:
    return f"shard-{s:06d}"


def write_shard(df, nbrs: list[list[str]], rows: range, index: dict[str, int], root: Path, out: Path, s: int,
                settings: ShardSettings) -> dict[str, Any]:
    """Write shard ``s`` (table rows ``rows``) atomically and its sidecar; returns the sidecar."""
    import webdataset as wds

    from ..retrieval.base import CorruptImageError

    texts, refs, ids = df["text"].astype(str), df["image"].astype(str), df["id"].astype(str)
    skipped: dict[str, int] = {}
    cache: dict[int, tuple[bytes, str] | str] = {}  # row -> record or the reason it failed; one shard's worth

    def record(row: int) -> tuple[bytes, str] | str:
        if row not in cache:
            try:
                cache[row] = image_record(refs.iloc[row], root, settings)
            except FileNotFoundError:
                cache[row] = "missing image"
            except (CorruptImageError, OSError):
                cache[row] = "unreadable image"
        return cache[row]

    n = 0
    tar = out / f"{_shard_name(s)}.tar"
    with replacing_path(tar) as tmp:
        with wds.TarWriter(str(tmp)) as sink:
            for row in rows:
                own = record(row)
                nb = [record(index[x]) for x in nbrs[row]]
                bad = own if isinstance(own, str) else next((f"neighbour's {r}" for r in nb if isinstance(r, str)), None)
                if bad is not None:
                    skipped[bad] = skipped.get(bad, 0) + 1
                    continue
                sample = {"__key__": f"{row:09d}", own[1]: own[0], "txt": texts.iloc[row],
                          "json": json.dumps({"id": ids.iloc[row], "row": row, "neighbor_ids": nbrs[row],
                                              "neighbor_texts": [texts.iloc[index[x]] for x in nbrs[row]]})}
                for j, (data, ext) in enumerate(nb):  # type: ignore[misc]
                    sample[f"nbr{j}.{ext}"] = data
                sink.write(sample)
                n += 1
    side = {"shard": tar.name, "rows": [rows.start, rows.stop], "nsamples": n, "filesize": tar.stat().st_size,
            "sha256": table_fingerprint(tar), "skipped": skipped}
    if n == 0:
        tar.unlink()
    write_json(out / f"{_shard_name(s)}.json", side, indent=1)
    return side


def write_shards(table: str | Path, out: str | Path, settings: ShardSettings | None = None, rank: int = 0,
                 world_size: int = 1, progress: bool = True, limit: int | None = None) -> ShardReport:
    """Turn a triples table into training shards in ``out`` (see the module docstring); resumable. ``limit``: only
    the first rows as samples (a trial); their neighbours still come from the whole table."""
    from rich.progress import track

    settings = settings or ShardSettings()
    table, out = Path(table), Path(out)
    df = read_table(table)
    n_rows = len(df) if limit is None else min(limit, len(df))
    nbrs = neighbour_lists(df["neighbor_ids"])
    ks = {len(v) for v in nbrs}
    if len(ks) > 1:
        raise ValueError(f"rows of {table} have different neighbour counts {sorted(ks)}; every row needs the same K")
    ids = df["id"].astype(str).tolist()
    index = {pid: i for i, pid in enumerate(ids)}
    unknown = sum(1 for row in nbrs for x in row if x not in index)
    if unknown:
        raise ValueError(f"{unknown} neighbour ids in {table} are not ids of the table")
    source = {"table": str(table.resolve()), "fingerprint": table_fingerprint(table), "rows": n_rows, "limit": limit,
              "k": ks.pop() if ks else 0, "settings": settings.__dict__, "format": FORMAT}
    _check_settings(out, source)
    n_shards = -(-n_rows // settings.samples_per_shard)
    mine = [s for s in range(n_shards) if s % world_size == rank]
    report = ShardReport()
    for s in track(mine, description=f"shards (rank {rank}/{world_size})", disable=not progress):
        if (out / f"{_shard_name(s)}.json").is_file():
            report.shards_skipped += 1
            continue
        lo = s * settings.samples_per_shard
        side = write_shard(df, nbrs, range(lo, min(lo + settings.samples_per_shard, n_rows)), index, table.parent,
                           out, s, settings)
        report.shards_written += 1
        report.samples += side["nsamples"]
        for k, v in side["skipped"].items():
            report.skipped[k] = report.skipped.get(k, 0) + v
    report.manifest = write_manifest(out, source, n_shards)
    return report


def _check_settings(out: Path, source: dict[str, Any]) -> None:
    """Refuse to mix shards of another table or other settings in one folder; record ours otherwise."""
    f = out / "settings.json"
    if f.is_file():
        old = json.loads(f.read_text())
        if old != source:
            diff = sorted(k for k in set(old) | set(source) if old.get(k) != source.get(k))
            raise ValueError(f"{out} holds shards of another table or other settings (differing: {', '.join(diff)}); "
                             "use a new folder or delete it")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(f, source, indent=1)


def write_manifest(out: Path, source: dict[str, Any], n_shards: int) -> Path | None:
    """Write ``manifest.json`` once every shard's sidecar exists (any process may: the content is the same)."""
    sides = []
    for s in range(n_shards):
        f = out / f"{_shard_name(s)}.json"
        if not f.is_file():
            return None
        sides.append(json.loads(f.read_text()))
    skipped: dict[str, int] = {}
    for side in sides:
        for k, v in side["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    manifest = {"wids_version": 1, "name": Path(source["table"]).stem, "format": FORMAT,
                "shardlist": [{"url": x["shard"], "nsamples": x["nsamples"], "filesize": x["filesize"],
                               "sha256": x["sha256"]} for x in sides if x["nsamples"]],
                "k": source["k"], "source": source, "samples": sum(x["nsamples"] for x in sides), "skipped": skipped}
    return write_json(out / MANIFEST, manifest, indent=1)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """A shard folder's manifest, checked; a folder still being written is refused with what is missing."""
    folder = Path(folder)
    f = folder / MANIFEST
    if not f.is_file():
        pending = "" if not (folder / "settings.json").is_file() else \
            " (its shards are still being written: rerun `reimagen-eval shards` there to finish them)"
        raise FileNotFoundError(f"{folder} has no {MANIFEST}: not a finished shard folder{pending}")
    try:
        manifest = json.loads(f.read_text())
    except ValueError as err:
        raise ValueError(f"{f} is not valid JSON ({err}); rewrite it with `reimagen-eval shards`") from None
    if manifest.get("format") != FORMAT or not manifest.get("shardlist"):
        raise ValueError(f"{f} is not a reimagen shard manifest with at least one shard (format {FORMAT})")
    for sh in manifest["shardlist"]:
        if "://" not in sh["url"] and not (folder / sh["url"]).is_file():
            raise FileNotFoundError(f"shard {folder / sh['url']} listed in {f} does not exist")
    return manifest


__all__ = ["ShardSettings", "ShardReport", "write_shards", "read_manifest", "read_table", "neighbour_lists",
           "image_record", "MANIFEST"]
