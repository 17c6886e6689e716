"""torch-fidelity 0.4's own DINOv2 and CLIP feature extractors (its preprocessing: TF1-compatible bilinear resize
to the network's size, the network's normalisation), with their weights located before any heavy work.

    dinov2-vit-{s,b,l,g}-14   FD-DINOv2 (Stein et al. 2023: ViT-L/14). torch-fidelity loads it with
                              ``torch.hub.load("facebookresearch/dinov2", "dinov2_vitl14")``: the code goes to
                              ``<hub>/facebookresearch_dinov2_main``, the weights to ``<hub>/checkpoints/
                              dinov2_vitl14_pretrain.pth`` (``<hub>`` = ``torch.hub.get_dir()``, under $TORCH_HOME).
                              torch.hub uses that cache offline; torch-fidelity takes no weights path for it.
    clip-vit-b-32             CLIP-FID (Kynkaanniemi et al. 2023).
    clip-vit-l-14-336px       CMMD (Jayasumana et al. 2024). OpenAI's TorchScript files (``ViT-B-32.pt``,
                              ``ViT-L-14-336px.pt``): ``--weights METRIC=PATH``, or ``<cache>/weights/<file>``, or
                              where torch-fidelity downloads them (``<hub>/checkpoints/<name>-<sha256>.pt``).

Offline, a missing network is an error that names the file, its URL and where to put it.
"""

from __future__ import annotations

import urllib.error
from dataclasses import dataclass
from pathlib import Path

from .features import cache_root, file_digest

DINOV2_HUB = "facebookresearch/dinov2"
DINOV2 = {"dinov2-vit-s-14": "dinov2_vits14", "dinov2-vit-b-14": "dinov2_vitb14", "dinov2-vit-l-14": "dinov2_vitl14",
          "dinov2-vit-g-14": "dinov2_vitg14"}
CLIP = {"clip-vit-b-32": "ViT-B-32", "clip-vit-l-14": "ViT-L-14", "clip-vit-l-14-336px": "ViT-L-14-336px"}


def _hub_dir() -> Path:
    import torch

    return Path(torch.hub.get_dir())


@dataclass(frozen=True)
class LibraryExtractor:
    """A torch-fidelity feature extractor by its registered name, and the weights file it is to load."""

    name: str                   # e.g. "dinov2-vit-l-14", "clip-vit-l-14-336px"
    weights: str | None = None  # CLIP: a local TorchScript file (else located, else downloaded by torch-fidelity)

    def __post_init__(self) -> None:
        if self.name not in DINOV2 and self.name not in CLIP:
            raise ValueError(f"unknown torch-fidelity extractor {self.name!r}; one of {', '.join([*DINOV2, *CLIP])}")
        if self.weights is not None and self.name in DINOV2:
            raise ValueError(f"{self.name} loads through torch.hub (torch-fidelity takes no weights path): put the "
                             f"hub cache under $TORCH_HOME instead ({self.missing('a weights path was given')})")

    @property
    def layer(self) -> str:
        return "dinov2" if self.name in DINOV2 else "clip"

    # -- locating the weights ---------------------------------------------------------------------
    def clip_candidates(self) -> list[Path]:
        from torch_fidelity.feature_extractor_clip import MODEL_METADATA

        file = CLIP[self.name] + ".pt"
        return [cache_root() / "weights" / file,
                _hub_dir() / "checkpoints" / f"{self.name}-{MODEL_METADATA[self.name]['hash']}.pt"]

    def dinov2_files(self) -> tuple[Path | None, Path]:
        """(the cached hub repository, its weights file) where torch.hub keeps them."""
        hub = _hub_dir()
        repo = next((hub / f"facebookresearch_dinov2_{b}" for b in ("main", "master")
                     if (hub / f"facebookresearch_dinov2_{b}").is_dir()), None)
        return repo, hub / "checkpoints" / f"{DINOV2[self.name]}_pretrain.pth"

    def weights_path(self) -> str | None:
        """The file torch-fidelity is to load (CLIP), or None to let it use torch.hub / download."""
        if self.name in DINOV2:
            return None
        if self.weights is not None:
            p = Path(self.weights).expanduser()
            if not p.is_file():
                raise FileNotFoundError(self.missing(f"{p} does not exist"))
            return str(p.resolve())
        return next((str(p) for p in self.clip_candidates() if p.is_file() and p.stat().st_size > 0), None)

    def cache_key(self) -> str:
        """name + a digest of the weights (what changes a feature); 'unresolved' before they exist locally."""
        if self.name in DINOV2:
            repo, weights = self.dinov2_files()
            f = weights if weights.is_file() else (repo / "hubconf.py" if repo is not None else None)
        else:
            path = self.weights_path()
            f = Path(path) if path else None
        return f"{self.name}-{file_digest(f) if f is not None and f.is_file() else 'unresolved'}"

    def missing(self, reason: str) -> str:
        hub = _hub_dir()
        if self.name in DINOV2:
            return (f"{self.name} (DINOv2 via torch.hub) is not available ({reason}). On a machine with internet run "
                    f"`python -c \"import torch; torch.hub.load('{DINOV2_HUB}', '{DINOV2[self.name]}')\"`, then copy "
                    f"its hub folder facebookresearch_dinov2_main and checkpoints/{DINOV2[self.name]}_pretrain.pth "
                    f"to {hub} here (or set TORCH_HOME to where they are)")
        from torch_fidelity.feature_extractor_clip import MODEL_URLS

        return (f"{self.name} (OpenAI CLIP {CLIP[self.name]}) is not available ({reason}). Download "
                f"{MODEL_URLS[self.name]} and pass --weights METRIC={CLIP[self.name]}.pt, or put it at "
                f"{self.clip_candidates()[0]} (or {self.clip_candidates()[1]}, where torch-fidelity looks)")

    def build(self):
        """torch-fidelity's extractor, weights loaded (downloaded first when online and missing)."""
        from reimagen.utils.compat import patch_torchvision_if_broken

        patch_torchvision_if_broken()
        from torch_fidelity.utils import create_feature_extractor

        path = self.weights_path()
        try:
            return create_feature_extractor(self.name, [self.layer], cuda=False, verbose=False,
                                            **({"feature_extractor_weights_path": path} if path else {}))
        except (urllib.error.URLError, OSError, RuntimeError, ValueError, ImportError) as err:
            text = str(getattr(err, "reason", err)).strip()
            raise RuntimeError(self.missing(text.splitlines()[0][:200] if text else type(err).__name__)) from None


__all__ = ["LibraryExtractor", "DINOV2", "CLIP", "DINOV2_HUB"]
