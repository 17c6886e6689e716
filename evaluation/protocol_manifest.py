"""The protocol manifest of an FID sweep: everything its numbers depend on, recorded with every result, and the
check that refuses to put rows of different protocols in one table.

Published zero-shot COCO FIDs of one model differ by 3x between papers that used different reference sets,
resizing, image formats, sample counts or feature extractors. So every metrics file, results table and combined
table carries:

    reference     dataset, split, number of images, fingerprint of the image list, hash of each cached
                  statistics file (per feature extractor)
    preprocessing the protocol step (centre crop of the long edge, PIL bicubic to ``resolution``), its version
    images        format of the generated images, how many, the prompt seed
    extractors    per metric: backend, mode, extractor, digest of its weights, input resolution
    versions      torch, torch-fidelity, clean-fid, numpy, scipy, reimagen

``id`` hashes all but ``versions`` (a library upgrade is noted, not refused) and the bootstrap settings (they
change the intervals, not the values).
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from typing import Any, Sequence

from .protocol import PROTOCOL_VERSION
LIBRARIES = ("torch", "torch-fidelity", "clean-fid", "numpy", "scipy", "reimagen")


def library_versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def _file_hash(path) -> str:
    from .features import file_digest

    return file_digest(path, 16)


def protocol_manifest(sweep: Any, ref_stats: dict[str, Any]) -> dict[str, Any]:
    """The manifest of ``sweep`` (an ``evaluation.sweep.FidSweep`` after validation) given its reference
    statistics per backend key."""
    from . import metrics as mt

    c, ds = sweep.cfg, sweep.dataset
    body = {
        "reference": {"dataset": ds.name, "split": ds.split, "n": len(sweep.reference),
                      "n_unreadable": len(ds.reference) - len(sweep.reference),
                      "fingerprint": mt.items_fingerprint(sweep.reference, ds.reference_root),
                      "stats": {key: _file_hash(st.folder / mt.STATS) for key, st in sorted(ref_stats.items())}},
        "preprocessing": {"resolution": sweep.resolution, "crop": "centre crop of the long edge, then PIL bicubic",
                          "protocol_version": PROTOCOL_VERSION},
        "images": {"format": sorted({str(p).rsplit(".", 1)[-1].lower() for p in sweep.image_paths(sweep.points[0])}),
                   "n": len(sweep.jobs), "prompt_seed": c.seed},
        "metrics": list(sweep.metrics),
        "extractors": sweep.backends.describe(),
    }
    body["id"] = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]
    body["bootstrap"] = {"resamples": c.bootstrap, "seed": c.seed, "level": 0.95,
                         "method": "scipy.stats.bootstrap, percentile interval centred on the estimate"}
    body["kid"] = {"subsets": c.kid_subsets, "subset_size": c.kid_subset_size, "seed": c.seed}
    body["versions"] = library_versions()
    body["model"] = sweep.generator_record()  # recorded beside the id: models are compared under one protocol
    return body


def compare(manifests: Sequence[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[str]]:
    """(differences that make rows incomparable, notes) between the manifests of several runs (name, manifest)."""
    if len(manifests) < 2:
        return [], []
    base_name, base = manifests[0]
    problems, notes = [], []
    for name, m in manifests[1:]:
        if m.get("id") == base.get("id"):
            continue
        for part in ("reference", "preprocessing", "images", "extractors"):
            if m.get(part) != base.get(part):
                problems.append(f"{name} and {base_name} differ in {part}: {_diff(base.get(part), m.get(part))}")
    for name, m in manifests[1:]:
        if m.get("versions") != base.get("versions"):
            notes.append(f"library versions differ between {base_name} and {name}: "
                         f"{_diff(base.get('versions'), m.get('versions'))}")
    return problems, notes


def _diff(a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return "; ".join(f"{k}: {_short(a.get(k))} vs {_short(b.get(k))}" for k in keys)
    return f"{_short(a)} vs {_short(b)}"


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


__all__ = ["protocol_manifest", "compare", "library_versions"]
