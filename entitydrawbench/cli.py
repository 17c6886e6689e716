"""EntityDrawBench commands of ``reimagen-eval`` (flat commands sharing the ``entitydraw`` prefix).

    entitydraw          generate the benchmark's images with a model (Re-Imagen cascade, diffusers baseline or
                        an image folder) into a resumable run folder
    entitydraw-prompts  export the 250 + 20 prompts with their frequency split (JSONL / CSV)
    entitydraw-fetch    fetch the reference images through the MediaWiki API (or import a folder of them)
    entitydraw-score    CLIP-T / CLIP-I of a run, best-of-N pre-selection, Table 2 / Figure 5 shaped summary
    entitydraw-summary  one summary (table + PNG) over several scored runs, one row per model
    entitydraw-sweep    the K (Figure 7), eta (Figure 8) or guidance (Figure 13) ablation: run + score per value,
                        one table, one plot

With ``--world FOLDER`` (a toy world built by ``reimagen-eval toy build``) the same commands run the benchmark on
the synthetic long-tail world (``entitydrawbench.world``): its frequent / infrequent / unseen entities and scene
prompts, its reference pairs as neighbours, fast CPU sampling defaults, and the world's judge instead of CLIP
(faithfulness per image and best of N, per split: Table 2 / Figure 5)::

    reimagen-eval entitydraw --world runs/toyworld --model BASE --model SR --k 2 --eta 0.5 --out runs/edb-world
    reimagen-eval entitydraw --world runs/toyworld --model BASE --model SR --no-retrieval --out runs/edb-world-t2i
    reimagen-eval entitydraw-summary retrieval=runs/edb-world text-only=runs/edb-world-t2i --out runs/edb-world-cmp
    reimagen-eval entitydraw-sweep --world runs/toyworld --model BASE --model SR --param eta --values 0,0.5,1

The application registers them (reimagen_eval/cli.py)::

    from entitydrawbench.cli import COMMANDS as ENTITYDRAW_COMMANDS
    for _cmd in ENTITYDRAW_COMMANDS:
        app.command()(_cmd)

Bad input (unknown category, eta outside [0, 1], k < 1, a missing reference under --strict, an image folder
that lacks images, a run with other settings in the output folder) is one red line and exit code 2; nothing is
written before the inputs are checked. Heavy imports happen inside the commands.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from reimagen.utils.cliutil import friendly

err = Console(stderr=True)
out_console = Console()

# Options shared by `entitydraw` and `entitydraw-sweep` (the same definitions, so the two agree).
_MODEL = typer.Option([], "--model", help="The model, KIND:TARGET: reimagen:CHECKPOINT (repeat for the "
                      "super-resolution stages, base first; a bare checkpoint path works too), diffusers:ID_OR_PATH, "
                      "folder:PATH (<prompt_id>__<i>.png, ids from `entitydraw-prompts`; refused if any is missing) "
                      "or python:MODULE:FUNCTION (generate(prompts, seeds, **kwargs) -> PIL images).")
_MODEL_ARG = typer.Option([], "--model-arg", help="KEY=VALUE for a diffusers model (steps, guidance, size, "
                          "scheduler, dtype), a folder (size) or a python function (any keyword argument).")
_DIFFUSERS = typer.Option(None, "--diffusers", hidden=True, help="Deprecated: --model diffusers:ID.")
_IMAGES_FROM = typer.Option(None, "--images-from", hidden=True, help="Deprecated: --model folder:PATH.")
_REFERENCES = typer.Option(None, "--references", help="Reference folder (from entitydraw-fetch, or images named "
                           "<entity id>.jpg). Required for retrieval; recorded for baselines (CLIP-I).")
_K = typer.Option(2, "--k", "-k", min=1, help="Neighbours per prompt (Table 2: K = 2).")
_ETA = typer.Option(0.5, "--eta", min=0.0, max=1.0, help="Interleave ratio in [0, 1]: share of text-enhanced steps "
                    "(Eq. 6); with --guidance weighted, the mixing weight lam of Appendix E.")
_GUIDANCE = typer.Option("interleaved", "--guidance", help="Base-stage guidance: interleaved (the paper), weighted, "
                         "joint.")
# Sampling options default to the paper's settings, or to fast CPU settings with --world (world.WORLD_DEFAULTS).
_W_TEXT = typer.Option(None, "--w-text", help="Text guidance weight w_p (default: the paper's 30; 3 with --world).")
_W_NBR = typer.Option(None, "--w-neighbours", help="Neighbour guidance weight w_n (default: the paper's 30; 3 with "
                      "--world).")
_STEPS = typer.Option(None, "--steps", help="Sampling steps of the base stage (default: the paper's 256; 16 with "
                      "--world).")
_SR_GUIDANCE = typer.Option(None, "--sr-guidance", help="Joint guidance weight per super-resolution stage "
                            "(default: the paper's 5.0,3.0 for 256 and 1024 px; 3.0 with --world).")
_SR_STEPS = typer.Option(None, "--sr-steps", help="Sampling steps per super-resolution stage (default: the paper's "
                         "128,32; 8 with --world).")
_SR_AUG = typer.Option(0.0, "--sr-aug-level", help="Noise-augmentation level of the low-res input at sampling.")
_SAMPLER = typer.Option(None, "--sampler", help="ddpm (the paper's, the default), ddim, or a fast deterministic "
                        "solver: dpmpp-2m (the default with --world), dpmpp-2m-sde, unipc. DPM-Solver++ at 16 / 8 "
                        "steps kept the paper setting's numbers on the toy world with 16x fewer network evaluations "
                        "(docs/sampling.md).")
_WORLD = typer.Option(None, "--world", help="A built toy world folder (reimagen-eval toy build): its frequent / "
                      "infrequent / unseen entities, scene prompts and 3 reference pairs per entity replace the "
                      "open benchmark's; images are judged (faithfulness) instead of CLIP-scored.")
_PER_SPLIT = typer.Option(None, "--per-split", metavar="N[,SPLIT=N...]", help="With --world: only the first N "
                          "entities of each frequency split (quick runs); SPLIT=N sets one split's (e.g. "
                          "4,unseen=16: more of the long tail).")
_JUDGE = typer.Option(None, "--judge", help="With --world: the judge folder (default: the shipped "
                      "toyworld/weights/judge).")
_NO_RETRIEVAL = typer.Option(False, "--no-retrieval", help="Sample the Re-Imagen cascade text-only (no neighbours).")
_KB = typer.Option(None, "--kb", help="Knowledge base (FORMAT:PATH or .parquet) to top up neighbours by BM25 when k "
                   "exceeds an entity's reference pairs.")
_KB_INDEX = typer.Option(None, "--kb-index", help="A saved BM25 index of --kb (reimagen-eval index build); else "
                         "built in memory.")
_TOPUP_QUERY = typer.Option("name", "--topup-query", help="BM25 query of the top-up: the entity name or the prompt.")
_ALLOW_FEWER = typer.Option(False, "--allow-fewer-neighbours", help="Without --kb, leave slots beyond an entity's "
                            "reference pairs empty (masked) instead of failing.")
_SAMPLES = typer.Option(4, "--samples-per-prompt", help="Images per prompt (the paper: 4, rated best of 4).")
_SEED = typer.Option(0, "--seed", help="Image = f(prompt id, sample index, seed).")
_PROMPT_SEED = typer.Option(0, "--prompt-seed", help="Seed of each entity's template draw.")
_CATEGORIES = typer.Option("all", "--categories", help="Comma-separated subset of dogs, foods, landmarks, birds, "
                           "characters, broader (default all).")
_PER_CATEGORY = typer.Option(None, "--per-category", help="Only the first N entities of each category (quick runs).")
_STRICT = typer.Option(False, "--strict", help="Fail if an entity has no reference image (default: skip and list it).")
_FREQ = typer.Option("wordfreq", "--frequency-source", help="wordfreq (offline default), wordfreq:LANG, or a caption "
                     "corpus (.parquet / folder of them / .txt / .jsonl / .csv) to count mentions in.")
_CAPTION_COLUMN = typer.Option(None, "--caption-column", help="Caption column of the corpus (default: caption, "
                               "TEXT, text, ...).")
_BATCH = typer.Option(8, "--batch-size", help="Images per generation batch.")
_DEVICE = typer.Option("cpu", "--device", help="torch device, e.g. cuda.")
_PRECISION = typer.Option("fp32", "--precision", help="Sampling precision of a Re-Imagen cascade: fp32, or bf16 / "
                          "fp16 autocast on a GPU (bf16 also runs on a CPU).")
_SIZE = typer.Option(None, "--size", hidden=True, help="Deprecated: --model-arg size=N.")
_DIFF_STEPS = typer.Option(None, "--diffusers-steps", hidden=True, help="Deprecated: --model-arg steps=N.")
_DIFF_GUIDANCE = typer.Option(None, "--diffusers-guidance", hidden=True, help="Deprecated: --model-arg guidance=W.")
_WAIT = typer.Option(False, "--wait", help="If another process writes the run folder, wait for it instead of refusing "
                     "(the refusal names its host, pid and start time).")
_CLIP_MODEL = typer.Option("ViT-B-32", "--clip-model", help="open-clip architecture (e.g. ViT-L-14), hf-hub:/"
                           "local-dir: reference, or a JSON model config.")
_CLIP_PRETRAINED = typer.Option(None, "--clip-pretrained", help="open-clip weights: a tag (e.g. laion2b_s34b_b79k, "
                                "downloaded) or a local checkpoint file. Without it the weights are RANDOM and the "
                                "scores meaningless (tests only).")
_SELECT = typer.Option("mean", "--select", help="Best-of-N selection score: clip-t, clip-i, mean (of the two) or "
                       "vqa (the --vqa plug-in's score).")


@dataclass(frozen=True)
class DrawOptions:
    """The options of `entitydraw` (and the shared part of `entitydraw-sweep`) as given on the command line; the
    sampling ones are None until ``with_defaults`` fills in the paper's (Sec. 4.2) or the toy world's."""

    model: list[str]  # KIND:TARGET (reimagen:, diffusers:, folder:, python:); Re-Imagen stages base first
    model_arg: list[str]  # KEY=VALUE for a non-Re-Imagen model
    diffusers: Optional[str]  # deprecated: diffusers:ID
    images_from: Optional[Path]  # deprecated: folder:PATH
    references: Optional[Path]  # the entities' reference pairs (retrieval; CLIP-I)
    world: Optional[Path]  # a built toy world instead of the open benchmark
    per_split: Optional[str]  # with --world: first N entities per frequency split ("4,unseen=16")
    wait: bool  # wait for another writer of the run folder instead of refusing
    judge: Optional[Path]  # with --world: the judge folder
    out: Path  # the run folder
    k: int  # neighbours per prompt (Table 2: K = 2)
    eta: float  # interleave ratio (Eq. 6); weighted guidance's mixing weight lam
    guidance: str  # base stage: interleaved | weighted | joint
    w_text: Optional[float]  # w_p
    w_neighbours: Optional[float]  # w_n
    steps: Optional[int]  # base-stage sampling steps
    sr_guidance: Optional[str]  # comma-separated, one per super-resolution stage
    sr_steps: Optional[str]  # comma-separated, one per super-resolution stage
    sr_aug_level: float  # noise level of the low-res input at sampling
    sampler: Optional[str]  # ddpm | ddim
    no_retrieval: bool  # the cascade text-only
    kb: Optional[str]  # knowledge base of the BM25 top-up
    kb_index: Optional[Path]  # its saved BM25 index
    topup_query: str  # name | prompt
    allow_fewer_neighbours: bool  # pad missing slots (masked) instead of failing
    samples_per_prompt: int  # the paper: 4
    seed: int  # image = f(prompt id, sample index, seed)
    prompt_seed: int  # each entity's template draw
    categories: str  # comma-separated, or all
    per_category: Optional[int]  # first N entities per category
    strict: bool  # fail on an entity without a reference image
    frequency_source: str  # wordfreq, wordfreq:LANG, or a caption corpus
    caption_column: Optional[str]  # the corpus's caption column
    batch_size: int  # images per generation block
    device: str  # torch device
    precision: str  # fp32 | bf16 | fp16
    size: Optional[int]  # deprecated: --model-arg size=N
    diffusers_steps: Optional[int]  # deprecated: --model-arg steps=N
    diffusers_guidance: Optional[float]  # deprecated: --model-arg guidance=W

    @classmethod
    def of(cls, values: dict) -> "DrawOptions":
        """The options among a command's arguments (``entitydraw-sweep`` has more)."""
        return cls(**{f.name: values[f.name] for f in fields(cls)})

    def with_defaults(self) -> "DrawOptions":
        """Unset sampling options filled: the paper's, or the toy world's fast ones with --world; the
        benchmark-only and the world-only options are not mixed."""
        from .world import WORLD_DEFAULTS

        filled = {}
        for key, paper in PAPER_DEFAULTS.items():
            if getattr(self, key) is None:
                default = WORLD_DEFAULTS[key] if self.world is not None else paper
                filled[key] = ",".join(map(str, default)) if isinstance(default, tuple) else default
        if self.world is not None:
            bad = [opt for opt, on in (("--references", self.references is not None),
                                       ("--categories", self.categories != "all"),
                                       ("--per-category", self.per_category is not None),
                                       ("--frequency-source", self.frequency_source != "wordfreq")) if on]
            if bad:
                raise ValueError(f"{', '.join(bad)} cannot be used with --world: the world's prompts, references "
                                 "and frequency splits are used (--per-split N for quick runs)")
            parse_per_split(self.per_split)  # a malformed --per-split fails before the models load
        elif self.per_split is not None or self.judge is not None:
            raise ValueError("--per-split and --judge need --world (a built toy world folder)")
        return replace(self, **filled)


def parse_per_split(spec: Optional[str]) -> "int | dict[str, int] | None":
    """``--per-split``: "N" (every split), or "N,SPLIT=N,..." / "SPLIT=N,..." (a split not named: N, or whole)."""
    from .world import SPLITS, split_limits

    if spec is None:
        return None
    default, limits = None, {}
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        name, eq, value = item.rpartition("=")
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"--per-split {spec!r}: {item!r} is not N or SPLIT=N") from None
        if eq:
            limits[name.strip()] = n
        else:
            default = n
    if not limits:
        split_limits(default)
        return default
    return {s: n for s, n in split_limits({**dict.fromkeys(SPLITS, default),
                                           **limits}).items() if n is not None}


def _floats(spec: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(s) for s in spec.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {spec!r}") from None


def _ints(spec: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in spec.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {spec!r}") from None


PAPER_DEFAULTS = {"steps": 256, "sampler": "ddpm", "w_text": 30.0, "w_neighbours": 30.0, "sr_guidance": "5.0,3.0",
                  "sr_steps": "128,32"}


def _config(opts: DrawOptions):
    from reimagen.diffusion.solvers import check_sampler

    from .entities import parse_categories
    from .run import RunConfig

    o = opts.with_defaults()
    check_sampler(o.sampler, max([o.steps, *_ints(o.sr_steps, "--sr-steps")]))
    cfg = RunConfig(
        seed=o.seed, prompt_seed=o.prompt_seed, samples_per_prompt=o.samples_per_prompt,
        categories=parse_categories(o.categories), per_category=o.per_category, k=o.k, eta=o.eta,
        guidance=o.guidance, w_text=o.w_text, w_neighbours=o.w_neighbours, steps=o.steps,
        sr_guidance=_floats(o.sr_guidance, "--sr-guidance"), sr_steps=_ints(o.sr_steps, "--sr-steps"),
        sr_aug_level=o.sr_aug_level, sampler=o.sampler, retrieval=not o.no_retrieval, kb=o.kb,
        kb_index=str(o.kb_index) if o.kb_index else None, topup_query=o.topup_query,
        allow_fewer_neighbours=o.allow_fewer_neighbours, strict=o.strict,
        frequency_source=o.frequency_source, caption_column=o.caption_column, batch_size=o.batch_size,
        device=o.device, precision=o.precision)
    cfg.check()
    if o.references is not None and not Path(o.references).is_dir():
        raise FileNotFoundError(f"reference folder {o.references} does not exist")
    return cfg


# options of a Re-Imagen cascade that no other kind of model has (refused by name, never ignored)
_CASCADE_ONLY = ("w_text", "w_neighbours", "steps", "sr_guidance", "sr_steps", "sampler")


def model_specs(opts: DrawOptions) -> list:
    """The ``--model`` specs (one per Re-Imagen stage, else one), the deprecated spellings mapped to the grammar
    with a warning; options that do not apply to the kind are refused by name."""
    from reimagen.pipelines.plugins import parse_models, refuse_cascade_options
    from reimagen.utils.cliutil import warn_renamed

    specs, args = list(opts.model), list(opts.model_arg)
    for old, value, new in (("--diffusers", opts.diffusers, f"diffusers:{opts.diffusers}"),
                            ("--images-from", opts.images_from, f"folder:{opts.images_from}")):
        if value is not None:
            warn_renamed(old, f"--model {new}")
            specs.append(new)
    for old, value, key in (("--size", opts.size, "size"), ("--diffusers-steps", opts.diffusers_steps, "steps"),
                            ("--diffusers-guidance", opts.diffusers_guidance, "guidance")):
        if value is not None:
            warn_renamed(old, f"--model-arg {key}={value}")
            args.append(f"{key}={value}")
    if not specs:
        raise ValueError("give the model: --model reimagen:CHECKPOINT (repeat per stage, base first), "
                         "diffusers:ID_OR_PATH, folder:PATH or python:MODULE:FUNCTION")
    parsed = parse_models(specs, args)
    given = [f"--{k.replace('_', '-')}" for k in _CASCADE_ONLY if getattr(opts, k) is not None]
    refuse_cascade_options(given + ["--precision"] * (opts.precision != "fp32")
                           + ["--no-retrieval"] * opts.no_retrieval, parsed[0])
    return parsed


def _generator_factory(specs: list):
    """cfg -> generator for the chosen model."""

    def make(cfg):
        if specs[0].kind == "reimagen":
            from .run import cascade_generator

            return cascade_generator([s.target for s in specs], cfg)
        from reimagen.pipelines.plugins import build_generator

        return build_generator(specs[0], device=cfg.device)

    return make


def _log(msg: str) -> None:
    err.print(escape(msg), highlight=False)


def entitydraw(
    model: list[str] = _MODEL, model_arg: list[str] = _MODEL_ARG, diffusers: Optional[str] = _DIFFUSERS,
    images_from: Optional[Path] = _IMAGES_FROM,
    references: Optional[Path] = _REFERENCES, world: Optional[Path] = _WORLD,
    per_split: Optional[str] = _PER_SPLIT, judge: Optional[Path] = _JUDGE,
    out: Path = typer.Option(Path("runs/entitydraw"), "--out", help="Run folder (rerun to resume; RANK/WORLD_SIZE "
                             "shard it)."),
    k: int = _K, eta: float = _ETA, guidance: str = _GUIDANCE, w_text: float = _W_TEXT,
    w_neighbours: float = _W_NBR, steps: int = _STEPS, sr_guidance: str = _SR_GUIDANCE, sr_steps: str = _SR_STEPS,
    sr_aug_level: float = _SR_AUG, sampler: str = _SAMPLER, no_retrieval: bool = _NO_RETRIEVAL,
    kb: Optional[str] = _KB, kb_index: Optional[Path] = _KB_INDEX, topup_query: str = _TOPUP_QUERY,
    allow_fewer_neighbours: bool = _ALLOW_FEWER, samples_per_prompt: int = _SAMPLES, seed: int = _SEED,
    prompt_seed: int = _PROMPT_SEED, categories: str = _CATEGORIES, per_category: Optional[int] = _PER_CATEGORY,
    strict: bool = _STRICT, frequency_source: str = _FREQ, caption_column: Optional[str] = _CAPTION_COLUMN,
    batch_size: int = _BATCH, device: str = _DEVICE, precision: str = _PRECISION, size: Optional[int] = _SIZE,
    diffusers_steps: Optional[int] = _DIFF_STEPS, diffusers_guidance: Optional[float] = _DIFF_GUIDANCE,
    wait: bool = _WAIT,
) -> None:
    """EntityDrawBench (Sec. 4.2): 4 images per prompt, paper settings, resumable run folder with metadata."""
    _entitydraw(DrawOptions.of(locals()))


@friendly
def _entitydraw(opts: DrawOptions) -> None:
    import time

    from reimagen.utils.runlock import wait_for_locks

    from .run import run_entitydraw

    wait_for_locks(opts.wait)
    specs = model_specs(opts)
    cfg = _config(opts)
    bench = None
    if opts.world is not None:
        from .world import WorldBench, check_world_config

        bench = WorldBench.open(opts.world)  # fails fast, before any model is loaded
        check_world_config(cfg, bench, cfg.retrieval and specs[0].kind == "reimagen")
    gen = _generator_factory(specs)(cfg)
    t0 = time.perf_counter()
    if bench is not None:
        from .world import run_world

        res = run_world(gen, opts.out, cfg, bench, parse_per_split(opts.per_split), progress=True, log=_log)
    else:
        res = run_entitydraw(gen, opts.out, cfg, references=opts.references, progress=True, log=_log)
    secs = time.perf_counter() - t0
    _print_skipped(res.skipped)
    rate = f"; {secs / res.counts['made']:.2f} s per image ({secs:.1f} s)" if res.counts["made"] else ""
    err.print(f"{escape(str(res.out))}: {res.n_prompts} prompts x {cfg.samples_per_prompt} samples; "
              f"made {res.counts['made']}, skipped {res.counts['skipped']} existing "
              f"(this shard: {res.counts['total']}){rate}",
              highlight=False)
    if bench is not None:
        _autoscore(res.out, opts.judge)


def _autoscore(run: Path, judge: Optional[Path]) -> None:
    """World mode: judge a finished run (all shards done) if a judge is available."""
    from .world import DEFAULT_JUDGE, run_complete, score_world_run

    path = judge or DEFAULT_JUDGE
    if not run_complete(run):
        err.print("run not complete (other shards?): judge it later with `reimagen-eval entitydraw-score "
                  f"{escape(str(run))}`", highlight=False)
        return
    if judge is None and not (path / "judge.safetensors").is_file():
        err.print(f"[yellow]no judge at {escape(str(path))}[/]: train it (`reimagen-eval toy judge`) and run "
                  f"`reimagen-eval entitydraw-score {escape(str(run))}`", highlight=False)
        return
    _print_world_summary(score_world_run(run, judge_path=path))
    err.print(f"judged: fields in {escape(str(run / 'images.jsonl'))}; summary in {escape(str(run / 'summary'))}"
              ".csv/.md/.png", highlight=False)


def _print_skipped(skipped: dict[str, str], limit: int = 20) -> None:
    if not skipped:
        return
    err.print(f"[yellow]skipped {len(skipped)} entities without a reference image:[/]", highlight=False)
    for eid, why in list(skipped.items())[:limit]:
        err.print(f"  {escape(eid)}: {escape(why)}", highlight=False)
    if len(skipped) > limit:
        err.print(f"  ... and {len(skipped) - limit} more (skipped.json in the run folder)", highlight=False)


@friendly
def entitydraw_prompts(
    out: Path = typer.Option(Path("entitydraw_prompts"), "--out", help="FILE.jsonl, FILE.csv, or a stem for both."),
    seed: int = typer.Option(0, "--seed", help="Seed of each entity's template draw."),
    categories: str = _CATEGORIES, per_category: Optional[int] = _PER_CATEGORY,
    frequency_source: str = _FREQ, caption_column: Optional[str] = _CAPTION_COLUMN,
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Another entity manifest (.jsonl) instead of "
                                            "the packaged one."),
    world: Optional[Path] = _WORLD, per_split: Optional[str] = _PER_SPLIT,
    samples_per_prompt: int = typer.Option(4, "--samples-per-prompt", min=1, help="Images per prompt: the file "
                                           "names and seeds listed per prompt."),
    image_seed: int = typer.Option(0, "--image-seed", help="The run's --seed: each image's seed is "
                                   "sample_seed(image seed, prompt id, sample index), what a python: model gets."),
) -> None:
    """Export the prompts a model must draw (JSONL / CSV): ids, texts, the frequency split (Figure 5), and per
    prompt the image file names (<prompt id>__<i>.png, what --model folder:PATH must hold) and image seeds.
    The open benchmark's 250 + 20 prompts, or with --world a toy world's (the same --per-split as the run)."""
    from reimagen.utils.seeding import sample_seed

    from .prompts import PROMPT_COLUMNS, export_prompts

    rows = _prompt_rows(seed, categories, per_category, frequency_source, caption_column, manifest, world, per_split)
    for r in rows:
        r["files"] = [f"{r['prompt_id']}__{i}.png" for i in range(samples_per_prompt)]
        r["seeds"] = [sample_seed(image_seed, r["prompt_id"], i) for i in range(samples_per_prompt)]
    extra = ("split", "count", "position", "background") if world is not None else ()
    paths = export_prompts(rows, out, (*PROMPT_COLUMNS, *extra, "files", "seeds"))
    n_freq = sum(bool(r["frequent"]) for r in rows)
    err.print(f"{len(rows)} prompts ({n_freq} frequent, {len(rows) - n_freq} not, by "
              f"{escape(rows[0]['frequency_source'])}) x {samples_per_prompt} images -> "
              f"{escape(', '.join(map(str, paths)))}", highlight=False)


def _prompt_rows(seed, categories, per_category, frequency_source, caption_column, manifest, world, per_split):
    if world is not None:
        from .world import WorldBench

        if manifest is not None or categories != "all" or per_category is not None:
            raise ValueError("--manifest, --categories and --per-category cannot be used with --world: the world's "
                             "prompts are used (--per-split N)")
        return WorldBench.open(world).prompt_table(parse_per_split(per_split), seed)
    if per_split is not None:
        raise ValueError("--per-split needs --world (a built toy world folder)")
    from .entities import load_entities, parse_categories, select
    from .prompts import build_prompt_table

    cats = parse_categories(categories)
    everything = load_entities(manifest)
    chosen = {e.id for e in select(everything, cats, per_category)}
    # the frequency split is computed over the whole manifest, then the selection is taken
    return [r for r in build_prompt_table(everything, seed=seed, frequency_source=frequency_source,
                                          caption_column=caption_column) if r["prompt_id"] in chosen]


@friendly
def entitydraw_fetch(
    out: Path = typer.Option(Path("entitydraw_refs"), "--out", help="Reference folder to write (resumable)."),
    from_folder: Optional[Path] = typer.Option(None, "--from-folder", help="Import your own images (named by entity "
                                               "id or name) instead of fetching."),
    categories: str = _CATEGORIES, per_category: Optional[int] = _PER_CATEGORY,
    api: list[str] = typer.Option([], "--api", help="WIKI=URL: another API endpoint for a wiki of the manifest "
                                  "(enwiki, commons, wookieepedia), e.g. a mirror."),
    max_width: int = typer.Option(1024, "--max-width", help="Download the wiki's rendering at this width (0: the "
                                  "original file, SHA-1 checked)."),
    free_only: bool = typer.Option(False, "--free-only", help="Skip non-free or unlicensed images (listed)."),
    retries: int = typer.Option(4, "--retries", help="Retries per request (429 / 5xx / network errors)."),
    user_agent: Optional[str] = typer.Option(None, "--user-agent", help="HTTP User-Agent; Wikimedia asks for a "
                                             "contact, e.g. 'mybench/1.0 (me@example.org)'."),
    strict: bool = typer.Option(False, "--strict", help="Exit with code 2 if any reference is missing."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Another entity manifest (.jsonl)."),
) -> None:
    """Fetch reference images (MediaWiki lead images) with URL, licence, checksums; list the missing ones."""
    from .entities import WIKIS, load_entities, parse_categories, select
    from .references import DEFAULT_USER_AGENT, fetch_references, import_reference_folder

    ents = select(load_entities(manifest), parse_categories(categories), per_category)
    apis = {}
    for item in api:
        wiki, sep, url = item.partition("=")
        if not sep or not url.startswith(("http://", "https://")):
            raise ValueError(f"--api expects WIKI=URL (http or https), got {item!r}")
        if wiki not in WIKIS:
            raise ValueError(f"unknown wiki {wiki!r} in --api; choose one of {', '.join(WIKIS)}")
        apis[wiki] = url
    if retries < 0 or max_width < 0:
        raise ValueError("--retries and --max-width must be >= 0")
    if from_folder is not None:
        report = import_reference_folder(ents, from_folder, out)
    else:
        report = fetch_references(ents, out, api_urls=apis, max_width=max_width, free_only=free_only,
                                  retries=retries, user_agent=user_agent or DEFAULT_USER_AGENT,
                                  progress=lambda m: err.print(escape(m), highlight=False))
    err.print(f"{escape(str(out))}: {report.summary()}", highlight=False)
    if report.missing:
        table = Table(title=f"{len(report.missing)} entities without a reference image")
        table.add_column("entity")
        table.add_column("reason", overflow="fold")
        for eid, why in report.missing.items():
            table.add_row(escape(eid), escape(why))
        err.print(table)
        if strict:
            raise ValueError(f"{len(report.missing)} references missing (--strict)")


@friendly
def entitydraw_score(
    run: Path = typer.Argument(..., help="A run folder made by entitydraw."),
    clip_model: str = _CLIP_MODEL, clip_pretrained: Optional[str] = _CLIP_PRETRAINED, select: str = _SELECT,
    batch_size: int = typer.Option(32, "--batch-size", help="Images per CLIP batch."),
    device: str = _DEVICE,
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Score the images present even if the run is "
                                       "unfinished."),
    label: Optional[str] = typer.Option(None, "--label", help="Model name in the summary (default: the folder name)."),
    judge: Optional[Path] = typer.Option(None, "--judge", help="Toy-world runs (entitydraw --world) are judged, not "
                                         "CLIP-scored: the judge folder (default: toyworld/weights/judge)."),
    dino_model: Optional[str] = typer.Option(None, "--dino-model", help="Also DINO subject similarity to the "
                                             "reference (dino_i): a ViT model id or folder, e.g. "
                                             "facebook/dino-vits16 (DreamBench's)."),
    vqa: Optional[str] = typer.Option(None, "--vqa", help="Also a VQA-style faithfulness P(yes | 'does this figure "
                                      "show <prompt>?'): hf:<model> (a transformers VQA pipeline), t2v:<model> "
                                      "(t2v_metrics' VQAScore) or module:attr (f(images, prompts) -> scores)."),
) -> None:
    """CLIP-T / CLIP-I of a run, best-of-N selection, Table 2 / Figure 5 summary: automatic proxies, not human.
    A toy-world run is judged instead: look_ok, scene_ok, faithful per image, best of N, per-split rates."""
    from .scoring import score_run
    from .world import is_world_run, score_world_run

    if is_world_run(run):
        _print_world_summary(score_world_run(run, judge_path=judge, allow_partial=allow_partial, label=label))
        err.print(f"judged: fields in {escape(str(run / 'images.jsonl'))}; summary in "
                  f"{escape(str(run / 'summary'))}.csv/.md/.png", highlight=False)
        return
    if judge is not None:
        raise ValueError(f"{run} is not a toy-world run (entitydraw --world): the judge reads only the world's "
                         "scenes; drop --judge to CLIP-score it")
    summary = score_run(run, clip_model=clip_model, pretrained=clip_pretrained, device=device, select=select,
                        batch_size=batch_size, allow_partial=allow_partial, label=label, dino_model=dino_model,
                        vqa=vqa)
    _print_summary(summary)
    err.print(f"scores in {escape(str(run / 'images.jsonl'))}; summary in {escape(str(run / 'summary'))}.csv/.md/.png",
              highlight=False)


#: A model name is folded onto more lines, never cut to "entitydra…", when the terminal is narrow (80 columns).
_NAME_COLUMN = {"overflow": "fold", "min_width": 10}


def _print_world_summary(summary: dict) -> None:
    from .world import GROUP_TITLES, GROUPS, find

    recs = summary["records"]
    groups = [g for g in GROUPS if any(r["split"] == g and r["n"] for r in recs)]
    table = Table(title="EntityDrawBench on the toy world - judged rates ± s.e. (n)")
    for col in ["model", "metric", *[GROUP_TITLES[g] for g in groups]]:
        table.add_column(col, **_NAME_COLUMN if col == "model" else {})

    def short(rec):
        if not rec or rec["mean"] is None:
            return "-"
        return f"{rec['mean']:.2f}" + (f"±{rec['sem']:.2f}" if rec["sem"] is not None else "") + f" ({rec['n']})"

    for m in summary["models"]:
        for selection, sel in (("best_of_n", "best of N"), ("per_image", "per image")):
            for metric, name in (("faithful", "faithful"), ("look_ok", "look"), ("scene_ok", "scene")):
                table.add_row(escape(m), f"{name}, {sel}", *[short(find(recs, m, metric, g, selection))
                                                              for g in groups])
    out_console.print(table)


def _print_summary(summary: dict) -> None:
    if "judge" in summary:
        return _print_world_summary(summary)
    from .entities import CATEGORIES, CATEGORY_TITLES
    from .scoring import METRIC_TITLES

    recs = [r for r in summary["records"] if r["selection"] == "best_of_n"]
    cats = [c for c in CATEGORIES if any(r["group_by"] == "category" and r["group"] == c and r["n"] for r in recs)]
    table = Table(title="EntityDrawBench - automatic proxy scores (best of N), NOT human ratings")
    for col in ["model", "metric", *[CATEGORY_TITLES[c] for c in cats], "All", "Frequent", "Infrequent"]:
        table.add_column(col, **_NAME_COLUMN if col == "model" else {})
    def cell(model, metric, group_by, group):
        r = next((x for x in recs if x["model"] == model and x["metric"] == metric and x["group_by"] == group_by
                  and x["group"] == group), None)
        if not r or r["mean"] is None:
            return "-"
        return f"{r['mean']:.3f}±{r['sem']:.3f}" if r["sem"] is not None else f"{r['mean']:.3f}"

    for m in summary["models"]:
        for metric in ("clip_i", "clip_t"):
            groups = [("category", c) for c in cats] + [("category", "all"), ("split", "frequent"),
                                                        ("split", "infrequent")]
            table.add_row(escape(m), METRIC_TITLES[metric], *[cell(m, metric, g, v) for g, v in groups])
    out_console.print(table)
    err.print(f"[yellow]{escape(summary['note'])}[/]", highlight=False)


@friendly
def entitydraw_summary(
    runs: list[str] = typer.Argument(..., help="Scored run folders, as PATH or LABEL=PATH (one row per model)."),
    out: Path = typer.Option(Path("entitydraw_summary"), "--out", help="Output stem: OUT.csv, OUT.md, OUT.png."),
    allow_different: bool = typer.Option(False, "--allow-different", help="Tabulate runs made or scored under "
                                         "different protocols (prompts, samples per prompt, seed, judge or CLIP "
                                         "weights) anyway, marked, instead of refusing."),
) -> None:
    """Compare several scored runs in one Table 2 / Figure 5 shaped table and PNG (one row per model)."""
    from .scoring import summarize_runs

    labelled: dict[str, Path] = {}
    for item in runs:
        label, sep, path = item.partition("=")
        if not sep:
            label, path = Path(item).name, item
        if label in labelled:
            raise ValueError(f"two runs are labelled {label!r}; name them LABEL=PATH")
        labelled[label] = Path(path)
    summary = summarize_runs(labelled, out, allow_different)
    _print_summary(summary)
    err.print(f"summary in {escape(str(out))}.csv/.md/.png", highlight=False)


def entitydraw_sweep(
    param: str = typer.Option(..., "--param", help="k (Figure 7), eta (Figure 8) or guidance (Figure 13)."),
    values: str = typer.Option(..., "--values", help="Comma-separated values, e.g. 1,2,3 or 0,0.25,0.5,0.75,1 or "
                               "joint,weighted,interleaved."),
    out: Path = typer.Option(Path("runs/entitydraw_sweep"), "--out", help="Folder: one run per value, "
                             "sweep_<param>.csv/.md/.png."),
    model: list[str] = _MODEL, model_arg: list[str] = _MODEL_ARG, diffusers: Optional[str] = _DIFFUSERS,
    images_from: Optional[Path] = _IMAGES_FROM,
    references: Optional[Path] = _REFERENCES, world: Optional[Path] = _WORLD,
    per_split: Optional[str] = _PER_SPLIT, judge: Optional[Path] = _JUDGE,
    k: int = _K, eta: float = _ETA, guidance: str = _GUIDANCE, w_text: float = _W_TEXT,
    w_neighbours: float = _W_NBR, steps: int = _STEPS, sr_guidance: str = _SR_GUIDANCE, sr_steps: str = _SR_STEPS,
    sr_aug_level: float = _SR_AUG, sampler: str = _SAMPLER, no_retrieval: bool = _NO_RETRIEVAL,
    kb: Optional[str] = _KB, kb_index: Optional[Path] = _KB_INDEX, topup_query: str = _TOPUP_QUERY,
    allow_fewer_neighbours: bool = _ALLOW_FEWER, samples_per_prompt: int = _SAMPLES, seed: int = _SEED,
    prompt_seed: int = _PROMPT_SEED, categories: str = _CATEGORIES, per_category: Optional[int] = _PER_CATEGORY,
    strict: bool = _STRICT, frequency_source: str = _FREQ, caption_column: Optional[str] = _CAPTION_COLUMN,
    batch_size: int = _BATCH, device: str = _DEVICE, precision: str = _PRECISION, size: Optional[int] = _SIZE,
    diffusers_steps: Optional[int] = _DIFF_STEPS, diffusers_guidance: Optional[float] = _DIFF_GUIDANCE,
    wait: bool = _WAIT,
    clip_model: str = _CLIP_MODEL, clip_pretrained: Optional[str] = _CLIP_PRETRAINED, select: str = _SELECT,
) -> None:
    """Ablation over K (Figure 7), eta (Figure 8) or the guidance (Figure 13): run + score per value (CLIP, or the
    judge with --world); one table, one plot."""
    _entitydraw_sweep(DrawOptions.of(locals()), param, values, clip_model, clip_pretrained, select)


@friendly
def _entitydraw_sweep(opts: DrawOptions, param: str, values: str, clip_model: str, clip_pretrained: Optional[str],
                      select: str) -> None:
    from reimagen.utils.runlock import wait_for_locks

    from .ablation import parse_values, sweep
    from .scoring import SELECT_MODES

    wait_for_locks(opts.wait)
    values = parse_values(param, values)
    if select not in SELECT_MODES:
        raise ValueError(f"unknown selection score {select!r}; choose {', '.join(SELECT_MODES)}")
    specs = model_specs(opts)
    cfg = _config(opts)
    if specs[0].kind != "reimagen" or not cfg.retrieval:
        raise ValueError("k, eta and the guidance only matter for a Re-Imagen model with retrieval: pass --model "
                         "reimagen:CHECKPOINT and drop --no-retrieval")
    if opts.world is not None:
        return _world_sweep(opts, param, values, cfg, specs)
    clip = {"model": clip_model, "pretrained": clip_pretrained, "select": select,
            "device": opts.device}
    table = sweep(param, values, cfg, _generator_factory(specs), opts.out, opts.references, clip, log=_log)
    t = Table(title=f"sweep over {param} - automatic proxy scores (best of N), NOT human ratings")
    for col in (param, "prompts", "CLIP-I all", "CLIP-T all", "CLIP-I frequent", "CLIP-I infrequent"):
        t.add_column(col)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for r in table:
        t.add_row(str(r[param]), str(r["prompts"]), fmt(r.get("clip_i_all")), fmt(r.get("clip_t_all")),
                  fmt(r.get("clip_i_frequent")), fmt(r.get("clip_i_infrequent")))
    out_console.print(t)
    err.print(f"table and plot: {escape(str(opts.out))}/sweep_{escape(param)}.csv/.md/.png", highlight=False)


def _world_sweep(opts: DrawOptions, param: str, values: list, cfg, specs: list) -> None:
    from .world import METRIC_TITLES, WorldBench, world_sweep

    bench = WorldBench.open(opts.world)
    table = world_sweep(param, values, cfg, _generator_factory(specs), opts.out, bench, parse_per_split(opts.per_split),
                        judge_path=opts.judge, log=_log)
    t = Table(title=f"toy-world sweep over {param} - judged (per image, all splits; faithful also best of N)")
    for col in (param, "prompts", *(METRIC_TITLES[m] for m in ("look_ok", "scene_ok", "faithful")),
                "faithful, best of N"):
        t.add_column(col)
    fmt = lambda r, key: "-" if r.get(key) is None else f"{r[key]:.3f}"  # noqa: E731
    for r in table:
        t.add_row(str(r[param]), str(r["prompts"]), fmt(r, "look_ok_all"), fmt(r, "scene_ok_all"),
                  fmt(r, "faithful_all"), fmt(r, "faithful_all_best"))
    out_console.print(t)
    err.print(f"table and plot: {escape(str(opts.out))}/sweep_{escape(param)}.csv/.md/.png", highlight=False)


COMMANDS = (entitydraw, entitydraw_prompts, entitydraw_fetch, entitydraw_score, entitydraw_summary, entitydraw_sweep)


def register(app: typer.Typer) -> None:
    """Add the EntityDrawBench commands to a Typer app."""
    for cmd in COMMANDS:
        app.command()(cmd)


__all__ = ["entitydraw", "entitydraw_prompts", "entitydraw_fetch", "entitydraw_score", "entitydraw_summary",
           "entitydraw_sweep", "COMMANDS", "register"]
