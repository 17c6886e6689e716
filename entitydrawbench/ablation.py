"""Ablation sweeps (paper Sec. 4.3): the number of neighbours K (Figure 7), the interleave ratio eta (Figure 8)
and the guidance strategy (joint / weighted / interleaved, Figure 13 in the appendix).

``sweep`` runs EntityDrawBench once per value (each in its own resumable run folder ``OUT/<param>=<value>``),
scores every run with the same CLIP model, and writes one table (``OUT/sweep_<param>.csv`` and ``.md``) and one
plot (``OUT/sweep_<param>.png``) of CLIP-I and CLIP-T of the best-of-N images, overall and for frequent and
infrequent entities. The paper plots human faithfulness; these are automatic proxies and are labelled so.
Figure 8's trade-off (smaller eta: more entity faithfulness, less text alignment) shows as CLIP-I falling and
CLIP-T rising with eta.
"""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .entities import write_text
from .run import RunConfig, run_entitydraw
from .scoring import METRIC_TITLES, METRICS, proxy_label, score_run
from .summary import FIGURE, SWEEPABLE, parse_values, savefig, wrap

def sweep(param: str, values: Sequence, cfg: RunConfig, make_generator: Callable[[RunConfig], Any], out: str | Path,
          references: str | Path | None, clip: dict[str, Any], entities=None, progress: bool = False,
          log=None) -> list[dict]:
    """Run, score and tabulate one run per value; returns the table rows."""
    from .scoring import load_encoder

    values = parse_values(param, values)
    out = Path(out)
    encoder = load_encoder(clip.get("model", "ViT-B-32"), clip.get("pretrained"), clip.get("device", "cpu"),
                           clip.get("seed", 0))
    table = []
    for v in values:
        c = replace(cfg, **{param: v})
        run_dir = out / f"{param}={v}"
        res = run_entitydraw(make_generator(c), run_dir, c, references=references, entities=entities,
                             progress=progress, log=log)
        summary = score_run(run_dir, encoder=encoder, select=clip.get("select", "mean"), label=f"{param}={v}")
        row: dict[str, Any] = {param: v, "run": str(run_dir), "prompts": res.n_prompts}
        for rec in summary["records"]:
            if rec["selection"] != "best_of_n" or rec["group_by"] not in ("category", "split"):
                continue
            if rec["group_by"] == "category" and rec["group"] != "all":
                continue
            key = f"{rec['metric']}_{rec['group']}"
            row[key], row[key + "_sem"] = rec["mean"], rec["sem"]
        table.append(row)
    note = proxy_label({**clip, "model": encoder.model_name, "pretrained": encoder.pretrained})
    _write_table(table, param, out, note)
    _plot(table, param, out / f"sweep_{param}.png", note)
    return table


def _write_table(table: list[dict], param: str, out: Path, note: str) -> None:
    cols = [param, "prompts"] + [f"{m}_{g}{s}" for m in METRICS for g in ("all", "frequent", "infrequent")
                                 for s in ("", "_sem")] + ["run"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(table)
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    md = [f"# Sweep over {param}: {FIGURE[param]}", "", f"**{note}**", "",
          f"| {param} | prompts | " + " | ".join(f"{METRIC_TITLES[m]} {g}" for m in METRICS
                                                 for g in ("all", "frequent", "infrequent")) + " |",
          "|---" * 8 + "|"]
    def cell(r, key):
        mean, sem = r.get(key), r.get(key + "_sem")
        return fmt(mean) if mean is None or sem is None else f"{fmt(mean)} ± {fmt(sem)}"

    for r in table:
        md.append(f"| {r[param]} | {r['prompts']} | " + " | ".join(
            cell(r, f"{m}_{g}") for m in METRICS for g in ("all", "frequent", "infrequent")) + " |")
    for suffix, text in ((".csv", buf.getvalue()), (".md", "\n".join(md) + "\n")):
        write_text(out / f"sweep_{param}{suffix}", text)


def _plot(table: list[dict], param: str, path: Path, note: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np


    labels = [str(r[param]) for r in table]
    xs = list(range(len(table))) if param == "guidance" else [r[param] for r in table]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("clip_i", "clip_t")):
        for group, style in (("all", "-o"), ("frequent", "--s"), ("infrequent", ":^")):
            ys = [r.get(f"{metric}_{group}") for r in table]
            es = [r.get(f"{metric}_{group}_sem") or 0.0 for r in table]
            ys = [np.nan if y is None else y for y in ys]
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=2, label=group)
        ax.set_xlabel({"k": "K (neighbours)", "eta": "eta (share of text-enhanced steps)"}.get(param, param))
        ax.set_ylabel(METRIC_TITLES[metric])
        ax.set_xticks(xs)
        ax.set_xticklabels(labels)
        ax.legend(fontsize=8)
    fig.suptitle(f"EntityDrawBench sweep over {param}, {FIGURE[param]} - AUTOMATIC PROXY scores, not human "
                 "ratings\n" + wrap(note, 130), fontsize=9)
    fig.subplots_adjust(top=0.78, wspace=0.3)
    try:
        return savefig(fig, path)
    finally:
        plt.close(fig)


__all__ = ["SWEEPABLE", "parse_values", "sweep"]
