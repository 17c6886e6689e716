"""Feature extractors for FID / KID: the backends' own Inception, or a custom network injected through each
backend's own custom-extractor API.

    "inception"          clean-fid: the torchscript ``inception-2015-12-05.pt`` (pool3, 2048-d);
                         torch-fidelity: ``inception-v3-compat`` (``weights-inception-2015-12-05-6726825d.pth``).
                         The only choice whose numbers compare with published FIDs.
    "random-conv-<d>"    a fixed random conv net, seeded, ``(B, 3, 299, 299)`` float in [0, 255] -> ``(B, d)``;
                         "random-conv-<d>-seed<s>" picks the seed. Offline smoke tests and throughput
                         measurements only: its FIDs mean nothing.
    "judge"              short for ``evaluation.synthetic:judge_features``: the toy world's judge CNN (``ALIASES``).
    "module:attr"        any ``nn.Module`` class or factory of the same contract (``attr()`` builds it; the
                         module must set ``feature_dim``).

A custom network ``core`` is given to clean-fid as ``custom_feat_extractor`` (clean-fid resizes to 299 itself)
and to torch-fidelity as a ``FeatureExtractorBase`` registered with ``register_feature_extractor`` whose
``forward`` takes uint8 images of any size and resizes them with torch-fidelity's TF1-compatible bilinear
interpolation, as its Inception does. So each backend keeps its own preprocessing.

Inception weights are never downloaded silently into odd places: ``resolve_inception_weights`` looks for
``--inception-weights PATH``, then ``<cache>/weights/<file>``, then the library's own location, and only then
lets the library download; offline, the error names the file, its URL and where to put it.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

INCEPTION = "inception"


# ----------------------------------------------------------------------------------------------
# Custom extractors
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CustomExtractor:
    """A network mapping float images (B, 3, H, W) in [0, 255] (H = W = 299 from clean-fid) to (B, dim)."""

    name: str                         # what the user typed, e.g. "random-conv-16"
    dim: int                          # feature dimension
    build: Callable[[], nn.Module]    # a fresh module in eval mode, deterministic
    key: str = ""                     # identity for cache keys (name + everything that changes the weights)
    params: dict[str, Any] = field(default_factory=dict)

    def cache_key(self) -> str:
        return self.key or self.name


class RandomConvFeatures(nn.Module):
    """A fixed random conv net (not trained; weights a function of ``seed``): area-downsample to 64x64, three
    strided 3x3 convs with ReLU (He-initialised, so activations keep their scale), global mean and max pooling
    plus the per-channel colour mean and spread, a fixed random projection to ``dim``. Deterministic, CPU-cheap,
    sensitive to colour and texture: enough for FID plumbing tests and throughput measurements."""

    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        self.feature_dim, self.seed = int(dim), int(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.convs = nn.ModuleList([nn.Conv2d(3, 16, 3, stride=2, padding=1),
                                        nn.Conv2d(16, 32, 3, stride=2, padding=1),
                                        nn.Conv2d(32, 64, 3, stride=2, padding=1)])
            for conv in self.convs:
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
            self.proj = nn.Linear(134, self.feature_dim, bias=False)
            nn.init.normal_(self.proj.weight, std=134 ** -0.5)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 127.5 - 1.0
        x = F.adaptive_avg_pool2d(x, 64)
        colour = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.proj(torch.cat([x.mean((2, 3)), x.amax((2, 3)), colour], 1))


EXTRACTORS: dict[str, Callable[[], CustomExtractor]] = {}
#: Short names for ``module:attr`` extractors (resolved lazily, so the module is imported only when used).
ALIASES: dict[str, str] = {"judge": "evaluation.synthetic:judge_features"}
_RANDOM_CONV = re.compile(r"^random-conv-(\d+)(?:-seed(\d+))?$")


def register_feature_extractor(name: str, factory: Callable[[], CustomExtractor]) -> None:
    """Make ``--feature-extractor NAME`` available (``factory()`` returns a :class:`CustomExtractor`)."""
    if name == INCEPTION or _RANDOM_CONV.match(name) or name in ALIASES:
        raise ValueError(f"feature extractor name {name!r} is reserved")
    EXTRACTORS[name] = factory


def random_conv(dim: int = 16, seed: int = 0) -> CustomExtractor:
    return CustomExtractor(f"random-conv-{dim}" + (f"-seed{seed}" if seed else ""), dim,
                           lambda: RandomConvFeatures(dim, seed), key=f"random-conv-v2-d{dim}-s{seed}",
                           params={"dim": dim, "seed": seed})


def resolve_extractor(name: str) -> str | CustomExtractor:
    """"inception" or the :class:`CustomExtractor` a name stands for (see the module docstring)."""
    name = ALIASES.get(name, name)
    if name == INCEPTION:
        return INCEPTION
    m = _RANDOM_CONV.match(name)
    if m:
        dim = int(m.group(1))
        if not 1 <= dim <= 65536:
            raise ValueError(f"feature extractor {name!r}: dimension must be in 1..65536")
        return random_conv(dim, int(m.group(2) or 0))
    if name in EXTRACTORS:
        return EXTRACTORS[name]()
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"feature extractor {name!r}: cannot import {attr} from {mod} ({err})") from None
        if isinstance(obj, CustomExtractor):
            return obj
        probe = obj()
        if isinstance(probe, CustomExtractor):
            return probe
        dim = getattr(probe, "feature_dim", None)
        if not isinstance(probe, nn.Module) or not isinstance(dim, int):
            raise ValueError(f"feature extractor {name!r} must build an nn.Module with an int feature_dim")
        return CustomExtractor(name, dim, lambda: obj().eval(), key=name.replace(":", "."))
    raise ValueError(f"unknown feature extractor {name!r}; choose inception, random-conv-<dim> (tests only), "
                     f"a registered name ({', '.join(sorted(EXTRACTORS)) or 'none registered'}) or module:attr")


# ----------------------------------------------------------------------------------------------
# Inception weights
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InceptionWeights:
    backend: str
    file: str   # the file name the library expects
    url: str    # where the library downloads it from
    what: str   # short description for messages


CLEANFID_WEIGHTS = InceptionWeights(
    "clean-fid", "inception-2015-12-05.pt",
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
    "clean-fid's torchscript Inception (StyleGAN2-ADA's inception-2015-12-05.pt)")
FIDELITY_WEIGHTS = InceptionWeights(
    "torch-fidelity", "weights-inception-2015-12-05-6726825d.pth",
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
    "torch-fidelity's inception-v3-compat state dict")


def cache_root() -> Path:
    """``$REIMAGEN_CACHE``, else ``$XDG_CACHE_HOME/reimagen``, else ``~/.cache/reimagen``."""
    if os.environ.get("REIMAGEN_CACHE"):
        return Path(os.environ["REIMAGEN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "reimagen"


def library_weights_path(w: InceptionWeights) -> Path:
    """Where the library itself looks for (and downloads) the file."""
    if w is CLEANFID_WEIGHTS:
        import platform

        return Path("./" if platform.system() == "Windows" else "/tmp") / w.file  # cleanfid.features
    return Path(torch.hub.get_dir()) / "checkpoints" / w.file  # torch.hub.load_state_dict_from_url


def _download_with_library(w: InceptionWeights) -> None:
    if w is CLEANFID_WEIGHTS:
        from cleanfid.downloads_helper import check_download_inception

        check_download_inception(fpath=str(library_weights_path(w).parent))
    else:
        torch.hub.load_state_dict_from_url(w.url, progress=False)


def missing_weights_message(w: InceptionWeights, reason: str) -> str:
    ours = cache_root() / "weights" / w.file
    return (f"{w.what} is not available ({reason}). On a machine with internet, download {w.url} and pass "
            f"--inception-weights PATH, or put it at {ours} (or {library_weights_path(w)}, where {w.backend} "
            f"itself looks). Each backend has its own file: clean-fid {CLEANFID_WEIGHTS.file}, torch-fidelity "
            f"{FIDELITY_WEIGHTS.file}.")


def resolve_inception_weights(w: InceptionWeights, path: str | os.PathLike | None = None,
                              download: bool = True) -> Path:
    """The weights file to load: ``path`` if given (must exist), else our cache, else the library's location,
    else the library's own download; a RuntimeError naming the file, URL and places when all fail."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(missing_weights_message(w, f"--inception-weights {p} does not exist"))
        return p.resolve()
    for p in (cache_root() / "weights" / w.file, library_weights_path(w)):
        if p.is_file() and p.stat().st_size > 0:
            return p.resolve()
    if not download:
        raise RuntimeError(missing_weights_message(w, "not found locally"))
    try:
        _download_with_library(w)
    except (urllib.error.URLError, OSError, RuntimeError, ValueError) as err:
        text = str(getattr(err, "reason", err)).strip()
        reason = text.splitlines()[0][:160] if text else type(err).__name__
        raise RuntimeError(missing_weights_message(w, f"download failed: {reason}")) from None
    p = library_weights_path(w)
    if not p.is_file():
        raise RuntimeError(missing_weights_message(w, f"the download did not produce {p}"))
    return p.resolve()


_SHA: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | os.PathLike, n: int = 12) -> str:
    """Short sha256 of a file (memoised per path, size and mtime)."""
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _SHA[key] = h.hexdigest()
    return _SHA[key][:n]


__all__ = ["INCEPTION", "CustomExtractor", "RandomConvFeatures", "EXTRACTORS", "ALIASES", "register_feature_extractor",
           "random_conv", "resolve_extractor", "InceptionWeights", "CLEANFID_WEIGHTS", "FIDELITY_WEIGHTS",
           "cache_root", "library_weights_path", "missing_weights_message", "resolve_inception_weights",
           "file_digest"]
