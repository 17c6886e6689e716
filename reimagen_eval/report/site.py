"""``reimagen-eval report``: a static site (``OUT/index.html``) of benchmark runs, side by side.

    OUT/index.html          summaries (figures, tables) at the top, then each section's rows, drawn by report.js
    OUT/data/<section>.js   the rows of one section (JSON assigned to a global: a page opened from disk may load
                            scripts but not fetch JSON); images are never inlined
    OUT/thumbs/<hash>.png   every image once, by content hash (copied when small, downscaled when large)
    OUT/files/              the runs' figures and tables, copied
    OUT/assets/             report.js, report.css (shipped in this package; no CDN)

The site is built in a temporary folder next to OUT and renamed into place, so a failed build leaves the previous
site (or nothing) behind, never half a site.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .runs import Run, ReportError, entitydraw_rows, fid_points, open_runs, sample_rows
from .thumbs import SHEET_SIDE, Thumbs

ASSETS = Path(__file__).parent / "assets"
MARKER = ".reimagen-report"
PAGE_ROWS = 20  # prompts per page (EntityDrawBench, sample); FID grids show 120 images per page


@dataclass
class Report:
    index: Path
    sections: list[dict] = field(default_factory=list)
    images: int = 0
    missing: dict[str, str] = field(default_factory=dict)
    thumbs_written: int = 0
    thumbs_reused: int = 0
    seconds: float = 0.0
    bytes: int = 0


def build_report(specs: list[str], out: str | Path, title: str = "reimagen report",
                 progress: Optional[Callable[[str], None]] = None) -> Report:
    """Read every run (``PATH`` or ``NAME=PATH``), then write the site to ``out`` (replacing a previous report)."""
    t0 = time.time()
    out = Path(out)
    if not specs:
        raise ReportError("give at least one run folder")
    runs = open_runs(specs)
    if out.exists() and not (out / MARKER).exists() and any(out.iterdir()):
        raise ReportError(f"{out} exists and is not a report folder: choose another --out (nothing was written)")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        report = _write_site(runs, tmp, title, previous=out if out.exists() else None, progress=progress)
        _swap(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.index = out / "index.html"
    report.seconds = time.time() - t0
    report.bytes = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return report


def _swap(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _write_site(runs: list[Run], site: Path, title: str, previous: Optional[Path],
                progress: Optional[Callable[[str], None]]) -> Report:
    thumbs = Thumbs(site, previous)
    say = progress or (lambda msg: None)
    (site / "data").mkdir()
    (site / "files").mkdir()
    sections: list[dict] = []
    draws = [r for r in runs if r.kind == "entitydraw"]
    if draws:
        say(f"EntityDrawBench: {len(draws)} run(s)")
        sections.append(_entitydraw_section(draws, site, thumbs))
    for run in runs:
        if run.kind != "entitydraw":
            say(f"{run.kind}: {run.name}")
            sections.append({"fid": _fid_section, "sample": _sample_section,
                             "rating": _rating_section}[run.kind](run, site, thumbs))
    for s in sections:
        if "data" in s:
            payload = json.dumps(s.pop("data"), separators=(",", ":"))
            (site / "data" / f"{s['id']}.js").write_text(
                f"window.REPORT = window.REPORT || {{}};\nwindow.REPORT[{json.dumps(s['id'])}] = {payload};\n")
            s["script"] = f"data/{s['id']}.js"
    shutil.copytree(ASSETS, site / "assets", ignore=shutil.ignore_patterns("*.j2"))
    n_images = sum(s.get("n_images", 0) for s in sections)
    html = _template().render(title=title, sections=sections, missing=sorted(thumbs.missing.items()),
                              runs=runs, n_images=n_images, page_rows=PAGE_ROWS,
                              built=time.strftime("%Y-%m-%d %H:%M"))
    (site / "index.html").write_text(html)
    (site / MARKER).write_text(json.dumps({"runs": [[r.name, str(r.path), r.kind] for r in runs]}) + "\n")
    return Report(index=site / "index.html", sections=sections, images=n_images, missing=dict(thumbs.missing),
                  thumbs_written=thumbs.written, thumbs_reused=thumbs.reused)


def _template():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(ASSETS)), autoescape=select_autoescape(["html", "j2"]))
    return env.get_template("index.html.j2")


def _table(csv: Path, max_rows: int = 200) -> Optional[str]:
    """A CSV as an HTML table (pandas escapes the cells)."""
    import pandas as pd

    if not csv.is_file():
        return None
    df = pd.read_csv(csv)
    return df.head(max_rows).to_html(index=False, classes="table", border=0, na_rep="", float_format="{:.4g}".format)


def _copy(src: Path, site: Path, prefix: str) -> Optional[str]:
    if not src.is_file():
        return None
    rel = f"files/{prefix}-{src.name}"
    shutil.copyfile(src, site / rel)
    return rel


def _thumb_rows(rows: list[dict], thumbs: Thumbs) -> int:
    """Replace image paths by thumbnail paths (None when missing); returns the number of sample images."""
    n = 0
    for row in rows:
        row["references"] = [{"src": thumbs.add(p), "path": p} for p in row["references"]]
        if row.get("sheet"):
            row["sheet"] = thumbs.add(row["sheet"], SHEET_SIDE)
        for cell in row["cells"].values():
            for nb in cell["neighbours"]:
                nb["src"] = thumbs.add(nb.pop("image"))
            n += _thumb_images(cell["images"], thumbs)
    return n


def _thumb_images(images: list[dict], thumbs: Thumbs) -> int:
    """Each image's path becomes its thumbnail (``src``, None when missing) and stays as ``path``."""
    for im in images:
        path = im.pop("image")
        im["src"], im["path"] = thumbs.add(path), path
    return len(images)


def _entitydraw_section(runs: list[Run], site: Path, thumbs: Thumbs) -> dict[str, Any]:
    data = entitydraw_rows(runs)
    n = _thumb_rows(data["rows"], thumbs)
    figure, summary_md, note = _entitydraw_summary(runs, site)
    splits = sorted({r["split"] for r in data["rows"] if r["split"]})
    cats = sorted({r["category"] for r in data["rows"] if r["category"]})
    return {"id": "entitydraw", "kind": "rows", "title": "EntityDrawBench", "figure": figure, "summary_md": summary_md,
            "note": note, "downloads": [f"files/entitydraw-summary{x}" for x in (".csv", ".md") if summary_md],
            "models": data["models"], "unshared": {k: v for k, v in data["unshared"].items() if v},
            "n_rows": len(data["rows"]), "n_images": n, "splits": splits, "categories": cats,
            "runs": [{"name": r.name, "path": str(r.path), "generator": _generator(r.manifest)} for r in runs],
            "data": {"kind": "rows", "models": data["models"], "rows": data["rows"]}}


def _generator(manifest: dict) -> str:
    """What made a run's images, in a few words (run.json's model_record)."""
    from entitydrawbench.summary import generator_of

    if not manifest.get("generator") and not manifest.get("model_record"):
        return ""
    g = generator_of(manifest)
    parts = [f"{g.get('kind')}: {g.get('model')}" if g.get("model") else str(g.get("kind"))]
    parts += [f"{k} {g[k]}" for k in ("scheduler", "steps", "size") if g.get(k) not in (None, "")]
    return "; ".join(parts)


def _entitydraw_summary(runs: list[Run], site: Path) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """The Table 2 / Figure 5 summary of the runs (``entitydraw-summary``), or a note saying why there is none."""
    from entitydrawbench.scoring import summarize_runs

    stem = site / "files" / "entitydraw-summary"
    try:
        summarize_runs({r.name: r.path for r in runs}, stem, allow_different=True)
    except (ValueError, FileNotFoundError, KeyError) as err:
        return None, None, f"no summary: {err}"
    fig, md = stem.with_suffix(".png"), stem.with_suffix(".md")
    return (f"files/{fig.name}" if fig.is_file() else None), (_markdown(md.read_text()) if md.is_file() else None), None


def _markdown(text: str) -> str:
    """Markdown (the runs' .md tables) as HTML; raw HTML in it is escaped (markdown-it-py, rich's own parser)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _fid_section(run: Run, site: Path, thumbs: Thumbs) -> dict[str, Any]:
    data = fid_points(run)
    n = sum(_thumb_images(images, thumbs) for images in data["points"].values())
    protocol = run.path / "protocol.json"
    return {"id": f"fid-{_slug(run.name)}", "kind": "grid", "title": f"FID: {run.name}",
            "figure": _copy(run.path / "fid_vs_guidance.png", site, _slug(run.name)),
            "table": _table(run.path / "results.csv"), "note": None if (run.path / "results.csv").is_file()
            else "no results.csv yet: the sweep has not finished", "n_images": n,
            "protocol": protocol.read_text() if protocol.is_file() else None,
            "points": list(data["points"]), "n_rows": n,
            "data": {"kind": "grid", "points": data["points"]}}


def _sample_section(run: Run, site: Path, thumbs: Thumbs) -> dict[str, Any]:
    data = sample_rows(run)
    n = _thumb_rows(data["rows"], thumbs)
    return {"id": f"sample-{_slug(run.name)}", "kind": "rows", "title": f"Samples: {run.name}", "figure": None,
            "table": None, "note": None, "models": data["models"], "unshared": {}, "n_rows": len(data["rows"]),
            "n_images": n, "splits": [], "categories": [], "runs": [{"name": run.name, "path": str(run.path),
                                                                       "generator": _generator(run.manifest)}],
            "data": {"kind": "rows", "models": data["models"], "rows": data["rows"]}}


def _rating_section(run: Run, site: Path, thumbs: Thumbs) -> dict[str, Any]:
    tables = {name: _table(run.path / f"{name}.csv") for name in ("table2", "agreement", "rater_quality")}
    return {"id": f"rating-{_slug(run.name)}", "kind": "static", "title": f"Rating study: {run.name}",
            "figure": _copy(run.path / "figure5.png", site, _slug(run.name)), "table": tables["table2"],
            "extra_tables": {k: v for k, v in tables.items() if k != "table2" and v}, "note": None,
            "n_images": 0, "summary_md": _markdown((run.path / "report.md").read_text())}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


__all__ = ["Report", "ReportError", "build_report", "PAGE_ROWS", "MARKER"]
