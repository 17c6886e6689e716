"""Tables of captions and local image paths (img2dataset parquet, csv, tsv, jsonl) and image folders."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from ..base import KnowledgeBase
from ._common import IMAGE_EXTENSIONS, _as_bool, _image_file_ok, _make_kb, _optional, _ref_under, _track
from ._registry import register_reader


# ----------------------------------------------------------------------------------------------
# Tables (img2dataset parquet, or any parquet/csv/tsv/jsonl) with a caption and a local path column
# ----------------------------------------------------------------------------------------------
def _read_table(path: Path, columns: list[str] | None = None):
    import pandas as pd

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if columns is not None:
            missing = [c for c in columns if c not in names]
            if missing:
                raise ValueError(f"{path}: no column {missing[0]!r} (columns: {names})")
        return pq.read_table(path, columns=columns).to_pandas()
    if suffix in (".csv", ".tsv"):
        df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    elif suffix in (".jsonl", ".json"):
        df = pd.read_json(path, lines=suffix == ".jsonl", dtype=False)
    else:
        raise ValueError(f"{path}: unsupported table format {suffix!r}; use .parquet, .csv, .tsv or .jsonl")
    if columns is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r} (columns: {list(df.columns)})")
        df = df[columns]
    return df


def _cell_str(value: Any) -> str:
    """A table cell as a string; None, NaN and pandas' NA are empty."""
    if value is None:
        return ""
    if not isinstance(value, str):
        import pandas as pd

        try:
            if pd.isna(value) is True:
                return ""
        except (TypeError, ValueError):
            pass
    return str(value)


@register_reader("parquet")
def read_parquet_collection(path: str | Path, caption_col: str = "caption", path_col: str = "path",
                            id_col: str | None = None, verify: bool = False, progress: bool = True) -> KnowledgeBase:
    """A table of (caption, local image path) rows: one ``.parquet`` (also ``.csv``/``.tsv``/``.jsonl``) file, or a
    folder of ``.parquet`` files read in sorted order. Relative image paths are relative to the table's folder.

    id = ``id_col`` if given; else the ``key`` column if there is one (img2dataset's sample key); else the row
    number over all files. If a ``status`` column exists (img2dataset), rows whose status is not "success" are
    skipped as ``"download failed"``. Other skips: ``"no caption"``, ``"no image path"``, ``"missing image"``
    (the file does not exist), ``"corrupt image"`` (``verify=True`` only).
    """
    verify, progress = _as_bool(verify, "verify"), _as_bool(progress, "progress")
    id_col = _optional(id_col)
    p = Path(path)
    if p.is_dir():
        root, files = p, sorted(p.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no .parquet files in {p}")
    elif p.is_file():
        root, files = p.parent, [p]
    else:
        raise FileNotFoundError(f"table not found: {p}")
    skipped: Counter = Counter()
    ids: list[str] = []
    texts: list[str] = []
    refs: list[str] = []
    row_no = 0
    first_file: dict[str, Path] = {}
    for f in files:
        if f.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            names = pq.read_schema(f).names
            table = None
        else:
            table = _read_table(f)
            names = list(table.columns)
        key_col = id_col if id_col is not None else ("key" if "key" in names else None)
        cols = list(dict.fromkeys([caption_col, path_col] + ([key_col] if key_col else [])
                                  + (["status"] if "status" in names else [])))
        missing = [c for c in cols if c not in names]
        if missing:
            raise ValueError(f"{f}: no column {missing[0]!r} (columns: {names}); "
                             f"set caption_col / path_col / id_col to the table's column names")
        df = _read_table(f, cols) if table is None else table[cols]
        caps, paths = df[caption_col].tolist(), df[path_col].tolist()
        keys = df[key_col].tolist() if key_col else None
        status = df["status"].tolist() if "status" in df.columns else None
        for i in _track(range(len(df)), f"reading {f.name}", progress, total=len(df)):
            row = row_no
            row_no += 1
            if status is not None and _cell_str(status[i]) != "success":
                skipped["download failed"] += 1
                continue
            text = " ".join(_cell_str(caps[i]).split())
            if not text:
                skipped["no caption"] += 1
                continue
            rel = _cell_str(paths[i]).strip()
            if not rel:
                skipped["no image path"] += 1
                continue
            full = rel if os.path.isabs(rel) else os.path.join(f.parent, rel)
            if not os.path.isfile(full):
                skipped["missing image"] += 1
                continue
            if verify and not _image_file_ok(full):
                skipped["corrupt image"] += 1
                continue
            pid = _cell_str(keys[i]) if keys is not None else str(row)
            if pid in first_file:
                where = f"{f}" if first_file[pid] == f else f"{first_file[pid]} and {f}"
                raise ValueError(f"{where}: duplicate id {pid!r} (column {key_col or 'row number'})")
            first_file[pid] = f
            ids.append(pid)
            texts.append(text)
            refs.append(rel if os.path.isabs(rel) else _ref_under(full, root))
    meta = {"format": "table", "files": [str(f) for f in files], "caption_col": caption_col, "path_col": path_col,
            "id_col": id_col}
    return _make_kb(ids, texts, refs, name=f"parquet-{p.stem}", root=root, skipped=skipped, meta=meta, source=p)


# ----------------------------------------------------------------------------------------------
# A folder of images with a JSONL or CSV of texts
# ----------------------------------------------------------------------------------------------
def _folder_records(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {n}: not valid JSON ({err})") from None
                if not isinstance(rec, dict):
                    raise ValueError(f"{path} line {n}: expected an object with 'file' and 'text'")
                yield n, rec
    elif suffix in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for n, rec in enumerate(reader, 2):  # line 1 is the header
                yield n, rec
    elif suffix == ".json":
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of records with 'file' and 'text'")
        for n, rec in enumerate(data, 1):
            if not isinstance(rec, dict):
                raise ValueError(f"{path} record {n}: expected an object with 'file' and 'text'")
            yield n, rec
    else:
        raise ValueError(f"{path}: unsupported texts file {suffix!r}; use .jsonl, .csv, .tsv or .json")


@register_reader("folder")
def read_folder(root: str | Path, texts: str | Path = "captions.jsonl", verify: bool = False,
                progress: bool = True) -> KnowledgeBase:
    """A folder of images (searched recursively) with a texts file (``texts``, relative to ``root`` or absolute;
    JSONL, CSV or TSV with a header, or a JSON list). Each record has ``"file"`` (or ``"image"``: a path relative to
    ``root``) and ``"text"``, optionally ``"id"`` (default: the file's stem). Rows keep the texts file's order.

    Skipped: ``"missing image"`` (a record whose file does not exist), ``"no text"`` (empty text),
    ``"corrupt image"`` (``verify=True`` only), and ``"image without text"`` (an image in the folder that no record
    names). A record without a file or text field is a ValueError naming the file and line.
    """
    root = Path(root)
    verify, progress = _as_bool(verify, "verify"), _as_bool(progress, "progress")
    tpath = Path(texts)
    if not tpath.is_absolute():
        tpath = root / tpath
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not tpath.is_file():
        raise FileNotFoundError(f"texts file not found: {tpath} (expected records with 'file' and 'text')")
    skipped: Counter = Counter()
    ids: list[str] = []
    out_texts: list[str] = []
    refs: list[str] = []
    named: set[str] = set()
    for n, rec in _track(list(_folder_records(tpath)), f"reading {tpath.name}", progress):
        file = _cell_str(rec.get("file") or rec.get("image") or "").strip()
        if not file:
            raise ValueError(f"{tpath} line {n}: record has neither 'file' nor 'image'")
        if "text" not in rec:
            raise ValueError(f"{tpath} line {n}: record has no 'text'")
        full = Path(file) if os.path.isabs(file) else root / file
        named.add(os.path.normpath(os.path.abspath(full)))
        text = " ".join(_cell_str(rec.get("text")).split())
        if not full.is_file():
            skipped["missing image"] += 1
            continue
        if not text:
            skipped["no text"] += 1
            continue
        if verify and not _image_file_ok(full):
            skipped["corrupt image"] += 1
            continue
        ids.append(_cell_str(rec.get("id")).strip() or Path(file).stem)
        out_texts.append(text)
        refs.append(_ref_under(full, root))
    orphans = 0
    for dirpath, _, filenames in os.walk(root):
        for fn in filenames:
            if os.path.splitext(fn)[1].lower() in IMAGE_EXTENSIONS:
                if os.path.normpath(os.path.abspath(os.path.join(dirpath, fn))) not in named:
                    orphans += 1
    if orphans:
        skipped["image without text"] = orphans
    meta = {"format": "folder", "texts": str(tpath)}
    return _make_kb(ids, out_texts, refs, name=f"folder-{Path(os.path.abspath(root)).name}", root=root,
                    skipped=skipped, meta=meta, source=tpath)
