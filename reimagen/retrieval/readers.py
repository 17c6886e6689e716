"""Readers for the knowledge bases of the paper (Sec. 4, Appendix B), registered for ``open_knowledge_base``.

    coco:ROOT?split=val2014                 COCO captions (official layout), one pair per caption
    wikiimages:ROOT?split=train&seed=0      WikiImages from the WebQA release, filtered as in Appendix B
    webdataset:FOLDER_OR_GLOB               img2dataset / webdataset ``.tar`` shards (e.g. LAION-400M)
    parquet:TABLE?caption_col=..&path_col=..  a table (parquet/csv/tsv/jsonl) of captions and local image paths
    folder:ROOT?texts=captions.jsonl        a folder of images with a JSONL or CSV of texts

Every reader returns a :class:`~reimagen.retrieval.base.KnowledgeBase` with ``name``, ``root`` and ``skipped``
(pairs left out, counted per reason). Images are never decoded at read time (references are resolved lazily by
``load_image``) unless ``verify=True`` asks to decode-check each one. Options given in a ``?key=value`` query
arrive as strings: every reader accepts "true"/"false"/"1"/"0" for flags and numeric strings for numbers.
"""

from __future__ import annotations

import csv
import functools
import glob
import io
import json
import os
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from .base import CorruptImageError, KnowledgeBase, load_image_bytes, register_reader

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


# ----------------------------------------------------------------------------------------------
# COCO (Sec. 4.1: COCO captions; FID against the full split)
# ----------------------------------------------------------------------------------------------
COCO_SPLITS = ("train2014", "val2014", "train2017", "val2017")


def coco_annotation_file(root: str | Path, split: str = "val2014") -> Path:
    """``ROOT/annotations/captions_<split>.json``, the file ``read_coco`` reads."""
    return Path(root) / "annotations" / f"captions_{split}.json"


def _coco_missing(path: Path, split: str) -> FileNotFoundError:
    year = split[-4:] if split[-4:].isdigit() else "2014"
    return FileNotFoundError(
        f"COCO captions file not found: {path}\n"
        f"It is in annotations_trainval{year}.zip from https://cocodataset.org/#download "
        f"(http://images.cocodataset.org/annotations/annotations_trainval{year}.zip); unzip it into {path.parent.parent} "
        f"so that annotations/captions_{split}.json exists, next to the image folder {split}/ "
        f"(http://images.cocodataset.org/zips/{split}.zip). With internet access, "
        f"`python -c \"from reimagen.retrieval.download import download_coco; download_coco('{path.parent.parent}', "
        f"splits=('{split}',))\"` does both.")


def _load_json(path: Path) -> Any:
    """A JSON file's content; invalid JSON is a ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def _load_coco_captions(path: Path) -> tuple[dict[int, str], list[tuple[int, int, str]]]:
    """(image id -> file_name, [(image_id, annotation id, caption)]) with the schema checked."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a COCO captions object with keys 'images' and 'annotations', "
                         f"got a JSON {type(data).__name__}")
    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}; a COCO captions file has 'images' and 'annotations'")
        if not isinstance(data[key], list):
            raise ValueError(f"{path}: {key!r} must be a list, got {type(data[key]).__name__}")
    files: dict[int, str] = {}
    for i, im in enumerate(data["images"]):
        for key in ("id", "file_name"):
            if not isinstance(im, dict) or key not in im:
                raise ValueError(f"{path}: images[{i}] has no {key!r}")
        files[int(im["id"])] = str(im["file_name"])
    anns: list[tuple[int, int, str]] = []
    for i, a in enumerate(data["annotations"]):
        for key in ("id", "image_id", "caption"):
            if not isinstance(a, dict) or key not in a:
                raise ValueError(f"{path}: annotations[{i}] has no {key!r}")
        anns.append((int(a["image_id"]), int(a["id"]), str(a["caption"] or "")))
    return files, anns


def _coco_image_dir(root: Path, split: str, image_dir: str | Path | None) -> Path:
    if image_dir is None:
        return root / split
    p = Path(image_dir)
    return p if p.is_absolute() else root / p


@register_reader("coco")
def read_coco(root: str | Path, split: str = "val2014", image_dir: str | Path | None = None, verify: bool = False,
              progress: bool = True) -> KnowledgeBase:
    """COCO captions in the official layout: ``ROOT/annotations/captions_<split>.json`` and images in
    ``ROOT/<split>/<file_name>`` (or ``image_dir``, absolute or relative to ROOT).

    One pair per caption (COCO has about 5 per image), rows sorted by (image id, annotation id):
    id ``"<image_id>-<annotation_id>"`` (see :func:`coco_image_id`), text = the caption stripped, image reference
    ``"<split>/<file_name>"`` relative to ``root``. Skipped pairs, counted per caption: ``"missing image"`` (the
    file does not exist), ``"corrupt image"`` (``verify=True`` only: the file does not decode), ``"empty caption"``,
    ``"unknown image id"`` (an annotation whose image is not listed in ``images``).
    """
    root = Path(root)
    split = str(split)
    verify, progress = _as_bool(verify, "verify"), _as_bool(progress, "progress")
    ann_path = coco_annotation_file(root, split)
    if not ann_path.is_file():
        raise _coco_missing(ann_path, split)
    files, anns = _load_coco_captions(ann_path)
    img_dir = _coco_image_dir(root, split, _optional(image_dir))
    status: dict[int, str | None] = {}  # image id -> None (usable) or the skip reason

    def image_status(image_id: int) -> str | None:
        if image_id not in status:
            path = img_dir / files[image_id]
            if not path.is_file():
                status[image_id] = "missing image"
            elif verify and not _image_file_ok(path):
                status[image_id] = "corrupt image"
            else:
                status[image_id] = None
        return status[image_id]

    skipped: Counter = Counter()
    ids: list[str] = []
    texts: list[str] = []
    refs: list[str] = []
    for image_id, ann_id, caption in _track(sorted(anns), f"reading COCO {split}", progress, total=len(anns)):
        if image_id not in files:
            skipped["unknown image id"] += 1
            continue
        reason = image_status(image_id)
        if reason:
            skipped[reason] += 1
            continue
        text = caption.strip()
        if not text:
            skipped["empty caption"] += 1
            continue
        ids.append(f"{image_id}-{ann_id}")
        texts.append(text)
        refs.append(_ref_under(img_dir / files[image_id], root))
    meta = {"format": "coco", "split": split, "annotation_file": str(ann_path),
            "images": sum(1 for v in status.values() if v is None),
            "missing image files": sum(1 for v in status.values() if v == "missing image"),
            "corrupt image files": sum(1 for v in status.values() if v == "corrupt image")}
    return _make_kb(ids, texts, refs, name=f"coco-{split}", root=root, skipped=skipped, meta=meta, source=ann_path)


def coco_image_id(pair_id: str) -> int:
    """The COCO image id of a ``read_coco`` pair id ``"<image_id>-<annotation_id>"``."""
    image, sep, ann = str(pair_id).partition("-")
    if not sep or not image.isdigit() or not ann.isdigit():
        raise ValueError(f"{pair_id!r} is not a COCO pair id of the form '<image_id>-<annotation_id>'")
    return int(image)


def coco_reference_images(root: str | Path, split: str = "val2014", image_dir: str | Path | None = None,
                          skip_missing: bool = False) -> list[str]:
    """Absolute paths of ALL images of a COCO split (the FID reference set, Sec. 4.1), sorted by image id, as
    listed in ``captions_<split>.json``. A listed file that does not exist is a FileNotFoundError (the reference
    statistics would silently change) unless ``skip_missing=True``."""
    root = Path(root)
    ann_path = coco_annotation_file(root, split)
    if not ann_path.is_file():
        raise _coco_missing(ann_path, split)
    files, _ = _load_coco_captions(ann_path)
    img_dir = _coco_image_dir(root, split, _optional(image_dir))
    paths = [os.path.abspath(img_dir / files[i]) for i in sorted(files)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing and not _as_bool(skip_missing, "skip_missing"):
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} images listed in {ann_path} are missing "
                                f"(first: {missing[0]}); pass skip_missing=True to use the others")
    if missing:
        gone = set(missing)
        paths = [p for p in paths if p not in gone]
    return paths


# ----------------------------------------------------------------------------------------------
# WikiImages (WebQA release; Appendix B filters; Sec. 4.1 split)
# ----------------------------------------------------------------------------------------------
WEBQA_JSON = "WebQA_train_val.json"
WEBQA_TSV = "imgs.tsv"
WEBQA_LINEIDX = "imgs.lineidx"
MAX_TEXT_TOKENS = 15

_MONTHS = ("January|February|March|April|May|June|July|August|September|October|November|December|"
           "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec")
#: A text "with a date" (Appendix B). Month names only count next to a day number (case-sensitive, so that
#: "may" the verb never matches). Any year 1000-2099 counts, which also covers "12 May 2003", "May 2003",
#: "2003-05-12" and "05/12/2003"; numbers such as "1500 metres" are dropped too (accepted false positives).
DATE_RE = re.compile(
    r"\b(?:1\d{3}|20\d{2})(?:s|'s)?\b"                                   # a year 1000-2099, or "1980s"
    rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?(?:{_MONTHS})\b"          # "12 May", "3rd of June"
    rf"|\b(?:{_MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?\b"                 # "May 12", "Sept. 3rd"
    r"|\b\d{1,2}([/.-])\d{1,2}\1(?:\d{4}|\d{2})\b"                         # "05/12/2003", "12.05.03"
    r"|\b\d{4}([/.-])\d{1,2}\2\d{1,2}\b")                                 # "2003/05/12"
#: A text "with a wiki-id" (Appendix B): a Wikidata item id (capital Q and at least 3 digits, so that product
#: names like "Audi Q5" or "Infiniti Q50" survive), the word "wikidata", a wiki page name with a namespace
#: ("File:Eiffel.jpg", "Category:Towers", "Template:...", "User:..."), "wiki id"/"wikipedia id", or a wiki URL
#: path ("/wiki/...", "wikipedia.org", "wikimedia.org").
WIKI_ID_RE = re.compile(
    r"\bQ[1-9]\d{2,}\b"
    r"|(?i:\bwikidata\b)"
    r"|(?i:\b(?:File|Image|Category|Template|User|Commons|Special|Wikipedia):\S)"
    r"|(?i:\bwiki\w*[\s_-]*id\b)"
    r"|(?i:/wiki/|\bwiki\w*\.org\b)")


def wikiimages_filter_reason(text: str, max_tokens: int = MAX_TEXT_TOKENS) -> str | None:
    """Why Appendix B drops ``text`` (None if kept): "no text", "text over 15 tokens" (whitespace tokens: the
    paper does not name its tokenizer; whitespace words are the tokenizer-free reading, and a T5 SentencePiece
    count would be larger), "text with a date" (:data:`DATE_RE`), "text with a wiki-id" (:data:`WIKI_ID_RE`).
    The first reason that applies, in that order."""
    if not text:
        return "no text"
    if len(text.split()) > max_tokens:
        return f"text over {max_tokens} tokens"
    if DATE_RE.search(text):
        return "text with a date"
    if WIKI_ID_RE.search(text):
        return "text with a wiki-id"
    return None


def _norm_image_id(value: Any) -> str:
    s = str(value).strip()
    try:
        return str(int(s))
    except ValueError:
        return s


def _webqa_missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"WebQA file not found: {path}\nWikiImages needs {WEBQA_JSON}, {WEBQA_TSV} and {WEBQA_LINEIDX} in "
        f"{path.parent}; they come from the WebQA release (https://github.com/WebQnA/WebQA, 'Download Data'). "
        "See reimagen.retrieval.download.instructions('webqa').")


@functools.lru_cache(maxsize=4)
def _webqa_offsets_cached(tsv: str, lineidx: str, _stamp: tuple) -> tuple[dict[str, int], int]:
    with open(lineidx, encoding="ascii") as fh:
        offsets = [int(line) for line in fh if line.strip()]
    size = os.path.getsize(tsv)
    mapping: dict[str, int] = {}
    duplicates = 0
    with open(tsv, "rb") as fh:
        for i, off in enumerate(offsets):
            if not 0 <= off < size:
                raise ValueError(f"{lineidx} line {i + 1}: offset {off} is outside {tsv} ({size} bytes); "
                                 f"the two files do not belong together")
            if off > 0:
                fh.seek(off - 1)
                if fh.read(1) != b"\n":
                    raise ValueError(f"{lineidx} line {i + 1}: offset {off} is not the start of a line of {tsv}; "
                                     f"the two files do not belong together")
            else:
                fh.seek(0)
            head = fh.read(64)
            while b"\t" not in head and b"\n" not in head and len(head) < 4096:
                more = fh.read(256)
                if not more:
                    break
                head += more
            if b"\t" not in head.split(b"\n", 1)[0]:
                raise ValueError(f"{tsv}: the line at offset {off} (line {i + 1} of {lineidx}) is not "
                                 f"'image_id<TAB>base64'")
            key = _norm_image_id(head.split(b"\t", 1)[0].decode("utf-8", "replace"))
            if key in mapping:
                duplicates += 1
            else:
                mapping[key] = off
    return mapping, duplicates


def webqa_image_offsets(root: str | Path) -> dict[str, int]:
    """WebQA image id -> byte offset of its line in ``imgs.tsv``, from ``imgs.lineidx``: the id at the start of
    each indexed line is read (a few bytes per line; no image is decoded). Cached per process while the files are
    unchanged. An offset that does not start a line of imgs.tsv is a ValueError (mismatched files)."""
    root = Path(root)
    tsv, lineidx = root / WEBQA_TSV, root / WEBQA_LINEIDX
    for p in (tsv, lineidx):
        if not p.is_file():
            raise _webqa_missing(p)
    st1, st2 = tsv.stat(), lineidx.stat()
    stamp = (st1.st_size, st1.st_mtime_ns, st2.st_size, st2.st_mtime_ns)
    mapping, _ = _webqa_offsets_cached(str(tsv.resolve()), str(lineidx.resolve()), stamp)
    return mapping


def _webqa_image_texts(path: Path) -> tuple[dict[str, str], int]:
    """image id -> text (caption, else title) over img_posFacts and img_negFacts of all records. Records are
    visited in sorted guid order and the first text of an image wins, so the result does not depend on the
    JSON's key order."""
    if not path.is_file():
        raise _webqa_missing(path)
    data = _load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object mapping guids to records, got a JSON {type(data).__name__}")
    texts: dict[str, str] = {}
    facts = 0
    seen_key = False
    for guid in sorted(data, key=str):
        rec = data[guid]
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {guid!r} is not an object")
        for key in ("img_posFacts", "img_negFacts"):
            if key not in rec:
                continue
            seen_key = True
            for j, fact in enumerate(rec[key] or []):
                if not isinstance(fact, dict) or "image_id" not in fact:
                    raise ValueError(f"{path}: record {guid!r} {key}[{j}] has no 'image_id'")
                facts += 1
                iid = _norm_image_id(fact["image_id"])
                if iid in texts:
                    continue
                text = str(fact.get("caption") or "").strip() or str(fact.get("title") or "").strip()
                texts[iid] = " ".join(text.split())
    if data and not seen_key:
        raise ValueError(f"{path}: no record has 'img_posFacts' or 'img_negFacts'; is this WebQA_train_val.json?")
    return texts, facts


def _id_sort_key(pid: str) -> tuple:
    return (0, int(pid), "") if pid.isdigit() else (1, 0, pid)


@register_reader("wikiimages")
def read_wikiimages(root: str | Path, split: str = "train", seed: int = 0, val_size: int = 22000,
                    num_prompts: int = 20000, verify: bool = False, progress: bool = True,
                    max_tokens: int = MAX_TEXT_TOKENS) -> KnowledgeBase:
    """WikiImages (Chang et al., 2022; Appendix B) from the WebQA release in ``root``:

    ``WebQA_train_val.json``: a dict guid -> record; a record's ``img_posFacts`` and ``img_negFacts`` are lists of
    image facts with ``image_id`` (int), ``title``, ``caption``, ``url``, ``imgUrl`` (field names confirmed
    against the WebQA repository and code that reads it). ``imgs.tsv``: lines ``image_id<TAB>base64 JPEG``;
    ``imgs.lineidx``: the byte offset of each line of imgs.tsv, one per line.

    Pairs: each unique ``image_id`` of all image facts (WebQA's own train/val ``split`` field is not used: the
    paper samples its own split), text = the caption (the title if the caption is empty), whitespace collapsed.
    Appendix B filters (:func:`wikiimages_filter_reason`) drop texts of more than ``max_tokens`` whitespace tokens,
    with a date, or with a wiki-id; then images absent from imgs.tsv are dropped. Skips are counted per reason
    (the counts describe the whole collection, whatever the split).

    Split (Sec. 4.1: 320K pairs remain, 22K validation, 20K prompts from it): ids are sorted, permuted with
    ``numpy.random.default_rng(seed)``; the first ``val_size`` form ``val``, the rest ``train``; ``prompts`` are
    ``num_prompts`` drawn without replacement from ``val`` by the same generator. Deterministic given the seed and
    independent of the order of the files. ``split="all"`` returns every pair. Rows are sorted by image id.
    Pair id = the image id; image reference ``tsv://imgs.tsv#<offset>`` relative to ``root``.
    """
    root = Path(root)
    split = str(split)
    if split not in ("train", "val", "prompts", "all"):
        raise ValueError(f"split={split!r}: choose train, val, prompts or all")
    seed, val_size = _as_int(seed, "seed"), _as_int(val_size, "val_size")
    num_prompts = _as_int(num_prompts, "num_prompts")
    max_tokens = _as_int(max_tokens, "max_tokens")
    verify, progress = _as_bool(verify, "verify"), _as_bool(progress, "progress")
    json_path = root / WEBQA_JSON
    for p in (json_path, root / WEBQA_TSV, root / WEBQA_LINEIDX):
        if not p.is_file():
            raise _webqa_missing(p)

    texts_by_id, n_facts = _webqa_image_texts(json_path)
    offsets = webqa_image_offsets(root)
    skipped: Counter = Counter()
    kept: list[str] = []
    for iid in _track(sorted(texts_by_id, key=_id_sort_key), "filtering WikiImages", progress, total=len(texts_by_id)):
        reason = wikiimages_filter_reason(texts_by_id[iid], max_tokens)
        if reason is None and iid not in offsets:
            reason = "image not in imgs.tsv"
        if reason is None and verify and not _image_ref_ok(f"tsv://{WEBQA_TSV}#{offsets[iid]}", root):
            reason = "corrupt image"
        if reason:
            skipped[reason] += 1
        else:
            kept.append(iid)

    n = len(kept)
    if split == "all":
        rows = list(range(n))
    else:
        import numpy as np

        if val_size < 0 or num_prompts < 0:
            raise ValueError(f"val_size={val_size} and num_prompts={num_prompts} must be >= 0")
        if val_size >= n:
            raise ValueError(f"{json_path}: val_size={val_size} but only {n} pairs remain after filtering "
                             f"({dict(skipped)}); pass a smaller val_size (e.g. ?val_size={max(n // 10, 1)})")
        if num_prompts > val_size:
            raise ValueError(f"num_prompts={num_prompts} cannot exceed val_size={val_size} (prompts are drawn from val)")
        rng = np.random.default_rng(seed)
        perm = rng.permutation(n)
        val = np.sort(perm[:val_size])
        if split == "val":
            rows = val.tolist()
        elif split == "train":
            rows = np.sort(perm[val_size:]).tolist()
        else:
            rows = np.sort(rng.choice(val, size=num_prompts, replace=False)).tolist()
    ids = [kept[r] for r in rows]
    meta = {"format": "wikiimages", "split": split, "seed": seed, "val_size": val_size, "num_prompts": num_prompts,
            "max_tokens": max_tokens, "pairs_after_filtering": n, "image_facts": n_facts,
            "unique_images": len(texts_by_id)}
    return _make_kb(ids, [texts_by_id[i] for i in ids], [f"tsv://{WEBQA_TSV}#{offsets[i]}" for i in ids],
                    name=f"wikiimages-{split}", root=root, skipped=skipped, meta=meta, source=json_path)


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
