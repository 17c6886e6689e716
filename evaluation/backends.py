"""FID backends: clean-fid and torch-fidelity, each with its own preprocessing, feature extractor and formulas.

A backend provides four things, all taken from the library:

    dataset(refs)      a torch Dataset yielding what the library's own loader yields for an image after the
                       protocol step (``protocol.center_crop_resize``):
                       clean-fid: ``cleanfid.utils.ResizeDataset`` (its resizer for ``mode``, e.g. PIL bicubic
                       to 299 in float), with the protocol step as its ``custom_image_tranform``;
                       torch-fidelity: uint8 CHW tensors (``TransformPILtoRGBTensor``) as its ``ImagesPathDataset``;
    extract(batch)     features of a batch: ``cleanfid.fid.get_batch_features`` with clean-fid's model (or the
                       custom one passed as ``custom_feat_extractor``); torch-fidelity's feature extractor made by
                       ``create_feature_extractor`` (a registered custom one, or ``inception-v3-compat``);
    frechet(s1, s2)    ``cleanfid.fid.frechet_distance`` (scipy sqrtm) / ``torch_fidelity.metric_fid.
                       fid_statistics_to_metric`` (eigenvalues);
    kid(f_ref, f_gen)  the unbiased polynomial-kernel MMD of one subset: ``cleanfid.fid.kernel_distance`` /
                       ``torch_fidelity.metric_kid.kid_features_to_metric`` (the subsets are drawn by
                       ``evaluation.metrics`` so that both backends see the same ones and memory stays bounded).

The driver (``evaluation.metrics``) streams batches through ``extract`` and writes features to disk, so that the
reference set and 30K generated images never sit in memory at once; tests check the numbers against
``cleanfid.fid.compute_fid`` and ``torch_fidelity.calculate_metrics`` on the same images.
"""

from __future__ import annotations

import abc
import os
import shutil
import tempfile
from typing import Any, Sequence

import numpy as np
import torch

from . import features as fx
from .library_extractors import LibraryExtractor
from .protocol import center_crop_resize, load_rgb

BACKENDS = ("clean-fid", "torch-fidelity")
CLEANFID_MODES = ("clean", "legacy_tensorflow")


def _compat() -> None:
    from reimagen.utils.compat import patch_torchvision_if_broken

    patch_torchvision_if_broken()  # both libraries import torchvision


class Backend(abc.ABC):
    name: str = ""

    def __init__(self, extractor: str | fx.CustomExtractor = fx.INCEPTION, mode: str = "clean",
                 device: str = "cpu", inception_weights: str | os.PathLike | None = None, resolution: int = 256):
        self.extractor = extractor
        self.mode = mode
        self.device = device
        self.inception_weights = inception_weights
        self.resolution = int(resolution)
        self.weights_path: str | None = None
        self._loaded = False

    # -- identity ---------------------------------------------------------------------------------
    @property
    def is_inception(self) -> bool:
        return self.extractor == fx.INCEPTION

    def extractor_key(self) -> str:
        if self.is_inception:
            digest = fx.file_digest(self.weights_path) if self.weights_path else "unresolved"
            return f"inception-2015-12-05-{digest}"
        return self.extractor.cache_key()  # type: ignore[union-attr]

    def extractor_name(self) -> str:
        return fx.INCEPTION if self.is_inception else self.extractor.name  # type: ignore[union-attr]

    def key(self) -> str:
        """backend, mode, feature extractor: everything of the backend that changes a feature."""
        return f"{self.name}-{self.mode}__{self.extractor_key()}"

    # -- the four parts ---------------------------------------------------------------------------
    @abc.abstractmethod
    def load(self) -> "Backend":
        """Build the feature extractor (raises a clear error when Inception weights are missing)."""

    @abc.abstractmethod
    def dataset(self, refs: Sequence[str], root: str | None = None) -> torch.utils.data.Dataset:
        ...

    @abc.abstractmethod
    def extract(self, batch: torch.Tensor) -> np.ndarray:
        """(B, d) float32 features of one loader batch."""

    @abc.abstractmethod
    def frechet(self, mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
        ...

    @abc.abstractmethod
    def kid(self, f_ref: np.ndarray, f_gen: np.ndarray) -> float:
        """KID (unbiased MMD^2, kernel (x.y / d + 1)^3) of one subset: all rows of both arrays."""


# ----------------------------------------------------------------------------------------------
# clean-fid
# ----------------------------------------------------------------------------------------------
class CleanFidBackend(Backend):
    name = "clean-fid"

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        if self.mode not in CLEANFID_MODES:
            raise ValueError(f"unknown clean-fid mode {self.mode!r}; choose one of {', '.join(CLEANFID_MODES)}")
        self.model = None
        self._linkdir: str | None = None

    def load(self) -> "CleanFidBackend":
        if self._loaded:
            return self
        _compat()
        if self.is_inception:
            from cleanfid.inception_torchscript import InceptionV3W

            path = fx.resolve_inception_weights(fx.CLEANFID_WEIGHTS, self.inception_weights)
            self.weights_path = str(path)
            folder = str(path.parent)
            if path.name != fx.CLEANFID_WEIGHTS.file:  # InceptionV3W loads <folder>/inception-2015-12-05.pt
                self._linkdir = folder = tempfile.mkdtemp(prefix="reimagen-cleanfid-")
                try:
                    os.symlink(path, os.path.join(folder, fx.CLEANFID_WEIGHTS.file))
                except OSError:
                    shutil.copyfile(path, os.path.join(folder, fx.CLEANFID_WEIGHTS.file))
            try:
                net = InceptionV3W(folder, download=False, resize_inside=self.mode == "legacy_tensorflow")
            except Exception as err:  # noqa: BLE001  (any failure to read the user's file is reported the same way)
                raise RuntimeError(f"cannot load {path} as {fx.CLEANFID_WEIGHTS.what} ({str(err)[:200]}); "
                                   f"download {fx.CLEANFID_WEIGHTS.url} again") from None
            finally:
                if self._linkdir:
                    shutil.rmtree(self._linkdir, ignore_errors=True)
            self.model = net.to(self.device).eval()  # what cleanfid.features.feature_extractor builds, no DataParallel
        else:
            self.model = self.extractor.build().to(self.device).eval()  # type: ignore[union-attr]
        self._loaded = True
        return self

    def feat_model(self):
        """The callable clean-fid's functions take as ``model`` / ``custom_feat_extractor``."""
        return self.load().model

    def dataset(self, refs, root=None):
        from ._cleanfid_data import CleanFidImages

        return CleanFidImages(refs, self.mode, self.resolution, root)

    def extract(self, batch):
        from cleanfid.fid import get_batch_features

        return np.asarray(get_batch_features(batch, self.load().model, self.device), dtype=np.float32)

    def frechet(self, mu1, sigma1, mu2, sigma2):
        _compat()
        import warnings

        from cleanfid.fid import frechet_distance

        with warnings.catch_warnings():  # clean-fid 0.1.35 passes sqrtm(disp=False), deprecated in scipy 1.16+
            warnings.simplefilter("ignore", DeprecationWarning)
            return float(frechet_distance(mu1, sigma1, mu2, sigma2))

    def kid(self, f_ref, f_gen):
        _compat()
        from cleanfid.fid import kernel_distance

        m = min(len(f_ref), len(f_gen))
        state = np.random.get_state()  # kernel_distance permutes the m of m rows with the global RNG
        try:
            return float(kernel_distance(f_ref, f_gen, num_subsets=1, max_subset_size=m))
        finally:
            np.random.set_state(state)


# ----------------------------------------------------------------------------------------------
# torch-fidelity
# ----------------------------------------------------------------------------------------------
class FidelityImages(torch.utils.data.Dataset):
    """What torch-fidelity's ``ImagesPathDataset`` yields (``TransformPILtoRGBTensor``: uint8 CHW) for the
    protocol-preprocessed image; also reads knowledge-base references."""

    def __init__(self, refs: Sequence[str], resolution: int, root: str | None = None):
        _compat()
        from torch_fidelity.datasets import TransformPILtoRGBTensor

        self.refs, self.resolution, self.root = list(refs), resolution, root
        self.to_tensor = TransformPILtoRGBTensor()

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i):
        return self.to_tensor(center_crop_resize(load_rgb(self.refs[i], self.root), self.resolution))


def fidelity_extractor_class(custom: fx.CustomExtractor):
    """A torch-fidelity ``FeatureExtractorBase`` around a custom network: uint8 (B, 3, H, W) of any size ->
    TF1-compatible bilinear resize to 299 (as torch-fidelity's Inception) -> float [0, 255] -> network."""
    _compat()
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    class CustomFidelityExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.core = custom.build()

        @staticmethod
        def get_provided_features_list():
            return ("features",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "features"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 299, 299, dtype=torch.uint8)

        def forward(self, x):
            x = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
            return (self.core(x).float(),)

    return CustomFidelityExtractor


def register_with_fidelity(custom: fx.CustomExtractor) -> str:
    """Register a custom network with torch-fidelity (once per process); returns the registered name."""
    _compat()
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    name = f"reimagen-{custom.cache_key()}"
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, fidelity_extractor_class(custom))
    return name


class TorchFidelityBackend(Backend):
    name = "torch-fidelity"

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        self.mode = "tf1-bilinear"  # torch-fidelity has one preprocessing (TF1-compatible, inside the extractor)
        self.fe = None
        self.registered_name = ""
        self.layer = "2048"

    def fidelity_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``torch_fidelity.calculate_metrics`` selecting this feature extractor."""
        self.load()
        kw: dict[str, Any] = {"feature_extractor": self.registered_name, "cuda": str(self.device).startswith("cuda"),
                              "verbose": False}
        if self.is_inception:
            kw["feature_extractor_weights_path"] = self.weights_path
        return kw

    def load(self) -> "TorchFidelityBackend":
        if self._loaded:
            return self
        _compat()
        from torch_fidelity.utils import create_feature_extractor

        if self.is_inception:
            path = fx.resolve_inception_weights(fx.FIDELITY_WEIGHTS, self.inception_weights)
            self.weights_path = str(path)
            self.registered_name, self.layer = "inception-v3-compat", "2048"
            try:
                self.fe = create_feature_extractor(self.registered_name, [self.layer], cuda=False, verbose=False,
                                                   feature_extractor_weights_path=str(path))
            except Exception as err:  # noqa: BLE001  (any failure to read the user's file is reported the same way)
                raise RuntimeError(f"cannot load {path} as {fx.FIDELITY_WEIGHTS.what} ({str(err)[:200]}); "
                                   f"download {fx.FIDELITY_WEIGHTS.url} again") from None
        elif isinstance(self.extractor, LibraryExtractor):  # torch-fidelity's own DINOv2 / CLIP
            self.registered_name, self.layer = self.extractor.name, self.extractor.layer
            self.fe = self.extractor.build()
            self.weights_path = self.extractor.weights_path()
        else:
            self.registered_name = register_with_fidelity(self.extractor)  # type: ignore[arg-type]
            self.layer = "features"
            self.fe = create_feature_extractor(self.registered_name, [self.layer], cuda=False, verbose=False)
        self.fe = self.fe.to(self.device)  # cuda=True would mean cuda:0, not this process's device
        self._loaded = True
        return self

    def dataset(self, refs, root=None):
        return FidelityImages(refs, self.resolution, root)

    def extract(self, batch):
        fe = self.load().fe
        with torch.no_grad():
            feats = fe.convert_features_tuple_to_dict(fe(batch.to(self.device)))[self.layer]
        return feats.detach().cpu().numpy().astype(np.float32, copy=False)

    def frechet(self, mu1, sigma1, mu2, sigma2):
        _compat()
        from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

        return float(fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2},
                                              verbose=False)[KEY_METRIC_FID])

    def kid(self, f_ref, f_gen):
        _compat()
        from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

        m = min(len(f_ref), len(f_gen))
        out = kid_features_to_metric(torch.from_numpy(np.ascontiguousarray(f_ref)),
                                     torch.from_numpy(np.ascontiguousarray(f_gen)),
                                     kid_subsets=1, kid_subset_size=m, verbose=False)
        return float(out[KEY_METRIC_KID_MEAN])


def make_backend(name: str, extractor: str | fx.CustomExtractor = fx.INCEPTION, mode: str = "clean",
                 device: str = "cpu", inception_weights: str | os.PathLike | None = None,
                 resolution: int = 256) -> Backend:
    if name == "clean-fid":
        return CleanFidBackend(extractor, mode, device, inception_weights, resolution)
    if name == "torch-fidelity":
        return TorchFidelityBackend(extractor, mode, device, inception_weights, resolution)
    raise ValueError(f"unknown FID backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "CLEANFID_MODES", "Backend", "CleanFidBackend", "TorchFidelityBackend", "FidelityImages",
           "fidelity_extractor_class", "register_with_fidelity", "make_backend"]
