"""Automatic proxies for EntityDrawBench: CLIP-T, CLIP-I, best-of-N pre-selection, Table 2 / Figure 5 summaries.

The paper rates the best of 4 images per prompt by **human** judgement (faithfulness to the entity and the text;
photorealism). These scores are automatic stand-ins, reported as such everywhere they appear:

    CLIP-T  cosine similarity of the CLIP embeddings of the image and its prompt (text alignment)
    CLIP-I  cosine similarity of the CLIP embeddings of the image and the entity's reference image (entity
            appearance; as DreamBooth's CLIP-I)

Best-of-N picks, per prompt, the sample with the highest ``select`` score (clip-t, clip-i, or mean: the mean of
the two); ties go to the lowest sample index. Summaries (``summarize``) give, over the selected images, the
mean and standard error per category (Table 2's columns plus All) and per frequency split (Figure 5), written
as CSV, Markdown and a PNG bar chart. With ``pretrained=None`` the CLIP model has random weights: the numbers
are then meaningless (the machinery is tested that way) and every output says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .entities import CATEGORIES, CATEGORY_TITLES, write_json, write_jsonl, write_text
from .run import IMAGES_FILE, read_run
from .summary import check_protocols, ci95, mean_sem, run_protocol, savefig, wrap

SELECT_MODES = ("clip-t", "clip-i", "mean", "vqa")
METRICS = ("clip_t", "clip_i", "dino_i", "vqa")
METRIC_TITLES = {"clip_t": "CLIP-T (image-prompt)", "clip_i": "CLIP-I (image-reference)",
                 "dino_i": "DINO (image-reference subject similarity)", "vqa": "VQA-style P(yes | prompt)"}
SCORES_FILE = "scores.json"
PROXY_NOTE = ("Automatic proxies (CLIP cosine similarities), not the paper's human faithfulness / photorealism "
              "ratings.")


def proxy_label(clip: dict[str, Any]) -> str:
    weights = clip.get("pretrained") or "RANDOM WEIGHTS - meaningless, for tests only"
    extra = "".join(f"; {k.upper()}: {clip[k]}" for k in ("dino", "vqa") if clip.get(k))
    return f"{PROXY_NOTE} CLIP: {clip.get('model')} ({weights}){extra}; best of N by {clip.get('select')}."


# ----------------------------------------------------------------------------------------------
# Scoring a run
# ----------------------------------------------------------------------------------------------
def load_encoder(model: str = "ViT-B-32", pretrained: str | None = None, device: str = "cpu", seed: int = 0):
    from reimagen.retrieval.clip import ClipEncoder

    return ClipEncoder(model, pretrained=pretrained, device=device, seed=seed)


def _embed_images(encoder, paths: Sequence[str], batch_size: int) -> np.ndarray:
    import torch
    from PIL import Image

    out = []
    for start in range(0, len(paths), batch_size):
        batch = []
        for p in paths[start:start + batch_size]:
            with Image.open(p) as im:
                batch.append(encoder.preprocess(im.convert("RGB")))
        out.append(encoder.encode_image_tensors(torch.stack(batch)))
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def select_best(rows: list[dict], select: str = "mean") -> None:
    """Mark, in place, the best sample of every prompt (``selected``), with the score it was chosen by."""
    if select not in SELECT_MODES:
        raise ValueError(f"unknown selection score {select!r}; choose {', '.join(SELECT_MODES)}")
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        r["selected"] = False
        r["select_score"] = None
        if r.get("clip_t") is None:
            continue
        vals = {"clip-t": [r["clip_t"]], "clip-i": [r.get("clip_i")], "mean": [r["clip_t"], r.get("clip_i")],
                "vqa": [r.get("vqa")]}[select]
        vals = [v for v in vals if v is not None] or [r["clip_t"]]  # no reference: fall back to CLIP-T
        r["select_score"] = round(float(np.mean(vals)), 6)
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    for group in by_prompt.values():
        best = max(group, key=lambda r: (r["select_score"], -r["sample_index"]))
        best["selected"] = True


def score_run(run: str | Path, encoder=None, clip_model: str = "ViT-B-32", pretrained: str | None = None,
              device: str = "cpu", select: str = "mean", batch_size: int = 32, allow_partial: bool = False,
              label: str | None = None, seed: int = 0, dino_model: str | None = None,
              vqa: str | None = None) -> dict[str, Any]:
    """Score every image of a run folder (CLIP-T / CLIP-I; DINO with ``dino_model``; a VQA-style score with the
    ``vqa`` plug-in, see ``entitydrawbench.scorers``), mark the best of N per prompt, and write the summaries into
    it. Returns the summary (see ``summarize``)."""
    if select not in SELECT_MODES:
        raise ValueError(f"unknown selection score {select!r}; choose {', '.join(SELECT_MODES)}")
    if select == "vqa" and not vqa:
        raise ValueError("--select vqa needs a VQA plug-in (--vqa)")
    run = Path(run)
    _, rows = read_run(run)
    present = [r for r in rows if (run / r["image"]).is_file()]
    if len(present) < len(rows):
        lack = [r["image"] for r in rows if not (run / r["image"]).is_file()]
        if not allow_partial:
            raise ValueError(f"{run} lacks {len(lack)} of {len(rows)} images (e.g. {', '.join(lack[:3])}): finish "
                             "the run (rerun entitydraw with the same options) or pass --allow-partial")
    bad_refs = sorted({r["reference_image"] for r in present if r.get("reference_image")
                       and not Path(r["reference_image"]).is_file()})
    if bad_refs:
        raise FileNotFoundError(f"{len(bad_refs)} reference images recorded in {run / IMAGES_FILE} are gone "
                                f"(e.g. {bad_refs[0]})")
    if encoder is None:
        encoder = load_encoder(clip_model, pretrained, device, seed)
    img = _embed_images(encoder, [str(run / r["image"]) for r in present], batch_size)
    prompts = sorted({r["prompt"] for r in present})
    txt = dict(zip(prompts, encoder.encode_texts(prompts))) if prompts else {}
    refs = sorted({r["reference_image"] for r in present if r.get("reference_image")})
    ref = dict(zip(refs, _embed_images(encoder, refs, batch_size))) if refs else {}
    for r in rows:
        r["clip_t"] = r["clip_i"] = r["dino_i"] = r["vqa"] = None
    for r, e in zip(present, img):
        r["clip_t"] = round(float(e @ txt[r["prompt"]]), 6)
        r["clip_i"] = round(float(e @ ref[r["reference_image"]]), 6) if r.get("reference_image") else None
    _extra_scores(run, present, dino_model, vqa, device, batch_size)
    select_best(rows, select)
    write_jsonl(run / IMAGES_FILE, rows)
    clip = {"model": getattr(encoder, "model_name", clip_model),
            "pretrained": getattr(encoder, "pretrained", pretrained), "select": select,
            "seed": getattr(encoder, "seed", seed), "dino": dino_model, "vqa": vqa}
    summary = summarize({label or run.name: rows}, clip)
    write_json(run / SCORES_FILE, {"clip": clip, "note": proxy_label(clip), "n_images": len(rows),
                                   "n_scored": len(present), "summary": summary["records"]})
    write_summary(summary, run / "summary")
    return summary


def _extra_scores(run: Path, rows: list[dict], dino_model: str | None, vqa: str | None, device: str,
                  batch_size: int) -> None:
    """dino_i (with a DINO model) and vqa (with a plug-in) of the scored rows, in place."""
    from PIL import Image

    from .scorers import DinoScorer, load_vqa

    def load(paths):
        out = []
        for p in paths:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        return out

    if dino_model:
        dino = DinoScorer(dino_model, device, batch_size)
        gen = dino.embed(load([run / r["image"] for r in rows]))
        refs = sorted({r["reference_image"] for r in rows if r.get("reference_image")})
        ref = dict(zip(refs, dino.embed(load(refs)))) if refs else {}
        for r, e in zip(rows, gen):
            r["dino_i"] = round(float(e @ ref[r["reference_image"]]), 6) if r.get("reference_image") else None
    if vqa:
        fn = load_vqa(vqa, device)
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            vals = list(fn(load([run / r["image"] for r in chunk]), [r["prompt"] for r in chunk]))
            if len(vals) != len(chunk):
                raise RuntimeError(f"the VQA plug-in {vqa} returned {len(vals)} scores for {len(chunk)} images")
            for r, v in zip(chunk, vals):
                r["vqa"] = round(float(v), 6)


# ----------------------------------------------------------------------------------------------
# Summaries (Table 2 and Figure 5 shapes)
# ----------------------------------------------------------------------------------------------
def summarize(runs: dict[str, list[dict]], clip: dict[str, Any]) -> dict[str, Any]:
    """Per model (run label): mean, standard error and count of each metric over the best-of-N images, by
    category (+ All) and by frequency split (overall and per category); also over all samples."""
    records = []
    metrics = [m for m in METRICS if any(r.get(m) is not None for rows in runs.values() for r in rows)]
    for label, rows in runs.items():
        scored = [r for r in rows if r.get("clip_t") is not None]
        for selection, subset in (("best_of_n", [r for r in scored if r.get("selected")]), ("all_samples", scored)):
            groups: list[tuple[str, str, list[dict]]] = []
            cats = [c for c in CATEGORIES if any(r["category"] == c for r in subset)]
            groups += [("category", c, [r for r in subset if r["category"] == c]) for c in cats]
            groups.append(("category", "all", subset))
            for split, flag in (("frequent", True), ("infrequent", False)):
                groups.append(("split", split, [r for r in subset if bool(r.get("frequent")) == flag]))
                groups += [("split:" + c, split,
                            [r for r in subset if r["category"] == c and bool(r.get("frequent")) == flag])
                           for c in cats]
            for group_by, group, members in groups:
                for metric in metrics:
                    mean, sem, n = mean_sem([r.get(metric) for r in members], [r["prompt_id"] for r in members])
                    lo, hi = ci95(mean, sem)
                    records.append({"model": label, "selection": selection, "metric": metric, "group_by": group_by,
                                    "group": group, "mean": mean, "sem": sem, "ci_lo": lo, "ci_hi": hi, "n": n})
    return {"clip": clip, "note": proxy_label(clip), "records": records, "models": list(runs)}


def _cell(rec: dict | None) -> str:
    if not rec or rec["mean"] is None:
        return "-"
    if rec.get("ci_lo") is None:
        return f"{rec['mean']:.3f} (n={rec['n']})"
    return f"{rec['mean']:.3f} [{rec['ci_lo']:.3f}, {rec['ci_hi']:.3f}]"


def summary_markdown(summary: dict[str, Any]) -> str:
    recs = summary["records"]

    def find(model, metric, group_by, group, selection="best_of_n"):
        return next((r for r in recs if r["model"] == model and r["metric"] == metric and r["group_by"] == group_by
                     and r["group"] == group and r["selection"] == selection), None)

    cats = [c for c in CATEGORIES if any(r["group_by"] == "category" and r["group"] == c and r["n"] for r in recs)]
    measured = [m for m in METRICS if any(r["metric"] == m and r["n"] for r in recs)]
    lines = ["# EntityDrawBench: automatic proxy scores", "", f"**{summary['note']}**", "",
             *[f"> PROTOCOLS DIFFER: {n}" for n in summary.get("protocol_notes", [])],
             "Mean [95% interval: +- 1.96 standard errors] over the best-of-N image of each prompt.", ""]
    for metric in measured:
        lines += [f"## {METRIC_TITLES[metric]} by category (shaped like Table 2)", "",
                  "| Model | " + " | ".join(CATEGORY_TITLES[c] for c in cats) + " | All |",
                  "|---" * (len(cats) + 2) + "|"]
        for m in summary["models"]:
            lines.append(f"| {m} | " + " | ".join(_cell(find(m, metric, "category", c)) for c in cats)
                         + f" | {_cell(find(m, metric, 'category', 'all'))} |")
        lines.append("")
    lines += ["## By entity frequency (shaped like Figure 5)", "",
              "| Model | Metric | Frequent | Infrequent |", "|---|---|---|---|"]
    for m in summary["models"]:
        for metric in measured:
            lines.append(f"| {m} | {METRIC_TITLES[metric]} | {_cell(find(m, metric, 'split', 'frequent'))} | "
                         f"{_cell(find(m, metric, 'split', 'infrequent'))} |")
    lines.append("")
    from .summary import generators_markdown

    lines += generators_markdown(summary.get("generators", {}))
    return "\n".join(lines)


def write_summary(summary: dict[str, Any], stem: str | Path) -> list[Path]:
    """``<stem>.csv`` (long format), ``<stem>.md`` (tables) and ``<stem>.png`` (bar chart), each atomically."""
    import csv
    import io

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["model", "selection", "metric", "group_by", "group", "mean", "sem", "ci_lo",
                                        "ci_hi", "n", "kind"], lineterminator="\n")
    w.writeheader()
    w.writerows({**r, "kind": "automatic proxy (CLIP), not human rating"} for r in summary["records"])
    for suffix, text in ((".csv", buf.getvalue()), (".md", summary_markdown(summary))):
        paths.append(write_text(stem.with_suffix(suffix), text))
    paths.append(plot_summary(summary, stem.with_suffix(".png")))
    return paths


def plot_summary(summary: dict[str, Any], path: str | Path) -> Path:
    """2 x 2 bar chart: rows CLIP-I / CLIP-T; left per category (Table 2), right frequent vs infrequent (Figure 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in summary["records"] if r["selection"] == "best_of_n"]
    models = summary["models"]
    cats = [c for c in CATEGORIES if any(r["group_by"] == "category" and r["group"] == c and r["n"] for r in recs)]
    fig, axes = plt.subplots(2, 2, figsize=(13, 7.5), gridspec_kw={"width_ratios": [3, 1.3]})
    width = 0.8 / max(1, len(models))
    for row, metric in enumerate(("clip_i", "clip_t")):
        for col, (group_by, groups, titles) in enumerate(
                (("category", cats + ["all"], [CATEGORY_TITLES[c] for c in cats] + ["All"]),
                 ("split", ["frequent", "infrequent"], ["Frequent", "Infrequent"]))):
            ax = axes[row][col]
            for mi, m in enumerate(models):
                vals, errs = [], []
                for g in groups:
                    rec = next((r for r in recs if r["model"] == m and r["metric"] == metric
                                and r["group_by"] == group_by and r["group"] == g), None)
                    vals.append(rec["mean"] if rec and rec["mean"] is not None else np.nan)
                    errs.append(1.96 * rec["sem"] if rec and rec["sem"] is not None else 0.0)  # the 95% interval
                x = np.arange(len(groups)) + (mi - (len(models) - 1) / 2) * width
                ax.bar(x, vals, width, yerr=errs, capsize=2, label=m)
            ax.set_xticks(np.arange(len(groups)))
            ax.set_xticklabels(titles, fontsize=9)
            ax.set_ylabel(METRIC_TITLES[metric], fontsize=9)
            ax.set_title(("by category (Table 2 shape)" if col == 0 else "by entity frequency (Figure 5 shape)"),
                         fontsize=10)
            if row == 0 and col == 0 and len(models) > 1:
                ax.legend(fontsize=8)
    fig.suptitle("EntityDrawBench - AUTOMATIC PROXY scores (not human ratings)\n" + wrap(summary["note"]),
                 fontsize=10)
    try:
        return savefig(fig, Path(path))
    finally:
        plt.close(fig)


def summarize_runs(runs: dict[str, str | Path], out: str | Path, allow_different: bool = False) -> dict[str, Any]:
    """One Table-2 / Figure-5 summary over several scored runs (one row per model), written to ``out``.*
    Toy-world runs (``entitydraw --world``), judged rather than CLIP-scored, go to
    ``world.summarize_world_runs``; the two kinds do not mix. Runs of different protocols (prompts, samples,
    seed, scorers) are refused unless ``allow_different`` (then marked)."""
    from .world import is_world_run, summarize_world_runs

    kinds = {is_world_run(p) for p in runs.values()}
    if len(kinds) > 1:
        raise ValueError("toy-world runs (judged) and EntityDrawBench runs (CLIP proxies) cannot share a table")
    if kinds == {True}:
        return summarize_world_runs(runs, out, allow_different)
    from .summary import generator_of

    loaded, clips, protocols, generators = {}, [], {}, {}
    for label, path in runs.items():
        path = Path(path)
        manifest, rows = read_run(path)
        generators[label] = generator_of(manifest)
        if not (path / SCORES_FILE).is_file() or all(r.get("clip_t") is None for r in rows):
            raise ValueError(f"{path} is not scored yet: run `reimagen-eval entitydraw-score {path}` first")
        import json

        clips.append(json.loads((path / SCORES_FILE).read_text())["clip"])
        loaded[label] = rows
        protocols[label] = run_protocol(manifest, clips[-1])
    notes = check_protocols(protocols, allow_different)
    summary = summarize(loaded, clips[0])
    summary["protocol_notes"] = notes
    summary["generators"] = generators
    write_summary(summary, out)
    return summary


__all__ = ["SELECT_MODES", "METRICS", "PROXY_NOTE", "load_encoder", "select_best", "score_run", "summarize",
           "summary_markdown", "write_summary", "plot_summary", "summarize_runs"]
