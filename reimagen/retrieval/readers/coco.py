"""COCO captions in the official layout, one pair per caption (Sec. 4.1)."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..base import KnowledgeBase
from ._common import _as_bool, _image_file_ok, _make_kb, _optional, _ref_under, _track
from ._registry import register_reader


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

