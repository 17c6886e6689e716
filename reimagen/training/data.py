"""Training data for one stage: KNN-ImageText triples (Sec. 3.2 "Model Training").

A triples table has one row per (image, text) pair of the collection and lists the ids of its K retrieved
neighbours in the same collection (top-k text-to-text BM25, the query itself excluded; the [retrieval]
part of the project builds these tables). Columns:

    id            str        unique id of the pair
    text          str        its caption
    image         str        image reference: a path (absolute or relative to the table's folder), or
                             tsv://FILE#OFFSET / tar://SHARD#MEMBER (see reimagen.retrieval.base)
    neighbor_ids  list[str]  ids of its K neighbours, best first (or one string "id1|id2")

Parquet, JSONL and CSV are read. Images are loaded once, center-cropped and resized to the stage's size,
and kept in memory as uint8; missing or unreadable images are skipped and reported with counts, and pairs
whose neighbours were skipped are dropped with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass
class TripleData:
    images: Tensor  # (N, 3, S, S) uint8
    texts: list[str]
    neighbours: Tensor  # (N, K) int64 row indices into this same data (K may be 0)
    ids: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    train_rows: Tensor | None = None  # rows to train on (default all); the others serve only as neighbours

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if len(self.texts) != n or self.neighbours.shape[0] != n:
            raise ValueError(f"{n} images, {len(self.texts)} texts and {self.neighbours.shape[0]} neighbour rows")
        if not self.ids:
            self.ids = [str(i) for i in range(n)]
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError("images must be a (N, 3, S, S) uint8 tensor")
        if self.train_rows is None:
            self.train_rows = torch.arange(n)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def k(self) -> int:
        return self.neighbours.shape[1]

    def images_at(self, idx: Tensor) -> Tensor:
        """Rows ``idx`` as float images in [-1, 1]."""
        return self.images[idx].float() / 127.5 - 1.0

    def resized(self, size: int) -> "TripleData":
        """The same data at another resolution (e.g. 64px for a 32->64 super-resolution stage)."""
        if size == self.image_size:
            return self
        x = F.interpolate(self.images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return TripleData(x.round().clamp(0, 255).to(torch.uint8), self.texts, self.neighbours, self.ids, dict(self.skipped),
                          self.train_rows)

    @classmethod
    def from_arrays(cls, images: np.ndarray | Tensor, texts: Sequence[str], neighbours: np.ndarray | Tensor) -> "TripleData":
        imgs = torch.as_tensor(np.asarray(images))
        if imgs.dim() == 4 and imgs.shape[-1] == 3:  # NHWC -> NCHW
            imgs = imgs.permute(0, 3, 1, 2)
        return cls(imgs.contiguous().to(torch.uint8), list(texts), torch.as_tensor(np.asarray(neighbours), dtype=torch.long))

    @classmethod
    def from_table(cls, path: str | Path, image_size: int, progress: bool = True) -> "TripleData":
        """Read a triples table (see the module docstring)."""
        from ..retrieval.base import CorruptImageError, load_image
        from .loader import square_image
        from .shards import neighbour_lists, read_table

        path = Path(path)
        df = read_table(path)
        ids = df["id"].astype(str).tolist()
        nbrs = neighbour_lists(df["neighbor_ids"])
        ks = {len(v) for v in nbrs}
        if len(ks) > 1:
            raise ValueError(f"rows have different neighbour counts {sorted(ks)}; every row needs the same K")
        skipped: dict[str, int] = {}
        images: dict[str, np.ndarray] = {}
        from rich.progress import track

        for pid, ref in track(list(zip(ids, df["image"].astype(str))), description="loading images", disable=not progress):
            try:
                images[pid] = square_image(load_image(ref, root=path.parent), image_size)
            except FileNotFoundError:
                skipped["missing image"] = skipped.get("missing image", 0) + 1
            except (CorruptImageError, OSError):
                skipped["unreadable image"] = skipped.get("unreadable image", 0) + 1
        id_set = set(ids)
        unknown = sum(1 for row in nbrs for n in row if n not in id_set)
        if unknown:
            raise ValueError(f"{unknown} neighbour ids in {path} are not ids of the table")
        loaded = [i for i, pid in enumerate(ids) if pid in images]
        if not loaded:
            raise ValueError(f"no readable images in {path} (skipped: {skipped})")
        index = {ids[i]: j for j, i in enumerate(loaded)}
        # Rows whose neighbours were all loaded are trained on; the others stay only as neighbour images.
        train = [j for j, i in enumerate(loaded) if all(n in index for n in nbrs[i])]
        if len(train) < len(loaded):
            skipped["neighbour image skipped"] = len(loaded) - len(train)
        if not train:
            raise ValueError(f"no row of {path} has all its neighbour images (skipped: {skipped})")
        k = len(nbrs[0])
        nbr_rows = np.array([[index.get(n, j) for n in nbrs[i]] for j, i in enumerate(loaded)], dtype=np.int64)
        data = cls.from_arrays(np.stack([images[ids[i]] for i in loaded]), [str(df["text"].iloc[i]) for i in loaded],
                               nbr_rows.reshape(len(loaded), k))
        data.ids, data.skipped = [ids[i] for i in loaded], skipped
        data.train_rows = torch.tensor(train, dtype=torch.long)
        return data
