"""The model's commands: ``train`` (one stage from a KNN-ImageText triples table), ``sample`` (a cascade of
trained stages), ``presets`` (the paper's and the small configurations, with parameter counts). The
``reimagen-eval`` application (``reimagen_eval.cli``) mounts them beside the benchmarks' commands."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .cliutil import friendly

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Re-Imagen's model: train a stage, sample a cascade, list the presets.")
console = Console(stderr=True)


class TextEncoderName(str, Enum):
    tiny = "tiny"
    minilm = "minilm"
    t5 = "t5"


class GuidanceName(str, Enum):
    interleaved = "interleaved"
    joint = "joint"
    weighted = "weighted"


class SamplerName(str, Enum):
    ddpm = "ddpm"
    ddim = "ddim"


@app.command()
@friendly
def train(
    triples: Optional[Path] = typer.Option(None, help="KNN-ImageText triples table (.parquet/.jsonl/.csv) with "
                                           "columns id, text, image, neighbor_ids, loaded into RAM (small data)."),
    shards: Optional[Path] = typer.Option(None, help="Training shards (`reimagen-eval shards`), streamed: for data "
                                          "that does not fit in RAM. Give --triples or --shards."),
    text_store: Optional[Path] = typer.Option(None, help="Precomputed text embeddings of the shards "
                                              "(`reimagen-eval embed-text`); default SHARDS/text/<encoder>. Needed "
                                              "with --shards and a frozen encoder (minilm, t5), which is then "
                                              "never loaded."),
    out: Path = typer.Option(..., help="Run folder: checkpoints in OUT/last, loss log in OUT/log.jsonl. "
                             "Rerunning with the same folder resumes."),
    preset: str = typer.Option("small-32", help="Stage configuration (see `reimagen-eval presets`)."),
    prediction: Optional[str] = typer.Option(None, help="Override the preset's network output: eps, x0 or v "
                                             "(v weights the loss towards high noise levels, where an image's "
                                             "colours are decided). Default: the preset's."),
    schedule: Optional[str] = typer.Option(None, help="Override the preset's noise schedule: cosine, linear, or "
                                           "NAME:SHIFT with the log-SNR shifted by SHIFT (cosine:-3: noisier). "
                                           "Sampling uses the checkpoint's own schedule."),
    text_encoder: TextEncoderName = typer.Option(TextEncoderName.tiny, help="tiny: small trainable encoder; "
                                                 "minilm: offline pretrained all-MiniLM-L6-v2; t5: a T5 checkpoint."),
    t5: str = typer.Option("google/t5-v1_1-xxl", help="T5 checkpoint id or local folder (with --text-encoder t5)."),
    steps: int = typer.Option(1000, min=1, help="Total optimiser steps."),
    batch_size: int = typer.Option(16, min=1, help="Examples per step."),
    lr: float = typer.Option(1e-4, help="Learning rate (the paper: 1e-4)."),
    warmup_steps: int = typer.Option(0, min=0, help="Linear learning-rate warm-up over the first N steps."),
    optimizer: str = typer.Option("adamw", help="adamw or adafactor (the paper's choice for the 64x64 stage)."),
    ema_decay: float = typer.Option(0.999, help="EMA decay of the weights used for sampling."),
    ema_warmup: bool = typer.Option(True, help="Warm the EMA up: decay min(ema_decay, (1 + step) / (10 + step)), "
                                    "so that short runs do not sample with weights still close to the initial ones."),
    grad_clip: float = typer.Option(1.0, help="Max gradient norm (0 disables)."),
    p_drop_text: float = typer.Option(0.1, help="Probability of dropping the text (Sec. 3.2: 0.1)."),
    p_drop_neighbours: float = typer.Option(0.1, help="Probability of dropping the neighbours (Sec. 3.2: 0.1)."),
    max_aug_level: float = typer.Option(1.0, min=0.0, max=1.0, help="Super-resolution stages: the low-resolution "
                                        "input is noised to a level ~ U[0, this] (Imagen's noise-conditioning "
                                        "augmentation). Sampling uses level 0 by default; a short run trained with "
                                        "1.0 spends most steps on inputs it will never see (README, toy world)."),
    min_snr_gamma: float = typer.Option(0.0, min=0.0, help="Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is "
                                        "their default): caps the weight of low-noise steps at gamma. 0 trains "
                                        "with the paper's loss. The logged loss is the weighted one."),
    min_snr_plus_one: bool = typer.Option(False, help="With --min-snr-gamma and v / x0 prediction: weigh the x0 "
                                          "error by min(SNR, gamma) + 1, so that the high-noise steps, where the "
                                          "layout is decided, keep the plain loss's weight instead of ~0."),
    ckpt_every: int = typer.Option(500, min=1, help="Checkpoint every N steps."),
    log_every: int = typer.Option(25, min=1, help="Log the mean loss (over steps and processes) every N steps."),
    keep_last: int = typer.Option(0, min=0, help="Besides OUT/last, keep the N most recent OUT/step-XXXXXXXX "
                                  "checkpoints."),
    grad_accum: int = typer.Option(1, min=1, help="Micro-batches per step: --batch-size is the global batch, "
                                   "split over processes and then into N micro-batches."),
    precision: str = typer.Option("fp32", help="fp32, bf16 or fp16 autocast (fp16 with a gradient scaler that skips "
                                  "non-finite steps). bf16 also runs on CPU."),
    grad_checkpointing: bool = typer.Option(False, help="Recompute block activations in the backward pass: less "
                                            "memory, ~30% more compute."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the stage network."),
    fsdp: bool = typer.Option(False, help="With torchrun: shard parameters, gradients and optimiser state (FSDP2) "
                              "instead of replicating them (DDP), for stages that do not fit one GPU."),
    workers: int = typer.Option(0, min=0, help="DataLoader worker processes per rank (decoding, crops, noise)."),
    random_crop: bool = typer.Option(False, help="Random square crops of the training images instead of centred "
                                     "ones (Imagen trains its super-resolution stages on random crops)."),
    mirror_words: str = typer.Option("", metavar="WORD:WORD,...", help="Mirror half the training images left-right "
                                     "and swap these words in their captions (e.g. left:right), so that a layout "
                                     "word is learnt from the text, not from the neighbours' layout. With a frozen "
                                     "encoder: --triples only (both captions are encoded once)."),
    init_from: Optional[Path] = typer.Option(None, help="Start from this stage checkpoint's EMA weights (fine-tuning), "
                                             "e.g. toy-32's shipped stage into toy-32-layout: tensors the "
                                             "checkpoint lacks keep their initial values. Ignored when OUT already "
                                             "has a checkpoint (the run resumes)."),
    seed: int = typer.Option(0, help="Seed: every sample's randomness is a function of (seed, its stream position)."),
    device: str = typer.Option("cpu", help="torch device, e.g. cuda (under torchrun each process takes the GPU "
                               "LOCAL_RANK)."),
) -> None:
    """Train one cascade stage (base or super-resolution, from the preset) on KNN-ImageText triples.

    One process, or many: `torchrun --nproc-per-node 8 -m reimagen_eval.cli train ...` (DDP, or FSDP2 with --fsdp;
    multi-node with torchrun's --nnodes / --rdzv-endpoint). The batch is global, so a run resumes on another
    number of processes."""
    from .config import get_preset
    from .data import TripleData
    from .train import TrainConfig, Trainer
    from .unet import ReImagenUNet

    if (triples is None) == (shards is None):
        raise typer.BadParameter("give exactly one of --triples (a table, in RAM) and --shards (streamed)")
    if mirror_words and shards is not None and text_encoder != TextEncoderName.tiny:
        raise typer.BadParameter(f"--mirror-words with --shards needs the trainable tiny encoder: the text store "
                                 f"holds the {text_encoder.value} embeddings of each caption as written; use --triples")
    from .distributed import shard_from_env, shutdown_distributed

    shard_from_env()  # a half-set launcher environment is refused before anything is loaded
    if init_from is not None:
        _check_init_from(init_from, text_encoder)
    tc = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, optimizer=optimizer,
                     ema_decay=ema_decay, ema_warmup=ema_warmup, grad_clip=grad_clip, p_drop_text=p_drop_text,
                     p_drop_neighbours=p_drop_neighbours, max_aug_level=max_aug_level, min_snr_gamma=min_snr_gamma,
                     min_snr_plus_one=min_snr_plus_one,
                     ckpt_every=ckpt_every, log_every=log_every, keep_last=keep_last, grad_accum=grad_accum, precision=precision,
                     grad_checkpointing=grad_checkpointing, compile=compile, fsdp=fsdp, workers=workers,
                     random_crop=random_crop, mirror_words=mirror_words, seed=seed)
    enc, store = _train_text(text_encoder, t5, shards, text_store, device)
    dim = store.dim if store is not None else enc.dim
    overrides = {k: v for k, v in (("prediction", prediction), ("schedule", schedule)) if v}
    cfg = get_preset(preset, text_dim=dim, **overrides)
    if shards is not None:
        data = shards
    else:
        data = TripleData.from_table(triples, cfg.image_size)
        if data.skipped:
            console.print(f"[yellow]skipped[/] {sum(data.skipped.values())} rows: {data.skipped}")
    import torch

    with torch.random.fork_rng(devices=[]):  # the same initial weights in every process and run
        torch.manual_seed(seed)
        model = ReImagenUNet(cfg)
    if init_from is not None:
        from .checkpoint import init_from as start_from

        new = start_from(model, init_from)
        console.print(f"started from {init_from}; new tensors: {', '.join(new) or 'none'}")
    trainer = Trainer(model, store.encoder_spec if store is not None else enc, data, tc, out_dir=out,
                      device=device, text_store=store)
    hist = trainer.fit()
    if hist and trainer.dist.is_main:
        console.print(f"loss {hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f}; checkpoint: {out / 'last'}")
    shutdown_distributed()


def _check_init_from(path: Path, text_encoder: TextEncoderName) -> None:
    from .checkpoint import read_checkpoint_config

    if not (path / "config.json").is_file():
        raise typer.BadParameter(f"--init-from {path} is not a stage checkpoint (no config.json)")
    name = read_checkpoint_config(path)["text_encoder"].get("name")
    if name != text_encoder.value:
        raise typer.BadParameter(f"--init-from {path} was trained with the {name} text encoder, not "
                                 f"{text_encoder.value}: pass --text-encoder {name}")


def _train_text(name: TextEncoderName, t5: str, shards: Optional[Path], text_store: Optional[Path], device: str):
    """(encoder, None) for in-RAM data or the trainable tiny encoder; (None, store) for shards with a frozen one."""
    from .text import build_text_encoder

    spec = {"name": name.value}
    if name == TextEncoderName.t5:
        spec["name_or_path"] = t5
    if shards is None or name == TextEncoderName.tiny:
        return build_text_encoder(spec, device=device), None
    from .text_store import TextStore

    store = TextStore(text_store or shards / "text" / name.value)
    if store.encoder_spec.get("name") != name.value:
        raise typer.BadParameter(f"the text store {store.store} holds {store.encoder_spec.get('name')} embeddings, "
                                 f"not {name.value}")
    return None, store


@app.command()
@friendly
def shards(
    triples: Path = typer.Option(..., help="KNN-ImageText triples table (`reimagen-eval triples`)."),
    out: Path = typer.Option(..., help="Shard folder: shard-000000.tar ..., their sidecars, manifest.json. Rerun "
                             "to resume; under torchrun (RANK / WORLD_SIZE) each process writes its shards."),
    samples_per_shard: int = typer.Option(1000, min=1, help="Samples per tar shard."),
    max_side: Optional[int] = typer.Option(None, min=8, help="Re-encode images (and neighbours) as JPEG with the "
                                           "longer side at most this; default: keep the original bytes."),
    limit: Optional[int] = typer.Option(None, min=1, help="Only the table's first N rows as samples (a quick trial); "
                                        "their neighbours still come from the whole table."),
) -> None:
    """Write webdataset training shards: each sample carries its image, caption and K neighbours' images and
    captions, so that training reads sequentially. Missing or unreadable images are counted and skipped."""
    from .distributed import shard_from_env
    from .shards import ShardSettings, write_shards

    rank, world = shard_from_env()
    report = write_shards(triples, out, ShardSettings(samples_per_shard, max_side), rank, world, limit=limit)
    console.print(str(report), highlight=False)


@app.command("embed-text")
@friendly
def embed_text(
    shards: Path = typer.Option(..., help="Shard folder written by `reimagen-eval shards`."),
    text_encoder: TextEncoderName = typer.Option(TextEncoderName.minilm, help="The frozen encoder: minilm (offline) "
                                                 "or t5 (the paper's T5-XXL)."),
    t5: str = typer.Option("google/t5-v1_1-xxl", help="T5 checkpoint id or local folder (with --text-encoder t5)."),
    dtype: str = typer.Option("fp16", help="Stored precision: fp16, bf16 or fp32."),
    batch_size: int = typer.Option(64, min=1, help="Texts per encoder call."),
    device: str = typer.Option("cpu", help="torch device, e.g. cuda (under torchrun: the GPU LOCAL_RANK)."),
) -> None:
    """Encode every caption and neighbour caption of the shards once (into SHARDS/text/<encoder>), so that
    training never runs the text encoder. Resumable; under torchrun each process encodes its shards."""
    import os

    from .distributed import shard_from_env
    from .text import build_text_encoder
    from .text_store import DTYPES, embed_shards

    if dtype not in DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if text_encoder == TextEncoderName.tiny:
        raise typer.BadParameter("the tiny encoder is trained with the model; nothing to precompute")
    rank, world = shard_from_env()
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    spec = {"name": text_encoder.value, **({"name_or_path": t5} if text_encoder == TextEncoderName.t5 else {})}
    enc = build_text_encoder(spec, device=device)
    enc.batch_size = batch_size
    store = embed_shards(shards, enc, dtype=dtype, rank=rank, world_size=world)
    console.print(f"text embeddings: {store}" if store else "this process's shards are done; others pending",
                  highlight=False)


@app.command()
@friendly
def sample(
    checkpoint: list[Path] = typer.Option([], help="Stage checkpoint folders, base stage first (repeat the option)."),
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
    steps: int = typer.Option(64, min=1, help="Sampling steps of the base stage (and of every stage without "
                              "--sr-steps)."),
    sr_steps: Optional[int] = typer.Option(None, "--sr-steps", min=1, help="Sampling steps of the super-resolution "
                                           "stages (default: --steps)."),
    sampler: SamplerName = typer.Option(SamplerName.ddpm, help="ddpm (Eq. 4) or ddim."),
    num_samples: int = typer.Option(1, min=1, help="Samples per prompt (sample indices 0..N-1)."),
    batch_size: int = typer.Option(8, min=1, help="Images per sampling batch: jobs are cut into fixed blocks of this "
                                   "size (recorded in run.json; a resume must use the same)."),
    seed: int = typer.Option(0, help="Image = f(prompt id, sample index, seed)."),
    out: Path = typer.Option(Path("runs/samples"), help="Run folder: <prompt id>__<sample index>.png, run.json, "
                             "prompts.json, neighbours.json, sheets/. Rerun to resume; RANK / WORLD_SIZE shard it."),
    save_pipeline: Optional[Path] = typer.Option(None, "--save-pipeline", help="Also write the cascade, its settings "
                                                 "and the index as a pipeline folder here (for --pipeline or "
                                                 "ReImagenPipeline.from_pretrained)."),
    device: str = typer.Option("cpu", help="torch device."),
    precision: str = typer.Option("fp32", help="fp32, or bf16 / fp16 autocast on a GPU (bf16 also runs on a CPU)."),
) -> None:
    """Sample a cascade: prompts -> neighbours retrieved from an index (or hand-picked, or none) -> images, with
    the neighbours of every prompt and a contact sheet per prompt in the run folder."""
    from .generate import CascadeGenerator, shard_from_env
    from .guidance import JointGuidance, make_guidance
    from .pipeline import ReImagenPipeline, pipeline_folder, read_pipeline_json
    from .retrieval.base import load_image
    from .sample_run import prompt_table, run_sample
    from .checkpoint import checkpoint_digest, read_checkpoint_config

    # 1. Every argument and input file is checked before a model is loaded or a file written.
    ids, texts, queries = prompt_table(prompt, prompts)
    sources = [bool(neighbour_image) or bool(neighbour_text), index is not None, no_retrieval]
    if sum(sources) > 1:
        raise ValueError("choose one source of neighbours: --index (retrieval), --neighbour-image (hand-picked) or "
                         "--no-retrieval")
    if bool(checkpoint) == (pipeline is not None):
        raise ValueError("give the cascade as --checkpoint (repeat, base first) or as --pipeline FOLDER")
    from .precision import check_precision

    check_precision(precision, device)
    if len(neighbour_image) != len(neighbour_text):
        raise ValueError(f"{len(neighbour_image)} neighbour images but {len(neighbour_text)} neighbour texts")
    shard_from_env()
    picked = [(str(p), load_image(str(p)), t) for p, t in zip(neighbour_image, neighbour_text)]  # names a bad file
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
                        [checkpoint_digest(p) for p in stage_dirs])
    if save_pipeline is not None:
        pipe.save_pretrained(save_pipeline)
    console.print(f"made {counts['made']}, skipped {counts['skipped']} (existing) of {counts['total']} images in "
                  f"{out}; contact sheets in {out / 'sheets'}")


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
    from .cascade import Cascade
    from .pipeline import ReImagenPipeline, index_knowledge_base
    from .retrieval.base import load_retriever
    from .sampling import SamplerSettings

    retriever = knowledge = spec = None
    if index is not None:
        if not (Path(index) / "manifest.json").is_file():
            raise FileNotFoundError(f"--index {index} is not a saved index (no manifest.json); build one with "
                                    "`reimagen-eval index build`")
        knowledge, spec = index_knowledge_base(kb, Path(index), Path.cwd())
        if k > len(knowledge):
            raise ValueError(f"--k {k} but the index's knowledge base {spec} holds {len(knowledge)} pairs")
        retriever = load_retriever(index)
    base = SamplerSettings(steps=steps, sampler=sampler)
    sr = SamplerSettings(steps=sr_steps or steps, sampler=sampler)
    cascade = Cascade.from_checkpoints(stage_dirs, [base_g] + [sr_g] * (len(stage_dirs) - 1),
                                       [base] + [sr] * (len(stage_dirs) - 1), device=device, precision=precision)
    return ReImagenPipeline(cascade, retriever, knowledge, spec)


def _kb_image(kb, row: dict):
    """A neighbour's image for the contact sheet: from the knowledge base by id (its references may be relative)."""
    return kb.image(kb.index_of(row["id"]))


@app.command()
def presets(
    paper_only: bool = typer.Option(False, help="Only the paper's configurations."),
    memory: bool = typer.Option(False, help="Also the training memory per GPU of each preset at fp32 and bf16, "
                                "with DDP and with FSDP over --gpus (reimagen.memory: computed on fake tensors)."),
    gpus: int = typer.Option(8, min=1, help="With --memory: the ranks FSDP shards over."),
    gpu_gb: float = typer.Option(80.0, min=1.0, help="With --memory: GPU memory in GiB, for the largest micro-batch."),
    optimizer: str = typer.Option("adamw", help="With --memory: adamw or adafactor."),
) -> None:
    """List stage presets with parameter counts (built on the meta device: no memory, no weights)."""
    from .config import PRESETS
    from .memory import OPTIMISER_BYTES, parameter_count

    if optimizer not in OPTIMISER_BYTES:
        raise typer.BadParameter(f"--optimizer must be one of {', '.join(OPTIMISER_BYTES)}, got {optimizer!r}")
    table = Table(title="stage presets")
    for col in ("preset", "resolution", "params", "paper", "note"):
        table.add_column(col)
    chosen = {name: p for name, p in PRESETS.items() if p.paper_params is not None or not paper_only}
    for name, p in chosen.items():
        c = p.config
        res = f"{c.lowres_size}->{c.image_size}" if c.is_super_resolution else f"{c.image_size}"
        table.add_row(name, res, f"{parameter_count(c) / 1e6:,.1f}M",
                      f"{p.paper_params / 1e6:,.0f}M" if p.paper_params else "-", p.note)
    Console().print(table)
    if memory:
        Console().print(_memory_table(chosen, gpus, gpu_gb, optimizer))


def _memory_table(chosen, gpus: int, gpu_gb: float, optimizer: str) -> Table:
    from .memory import GiB, estimate

    table = Table(title=f"training memory per GPU ({optimizer}, K = 2; GiB; max micro-batch on {gpu_gb:g} GiB, "
                        "2 GiB reserved)")
    for col in ("preset", "precision", "states DDP", f"states FSDP x {gpus}", "activations / sample",
                "max micro-batch DDP", f"max micro-batch FSDP x {gpus}"):
        table.add_column(col, justify="right" if col != "preset" else "left")
    for name, p in chosen.items():
        for precision in ("fp32", "bf16"):
            ddp = estimate(p.config, precision, optimizer=optimizer)
            fsdp = estimate(p.config, precision, gpus, fsdp=True, optimizer=optimizer)
            table.add_row(name, precision, f"{(ddp.states_bytes + ddp.weight_copy_bytes) / GiB:.2f}",
                          f"{fsdp.states_bytes / GiB:.2f}", f"{ddp.activation_bytes / GiB:.3f}",
                          str(ddp.max_micro_batch(gpu_gb * GiB)), str(fsdp.max_micro_batch(gpu_gb * GiB)))
    return table
