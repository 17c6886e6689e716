"""FID datasets: prompts, the reference image set and the in-domain database of one benchmark (Sec. 4.1).

    coco         COCO captions: prompts from ``captions_<split>.json`` (default val2014), reference = every image
                 of that split, in-domain database ``coco-train`` (train2014 for val2014).
    wikiimages   WikiImages from the WebQA release (reimagen.retrieval.readers.read_wikiimages): the seeded
                 22K validation split (``split_seed``, ``val_size``), prompts drawn from it, reference = all
                 of it, in-domain database ``wikiimages-train``.
    synthetic    the synthetic long-tail world of the [toy] issue: it registers itself from
                 ``evaluation/synthetic.py`` (see ``PLUGINS``); nothing here depends on it. Its images are
                 64x64, so it registers ``default_resolution=64`` (``--resolution`` when not given).

A dataset is a factory registered with :func:`register_dataset`; the CLI passes the dataset root, the number of
prompts (None: the dataset's default), the seed and any ``--dataset-option KEY=VALUE``::

    factory(root: str | None, *, num_prompts: int | None, seed: int, **options) -> FidDataset
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .protocol import Prompt, draw_prompts


@dataclass
class FidDataset:
    name: str                                  # registry name, e.g. "coco"
    split: str                                 # the validation split, e.g. "val2014"
    prompts: list[Prompt]                      # drawn with the seed
    reference: list[str]                       # ALL validation images: file paths or image references
    in_domain_db: str                          # the --db name of its own train split, e.g. "coco-train"
    open_in_domain: Callable[[], Any]          # -> KnowledgeBase of that train split
    root: str | None = None                    # root of relative image references
    reference_root: str | None = None          # root for ``reference`` entries that are relative references
    in_domain_formats: tuple[str, ...] = ()    # knowledge-base formats that count as in-domain with a train split
    meta: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.name, "split": self.split, "root": self.root, "num_prompts": len(self.prompts),
                "reference_images": len(self.reference), **self.meta}


DATASETS: dict[str, Callable[..., FidDataset]] = {}
DEFAULT_NUM_PROMPTS: dict[str, int] = {}
#: --resolution when not given; datasets that register none use the protocol's 256 (Sec. 4.1)
DEFAULT_RESOLUTION: dict[str, int] = {}
PROTOCOL_RESOLUTION = 256
#: datasets that register themselves when their module is imported (the later [toy] issue adds the module)
PLUGINS: dict[str, str] = {"synthetic": "evaluation.synthetic"}


def register_dataset(name: str, factory: Callable[..., FidDataset], default_num_prompts: int | None = None,
                     default_resolution: int | None = None) -> None:
    """Make ``--dataset NAME`` available; ``factory(root, num_prompts=..., seed=..., **options)``."""
    DATASETS[name] = factory
    if default_num_prompts is not None:
        DEFAULT_NUM_PROMPTS[name] = int(default_num_prompts)
    if default_resolution is not None:
        DEFAULT_RESOLUTION[name] = int(default_resolution)


def dataset_names() -> list[str]:
    return sorted(set(DATASETS) | set(PLUGINS))


def get_dataset_factory(name: str) -> Callable[..., FidDataset]:
    if name not in DATASETS and name in PLUGINS:
        try:
            importlib.import_module(PLUGINS[name])
        except ModuleNotFoundError as err:
            if err.name != PLUGINS[name]:
                raise
            raise ValueError(f"dataset {name!r} is not available yet: {PLUGINS[name].replace('.', '/')}.py, which "
                             "registers it, lands with the [toy] issue") from None
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(dataset_names())}")
    return DATASETS[name]


def default_resolution(name: str) -> int:
    """The side real and generated images are resized to when --resolution is not given (imports a plugin)."""
    get_dataset_factory(name)
    return DEFAULT_RESOLUTION.get(name, PROTOCOL_RESOLUTION)


def open_dataset(name: str, root: str | os.PathLike | None, num_prompts: int | None, seed: int,
                 **options: Any) -> FidDataset:
    factory = get_dataset_factory(name)
    try:
        return factory(None if root is None else str(root), num_prompts=num_prompts, seed=seed, **options)
    except TypeError as err:
        raise ValueError(f"dataset {name}: bad --dataset-option ({err})") from None


def _need_root(root: str | None, name: str, what: str) -> Path:
    if root is None:
        raise ValueError(f"--dataset {name} needs --dataset-root: {what}")
    p = Path(root)
    if not p.is_dir():
        raise FileNotFoundError(f"dataset root {p} does not exist ({what})")
    return p


# ----------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------
def coco(root: str | None, *, num_prompts: int | None = None, seed: int = 0, split: str = "val2014",
         train_split: str | None = None, image_dir: str | None = None) -> FidDataset:
    """COCO captions (official layout: annotations/captions_<split>.json and <split>/ images)."""
    from reimagen.retrieval.readers import coco_annotation_file, coco_reference_images, read_coco

    r = _need_root(root, "coco", "the COCO folder with annotations/captions_val2014.json and val2014/ "
                   "(https://cocodataset.org/#download)")
    split = str(split)
    year = split[-4:] if split[-4:].isdigit() else "2014"
    train_split = train_split or f"train{year}"
    img_dir = Path(image_dir) if image_dir else r / split
    if not img_dir.is_absolute():
        img_dir = r / img_dir
    if coco_annotation_file(r, split).is_file() and not img_dir.is_dir():
        raise FileNotFoundError(f"COCO image folder not found: {img_dir}\nIt is {split}.zip from "
                                f"https://cocodataset.org/#download (http://images.cocodataset.org/zips/{split}.zip); "
                                f"unzip it into {r}")
    kb = read_coco(r, split, image_dir=image_dir, progress=False)  # names the annotation file if missing
    try:
        reference = coco_reference_images(r, split, image_dir=image_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}. The FID reference is the full {split} image set: get the missing files "
                                f"from http://images.cocodataset.org/zips/{split}.zip") from None
    n = DEFAULT_NUM_PROMPTS["coco"] if num_prompts is None else int(num_prompts)
    prompts = draw_prompts(kb.ids, kb.texts, n, seed, what=f"COCO {split} ({r})")
    return FidDataset("coco", split, prompts, reference, "coco-train",
                      lambda: read_coco(r, train_split, progress=False), root=str(r), in_domain_formats=("coco",),
                      meta={"train_split": train_split, "captions": len(kb), "skipped": kb.skipped})


# ----------------------------------------------------------------------------------------------
# WikiImages
# ----------------------------------------------------------------------------------------------
def wikiimages(root: str | None, *, num_prompts: int | None = None, seed: int = 0, split_seed: int = 0,
               val_size: int = 22000) -> FidDataset:
    """WikiImages (Appendix B filters; Sec. 4.1: 22K validation pairs, 20K prompts from them)."""
    from reimagen.retrieval.readers import read_wikiimages

    r = _need_root(root, "wikiimages", "the WebQA folder with WebQA_train_val.json, imgs.tsv and imgs.lineidx "
                   "(https://github.com/WebQnA/WebQA)")
    split_seed, val_size = int(split_seed), int(val_size)
    val = read_wikiimages(r, "val", seed=split_seed, val_size=val_size, num_prompts=0, progress=False)
    n = DEFAULT_NUM_PROMPTS["wikiimages"] if num_prompts is None else int(num_prompts)
    prompts = draw_prompts(val.ids, val.texts, n, seed, what=f"the WikiImages validation split ({r})")
    return FidDataset("wikiimages", f"val{val_size}-seed{split_seed}", prompts, list(val.image_refs),
                      "wikiimages-train",
                      lambda: read_wikiimages(r, "train", seed=split_seed, val_size=val_size, num_prompts=0,
                                              progress=False),
                      root=str(r), reference_root=str(r), in_domain_formats=("wikiimages",),
                      meta={"split_seed": split_seed, "val_size": val_size, "skipped": val.skipped})


register_dataset("coco", coco, default_num_prompts=30000)
register_dataset("wikiimages", wikiimages, default_num_prompts=20000)

__all__ = ["FidDataset", "DATASETS", "DEFAULT_NUM_PROMPTS", "DEFAULT_RESOLUTION", "PROTOCOL_RESOLUTION", "PLUGINS",
           "register_dataset", "dataset_names", "get_dataset_factory", "default_resolution", "open_dataset", "coco",
           "wikiimages"]
