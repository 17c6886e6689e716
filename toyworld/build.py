"""Write a world to disk as the real pipeline's inputs: image shards, knowledge bases, KNN-ImageText triples.

``build_world_files(world, out)`` writes, atomically and resumably (a finished file is not rewritten):

    out/world.json            the spec, the fingerprint, every entity (name, look, seen, corpus count)
    out/corpus.tar            training images (PNG members c00000.png ...)
    out/corpus.parquet        the training collection as a knowledge base (id, text, tar:// image ref)
    out/references.tar|.parquet  n_references reference pairs per entity (seen and unseen)
    out/validation.tar|.parquet  held-out scenes (the FID reference set)
    out/kb.parquet            corpus + references: the retrieval database at sampling time
    out/triples.parquet       the corpus's KNN-ImageText triples: top-k text BM25 neighbours (Sec. 3.2), built
                              by ``reimagen.retrieval.triples.build_triples`` exactly as for COCO or WebQA

``repeat_factor_triples`` writes a training table that repeats the rows of rare entities (LVIS's repeat factor
sampling), a training recipe of the toy cascade, not part of the world.

The model never sees the world's ground truth: it gets captions, images and retrieved pairs, as the paper's does.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from reimagen.utils.atomic import replacing_path, write_json
from .world import Scene, World, render_many

if TYPE_CHECKING:
    from reimagen.retrieval.base import KnowledgeBase


def _write_tar(path: Path, names: list[str], images: np.ndarray) -> None:
    from PIL import Image

    with replacing_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for name, arr in zip(names, images):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=1)
            info = tarfile.TarInfo(name)
            info.size = buf.tell()
            info.mtime = 0  # byte-identical shards for the same world
            buf.seek(0)
            tar.addfile(info, buf)


def _collection(world: World, out: Path, split: str, scenes: list[Scene], prefix: str, texts: list[str],
                progress: bool) -> "KnowledgeBase":
    from reimagen.retrieval.base import KnowledgeBase

    ids = [f"{prefix}{i:05d}" for i in range(len(scenes))]
    tar = out / f"{split}.tar"
    table = out / f"{split}.parquet"
    refs = [f"tar://{split}.tar#{pid}.png" for pid in ids]
    meta = {"world": world.fingerprint(), "split": split,
            "entities": [s.entity for s in scenes], "counts": [s.count for s in scenes],
            "positions": [s.position for s in scenes], "backgrounds": [s.background for s in scenes]}
    if table.is_file():
        kb = KnowledgeBase.from_parquet(table)
        if kb.meta.get("world") == world.fingerprint() and len(kb) == len(scenes):
            return kb
    if progress:
        print(f"rendering {len(scenes)} {split} images ...", flush=True)
    _write_tar(tar, [f"{pid}.png" for pid in ids], render_many(world, scenes, split))
    kb = KnowledgeBase(ids, texts, refs, name=f"toy-{split}", root=str(out), meta=meta)
    kb.to_parquet(table)
    return KnowledgeBase.from_parquet(table)


def load_world(root: str | Path) -> World:
    """The world a folder was built from (its ``world.json``, or that file itself), checked against the world
    code: a folder written by another version of ``world.py`` (another fingerprint) is refused."""
    from .world import rebuild_world

    root = Path(root)
    path = root / "world.json" if root.is_dir() else root
    if not path.is_file():
        raise FileNotFoundError(f"no world.json at {path}; build the world with `reimagen-eval toy build --out {root}`")
    try:
        manifest = json.loads(path.read_text())
        spec = dict(manifest["spec"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path} is not a world manifest ({err})") from None
    try:
        return rebuild_world(spec, manifest.get("fingerprint"), str(path), "rebuild it with `reimagen-eval toy build`")
    except TypeError as err:  # a spec with unknown fields
        raise ValueError(f"{path} is not a world manifest ({err})") from None


def build_split(world: World, out: str | Path, split: str, progress: bool = True) -> "KnowledgeBase":
    """Render one split (corpus, references or validation) into ``out/<split>.tar`` + ``.parquet`` (kept if
    already built for this world) and return its knowledge base."""
    if split == "corpus":
        scenes, prefix, texts = world.corpus, "c", world.corpus_captions
    elif split == "references":
        scenes, prefix = world.references, "r"
        texts = [world.reference_caption(s.entity) for s in world.references]
    elif split == "validation":
        scenes, prefix = world.validation, "v"
        texts = [world.caption(s, i) for i, s in enumerate(world.validation)]
    else:
        raise ValueError(f"unknown split {split!r}; choose corpus, references or validation")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return _collection(world, out, split, scenes, prefix, texts, progress)


def build_world_files(world: World, out: str | Path, k: int = 2, progress: bool = True) -> dict[str, Path]:
    """Render ``world`` and build its knowledge bases and BM25 triples under ``out`` (see the module docstring)."""
    from reimagen.retrieval.base import KnowledgeBase
    from reimagen.retrieval.triples import build_triples

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = build_split(world, out, "corpus", progress)
    refs = build_split(world, out, "references", progress)
    build_split(world, out, "validation", progress)
    kb_path = out / "kb.parquet"
    if not kb_path.is_file():
        both = KnowledgeBase(corpus.ids + refs.ids, corpus.texts + refs.texts, corpus.image_refs + refs.image_refs,
                             name="toy-kb", root=str(out.resolve()),
                             meta={"world": world.fingerprint(), "split": "kb",
                                   "entities": corpus.meta["entities"] + refs.meta["entities"]})
        both.to_parquet(kb_path)
    # Exact duplicate captions are skipped as neighbours: with this world's few templates, identical captions
    # describe identical scenes, and a model trained on them learns to copy the whole scene (not only the look).
    triples = build_triples(corpus, out / "triples.parquet", k=k, exclude_duplicate_texts=True, progress=progress)
    manifest = {"spec": world.spec.__dict__, "fingerprint": world.fingerprint(),
                "entities": [{"id": e.id, "name": e.name, "seen": e.seen, "corpus_count": world.corpus_counts[e.id],
                              "shape": e.look.shape, "body": e.look.body, "pattern": e.look.pattern,
                              "pattern_colour": e.look.pattern_colour} for e in world.entities]}
    write_json(out / "world.json", manifest, indent=1)
    return {"corpus": out / "corpus.parquet", "references": out / "references.parquet",
            "validation": out / "validation.parquet", "kb": kb_path, "triples": triples, "world": out / "world.json"}


def repeat_factor_triples(root: str | Path, out: str | Path, threshold: int = 100, seed: int = 0) -> dict[str, float]:
    """``root``'s triples with each row of an entity seen n times in the corpus repeated r = max(1, sqrt(threshold /
    n)) times on average (repeat factor sampling, Gupta et al., LVIS, CVPR 2019; the fraction of r by a seeded coin
    per row). A repeat keeps the row's neighbours and gets the id ``<id>~<j>``; nothing retrieves it. The counts are
    the corpus's, the ones the frequency splits use. Returns the table's sizes."""
    import pandas as pd

    from reimagen.retrieval.base import KnowledgeBase
    from reimagen.utils.atomic import replacing_path

    root = Path(root)
    triples = pd.read_parquet(root / "triples.parquet")
    corpus = KnowledgeBase.from_parquet(root / "corpus.parquet")
    entities = corpus.meta.get("entities")
    if entities is None or len(entities) != len(triples):
        raise ValueError(f"{root / 'corpus.parquet'} does not list one entity per row of {root / 'triples.parquet'}; "
                         "rebuild the world with `reimagen-eval toy build`")
    entity_of = dict(zip(corpus.ids, entities))
    counts = pd.Series(entities).value_counts()
    rate = np.sqrt(threshold / counts.loc[[entity_of[i] for i in triples["id"]]].to_numpy()).clip(min=1.0)
    coin = np.random.default_rng(seed).random(len(rate))
    repeats = (np.floor(rate) + (coin < rate - np.floor(rate))).astype(int)
    rows = triples.loc[triples.index.repeat(repeats)].copy()
    copy = rows.groupby("id").cumcount().to_numpy()
    rows["id"] = [i if j == 0 else f"{i}~{j}" for i, j in zip(rows["id"], copy)]
    with replacing_path(out) as tmp:
        rows.reset_index(drop=True).to_parquet(tmp, index=False)
    return {"rows": float(len(triples)), "rows_repeated": float(len(rows)), "mean_repeat": float(repeats.mean())}
