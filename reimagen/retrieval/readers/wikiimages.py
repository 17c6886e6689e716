"""WikiImages from the WebQA release, filtered as in Appendix B, split as in Sec. 4.1."""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from ..base import KnowledgeBase, OptionError
from ._common import _as_bool, _as_int, _image_ref_ok, _make_kb, _track
from ._registry import register_reader


from .coco import _load_json


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
            raise OptionError(f"{json_path}: val_size={val_size} but only {n} pairs remain after filtering "
                              f"({dict(skipped)}); pass a smaller val_size (e.g. {OptionError.MARK})", "val_size",
                              max(n // 10, 1))
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

