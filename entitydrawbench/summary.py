"""What the CLIP-proxy summaries (``scoring``), the judged toy-world summaries (``world``) and the sweeps
(``ablation``) share: the mean with its cluster-robust standard error, the figure writer, title wrapping, and the
sweepable parameters with the paper's figure each belongs to."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .run import RunConfig

SWEEPABLE = {"k": int, "eta": float, "guidance": str}
FIGURE = {"k": "Figure 7 (number of neighbours K)", "eta": "Figure 8 (interleave ratio eta)",
          "guidance": "Figure 13 (joint vs weighted vs interleaved guidance)"}


def parse_values(param: str, spec: str | Sequence) -> list:
    """'1,2,3,4' -> [1, 2, 3, 4], validated for the parameter."""
    if param not in SWEEPABLE:
        raise ValueError(f"cannot sweep {param!r}; choose {', '.join(SWEEPABLE)}")
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    try:
        values = [SWEEPABLE[param](v) for v in items if str(v) != ""]
    except ValueError:
        raise ValueError(f"sweep values for {param} must be numbers, got {spec!r}") from None
    if not values:
        raise ValueError("no sweep values")
    for v in values:
        replace(RunConfig(), **{param: v}).check()  # k >= 1, eta in [0, 1]
    if len(set(values)) != len(values):
        raise ValueError(f"duplicate sweep values {values}")
    return values


def mean_sem(values: list[float], clusters: list | None = None) -> tuple[float | None, float | None, int]:
    """Mean, standard error and count of the non-missing values.

    With ``clusters`` (e.g. the prompt id of each image) the standard error is cluster-robust: the 4 samples of
    one prompt share its entity, references and template, so they are not 4 independent draws, and the i.i.d.
    formula would understate the error of a per-image rate. This is the Liang-Zeger sandwich estimator with the
    usual G / (G - 1) correction, sqrt(G / (G - 1) * sum_g (sum_{i in g} (x_i - mean))^2) / N, written out
    because it is five lines (statsmodels is not a dependency); with one value per cluster it is exactly the
    i.i.d. std / sqrt(N), and with G = 1 cluster it is undefined."""
    keep = [i for i, x in enumerate(values) if x is not None and not (isinstance(x, float) and math.isnan(x))]
    v = np.array([values[i] for i in keep], dtype=float)
    if not len(v):
        return None, None, 0
    mean = float(v.mean())
    if clusters is None:
        sem = float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None  # undefined for one value
        return mean, sem, len(v)
    sums: dict = {}
    for i, x in zip(keep, v):
        sums[clusters[i]] = sums.get(clusters[i], 0.0) + (x - mean)
    g = len(sums)
    sem = math.sqrt(g / (g - 1) * sum(s * s for s in sums.values())) / len(v) if g > 1 else None
    return mean, sem, len(v)


def ci95(mean: float | None, sem: float | None, bounds: tuple[float, float] | None = None
         ) -> tuple[float | None, float | None]:
    """The normal-approximation 95% interval mean +- 1.96 sem (of ``mean_sem``: cluster-robust where clustered),
    clipped to ``bounds`` (e.g. (0, 1) for rates); (None, None) where the standard error is undefined."""
    if mean is None or sem is None:
        return None, None
    lo, hi = mean - 1.96 * sem, mean + 1.96 * sem
    if bounds is not None:
        lo, hi = max(bounds[0], lo), min(bounds[1], hi)
    return lo, hi


#: What a run's numbers depend on besides the model: the benchmark (and world), the prompts, the samples per
#: prompt, the seed. Rows of runs that differ in these (or in how they were scored) do not compare.
PROTOCOL_KEYS = ("benchmark", "world", "prompt_seed", "samples_per_prompt", "prompts", "n_prompts", "seed")


def run_protocol(manifest: dict[str, Any], scorer: Any) -> dict[str, Any]:
    """The protocol of a scored run: ``PROTOCOL_KEYS`` of its run.json and how it was scored."""
    return {**{k: manifest.get(k) for k in PROTOCOL_KEYS}, "scorer": scorer}


def check_protocols(protocols: dict[str, dict[str, Any]], allow_different: bool) -> list[str]:
    """Refuse runs of different protocols in one table (ValueError naming the differences), or, with
    ``allow_different``, return one note per run that differs from the first."""
    labels = list(protocols)
    if not labels:
        return []
    base = protocols[labels[0]]
    notes = []
    for label in labels[1:]:
        diff = sorted(k for k in set(base) | set(protocols[label]) if base.get(k) != protocols[label].get(k))
        if diff:
            notes.append(f"{label} differs from {labels[0]} in {', '.join(diff)}: its numbers do not compare")
    if notes and not allow_different:
        raise ValueError("the runs were made or scored under different protocols: " + "; ".join(notes)
                         + " (pass --allow-different to tabulate them anyway, marked)")
    return notes


def savefig(fig, path: Path) -> Path:
    from reimagen.utils.atomic import replacing_path  # here, not at the top: ``import reimagen`` loads torch

    with replacing_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    return path


def wrap(text: str, width: int = 150) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def generator_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """What made a run's images (run.json's model_record; derived for runs made before it existed)."""
    if manifest.get("model_record"):
        return manifest["model_record"]
    gen = manifest.get("generator")
    if gen == "cascade":
        st = manifest.get("stages", [])
        return {"kind": "reimagen", "model": " + ".join(s.get("name", "?") for s in st), "scheduler": None,
                "steps": None, "guidance": None, "size": None}
    return {"kind": gen, "model": manifest.get("pipeline") or manifest.get("folder") or manifest.get("function"),
            "scheduler": "pre-generated" if gen == "folder" else manifest.get("scheduler"),
            "steps": manifest.get("steps"), "guidance": manifest.get("guidance_scale"), "size": manifest.get("size")}


def generators_markdown(generators: dict[str, dict[str, Any]]) -> list[str]:
    """The summaries' "what made the images" table, one row per model; a table mixing kinds says so."""
    if not generators:
        return []
    kinds = sorted({str(g.get("kind")) for g in generators.values()})
    cols = ("kind", "model", "scheduler", "steps", "guidance", "size")
    lines = ["## What made the images", ""]
    if len(kinds) > 1:
        lines += [f"> MIXED GENERATOR KINDS ({', '.join(kinds)}): the rows compare different kinds of model "
                  "(sampler, steps, guidance and size differ by construction; see below).", ""]
    lines += ["| Model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, g in generators.items():
        lines.append(f"| {label} | " + " | ".join("-" if g.get(c) is None else str(g[c]) for c in cols) + " |")
    return lines + [""] + sampler_saving(generators)


def sampler_saving(generators: dict[str, dict[str, Any]]) -> list[str]:
    """For Re-Imagen rows sampled with DDPM: what the measured fast sampler would save (docs/sampling.md)."""
    from reimagen.diffusion.solvers import DEFAULT_SAMPLER, DEFAULT_SR_STEPS, DEFAULT_STEPS

    fast = DEFAULT_STEPS + DEFAULT_SR_STEPS
    notes = []
    for label, g in generators.items():
        samplers, steps = str(g.get("scheduler") or "").split(" / "), str(g.get("steps") or "").split(" / ")
        if g.get("kind") != "reimagen" or "ddpm" not in samplers or not all(s.isdigit() for s in steps):
            continue
        nfe = sum(map(int, steps))
        notes.append(f"- {label}: DDPM, {nfe} network evaluations per image. {DEFAULT_SAMPLER} at "
                     f"{DEFAULT_STEPS} / {DEFAULT_SR_STEPS} steps (`--sampler {DEFAULT_SAMPLER} --steps "
                     f"{DEFAULT_STEPS} --sr-steps {DEFAULT_SR_STEPS}`) takes {fast}, {nfe / fast:.0f}x fewer; on the "
                     "toy world it kept the paper setting's judged numbers (docs/sampling.md), for this model it is "
                     "a measurement to make.")
    return ["## A faster sampler", "", *notes, ""] if notes else []


__all__ = ["SWEEPABLE", "FIGURE", "parse_values", "mean_sem", "savefig", "wrap", "generator_of",
           "generators_markdown", "sampler_saving"]
