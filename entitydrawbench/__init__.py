"""EntityDrawBench (paper Sec. 4.2, Appendix C, Table 2, Figures 5, 7, 8): an open version of the benchmark.

Google released neither the entities, the prompts nor the images; this package rebuilds the benchmark the way
the paper describes it and runs any model on it:

    entities.jsonl  250 entities (50 dog breeds, foods, landmarks, birds, Star Wars characters) + 20 broader
                    objects, each with its wiki page and a one-line reference text    (``entities``)
    templates.json  5 prompt templates per category; each entity draws one with the seed (``prompts``)
    frequency       a frequency score per entity (wordfreq, or mentions in a caption corpus) and the
                    frequent / infrequent halves of each category (Figure 5)          (``frequency``)
    references      the reference (image, text) pairs: fetched through the MediaWiki API with licence,
                    attribution and checksums, or a user's folder                     (``references``)
    run             4 images per prompt with the paper's sampling settings, resumable and shardable
                    (Re-Imagen with the reference pairs as neighbours, diffusers baselines, image folders)
    scoring         CLIP-T / CLIP-I automatic proxies, best-of-4 pre-selection, Table 2 / Figure 5 summaries
    ablation        sweeps over K (Figure 7), eta (Figure 8) and the guidance (Figure 13)
    world           the same benchmark on the synthetic long-tail world (toyworld), judged for faithfulness
    cli             the ``reimagen-eval entitydraw*`` commands

Human ratings (photorealism, faithfulness) are the human evaluation's (``human_eval``); it reads a run folder's ``images.jsonl``.
"""

from .entities import CATEGORIES, Entity, load_entities
from .prompts import BENCHMARK, build_prompt_table, load_templates

__all__ = ["CATEGORIES", "Entity", "load_entities", "BENCHMARK", "build_prompt_table", "load_templates"]
