"""The inference room's command: ``sample`` (a cascade of trained stages, or a pipeline folder, with neighbours
retrieved from an index, hand-picked, or none) into a resumable run folder with contact sheets."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..diffusion.solvers import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS
from ..utils.cliutil import friendly

console = Console(stderr=True)


class GuidanceName(str, Enum):
    interleaved = "interleaved"
    joint = "joint"
    weighted = "weighted"


SamplerName = Enum("SamplerName", [(n.replace("-", "_"), n) for n in SAMPLERS], type=str)


# sample's options that only a Re-Imagen cascade has (another kind of model refuses them by name)
_CASCADE_OPTIONS = ("index", "kb", "k", "no_retrieval", "neighbour_image", "neighbour_text", "guidance", "w_p", "w_n",
                    "eta", "sr_guidance", "steps", "sr_steps", "sampler", "precision", "save_pipeline")


@friendly
def sample(
    ctx: typer.Context,
    model: list[str] = typer.Option([], "--model", help="The model, KIND:TARGET: reimagen:CHECKPOINT (repeat per "
                                    "stage, base first) or reimagen:PIPELINE_FOLDER, diffusers:ID_OR_PATH, "
                                    "folder:PATH (images <prompt id>__<i>.png) or python:MODULE:FUNCTION "
                                    "(generate(prompts, seeds, **kwargs) -> PIL images); docs/fid.md, 'Your model'."),
    model_arg: list[str] = typer.Option([], "--model-arg", help="KEY=VALUE for a diffusers model (steps, guidance, "
                                        "size, scheduler, dtype), a folder (size) or a python function (any)."),
    checkpoint: list[Path] = typer.Option([], help="Stage checkpoint folders, base stage first (repeat the option); "
                                          "the same as --model reimagen:PATH."),
    pipeline: Optional[Path] = typer.Option(None, "--pipeline", help="A pipeline folder (or Hub id) with the stages, "
                                            "their guidance and sampler settings and an index, instead of "
                                            "--checkpoint and --index (ReImagenPipeline.save_pretrained); the "
                                            "guidance and step options below then do not apply."),
    prompt: list[str] = typer.Option([], help="Prompt(s) (repeat the option); prompt i gets the id p0000 + i."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts file: .txt (one per line), .jsonl or "
                                           ".csv/.tsv with a prompt (or text / caption) column and optional id and "
                                           "query columns (query: what retrieval searches with; default the "
                                           "prompt)."),
    index: Optional[Path] = typer.Option(None, "--index", help="Retrieve each prompt's neighbours from this saved "
                                         "index (reimagen-eval index build: BM25, CLIP + faiss, precomputed)."),
    kb: Optional[str] = typer.Option(None, "--kb", help="The index's knowledge base (FORMAT:PATH or .parquet; "
                                     "default: the source the index recorded)."),
    k: int = typer.Option(2, "--k", "-k", min=1, help="Neighbours retrieved per prompt (the paper: 2)."),
    no_retrieval: bool = typer.Option(False, "--no-retrieval", help="Text only: joint guidance on the text, no "
                                      "neighbours (the baseline of the same cascade)."),
    neighbour_image: list[Path] = typer.Option([], help="Hand-picked neighbour image for every prompt (repeat for "
                                               "K > 1), instead of --index."),
    neighbour_text: list[str] = typer.Option([], help="Text of each neighbour image, in the same order."),
    guidance: GuidanceName = typer.Option(GuidanceName.interleaved, help="Base-stage guidance (Eq. 5 / Eq. 6)."),
    w_p: float = typer.Option(3.0, help="Text guidance weight w_p (interleaved/weighted) or w (joint)."),
    w_n: float = typer.Option(3.0, help="Neighbour guidance weight w_n (interleaved/weighted)."),
    eta: float = typer.Option(0.5, help="Interleave ratio: probability of the text-enhanced step (Eq. 6); weighted "
                              "guidance's mixing weight lam."),
    sr_guidance: float = typer.Option(5.0, help="Joint guidance weight of super-resolution stages."),
    steps: int = typer.Option(DEFAULT_STEPS, min=1, help="Sampling steps of the base stage."),
    sr_steps: Optional[int] = typer.Option(None, "--sr-steps", min=1, help="Sampling steps of the super-resolution "
                                           "stages (default: half of --steps)."),
    sampler: SamplerName = typer.Option(SamplerName(DEFAULT_SAMPLER), help="dpmpp-2m (DPM-Solver++ 2M, diffusers), "
                                        "dpmpp-2m-sde, unipc, ddim, or ddpm (Eq. 4, the paper's) (docs/sampling.md)."),
    num_samples: int = typer.Option(1, min=1, help="Samples per prompt (sample indices 0..N-1)."),
    batch_size: int = typer.Option(8, min=1, help="Images per sampling batch: jobs are cut into fixed blocks of this "
                                   "size (recorded in run.json; a resume must use the same)."),
    seed: int = typer.Option(0, help="Image = f(prompt id, sample index, seed)."),
    out: Path = typer.Option(Path("runs/samples"), help="Run folder: <prompt id>__<sample index>.png, run.json, "
                             "prompts.json, neighbours.json, sheets/. Rerun to resume; RANK / WORLD_SIZE shard it."),
    save_pipeline: Optional[Path] = typer.Option(None, "--save-pipeline", help="Also write the cascade, its settings "
                                                 "and the index as a pipeline folder here (for --pipeline or "
                                                 "ReImagenPipeline.from_pretrained)."),
    wait: bool = typer.Option(False, "--wait", help="If another process writes OUT, wait for it instead of refusing "
                              "(the refusal names its host, pid and start time); the images it made are kept."),
    device: str = typer.Option("cpu", help="torch device."),
    precision: str = typer.Option("fp32", help="fp32, or bf16 / fp16 autocast on a GPU (bf16 also runs on a CPU)."),
) -> None:
    """Sample a cascade: prompts -> neighbours retrieved from an index (or hand-picked, or none) -> images, with
    the neighbours of every prompt and a contact sheet per prompt in the run folder."""
    from ..diffusion.guidance import JointGuidance, make_guidance
    from ..models.checkpoint import checkpoint_digest, read_checkpoint_config
    from ..retrieval.base import load_image
    from .generate import CascadeGenerator
    from .pipeline import ReImagenPipeline, pipeline_folder, read_pipeline_json
    from .sample_run import prompt_table, run_sample

    # 1. Every argument and input file is checked before a model is loaded or a file written.
    ids, texts, queries = prompt_table(prompt, prompts)
    if model:
        if checkpoint or pipeline is not None:
            raise ValueError("give the model once: --model, or --checkpoint / --pipeline")
        from .plugins import parse_models

        specs = parse_models(model, model_arg)
        if specs[0].kind != "reimagen":
            return _sample_plugin(ctx, specs[0], ids, texts, num_samples, out, seed, batch_size, device, wait)
        if len(specs) == 1 and (Path(specs[0].target) / "pipeline.json").is_file():
            pipeline = Path(specs[0].target)
        else:
            checkpoint = [Path(sp.target) for sp in specs]
    elif model_arg:
        raise ValueError("--model-arg applies to --model diffusers:, folder: or python: models")
    picked = _check_sources(checkpoint, pipeline, index, no_retrieval, neighbour_image, neighbour_text, precision,
                            device)
    if pipeline is not None:
        folder = pipeline_folder(pipeline)
        stage_dirs = [folder / st["path"] for st in read_pipeline_json(folder)["stages"]]
    else:
        stage_dirs = list(checkpoint)
        for p in stage_dirs:
            read_checkpoint_config(p)
        has_source = index is not None or bool(picked)
        if guidance != GuidanceName.joint and not has_source and not no_retrieval:
            raise ValueError(f"{guidance.value} guidance needs neighbours: give --index, --neighbour-image, or "
                             "--no-retrieval for the text-only baseline")
        base_g = make_guidance(guidance.value, w_text=w_p, w_neighbours=w_n, eta=eta, lam=eta,
                               use_neighbours=guidance != GuidanceName.joint or has_source)
        sr_g = JointGuidance(w=sr_guidance, use_neighbours=base_g.needs_neighbours)

    # 2. The pipeline: the cascade, and the retriever with its knowledge base.
    if pipeline is not None:
        pipe = ReImagenPipeline.from_pretrained(folder, device=device, knowledge_base=kb, precision=precision)
    else:
        pipe = _pipeline_of(stage_dirs, base_g, sr_g, steps, sr_steps, sampler.value, index, kb, k, device, precision)
    reads_neighbours = pipe.cascade.stages[0].guidance.needs_neighbours  # (a text-only cascade: never)
    retrieve = pipe.retriever is not None and not no_retrieval and not picked and reads_neighbours
    cascade = pipe.cascade if (retrieve or picked) and reads_neighbours else pipe.cascade.without_retrieval()
    rows, nbr_fn = _neighbour_rows(pipe, ids, queries, k, picked if reads_neighbours else [], retrieve)
    gen = CascadeGenerator(cascade)

    # 3. Generate (resumable, sharded by blocks), the neighbours table and the contact sheets.
    kb_obj = pipe.knowledge_base if retrieve else None  # hand-picked neighbours are files
    counts = run_sample(gen, ids, texts, num_samples, out, seed, batch_size, rows, nbr_fn,
                        lambda n: load_image(n["image"]) if kb_obj is None else _kb_image(kb_obj, n),
                        [checkpoint_digest(p) for p in stage_dirs], wait=wait)
    if save_pipeline is not None:
        pipe.save_pretrained(save_pipeline)
    console.print(f"made {counts['made']}, skipped {counts['skipped']} (existing) of {counts['total']} images in "
                  f"{out}; contact sheets in {out / 'sheets'}")


def _sample_plugin(ctx, spec, ids, texts, num_samples, out, seed, batch_size, device, wait) -> None:
    """A diffusers, folder or python model: text only, no neighbours; the same run folder and contact sheets."""
    from ..retrieval.base import load_image
    from ..utils.cliutil import given_options
    from .plugins import build_generator, refuse_cascade_options
    from .sample_run import run_sample

    refuse_cascade_options(given_options(ctx, _CASCADE_OPTIONS), spec)
    gen = build_generator(spec, device=device)
    if hasattr(gen, "missing"):
        from .generate import Job

        lack = gen.missing([Job(p, t, i) for p, t in zip(ids, texts) for i in range(num_samples)])
        if lack:
            raise ValueError(f"{spec.label} lacks {len(lack)} images (e.g. {lack[0].prompt_id}__"
                             f"{lack[0].sample_index}.png); nothing was written")
    counts = run_sample(gen, ids, texts, num_samples, out, seed, batch_size, None, None,
                        lambda n: load_image(n["image"]), [spec.label], wait=wait)
    console.print(f"made {counts['made']}, skipped {counts['skipped']} (existing) of {counts['total']} images in "
                  f"{out} with {spec.label}; contact sheets in {out / 'sheets'}")


def _check_sources(checkpoint, pipeline, index, no_retrieval, neighbour_image, neighbour_text, precision, device):
    """Refuse conflicting sources of the cascade or of the neighbours; the hand-picked neighbours, loaded."""
    from ..retrieval.base import load_image
    from ..utils.launch import shard_from_env
    from ..utils.precision import check_precision

    sources = [bool(neighbour_image) or bool(neighbour_text), index is not None, no_retrieval]
    if sum(sources) > 1:
        raise ValueError("choose one source of neighbours: --index (retrieval), --neighbour-image (hand-picked) or "
                         "--no-retrieval")
    if bool(checkpoint) == (pipeline is not None):
        raise ValueError("give the cascade as --checkpoint (repeat, base first) or as --pipeline FOLDER")
    check_precision(precision, device)
    if len(neighbour_image) != len(neighbour_text):
        raise ValueError(f"{len(neighbour_image)} neighbour images but {len(neighbour_text)} neighbour texts")
    shard_from_env()
    return [(str(p), load_image(str(p)), t) for p, t in zip(neighbour_image, neighbour_text)]  # names a bad file


def _neighbour_rows(pipe, ids, queries, k, picked, retrieve):
    """(prompt id -> neighbour rows, neighbours_for(jobs)): retrieved per prompt, the same hand-picked files for
    every prompt, or (None, None) without neighbours."""
    if retrieve:
        rows = dict(zip(ids, pipe.retrieve(queries, k)))
        return rows, lambda batch: pipe.neighbours_of([rows[j.prompt_id] for j in batch], k)
    if not picked:
        return None, None
    from .cascade import Neighbours

    one = Neighbours.from_pairs([[(img, t) for _, img, t in picked]], size=pipe.neighbour_size)
    rows = {pid: [{"id": Path(p).name, "text": t, "score": None, "image": p} for p, _, t in picked] for pid in ids}
    return rows, lambda batch: one.index([0] * len(batch))


def _pipeline_of(stage_dirs, base_g, sr_g, steps, sr_steps, sampler, index, kb, k, device, precision):
    """The pipeline of --checkpoint / --index / --kb; the index and its knowledge base are opened (and refused
    when missing) before the stages are loaded."""
    from ..diffusion.solvers import default_sr_steps
    from ..retrieval.base import load_retriever
    from .cascade import Cascade
    from .pipeline import ReImagenPipeline, index_knowledge_base
    from .sampling import SamplerSettings

    retriever = knowledge = spec = None
    if index is not None:
        if not (Path(index) / "manifest.json").is_file():
            raise FileNotFoundError(f"--index {index} is not a saved index (no manifest.json); build one with "
                                    "`reimagen-eval index build`")
        knowledge, spec = index_knowledge_base(kb, Path(index), Path.cwd())
        if k > len(knowledge):
            raise ValueError(f"--k {k} but the index's knowledge base {spec} holds {len(knowledge)} pairs; pass "
                             f"--k {len(knowledge)} or less")
        retriever = load_retriever(index)
    base = SamplerSettings(steps=steps, sampler=sampler)
    sr = SamplerSettings(steps=sr_steps or default_sr_steps(steps), sampler=sampler)
    cascade = Cascade.from_checkpoints(stage_dirs, [base_g] + [sr_g] * (len(stage_dirs) - 1),
                                       [base] + [sr] * (len(stage_dirs) - 1), device=device, precision=precision)
    return ReImagenPipeline(cascade, retriever, knowledge, spec)


def _kb_image(kb, row: dict):
    """A neighbour's image for the contact sheet: from the knowledge base by id (its references may be relative)."""
    return kb.image(kb.index_of(row["id"]))


COMMANDS = [("sample", sample)]
