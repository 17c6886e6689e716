"""The training loader: one global sample order, cut into per-rank slices of each step's batch.

Sample order. Epoch e is a permutation of all N samples: the shards are permuted, then the samples are
shuffled within consecutive windows of ``window`` shards (a process reads a few shards at a time, as a
webdataset shuffle buffer would). Stream position p is sample ``order(p)`` of epoch p // N; step s consumes
positions [s * B, (s + 1) * B) of the global batch B, and rank r of W takes its 1/W slice (micro-batch m of A
for gradient accumulation: a further 1/A slice). So the order depends on neither W, A nor the number of
workers: every sample is seen once per epoch, a resume restarts at position step * B exactly, and 2 ranks
x B/2 train on the same samples as 1 rank x B. Memory is O(shards + one window), not O(N).

All of a sample's randomness (diffusion time, noise, condition dropout, augmentation level, random crop) comes
from a generator seeded by (seed, p) on the worker that decodes it.

Why wids (webdataset's indexed tar reader) and not webdataset's streaming ``WebDataset``: a shuffle buffer
fed by per-rank / per-worker shard splits gives an order that depends on ranks x workers, cannot resume
mid-epoch without replaying it, and needs shard counts divisible by ranks x workers. wids reads the same tar
shards (img2dataset / LAION layout) by index, memory-mapped, downloading remote shards to a local cache.
mosaicml-streaming and litdata resume exactly too, but need their own shard formats.
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..utils.seeding import sample_seed

Tensor = torch.Tensor


# ----------------------------------------------------------------------------------------------
# The global order
# ----------------------------------------------------------------------------------------------
class StreamOrder:
    """position -> sample index (0 .. N - 1, shard-major), epoch after epoch."""

    def __init__(self, lengths: Sequence[int], seed: int, window: int = 4):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.size == 0 or (self.lengths <= 0).any():
            raise ValueError("every shard needs at least one sample")
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        self.n = int(self.lengths.sum())
        self.seed, self.window = seed, max(1, window)

    @functools.lru_cache(maxsize=4)
    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, start position of each window in the epoch)."""
        rng = np.random.default_rng(sample_seed(self.seed, "shards", e))
        shards = rng.permutation(len(self.lengths))
        w = [shards[i:i + self.window] for i in range(0, len(shards), self.window)]
        sizes = np.array([self.lengths[x].sum() for x in w], dtype=np.int64)
        return shards, np.concatenate([[0], np.cumsum(sizes)])

    @functools.lru_cache(maxsize=4)
    def _window(self, e: int, i: int) -> np.ndarray:
        """Sample indices of window i of epoch e, shuffled."""
        shards, _ = self._epoch(e)
        members = np.concatenate([np.arange(self.starts[s], self.starts[s] + self.lengths[s])
                                  for s in shards[i * self.window:(i + 1) * self.window]])
        return np.random.default_rng(sample_seed(self.seed, "window", e, i)).permutation(members)

    def __call__(self, position: int) -> int:
        e, p = divmod(int(position), self.n)
        _, bounds = self._epoch(e)
        i = int(np.searchsorted(bounds, p, side="right")) - 1
        return int(self._window(e, i)[p - bounds[i]])


@dataclass(frozen=True)
class Slicing:
    """How step s's global batch is cut: ``global_batch`` = ``world_size`` x ``grad_accum`` x micro-batch."""

    global_batch: int
    world_size: int = 1
    rank: int = 0
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if self.global_batch % (self.world_size * self.grad_accum):
            raise ValueError(f"the batch size {self.global_batch} is not divisible by world size {self.world_size} x "
                             f"gradient accumulation {self.grad_accum}; pass a --batch-size that is a multiple of "
                             f"{self.world_size * self.grad_accum} (e.g. --batch-size "
                             f"{-(-self.global_batch // (self.world_size * self.grad_accum)) * self.world_size * self.grad_accum})")

    @property
    def micro(self) -> int:
        return self.global_batch // (self.world_size * self.grad_accum)

    def positions(self, step: int, m: int) -> range:
        """Stream positions of this rank's micro-batch m of step ``step``."""
        lo = step * self.global_batch + m * self.world_size * self.micro + self.rank * self.micro
        return range(lo, lo + self.micro)


class BatchPlan(torch.utils.data.Sampler):
    """Batches of (position, sample index) for this rank, from ``start_step`` on, forever."""

    def __init__(self, order: StreamOrder, slicing: Slicing, start_step: int = 0):
        self.order, self.slicing, self.start_step = order, slicing, start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for s in count(self.start_step):
            for m in range(self.slicing.grad_accum):
                yield [(p, self.order(p)) for p in self.slicing.positions(s, m)]


# ----------------------------------------------------------------------------------------------
# Per-sample randomness and images
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Randomness:
    image_size: int
    seed: int
    p_drop_text: float
    p_drop_neighbours: float
    max_aug_level: float
    random_crop: bool = False
    mirror_words: tuple[tuple[str, str], ...] = ()  # mirror half the images, swapping these words in their captions

    def draw(self, position: int) -> dict[str, Any]:
        """t, noise, condition dropout, augmentation level and noise, crop offset, mirroring: functions of (seed, p)."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, "train", position))
        s = self.image_size
        out = {"t": torch.rand((), generator=g), "noise": torch.randn((3, s, s), generator=g),
               "drop_text": bool(torch.rand((), generator=g) < self.p_drop_text),
               "drop_nbr": bool(torch.rand((), generator=g) < self.p_drop_neighbours),
               "aug_t": torch.rand((), generator=g) * self.max_aug_level,
               "aug_noise": torch.randn((3, s, s), generator=g), "crop": float(torch.rand((), generator=g))}
        # drawn last, so that runs without mirroring keep every other value
        out["mirror"] = bool(torch.rand((), generator=g) < 0.5) if self.mirror_words else False
        return out


def swap_words(text: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """``text`` with the words of each pair exchanged, whole words only: the caption of the mirrored image
    ("on the left" <-> "on the right")."""
    if not pairs:
        return text
    table = {a: b for a, b in pairs} | {b: a for a, b in pairs}
    return re.sub(r"\b(" + "|".join(map(re.escape, table)) + r")\b", lambda m: table[m.group(1)], text)


def parse_mirror_words(spec: str) -> tuple[tuple[str, str], ...]:
    """'left:right,top:bottom' -> (('left', 'right'), ('top', 'bottom')); '' -> ()."""
    pairs = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        a, sep, b = item.partition(":")
        if not sep or not a.strip() or not b.strip() or ":" in b:
            raise ValueError(f"mirror word pair {item!r} is not WORD:WORD (e.g. left:right)")
        pairs.append((a.strip(), b.strip()))
    return tuple(pairs)


def square_image(im, size: int, crop: float | None = None) -> np.ndarray:
    """Resize the shorter side to ``size`` and crop a square: centred, or at ``crop`` in [0, 1) along the longer
    side (Imagen's random crops). HWC uint8."""
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    if crop is None:
        left, top = (w - s) // 2, (h - s) // 2
    else:
        left, top = int((w - s + 1) * crop), int((h - s + 1) * crop)  # crop in [0, 1): every offset alike
    im = im.crop((left, top, left + s, top + s))
    if s != size:
        im = im.resize((size, size), Image.BICUBIC, reducing_gap=None)
    return np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy (torch.from_numpy)


def _chw(img: np.ndarray) -> Tensor:
    """HWC uint8 -> CHW uint8: images cross to the trainer as bytes (4x less than floats between processes and
    to the GPU); ``to_unit`` makes them floats in [-1, 1] there."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def to_unit(images: Tensor) -> Tensor:
    """uint8 images -> float in [-1, 1] (as ``TripleData.images_at``)."""
    return images.float() / 127.5 - 1.0


def _decode(data: bytes, size: int | None = None):
    """Decode image bytes; a JPEG at least twice ``size`` on its shorter side is decoded at a reduced scale
    (PIL's ``draft``: libjpeg's DCT scaling, the shorter side still >= ``size``), several times faster for
    LAION-sized images feeding a 64 px stage."""
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    if size is not None and im.format == "JPEG" and min(im.size) >= 2 * size:
        im.draft("RGB", (size, size))
    im.load()
    return im


# ----------------------------------------------------------------------------------------------
# Datasets: in RAM (a TripleData) and streamed (training shards)
# ----------------------------------------------------------------------------------------------
class ShardSamples(Dataset):
    """Samples of a shard folder (``reimagen.training.shards``), read through wids; key (position, index)."""

    def __init__(self, folder: str | Path, rnd: Randomness, text_store: Any | None = None, cache_dir: str | None = None):
        from .shards import read_manifest

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.k, self.rnd, self.text_store = int(self.manifest["k"]), rnd, text_store
        self.lengths = [sh["nsamples"] for sh in self.manifest["shardlist"]]
        self.cache_dir = cache_dir
        self._wids = None  # opened lazily, once per worker process

    def __len__(self) -> int:
        return sum(self.lengths)

    def _dataset(self):
        if self._wids is None:
            import contextlib
            import os

            import wids

            shards = [dict(sh, url=sh["url"] if "://" in sh["url"] else str(self.folder / sh["url"]))
                      for sh in self.manifest["shardlist"]]
            local = (lambda url: url) if self.cache_dir is None else wids.wids.CacheLocalname(self.cache_dir)
            with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # wids prints a banner
                self._wids = wids.ShardListDataset(shards, localname=local, transformations=[], lru_size=8)
        return self._wids

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any] | str:
        position, index = key
        # wids names members by ".ext" and hands them over as file objects
        raw = {k.lstrip("."): (v.getvalue() if hasattr(v, "getvalue") else v) for k, v in self._dataset()[index].items()}
        r = self.rnd.draw(position)
        try:
            s = self.rnd.image_size
            image = _decode(raw.get("jpg") or raw.get("png") or raw.get("jpeg") or b"", s)
            nbr = [_decode(raw.get(f"nbr{j}.jpg") or raw.get(f"nbr{j}.png") or b"", s) for j in range(self.k)]
        except Exception as err:  # PIL raises many kinds on damaged bytes: the sample is counted and skipped
            return f"{raw.get('__shard__')}#{raw.get('__key__')}: {type(err).__name__}"
        meta = _json(raw["json"])
        out = dict(r, position=position, row=int(meta["row"]), x0=_chw(square_image(image, self.rnd.image_size,
                                                                 r["crop"] if self.rnd.random_crop else None)),
                   nimg=torch.stack([_chw(square_image(x, self.rnd.image_size)) for x in nbr]) if nbr else None)
        if self.text_store is not None:
            out["text_emb"], out["text_len"] = self.text_store.rows(raw["__shard__"], int(raw["__shardindex__"]))
        else:
            out["text"], out["nbr_text"] = _text(raw["txt"]), list(meta["neighbor_texts"])
        return mirror(out, self.rnd.mirror_words)


def mirror(sample: dict[str, Any], pairs: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """Where the sample's draw says so, its image mirrored left-right and (given as text) its caption's ``pairs``
    swapped; the neighbours stay as retrieved, so their layout no longer tells the sample's."""
    if sample["mirror"]:
        sample["x0"] = sample["x0"].flip(-1)
        if "text" in sample:
            sample["text"] = swap_words(sample["text"], pairs)
    return sample


def _json(v: bytes | str) -> dict[str, Any]:
    import json

    return json.loads(v.decode() if isinstance(v, bytes) else v)


def _text(v: bytes | str) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else v


class MemorySamples(Dataset):
    """A ``TripleData`` in RAM; ``encoding``: the corpus's text encodings, when the encoder is frozen."""

    def __init__(self, data: Any, rnd: Randomness, encoding: Any | None = None, mirrored: Any | None = None):
        """``mirrored``: the encodings of the corpus's captions with ``rnd.mirror_words`` swapped (frozen encoder,
        mirroring on), padded as ``encoding``."""
        if encoding is not None and rnd.mirror_words and mirrored is None:
            raise ValueError("mirroring with a frozen encoder needs the swapped captions' encodings")
        self.data, self.rnd, self.encoding, self.mirrored = data, rnd, encoding, mirrored
        self.k = data.k
        self.lengths = [len(data.train_rows)]

    def __len__(self) -> int:
        return len(self.data.train_rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        position, index = key
        row = int(self.data.train_rows[index])
        r = self.rnd.draw(position)
        nrows = self.data.neighbours[row]
        out = dict(r, position=position, row=row, x0=self.data.images[row], nimg=self.data.images[nrows] if self.k else None)
        rows = torch.cat([torch.tensor([row]), nrows])
        if self.encoding is not None:
            enc = self.encoding.index(rows)
            if r["mirror"]:  # the sample's own caption swapped, its neighbours' as they are
                enc = type(enc).cat([self.mirrored.index(rows[:1]), enc.index(list(range(1, len(rows))))])
            out["text_emb"], out["text_len"] = enc.embeddings, enc.lengths
        else:
            out["text"], out["nbr_text"] = self.data.texts[row], [self.data.texts[int(i)] for i in nrows]
        return mirror(out, self.rnd.mirror_words)


def collate(items: list[dict[str, Any] | str]) -> dict[str, Any]:
    """Stack a micro-batch; samples that could not be decoded (strings naming them) are dropped and counted."""
    bad = [x for x in items if isinstance(x, str)]
    good = [x for x in items if not isinstance(x, str)]
    if not good:
        raise RuntimeError(f"every sample of a batch is unreadable, e.g. {bad[0]}; check the shards")
    out: dict[str, Any] = {"skipped": bad}
    for key in good[0]:
        vals = [x[key] for x in good]
        if key in ("text", "nbr_text"):
            out[key] = vals
        elif vals[0] is None:
            out[key] = None
        elif isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        else:
            out[key] = torch.tensor(vals)
    return out


def make_loader(dataset: Dataset, order: StreamOrder, slicing: Slicing, start_step: int, workers: int = 0,
                pin_memory: bool = False) -> DataLoader:
    """This rank's micro-batches from ``start_step`` on; workers decode, and the order stays ``order``'s."""
    return DataLoader(dataset, batch_sampler=BatchPlan(order, slicing, start_step), num_workers=workers,
                      collate_fn=collate, pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=4 if workers else None)


__all__ = ["StreamOrder", "Slicing", "BatchPlan", "Randomness", "ShardSamples", "MemorySamples", "collate",
           "make_loader", "mirror", "parse_mirror_words", "square_image", "swap_words", "to_unit"]
