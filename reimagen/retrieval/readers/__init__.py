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

from urllib.parse import parse_qsl

from ..base import KnowledgeBase
from . import coco, tables, webdataset, wikiimages  # noqa: F401  (each registers its readers)
from ._common import IMAGE_EXTENSIONS
from ._registry import READERS, register_reader
from .coco import COCO_SPLITS, coco_annotation_file, coco_image_id, coco_reference_images, read_coco
from .tables import read_folder, read_parquet_collection
from .webdataset import read_webdataset
from .wikiimages import (DATE_RE, MAX_TEXT_TOKENS, WEBQA_JSON, WEBQA_LINEIDX, WEBQA_TSV, WIKI_ID_RE,
                         read_wikiimages, webqa_image_offsets, wikiimages_filter_reason)


def open_knowledge_base(spec: str) -> KnowledgeBase:
    """Open a knowledge base from ``FORMAT:PATH[?key=value&...]`` (e.g. ``coco:/data/coco?split=train2014``),
    or a ``.parquet`` table written by ``KnowledgeBase.to_parquet``."""
    if spec.endswith(".parquet") and ":" not in spec.split("/")[0]:
        return KnowledgeBase.from_parquet(spec)
    fmt, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError(f"knowledge base {spec!r}: expected FORMAT:PATH (formats: {sorted(READERS)}) or a .parquet table")
    path, _, query = rest.partition("?")
    if fmt not in READERS:
        raise ValueError(f"unknown knowledge-base format {fmt!r}; choose one of {sorted(READERS)}")
    return READERS[fmt](path, **dict(parse_qsl(query)))


__all__ = ["READERS", "register_reader", "open_knowledge_base", "IMAGE_EXTENSIONS", "COCO_SPLITS",
           "coco_annotation_file", "coco_image_id", "coco_reference_images", "read_coco", "read_folder",
           "read_parquet_collection", "read_webdataset", "DATE_RE", "MAX_TEXT_TOKENS", "WEBQA_JSON", "WEBQA_LINEIDX",
           "WEBQA_TSV", "WIKI_ID_RE", "read_wikiimages", "webqa_image_offsets", "wikiimages_filter_reason"]
