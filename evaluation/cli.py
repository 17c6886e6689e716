"""``reimagen-eval fid``: the COCO-30K / WikiImages-20K FID sweeps of Table 1 (Sec. 4.1).

The application (reimagen_eval/cli.py) registers the command::

    from evaluation.cli import fid
    app.command()(fid)

Bad input (unknown dataset or database, a dataset root without its files, a model folder missing prompt ids,
fewer images than prompts, missing Inception weights offline) is one red line and exit code 2, found before
the output folder is created. Heavy imports happen inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from reimagen.retrieval.base import OptionError
from reimagen.utils.cliutil import friendly, warn_deprecated

err_console = Console(stderr=True)


def _options(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--dataset-option {p!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


@friendly
def fid(
    ctx: typer.Context,
    dataset: str = typer.Option("coco", "--dataset", help="coco (FID-30K), wikiimages (FID-20K), or synthetic "
                                "(registered by the toy-world issue); any name added with evaluation.datasets."
                                "register_dataset."),
    dataset_root: Optional[Path] = typer.Option(None, "--dataset-root", help="coco: folder with annotations/"
                                                "captions_val2014.json and val2014/ (and train2014/ for --db "
                                                "coco-train); wikiimages: folder with WebQA_train_val.json, "
                                                "imgs.tsv, imgs.lineidx; synthetic: a world folder from "
                                                "`reimagen-eval toy build` (a new folder is built)."),
    dataset_option: list[str] = typer.Option([], "--dataset-option", "-O", help="KEY=VALUE for the dataset "
                                             "(coco: split=val2014, train_split=train2014; wikiimages: "
                                             "split_seed=0, val_size=22000; synthetic: world_seed=0, "
                                             "build=false). Repeatable."),
    db: str = typer.Option("none", "--db", help="Retrieval database: coco-train / wikiimages-train / "
                           "synthetic-train (in-domain "
                           "for their dataset: FID), laion (zero-shot, with --db-root SHARDS or --index), none "
                           "(text only), or any knowledge base FORMAT:PATH[?opts] / table.parquet."),
    db_root: Optional[str] = typer.Option(None, "--db-root", help="Data of a named database that is not the "
                                          "dataset's own: LAION webdataset shards (folder or glob), or the other "
                                          "dataset's root."),
    index: Optional[Path] = typer.Option(None, "--index", help="A saved retriever (`reimagen-eval index build`) "
                                         "to use instead of building one over --db."),
    retriever: Optional[str] = typer.Option(None, "--retriever", help="bm25 (the paper's; the default) or clip; "
                                            "with --index, the index's kind."),
    k: int = typer.Option(2, "--k", help="Neighbours per prompt (the paper: 2)."),
    model: str = typer.Option(..., "--model", help="The model, KIND:TARGET: reimagen:CHECKPOINT (the base stage; a "
                              "bare path works too), diffusers:ID_OR_PATH (a text-to-image pipeline; --guidance-64 "
                              "are its guidance scales), folder:PATH (images made elsewhere, <prompt_id>__0.png) or "
                              "python:MODULE:FUNCTION (generate(prompts, seeds, **kwargs) -> PIL images); "
                              "docs/fid.md, 'Your model'."),
    model_arg: list[str] = typer.Option([], "--model-arg", help="KEY=VALUE for a diffusers model (steps, guidance, "
                                        "size, scheduler, dtype), a folder (size) or a python function (any)."),
    sr_model: Optional[str] = typer.Option(None, "--sr-model", help="The super-resolution checkpoint of the "
                                           "cascade (64 -> 256 in the paper)."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", help="Prompts drawn with --seed from the "
                                              "validation captions (default: COCO 30000, WikiImages 20000, "
                                              "synthetic 500)."),
    guidance_64: str = typer.Option("1.0,1.25,1.5,1.75,2.0", "--guidance-64", help="Guidance weights of the "
                                    "base stage (standard CFG, Sec. 4.1)."),
    guidance_sr: str = typer.Option("1,5,8,10", "--guidance-sr", help="Guidance weights of the super-resolution "
                                    "stage; each reuses the base images of every base weight."),
    steps: int = typer.Option(1000, "--steps", help="Sampling steps of the base stage (the paper: T = 1000); for a "
                              "diffusers baseline its num_inference_steps (e.g. 50)."),
    sr_steps: Optional[int] = typer.Option(None, "--sr-steps", help="Steps of the SR stage (default: --steps)."),
    sampler: str = typer.Option("ddpm", "--sampler", help="ddpm (the paper's), ddim, or a fast deterministic "
                                "solver: dpmpp-2m, unipc (one network evaluation per step: 20 steps cost 1/50 "
                                "of T = 1000; docs/fid.md)."),
    backend: str = typer.Option("clean-fid", "--backend", help="clean-fid or torch-fidelity (each with its own "
                                "Inception preprocessing)."),
    mode: str = typer.Option("clean", "--mode", help="clean-fid mode: clean or legacy_tensorflow."),
    feature_extractor: str = typer.Option("inception", "--feature-extractor", help="inception (comparable with "
                                          "published FIDs); judge (the toy world's judge CNN, for --dataset synthetic); "
                                          "random-conv-<dim> (offline tests only) or module:attr (a network of "
                                          "your own, see evaluation/features.py)."),
    inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="Local Inception weights: "
                                                     "clean-fid inception-2015-12-05.pt, torch-fidelity "
                                                     "weights-inception-2015-12-05-6726825d.pth."),
    resolution: Optional[int] = typer.Option(None, "--resolution", help="Real and generated images are center-"
                                             "cropped and resized to this side (PIL bicubic) before the backend's "
                                             "preprocessing (default: the dataset's; COCO / WikiImages 256, "
                                             "synthetic 64)."),
    metrics: str = typer.Option("fid,kid", "--metrics", help="Comma-separated: fid, kid (the --feature-extractor's "
                                "features), fd-dinov2 (DINOv2 ViT-L/14, Stein et al. 2023), cmmd (CLIP ViT-L/14@336 "
                                "MMD, Jayasumana et al. 2024), clip-fid (CLIP ViT-B/32 FID). Each extractor runs "
                                "once per image set; its weights are checked before any image is generated."),
    bootstrap: int = typer.Option(100, "--bootstrap", min=0, help="Bootstrap resamples of the generated images for "
                                  "every metric's 95% interval (0: no intervals). Each resample of a Frechet "
                                  "distance costs one weighted covariance and one matrix square root."),
    weights: list[str] = typer.Option([], "--weights", help="METRIC=PATH: a local OpenAI CLIP TorchScript file for "
                                      "cmmd (ViT-L-14-336px.pt) or clip-fid (ViT-B-32.pt). Repeatable. "
                                      "fd-dinov2 loads through the torch.hub cache ($TORCH_HOME/hub)."),
    kid_subsets: int = typer.Option(100, "--kid-subsets", help="KID: random subsets (as clean-fid / torch-fidelity)."),
    kid_subset_size: int = typer.Option(1000, "--kid-subset-size", help="KID: images per subset (at most the "
                                        "number of generated and of reference images)."),
    clip_model: str = typer.Option("ViT-B-32", "--clip-model", help="open-clip model for the CLIP score (and "
                                   "--retriever clip)."),
    clip_pretrained: Optional[str] = typer.Option(None, "--clip-pretrained", help="open-clip weights tag or local "
                                                  "checkpoint; without it the CLIP score is skipped with a note."),
    stats_cache: Optional[Path] = typer.Option(None, "--stats-cache", help="Reference statistics cache (default "
                                               "$REIMAGEN_CACHE/fid_stats or ~/.cache/reimagen/fid_stats)."),
    label: str = typer.Option("auto", "--label", help="auto (FID when --db is the dataset's train split, else "
                              "ZS-FID), FID or ZS-FID."),
    seed: int = typer.Option(0, "--seed", help="Prompt draw and images: image = f(prompt id, sample index, seed)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per generation batch."),
    feature_batch_size: int = typer.Option(64, "--feature-batch-size", help="Images per feature batch."),
    workers: int = typer.Option(0, "--workers", help="DataLoader workers of the feature extraction."),
    device: str = typer.Option("cpu", "--device", help="torch device (cuda uses cuda:LOCAL_RANK under torchrun)."),
    precision: str = typer.Option("fp32", "--precision", help="Sampling precision of Re-Imagen stages: fp32, or "
                                  "bf16 / fp16 autocast on a GPU (bf16 also runs on a CPU)."),
    out: Path = typer.Option(Path("runs/fid"), "--out", help="Output folder (rerun to resume; other settings are "
                             "refused)."),
    wait_timeout: float = typer.Option(7 * 24 * 3600.0, "--wait-timeout", help="With several processes: how long "
                                       "rank 0 waits for the others' images before the metrics."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars."),
    wait: bool = typer.Option(False, "--wait", help="If another process writes OUT's image folders, wait for it "
                              "instead of refusing (the refusal names its host, pid and start time)."),
    no_kid: bool = typer.Option(False, "--no-kid", hidden=True, help="Deprecated: --metrics without kid."),
) -> None:
    """FID / zero-shot FID sweep over guidance weights (Table 1): generate, measure, tabulate, plot."""
    from .metric_set import parse_metrics, parse_weights
    from .sweep import FidSweep, SweepConfig

    from reimagen.utils.runlock import wait_for_locks

    wait_for_locks(wait)
    if no_kid:
        metrics = without_kid(metrics)
    model, model_arg = _model(ctx, model, list(model_arg))
    cfg = SweepConfig(dataset=dataset, out=str(out), dataset_root=None if dataset_root is None else str(dataset_root),
                      dataset_options=_options(dataset_option), num_prompts=num_prompts, seed=seed, db=db,
                      db_root=db_root, index=None if index is None else str(index), retriever=retriever, k=k,
                      model=model, model_args=tuple(model_arg), sr_model=sr_model, guidance_64=guidance_64,
                      guidance_sr=guidance_sr, steps=steps,
                      sr_steps=sr_steps, sampler=sampler, batch_size=batch_size, device=device, precision=precision,
                      backend=backend,
                      mode=mode, feature_extractor=feature_extractor,
                      inception_weights=None if inception_weights is None else str(inception_weights),
                      resolution=resolution, metrics=parse_metrics(metrics), bootstrap=bootstrap,
                      metric_weights=parse_weights(weights), kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                      clip_model=clip_model, clip_pretrained=clip_pretrained,
                      stats_cache=None if stats_cache is None else str(stats_cache), label=label,
                      feature_batch_size=feature_batch_size, workers=workers, wait_timeout=wait_timeout,
                      progress=progress)
    try:
        sweep = FidSweep(cfg, log=lambda msg: err_console.print(escape(msg), highlight=False))
        sweep.validate()
        result = sweep.run()
    except OptionError as err:  # a dataset reader's remedy, as this command spells the reader's options
        raise err.respell(lambda key, value: f"--dataset-option {key}={value}") from None
    if result["rank"] == 0:
        _report(sweep, result, out)


# fid's options that only a Re-Imagen cascade has; guidance_64 and steps also drive a diffusers pipeline
_CASCADE_OPTIONS = ("sr_model", "guidance_sr", "sr_steps", "sampler", "precision", "sr_aug_level")


def _model(ctx, model: str, model_arg: list[str]) -> tuple[str, list[str]]:
    """``--model`` in the one grammar (KIND:TARGET), checked before anything is read; options that do not apply
    to its kind refused by name; diffusers' old --steps mapped to --model-arg steps (with a warning)."""
    from reimagen.pipelines.plugins import parse_model, refuse_cascade_options
    from reimagen.utils.cliutil import given_options, warn_renamed

    spec = parse_model(model, model_arg)
    if spec.kind == "reimagen":
        return spec.label, model_arg
    also = () if spec.kind == "diffusers" else ("guidance_64", "steps")  # a pipeline's guidance scales and steps
    refuse_cascade_options(given_options(ctx, _CASCADE_OPTIONS + also), spec)
    if spec.kind == "folder" and "size" in spec.args:  # the metrics read the files themselves
        raise ValueError(f"--model-arg size does not apply to fid's {spec.label}: every image is resized to "
                         "--resolution before the features")
    if spec.kind == "diffusers" and given_options(ctx, ("steps",)) and "steps" not in spec.args:
        steps = ctx.params["steps"]
        warn_renamed("--steps (of a diffusers model)", f"--model-arg steps={steps}")
        model_arg = [*model_arg, f"steps={steps}"]
    return spec.label, model_arg


def _made_by(rec: dict) -> str:
    """One sentence of results.md on what made the images."""
    if rec["kind"] == "folder":
        return f"Images: pre-generated, read from {rec['model']}."
    if rec["kind"] == "reimagen":
        return f"Images: Re-Imagen {rec['model']}, standard CFG, {rec['steps']} steps ({rec['scheduler']})."
    size = f", {rec['size']} px" if rec.get("size") else ""
    steps = f", {rec['steps']} steps" if rec.get("steps") else ""
    return (f"Images: {rec['kind']} model {rec['model']} ({rec['scheduler']}{steps}, guidance "
            f"{rec['guidance']}{size}).")


def _report(sweep, result: dict, out: Path) -> None:
    """Rank 0: the results files (CSV, Markdown with the protocol and the paper's numbers, plot) and a table."""
    from .metric_set import COLUMN, METRICS, TITLE
    from .results import best_row, measured_metrics, write_results

    c, ds = sweep.cfg, sweep.dataset
    protocol = (f"{len(sweep.jobs)} prompts drawn with seed {c.seed} from {ds.name} {ds.split}; reference: all "
                f"{len(ds.reference)} {ds.split} images; real and generated images center-cropped and resized to "
                f"{sweep.resolution}px (PIL bicubic), then {sweep.backend.name} ({sweep.backend.mode}) with "
                f"{sweep.backend.extractor_name()} features. {_made_by(sweep.generator_record())} "
                f"Label {sweep.label}: database {sweep.db.name} is "
                f"{'in-domain' if sweep.db.in_domain else 'not in-domain'}.")
    notes = list(result["notes"])
    if sweep.kind == "reimagen" and c.sampler in ("ddpm", "ddim") and c.steps > 20:
        notes.append(f"Sampler {c.sampler} with {c.steps} steps: a library solver (--sampler dpmpp-2m or unipc) at "
                     f"20 steps takes {c.steps / 20:.1f}x fewer network evaluations; whether it keeps these numbers "
                     "is a measurement to make (docs/fid.md).")
    if sweep.backend.extractor_name() != "inception":
        notes.append(f"Feature extractor {sweep.backend.extractor_name()} is not Inception: these numbers do not "
                     "compare with published FIDs.")
    paths = write_results(out, result["rows"], f"{sweep.label} sweep: {ds.name} {ds.split}", notes, protocol,
                          comparable=sweep.backend.extractor_name() == "inception",
                          manifest=getattr(sweep, "protocol", None))
    cols = measured_metrics(result["rows"])
    titles = {COLUMN[m]: TITLE[m] for m in METRICS}
    table = Table(title=f"{sweep.label}: {ds.name} {ds.split}, db {sweep.db.name} (95% intervals)")
    for col in ("w (64)", "w (SR)", *(titles[c] for c in cols), "n"):
        table.add_column(col, justify="right")
    best = best_row(result["rows"])
    for r in result["rows"]:
        mark = " *" if r is best else ""
        cells = [f"{r[c]:.5g}" + (f" [{r[c + '_lo']:.4g}, {r[c + '_hi']:.4g}]" if r.get(c + "_lo") is not None else "")
                 if r.get(c) is not None else "-" for c in cols]
        table.add_row("-" if r["w_64"] is None else f"{r['w_64']:g}", "-" if r["w_sr"] is None else f"{r['w_sr']:g}",
                      *[x + (mark if i == 0 else "") for i, x in enumerate(cells)], str(r["n"]))
    Console().print(table)
    for n in notes:
        err_console.print(f"note: {escape(n)}", highlight=False)
    err_console.print(f"wrote {escape(', '.join(str(p) for p in paths.values()))}", highlight=False)


@friendly
def fid_table(
    runs: list[Path] = typer.Argument(..., help="Output folders of `reimagen-eval fid` (each with results.csv and "
                                      "protocol.json), e.g. with and without retrieval."),
    out: Path = typer.Option(..., "--out", help="Folder for the combined results.csv / results.md."),
    allow_different: bool = typer.Option(False, "--allow-different", help="Keep runs whose protocols differ "
                                         "(reference set, preprocessing, images, extractors) in the table, each "
                                         "row marked, instead of refusing."),
) -> None:
    """Combine FID sweeps into one table; runs measured under different protocols are refused (or marked)."""
    import csv
    import json

    from .protocol_manifest import compare
    from .results import COLUMNS, cell

    manifests, rows = [], []
    for run in runs:
        if not (run / "protocol.json").is_file() or not (run / "results.csv").is_file():
            raise FileNotFoundError(f"{run} has no protocol.json / results.csv: not a finished `reimagen-eval fid` "
                                    "output folder (or one written before protocol manifests existed: rerun it)")
        manifests.append((str(run), json.loads((run / "protocol.json").read_text())))
        with open(run / "results.csv") as fh:
            rows += [dict(r, run=str(run)) for r in csv.DictReader(fh) if r["source"] == "measured"]
    problems, notes = compare(manifests)
    kinds = {name: (m.get("model") or {}).get("kind") for name, m in manifests}
    if len({k for k in kinds.values() if k}) > 1:  # recorded since 0.2; older runs have no model record
        notes.append("MIXED GENERATOR KINDS: " + ", ".join(f"{n} is {k}" for n, k in kinds.items() if k)
                     + " (scheduler, steps, guidance and size differ by construction: see each run's protocol.json)")
    if problems and not allow_different:
        raise ValueError("the runs were measured under different protocols, so their numbers do not compare: "
                         + " | ".join(problems) + " (pass --allow-different to tabulate them anyway, marked)")
    base = manifests[0][1]["id"]
    for r in rows:
        r["comparable"] = "yes" if r.get("protocol_id") == base else f"NO: protocol {r.get('protocol_id')} != {base}"
    from reimagen.utils.atomic import write_text

    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["run", "comparable", *COLUMNS], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "results.csv", buf.getvalue())
    lines = ["# Combined FID sweeps", "", *[f"- {x}" for x in problems + notes], "",
             "| run | comparable | point | FID | KID | FD-DINOv2 | CMMD | CLIP-FID | n |", "|---" * 9 + "|"]
    for r in rows:
        vals = [cell(_numbers(r), c) for c in ("fid", "kid", "fd_dinov2", "cmmd", "clip_fid")]
        lines.append(f"| {r['run']} | {r['comparable']} | {r['point']} | " + " | ".join(vals) + f" | {r['n']} |")
    write_text(out / "results.md", "\n".join(lines) + "\n")
    for x in problems + notes:
        err_console.print(f"note: {escape(x)}", highlight=False)
    err_console.print(f"wrote {escape(str(out / 'results.csv'))}, {escape(str(out / 'results.md'))}", highlight=False)


def _numbers(row: dict) -> dict:
    """A results.csv row with its metric columns as floats (empty: None), as ``results.cell`` formats them."""
    from .metric_set import METRIC_COLUMNS

    return {**row, **{c: float(row[c]) if row.get(c) else None for c in METRIC_COLUMNS}}


# ``python -m evaluation.cli fid ...`` works before (and besides) the reimagen-eval registration.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
app.command()(fid)
app.command("fid-table")(fid_table)


@app.callback()
def _main() -> None:
    """Evaluation commands of reimagen (also available as `reimagen-eval fid`)."""


if __name__ == "__main__":  # pragma: no cover
    app()


def without_kid(metrics: str) -> str:
    """``--no-kid`` (deprecated, DEPRECATED_OPTIONS) as the --metrics list it stands for."""
    warn_deprecated("fid --no-kid")
    return ",".join(m for m in (x.strip() for x in metrics.split(",")) if m and m != "kid")
