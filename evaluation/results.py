"""Result tables and the guidance plot: a tidy table of sweep rows, the best row picked as in Table 1 (the lowest
FID over the guidance grid, Sec. 4.1), the paper's reported numbers beside it, and FID against guidance weight.

``REPORTED`` is Table 1 of the ICLR 2023 paper (Re-Imagen rows use w = 1.25 for the 64 stage and 5 for the 256
super-resolution stage, T = 1000, BM25, k = 2; "OOD" is LAION-400M). The authors' slides carry a few rows the
paper does not (CLIP retrieval, the internal ImageText database, LAION with k = 1 / 3) and one value that differs
(WikiImages, LAION, k = 2: 5.82 in the slides, 5.80 in the paper); the paper's values are used here.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

from reimagen.utils.atomic import write_bytes, write_json, write_text

from .metric_set import COLUMN, METRIC_COLUMNS, METRICS, TITLE

COLUMNS = ("source", "dataset", "split", "model", "db", "retriever", "k", "w_64", "w_sr", "metric", *METRIC_COLUMNS,
           "kid_std", "clip_score", "n", "n_ref", "n_ref_unreadable", "backend", "mode", "feature_extractor", "resolution",
           "point", "protocol_id", "best")
PAPER = "reported (paper)"


def _rep(dataset, model, db, metric, fid, retriever="bm25", k=2, w_64=1.25, w_sr=5.0):
    return {"source": PAPER, "dataset": dataset, "model": model, "db": db, "retriever": retriever, "k": k,
            "w_64": w_64, "w_sr": w_sr, "metric": metric, "fid": fid}


def _baseline(dataset, model, metric, fid):
    return _rep(dataset, model, "-", metric, fid, retriever="-", k=None, w_64=None, w_sr=None)


#: Table 1 of the paper (COCO FID-30K / zero-shot FID-30K; WikiImages FID-20K / zero-shot FID-20K).
REPORTED: list[dict[str, Any]] = [
    _rep("coco", "Re-Imagen (3.6B)", "coco-train", "FID", 5.25),
    _rep("coco", "Re-Imagen (3.6B)", "laion", "ZS-FID", 6.88),
    _rep("coco", "Re-Imagen-small (2.4B)", "coco-train", "FID", 5.73),
    _rep("coco", "Re-Imagen-small (2.4B)", "laion", "ZS-FID", 7.32),
    _rep("wikiimages", "Re-Imagen (3.6B)", "wikiimages-train", "FID", 5.88),
    _rep("wikiimages", "Re-Imagen (3.6B)", "laion", "ZS-FID", 5.80),
    _rep("wikiimages", "Re-Imagen-small (2.4B)", "wikiimages-train", "FID", 6.32),
    _rep("wikiimages", "Re-Imagen-small (2.4B)", "laion", "ZS-FID", 6.04),
    _baseline("coco", "GLIDE (5B)", "ZS-FID", 12.24),
    _baseline("coco", "DALL-E 2 (5B)", "ZS-FID", 10.39),
    _baseline("coco", "Stable Diffusion (1B)", "ZS-FID", 12.63),
    _baseline("coco", "Imagen (3B)", "ZS-FID", 7.27),
    _baseline("coco", "Make-A-Scene (4B)", "ZS-FID", 11.84),
    _baseline("coco", "Make-A-Scene (4B), fine-tuned", "FID", 7.55),
    _baseline("coco", "Parti (20B)", "ZS-FID", 7.23),
    _baseline("coco", "Parti (20B), fine-tuned", "FID", 3.22),
    _baseline("coco", "KNN-Diffusion", "ZS-FID", 16.66),
    _baseline("coco", "Memory-Driven T2I", "ZS-FID", 19.47),
    _baseline("wikiimages", "Stable Diffusion (1B)", "ZS-FID", 7.50),
    _baseline("wikiimages", "Imagen (3B)", "ZS-FID", 6.44),
]


def reported_for(dataset: str, metric: str | None = None) -> list[dict[str, Any]]:
    return [dict(r) for r in REPORTED if r["dataset"] == dataset and (metric is None or r["metric"] == metric)]


def measured_metrics(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The metrics (result columns) some measured row has, in ``METRICS`` order."""
    have = [r for r in rows if r.get("source", "measured") == "measured"]
    return [COLUMN[m] for m in METRICS if any(_finite(r.get(COLUMN[m])) for r in have)]


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The measured row with the lowest finite FID (Table 1 reports the best guidance weights), or of the first
    metric measured when FID was not."""
    cols = measured_metrics(rows)
    if not cols:
        return None
    key = "fid" if "fid" in cols else cols[0]
    ok = [r for r in rows if r.get("source", "measured") == "measured" and _finite(r.get(key))]
    return min(ok, key=lambda r: r[key]) if ok else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, bool):
        return "yes" if x else ""
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return str(x)


def tidy_rows(measured: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measured rows (``best`` marks the Table-1 pick) followed by the paper's rows for the same dataset."""
    best = best_row(measured)
    out = [{**{c: None for c in COLUMNS}, **r, "best": r is best} for r in measured]
    datasets = sorted({r["dataset"] for r in measured})
    for ds in datasets:
        out += [{**{c: None for c in COLUMNS}, **r, "best": False} for r in reported_for(ds)]
    return out


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in COLUMNS})
    return buf.getvalue()


def cell(r: dict[str, Any], col: str) -> str:
    """A value, with its 95% interval when the row has one (``<col>_lo`` / ``<col>_hi``)."""
    v, lo, hi = r.get(col), r.get(f"{col}_lo"), r.get(f"{col}_hi")
    if _finite(lo) and _finite(hi):
        return f"{_fmt(v)} [{_fmt(lo)}, {_fmt(hi)}]"
    return _fmt(v)


def _md_table(rows: Sequence[dict[str, Any]], cols: Sequence[str], headers: Sequence[str]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(cell(r, c) for c in cols) + " |")
    return "\n".join(lines)


def to_markdown(rows: Sequence[dict[str, Any]], title: str = "FID sweep", notes: Sequence[str] = (),
                protocol: str = "") -> str:
    measured = [r for r in rows if r.get("source") == "measured"]
    best = next((r for r in measured if r.get("best")), None)
    parts = [f"# {title}", ""]
    if protocol:
        parts += [protocol, ""]
    mcols = measured_metrics(measured)
    titles = {COLUMN[m]: TITLE[m] for m in METRICS}
    cols = ["dataset", "db", "retriever", "k", "w_64", "w_sr", "metric", *mcols, "clip_score", "n"]
    heads = ["dataset", "db", "retriever", "k", "w (64)", "w (SR)", "label", *(titles[c] for c in mcols),
             "CLIP score", "n"]
    parts += ["## Sweep", "", "Values with their 95% bootstrap intervals over the generated images in brackets.", "",
              _md_table(measured, cols, heads), ""]
    if best is not None:
        label = best["metric"]
        side = [{**best, "source": "measured (best of the sweep)"}]
        side += [r for r in rows if r.get("source") == PAPER and r["dataset"] == best["dataset"]
                 and r["metric"] == label]
        cols2 = ["source", "model", "db", "retriever", "k", "w_64", "w_sr", "metric", "fid"]
        heads2 = ["source", "model", "db", "retriever", "k", "w (64)", "w (SR)", "metric", "FID"]
        parts += [f"## Best {label} (as in Table 1) and the paper's reported {label}", "",
                  _md_table(side, cols2, heads2), ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(parts)


def plot_fid_vs_guidance(rows: Sequence[dict[str, Any]], path: str | os.PathLike,
                         show_reported: bool = True) -> Path | None:
    """Each measured metric (a row of panels, with its 95% intervals as error bars) against the 64-stage weight
    (one line per SR weight) and against the SR weight (one line per 64-stage weight); with ``show_reported``,
    the paper's Re-Imagen FID of the same dataset and label as a dashed line (off for feature extractors other
    than Inception, whose numbers do not compare)."""
    mcols = measured_metrics(rows)
    measured = [r for r in rows if r.get("source") == "measured" and r.get("w_64") is not None]
    if not measured or not mcols:
        return None  # e.g. images made elsewhere: no guidance weight to plot against
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    has_sr = any(r.get("w_sr") is not None for r in measured)
    ncol = 2 if has_sr else 1
    fig, axes = plt.subplots(len(mcols), ncol, figsize=(5 * ncol + 0.5, 3.4 * len(mcols)), squeeze=False)
    label = measured[0]["metric"]
    paper = [r for r in REPORTED if r["dataset"] == measured[0]["dataset"] and r["metric"] == label
             and r["model"].startswith("Re-Imagen (")] if show_reported else []
    specs = [("w_64", "w_sr", "guidance weight, 64 stage", "w (SR)")]
    if has_sr:
        specs.append(("w_sr", "w_64", "guidance weight, super-resolution stage", "w (64)"))
    titles = {COLUMN[m]: TITLE[m] for m in METRICS}
    for row, col in zip(axes, mcols):
        for ax, (x_key, g_key, xlabel, glabel) in zip(row, specs):
            groups: dict[Any, list[dict[str, Any]]] = {}
            for r in measured:
                if r.get(x_key) is not None and _finite(r.get(col)):
                    groups.setdefault(r.get(g_key), []).append(r)
            for g, pts in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
                pts.sort(key=lambda r: float(r[x_key]))
                x, y = [float(r[x_key]) for r in pts], [float(r[col]) for r in pts]
                err = None
                if all(_finite(r.get(f"{col}_lo")) and _finite(r.get(f"{col}_hi")) for r in pts):
                    err = [[max(0.0, v - float(r[f"{col}_lo"])) for v, r in zip(y, pts)],
                           [max(0.0, float(r[f"{col}_hi"]) - v) for v, r in zip(y, pts)]]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3,
                            label=f"{glabel} = {g:g}" if g is not None else "measured")
            if col == "fid":
                for r in paper:
                    ax.axhline(r["fid"], ls="--", lw=1, color="grey",
                               label=f"{r['model']}, {r['db']}: {r['fid']} ({PAPER})")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{titles[col]} ({label})" if col == "fid" else titles[col])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"metrics vs classifier-free guidance weight ({measured[0]['dataset']}, db {measured[0]['db']}; "
                 "bars: 95% bootstrap intervals)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_bytes(path, buf.getvalue())


def write_results(out: str | os.PathLike, measured: Sequence[dict[str, Any]], title: str, notes: Sequence[str] = (),
                  protocol: str = "", comparable: bool = True,
                  manifest: dict[str, Any] | None = None) -> dict[str, Path]:
    """results.csv, results.md, fid_vs_guidance.png and (given the protocol ``manifest``) protocol.json in
    ``out``, each written atomically."""
    out = Path(out)
    rows = tidy_rows(measured)
    paths = {"csv": write_text(out / "results.csv", to_csv(rows)),
             "md": write_text(out / "results.md", to_markdown(rows, title, notes, protocol))}
    if manifest is not None:
        paths["protocol"] = write_json(out / "protocol.json", manifest, indent=2, sort_keys=True, default=str)
    png = plot_fid_vs_guidance(rows, out / "fid_vs_guidance.png", show_reported=comparable)
    if png is not None:
        paths["png"] = png
    return paths


__all__ = ["COLUMNS", "PAPER", "REPORTED", "reported_for", "best_row", "measured_metrics", "tidy_rows", "to_csv",
           "cell", "to_markdown", "plot_fid_vs_guidance", "write_results"]
