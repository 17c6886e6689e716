"""A static HTML report of benchmark runs (``reimagen-eval report RUN [NAME=RUN ...] --out DIR``): EntityDrawBench
runs side by side per prompt (references, neighbours, samples, per-image scores, the best-of-N pick), FID sweeps as
image grids per guidance point, ``sample`` runs with their neighbours and contact sheets, rating studies' tables."""

from .runs import KINDS, ReportError, detect_kind
from .site import Report, build_report

__all__ = ["KINDS", "Report", "ReportError", "build_report", "detect_kind"]
