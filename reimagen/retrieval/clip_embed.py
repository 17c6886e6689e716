"""The CLIP side of CLIP retrieval: open-clip models (architecture names, JSON configs, local or downloaded
weights, with a message naming the file to fetch when a download fails) and the resumable embedding of a
knowledge base into a float32 memmap. ``reimagen.retrieval.clip`` builds the faiss indexes and the retriever
on top (its docstring describes the modes, the indexes and the saved folder)."""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..utils.atomic import write_json
from .base import CorruptImageError, KnowledgeBase

EMBED_MODES = ("image", "text", "both")
STATE_FILE = "embeddings.state.json"
EMBEDDINGS_FILE = "embeddings.npy"


# ----------------------------------------------------------------------------------------------
# Lazy imports
# ----------------------------------------------------------------------------------------------
def _open_clip():
    from ..utils.compat import patch_torchvision_if_broken

    patch_torchvision_if_broken()
    try:
        import open_clip
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(f"CLIP retrieval needs open-clip-torch ({err}); install it with "
                          "pip install 'reimagen[retrieval]'") from None
    return open_clip


# ----------------------------------------------------------------------------------------------
# The CLIP model
# ----------------------------------------------------------------------------------------------
def resolve_model(model_name: str) -> tuple[str, dict | None]:
    """(open-clip model name, its config dict or None for hf-hub:/local-dir: references). A path to a JSON
    config file is registered with open-clip under its file stem."""
    open_clip = _open_clip()
    spec = str(model_name)
    if spec.endswith(".json"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"open-clip model config {spec} does not exist")
        cfg = json.loads(Path(spec).read_text())
        if not all(key in cfg for key in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(f"{spec} is not an open-clip model config (needs embed_dim, vision_cfg, text_cfg)")
        open_clip.add_model_config(spec)
        return Path(spec).stem, cfg
    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, None
    cfg = open_clip.get_model_config(spec)
    if cfg is None:
        raise ValueError(f"unknown open-clip model {spec!r}: use one of open_clip.list_models() (e.g. ViT-B-32), "
                         "an hf-hub:/local-dir: reference, or the path of a JSON model config")
    return spec, cfg


def weights_download_hint(model_name: str, tag: str) -> str:
    """Where the weights of an open-clip (model, tag) live, for a user who must fetch them by hand."""
    open_clip = _open_clip()
    pcfg = open_clip.get_pretrained_cfg(model_name, tag) or {}
    if pcfg.get("hf_hub"):
        # open-clip's convention: "org/repo/" (default file names) or "org/repo/file.bin"
        repo, filename = os.path.split(pcfg["hf_hub"])
        files = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        return " or ".join(f"https://huggingface.co/{repo}/resolve/main/{f}" for f in files)
    if pcfg.get("url"):
        return pcfg["url"]
    return f"the checkpoint of open-clip model {model_name} tag {tag}"


def _missing_weights_error(model_name: str, pretrained: str, err: BaseException) -> RuntimeError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if model_name.startswith("hf-hub:"):
        repo = model_name[len("hf-hub:"):]
        return RuntimeError(
            f"could not get the open-clip model {model_name!r} ({first[:200]}). On a machine with internet, download "
            f"open_clip_config.json and open_clip_model.safetensors (or open_clip_pytorch_model.bin) from "
            f"https://huggingface.co/{repo} into a folder and pass model_name='local-dir:FOLDER' "
            "(CLI: --clip-model local-dir:FOLDER).")
    return RuntimeError(
        f"could not get the open-clip weights {model_name!r} pretrained={pretrained!r} ({first[:200]}). "
        f"On a machine with internet, download {weights_download_hint(model_name, pretrained)} "
        f"and pass its local path with pretrained=PATH (CLI: --pretrained PATH).")


class ClipEncoder:
    """An open-clip model that returns L2-normalised float32 numpy embeddings of PIL images and texts."""

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None, device: str = "cpu",
                 seed: int = 0, text_only: bool = False):
        import torch

        open_clip = _open_clip()
        name, cfg = resolve_model(model_name)
        needs_download = False
        if pretrained:
            if os.path.isfile(pretrained):
                pretrained = os.path.abspath(pretrained)
            elif os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")):
                raise FileNotFoundError(f"CLIP checkpoint {pretrained} does not exist")
            elif cfg is not None:
                if not open_clip.get_pretrained_cfg(name, pretrained):
                    tags = open_clip.list_pretrained_tags_by_model(name)
                    raise ValueError(f"pretrained={pretrained!r} is neither a file nor an open-clip tag of {name} "
                                     f"(tags: {', '.join(tags) or 'none'})")
                needs_download = True
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random weights (pretrained=None) are a function of the seed
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained or None, device=device)
            except (RuntimeError, OSError) as err:
                if needs_download or name.startswith("hf-hub:"):
                    raise _missing_weights_error(name, pretrained or "", err) from None
                raise
        model.eval()
        if text_only and hasattr(model, "visual"):
            model.visual = torch.nn.Identity()  # only queries are encoded: free the image tower
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        self.model_name = name
        self.model_cfg = cfg
        self.pretrained = pretrained
        self.device = device
        self.seed = seed
        self._dim = int(cfg["embed_dim"]) if cfg and "embed_dim" in cfg else None

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.encode_texts(["a"]).shape[1])
        return self._dim

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            tokens = self.tokenizer(list(texts)).to(self.device)
            out = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return out.cpu().numpy().astype(np.float32, copy=False)

    def encode_image_tensors(self, batch) -> np.ndarray:
        """Preprocessed images (B, 3, H, W) -> normalised embeddings (B, d)."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            out = F.normalize(self.model.encode_image(batch.to(self.device)).float(), dim=-1)
        return out.cpu().numpy().astype(np.float32, copy=False)

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        if not len(images):
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.encode_image_tensors(torch.stack([self.preprocess(im) for im in images]))


# ----------------------------------------------------------------------------------------------
# Resumable embedding of a knowledge base
# ----------------------------------------------------------------------------------------------
def _fingerprint(kb: KnowledgeBase, encoder: ClipEncoder, embed: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([encoder.model_name, encoder.model_cfg, encoder.pretrained, encoder.seed, embed,
                         len(kb)], sort_keys=True, default=str).encode())
    for i in range(len(kb)):
        h.update(kb.ids[i].encode() + b"\0")
        if embed in ("image", "both"):
            h.update(kb.image_refs[i].encode() + b"\0")
        if embed in ("text", "both"):
            h.update(kb.texts[i].encode() + b"\0")
    return h.hexdigest()


def _load_preprocessed(kb: KnowledgeBase, i: int, preprocess) -> tuple[Any, str | None]:
    try:
        return preprocess(kb.image(i)), None
    except FileNotFoundError:
        return None, "missing_image"
    except CorruptImageError:
        return None, "corrupt_image"
    except Exception:  # noqa: BLE001 - one odd web image (truncated, decompression bomb, ...) must not stop a build
        return None, "corrupt_image"


def embed_knowledge_base(kb: KnowledgeBase, encoder: ClipEncoder, embed: str = "image", batch_size: int = 64,
                         work_dir: str | Path = ".", progress: bool = True,
                         num_workers: int = 2) -> tuple[Path, dict[int, str], int]:
    """Embed every row of ``kb`` into ``work_dir/embeddings.npy`` (N x d float32, L2-normalised), resuming a
    partial run of the same (model, weights, mode, knowledge base). Returns (path, {row: skip reason}, the
    number of rows that were already done when this call started)."""
    import torch

    if embed not in EMBED_MODES:
        raise ValueError(f"unknown embed mode {embed!r}; choose one of {', '.join(EMBED_MODES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    emb_path, state_path = work_dir / EMBEDDINGS_FILE, work_dir / STATE_FILE
    n, dim = len(kb), encoder.dim
    fp = _fingerprint(kb, encoder, embed)
    state = None
    if state_path.is_file() and emb_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except ValueError:
            state = None
        if state is not None and (state.get("fingerprint") != fp or state.get("shape") != [n, dim]):
            state = None
    if state is not None:
        try:
            mm = np.lib.format.open_memmap(emb_path, mode="r+")
            if mm.shape != (n, dim) or mm.dtype != np.float32:
                state = None
        except ValueError:
            state = None
    if state is None:
        for p in (emb_path, state_path):
            if p.exists():
                p.unlink()  # unlink, never truncate in place: a saved index may share the file
        mm = np.lib.format.open_memmap(emb_path, mode="w+", dtype=np.float32, shape=(n, dim))
        state = {"fingerprint": fp, "shape": [n, dim], "done": 0, "failed": {}}
        write_json(state_path, state)
    done = int(state["done"])
    failed = {int(r): reason for r, reason in state["failed"].items()}
    resumed_from = done

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = [TextColumn(f"CLIP {embed} embeddings"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    pool = ThreadPoolExecutor(max_workers=max(1, num_workers)) if embed != "text" and num_workers > 0 else None
    try:
        with Progress(*cols, console=Console(stderr=True), disable=not progress, transient=False) as prog:
            task = prog.add_task("embed", total=n, completed=done)
            for start in range(done, n, batch_size):
                rows = list(range(start, min(n, start + batch_size)))
                vecs = np.zeros((len(rows), dim), dtype=np.float32)
                ok = rows
                if embed in ("image", "both"):
                    mapper = pool.map if pool is not None else map
                    loaded = list(mapper(lambda i: _load_preprocessed(kb, i, encoder.preprocess), rows))
                    ok = []
                    for i, (tensor, reason) in zip(rows, loaded):
                        if reason is None:
                            ok.append(i)
                        else:
                            failed[i] = reason
                    if ok:
                        img = encoder.encode_image_tensors(torch.stack([t for t, r in loaded if r is None]))
                        vecs[[i - start for i in ok]] = img
                if embed in ("text", "both") and ok:
                    txt = encoder.encode_texts([kb.texts[i] for i in ok])
                    if embed == "both":
                        mixed = vecs[[i - start for i in ok]] + txt
                        txt = mixed / np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), 1e-12)
                    vecs[[i - start for i in ok]] = txt
                mm[start:start + len(rows)] = vecs
                mm.flush()  # rows on disk before the state says they are done
                state["done"] = start + len(rows)
                state["failed"] = {str(r): reason for r, reason in sorted(failed.items())}
                write_json(state_path, state)
                prog.advance(task, len(rows))
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        del mm
    return emb_path, failed, resumed_from


