"""The metrics of ``reimagen-eval fid --metrics ...``: which features each reads and how one sweep point's values
and 95% bootstrap intervals are computed.

    fid        Frechet distance of the sweep's features (--backend / --feature-extractor: Inception by default)
    kid        KID of the same features (subsets of --kid-subset-size, as the libraries compute it)
    fd-dinov2  Frechet distance of DINOv2 ViT-L/14 features (Stein et al. 2023; torch-fidelity's extractor)
    cmmd       CMMD: RBF-kernel MMD (sigma 10, x 1000) of unit-norm CLIP ViT-L/14@336 embeddings (Jayasumana et al.)
    clip-fid   Frechet distance of CLIP ViT-B/32 features (Kynkaanniemi et al. 2023)

Each extractor runs once per image set (features cached next to the point, the reference set's in the statistics
cache); fid and kid share theirs. Intervals: Frechet distances and CMMD from ``--bootstrap`` resamples of the
generated images (``evaluation.distances``); KID from a bootstrap of the mean over its subsets' values.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import distances as dist
from . import metrics as mt

METRICS = ("fid", "kid", "fd-dinov2", "cmmd", "clip-fid")
LIBRARY = {"fd-dinov2": "dinov2-vit-l-14", "cmmd": "clip-vit-l-14-336px", "clip-fid": "clip-vit-b-32"}
COLUMN = {m: m.replace("-", "_") for m in METRICS}  # the result table's column of each metric
TITLE = {"fid": "FID", "kid": "KID", "fd-dinov2": "FD-DINOv2", "cmmd": "CMMD", "clip-fid": "CLIP-FID"}
METRIC_COLUMNS = tuple(x for m in METRICS for x in (COLUMN[m], f"{COLUMN[m]}_lo", f"{COLUMN[m]}_hi"))


def parse_metrics(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"fid,kid,cmmd"`` -> ("fid", "kid", "cmmd"); unknown names are refused, repeats dropped."""
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r} in --metrics; choose from {', '.join(METRICS)}")
    if not names:
        raise ValueError(f"--metrics is empty; choose from {', '.join(METRICS)}")
    return tuple(dict.fromkeys(names))


def parse_weights(items: Sequence[str]) -> dict[str, str]:
    """``["cmmd=/data/ViT-L-14-336px.pt"]`` -> {"cmmd": path}; only metrics with a weights file of their own."""
    out = {}
    for item in items:
        metric, sep, path = item.partition("=")
        metric = metric.strip().lower()
        if not sep or not path.strip():
            raise ValueError(f"--weights {item!r}: give METRIC=PATH, e.g. cmmd=ViT-L-14-336px.pt")
        if metric not in ("cmmd", "clip-fid"):
            raise ValueError(f"--weights {item!r}: only cmmd and clip-fid take a weights file (fd-dinov2 loads "
                             "through the torch.hub cache, fid / kid through --inception-weights)")
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"--weights {metric}={path}: the file does not exist")
        out[metric] = path
    return out


def check_sample_sizes(metrics: Sequence[str], n_gen: int, n_ref: int, kid_subset_size: int, bootstrap: int) -> None:
    """Refuse, before any sampling, a metric the sample sizes cannot give."""
    if "kid" in metrics and min(n_gen, n_ref) < kid_subset_size:
        raise ValueError(f"kid: subsets of --kid-subset-size {kid_subset_size} need that many images on each side, "
                         f"but the sweep has {n_gen} generated and {n_ref} reference images; lower --kid-subset-size "
                         "or leave kid out of --metrics")
    if "cmmd" in metrics and min(n_gen, n_ref) < 2:
        raise ValueError("cmmd needs at least 2 generated and 2 reference images")
    if bootstrap and (bootstrap < 2 or n_gen < 2):
        raise ValueError(f"--bootstrap {bootstrap}: a bootstrap interval needs at least 2 resamples of at least 2 "
                         "images (0 turns the intervals off)")


@dataclass
class MetricBackends:
    """The backend (features) of every metric of a sweep; fid and kid use the sweep's own."""

    main: Any
    extra: dict[str, Any]  # metric -> backend

    @classmethod
    def build(cls, main, metrics: Sequence[str], weights: dict[str, str], device: str, resolution: int
              ) -> "MetricBackends":
        from .backends import TorchFidelityBackend
        from .library_extractors import LibraryExtractor

        extra = {m: TorchFidelityBackend(LibraryExtractor(LIBRARY[m], weights.get(m)), device=device,
                                         resolution=resolution) for m in metrics if m in LIBRARY}
        return cls(main, extra)

    def load(self) -> None:
        """Load every extractor: missing weights fail here, before any sampling."""
        self.main.load()
        for b in self.extra.values():
            b.load()

    def describe(self) -> dict[str, Any]:
        """Extractor, its weights' identity and the preprocessing of each metric (the protocol manifest's part)."""
        out = {}
        for m, b in [("fid/kid", self.main), *self.extra.items()]:
            out[m] = {"backend": b.name, "mode": b.mode, "extractor": b.extractor_name(), "key": b.extractor_key(),
                      "weights": b.weights_path, "resolution": b.resolution}
        return out


def point_metrics(metrics: Sequence[str], backends: MetricBackends, refs: Sequence[str], ref_stats: dict[str, Any],
                  folder: Path, fingerprint: str, cfg: Any, progress: bool, name: str) -> dict[str, Any]:
    """Every metric of one sweep point (its images ``refs``) with 95% bootstrap intervals ``<col>_lo`` /
    ``<col>_hi``. ``ref_stats``: the reference ``Stats`` per backend key."""
    out: dict[str, Any] = {}
    b = backends.main
    c = cfg
    if "fid" in metrics or "kid" in metrics:
        st = mt.stats_for(b, refs, folder / f"{mt.safe_name(b.key())}__{b.resolution}px", fingerprint, None,
                          c.feature_batch_size, c.workers, progress, f"features {name}")
        ref = ref_stats[b.key()]
        out["n"], out["n_ref"] = st.n, ref.n
        if "fid" in metrics:
            out["fid"] = b.frechet(st.mu, st.sigma, ref.mu, ref.sigma)
            out.update(_frechet_ci("fid", st, ref, c))
        if "kid" in metrics:
            vals = mt.kid_values(b, ref.features, st.features, c.kid_subsets, c.kid_subset_size, c.seed)
            out["kid"], out["kid_std"], out["kid_subset_size"] = float(np.mean(vals)), float(np.std(vals)), \
                c.kid_subset_size
            if c.bootstrap and len(vals) > 1:
                out["kid_lo"], out["kid_hi"] = dist.bootstrap_ci(
                    len(vals), lambda cnt: cnt @ np.asarray(vals) / cnt.sum(1), c.bootstrap, c.seed)
    for m, eb in backends.extra.items():
        st = mt.stats_for(eb, refs, folder / f"{mt.safe_name(eb.key())}__{eb.resolution}px", fingerprint, None,
                          c.feature_batch_size, c.workers, progress, f"{m} features {name}")
        ref = ref_stats[eb.key()]
        col = COLUMN[m]
        out.setdefault("n", st.n)
        out.setdefault("n_ref", ref.n)
        if m == "cmmd":
            x, y = dist.unit_norm(mt.read_all(st.features)), dist.unit_norm(mt.read_all(ref.features))
            out[col] = float(dist.cmmd_from_counts(x, y, np.ones((1, len(x))))[0])
            if c.bootstrap:
                out[f"{col}_lo"], out[f"{col}_hi"] = dist.bootstrap_ci(
                    len(x), lambda cnt: dist.cmmd_from_counts(x, y, cnt), c.bootstrap, c.seed)
        else:
            out[col] = eb.frechet(st.mu, st.sigma, ref.mu, ref.sigma)
            out.update(_frechet_ci(col, st, ref, c))
    return out


def _frechet_ci(col: str, st, ref, c) -> dict[str, float]:
    if not c.bootstrap:
        return {}
    x = mt.read_all(st.features)
    def stat(cnt: np.ndarray) -> np.ndarray:
        return dist.frechet_from_counts(x, ref.mu, ref.sigma, cnt)

    lo, hi = dist.bootstrap_ci(len(x), stat, c.bootstrap, c.seed)
    return {f"{col}_lo": lo, f"{col}_hi": hi}


__all__ = ["METRICS", "LIBRARY", "COLUMN", "TITLE", "METRIC_COLUMNS", "parse_metrics", "parse_weights",
           "check_sample_sizes", "MetricBackends", "point_metrics"]
