"""Precomputed text embeddings of training shards: the frozen encoder (T5-XXL in the paper, Sec. 4) runs once,
not at every step, and training never loads it.

``<shards>/text/<name>/shard-000042.safetensors`` holds, for the n samples of ``shard-000042.tar`` in their
order, ``emb`` (n * (K + 1), L, d) in float16 or bfloat16 (row i * (K + 1) is sample i's caption, the next K
rows its neighbours' captions) and ``length`` (n * (K + 1),) int32, the number of real tokens (the mask is
``arange(L) < length``). ``store.json`` records the encoder's spec, d, L (the longest text of the whole
store, to which every row is padded when read), dtype and K. Each shard's file is written atomically; with
RANK / WORLD_SIZE set, rank r encodes shards r, r + W, ...; a rerun skips finished shards.
"""

from __future__ import annotations

import json
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from ..models.text import TextEncoder
from ..utils.atomic import replacing_path, write_json
from .shards import read_manifest

STORE = "store.json"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def shard_texts(tar: Path) -> list[list[str]]:
    """[caption, neighbour captions...] per sample, in the shard's order (read from the .txt / .json members)."""
    by_key: "OrderedDict[str, dict[str, str]]" = OrderedDict()
    with tarfile.open(tar) as tf:
        for m in tf:
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if ext in ("txt", "json"):
                by_key.setdefault(key, {})[ext] = tf.extractfile(m).read().decode("utf-8")  # type: ignore[union-attr]
    return [[v["txt"], *json.loads(v["json"])["neighbor_texts"]] for v in by_key.values()]


def embed_shards(folder: str | Path, encoder: TextEncoder, name: str | None = None, dtype: str = "fp16",
                 rank: int = 0, world_size: int = 1, progress: bool = True) -> Path | None:
    """Encode every shard's texts into ``folder/text/<name>``; returns the store folder once all shards are done."""
    from rich.progress import track

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if getattr(encoder, "trainable", False):
        raise ValueError("a trainable text encoder (tiny) is trained with the model: there is nothing to precompute")
    folder = Path(folder)
    manifest = read_manifest(folder)
    store = folder / "text" / (name or encoder.name)
    spec = {"encoder": encoder.spec(), "dtype": dtype, "k": manifest["k"]}
    settings = store / "settings.json"
    if settings.is_file() and json.loads(settings.read_text()) != spec:
        raise ValueError(f"{store} holds embeddings of another encoder or dtype; choose another --name")
    if not settings.is_file():
        write_json(settings, spec, indent=1)
    shards = manifest["shardlist"]
    mine = [i for i in range(len(shards)) if i % world_size == rank]
    for i in track(mine, description=f"text embeddings (rank {rank}/{world_size})", disable=not progress):
        out = store / (Path(shards[i]["url"]).stem + ".safetensors")
        if out.is_file():
            continue
        rows = [t for sample in shard_texts(folder / shards[i]["url"]) for t in sample]
        with torch.no_grad():
            enc = encoder.encode(rows)
        from safetensors.torch import save_file

        with replacing_path(out) as tmp:
            save_file({"emb": enc.embeddings.to(DTYPES[dtype]).cpu().contiguous(),
                       "length": enc.lengths.to(torch.int32).cpu()}, str(tmp))
    return finish_store(store, spec, shards, encoder.dim)


def finish_store(store: Path, spec: dict[str, Any], shards: list[dict[str, Any]], dim: int) -> Path | None:
    """Write ``store.json`` once every shard's file exists (any process may: the content is the same)."""
    from safetensors import safe_open

    files = [store / (Path(sh["url"]).stem + ".safetensors") for sh in shards]
    if not all(f.is_file() for f in files):
        return None
    max_len = 0
    for f in files:
        with safe_open(str(f), "pt") as fh:
            max_len = max(max_len, fh.get_slice("emb").get_shape()[1])
    write_json(store / STORE, dict(spec, dim=dim, max_len=max_len), indent=1)
    return store


class TextStore:
    """Reads a store's rows for (shard url, index in shard): (emb (K + 1, L, d) float32, length (K + 1,))."""

    def __init__(self, store: str | Path):
        self.store = Path(store)
        f = self.store / STORE
        if not f.is_file():
            raise FileNotFoundError(f"{self.store} is not a finished text-embedding store (no {STORE}); run "
                                    "`reimagen-eval embed-text --shards ...` first")
        self.meta = json.loads(f.read_text())
        self.k, self.max_len, self.dim = int(self.meta["k"]), int(self.meta["max_len"]), int(self.meta["dim"])
        self._open: "OrderedDict[str, Any]" = OrderedDict()  # a few open files per worker

    @property
    def encoder_spec(self) -> dict[str, Any]:
        return self.meta["encoder"]

    def check(self, manifest: dict[str, Any]) -> None:
        """Refuse a store that does not cover a shard folder: another K, or a shard whose file is missing or holds
        another number of rows than its samples x (K + 1) (every sample needs its embeddings)."""
        from safetensors import safe_open

        k = int(manifest["k"])
        if k != self.k:
            raise ValueError(f"the text store {self.store} has K = {self.k} neighbour texts per sample, the shards "
                             f"K = {k}: re-run `reimagen-eval embed-text` on these shards")
        for sh in manifest["shardlist"]:
            f = self.store / (Path(sh["url"]).stem + ".safetensors")
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing: the samples of shard {sh['url']} have no text embeddings; "
                                        "re-run `reimagen-eval embed-text` to finish the store")
            with safe_open(str(f), "pt") as fh:
                rows = fh.get_slice("emb").get_shape()[0]
            if rows != sh["nsamples"] * (k + 1):
                raise ValueError(f"{f} holds {rows} text rows, but shard {sh['url']} has {sh['nsamples']} samples x "
                                 f"{k + 1} texts = {sh['nsamples'] * (k + 1)}: some samples have no embedding; "
                                 "delete the file and re-run `reimagen-eval embed-text`")

    def _file(self, shard_url: str):
        from safetensors import safe_open

        if shard_url not in self._open:
            self._open[shard_url] = safe_open(str(self.store / (Path(shard_url).stem + ".safetensors")), "pt")
            while len(self._open) > 8:
                self._open.popitem(last=False)
        return self._open[shard_url]

    def rows(self, shard_url: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        fh = self._file(shard_url)
        lo, hi = index * (self.k + 1), (index + 1) * (self.k + 1)
        emb = fh.get_slice("emb")[lo:hi].float()
        pad = self.max_len - emb.shape[1]
        if pad:
            emb = torch.nn.functional.pad(emb, (0, 0, 0, pad))
        return emb, fh.get_slice("length")[lo:hi].long()

    def __getstate__(self) -> dict[str, Any]:  # open files do not cross into worker processes
        return dict(self.__dict__, _open=OrderedDict())


__all__ = ["embed_shards", "TextStore", "shard_texts", "STORE", "DTYPES"]
