"""Prompt templates and the prompt table (paper Appendix C: "For each entity category, we write 5 prompt
templates with an entity name placeholder ... Each entity will sample a template and replace the placeholder
with the entity's name to generate a prompt").

Each entity draws its template from a hash of (seed, entity id), so a prompt depends only on the seed and the
entity: adding or removing other entities never changes it, and every process of a sharded run agrees. The
prompt id is the entity id (one prompt per entity: 250 + 20 prompts).

The prompt table (``build_prompt_table``) has one row per entity with the prompt, its template, the entity's
reference text and page, and the frequency split (score, rank within the category, frequent or not).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import unicodedata
from pathlib import Path
from typing import Sequence

from .entities import CATEGORIES, Entity, write_jsonl, write_text
from .frequency import frequency_scores, frequency_split

TEMPLATES_PER_CATEGORY = 5
BENCHMARK = "entitydrawbench-open-v1"
PROMPT_COLUMNS = ("prompt_id", "entity_id", "name", "category", "prompt", "template_index", "template",
                  "reference_text", "wiki", "page", "page_url", "frequency_score", "frequency_rank", "frequent",
                  "frequency_source")


def load_templates(path: str | Path | None = None) -> dict[str, list[str]]:
    """category -> 5 templates, each with one '{}' placeholder (the packaged templates.json by default)."""
    p = Path(__file__).with_name("templates.json") if path is None else Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"template file {p} does not exist")
    data = {k: v for k, v in json.loads(p.read_text(encoding="utf-8")).items() if not k.startswith("_")}
    for cat in data:
        if cat not in CATEGORIES:
            raise ValueError(f"{p}: unknown category {cat!r}; choose from {', '.join(CATEGORIES)}")
    for cat in CATEGORIES:
        ts = data.get(cat)
        if not ts or len(ts) != TEMPLATES_PER_CATEGORY or len(set(ts)) != len(ts):
            raise ValueError(f"{p}: category {cat} needs {TEMPLATES_PER_CATEGORY} distinct templates")
        for t in ts:
            if t.count("{}") != 1:
                raise ValueError(f"{p}: template {t!r} must contain the placeholder {{}} exactly once")
    return data


def template_index(seed: int, entity_id: str, n: int = TEMPLATES_PER_CATEGORY) -> int:
    """The template an entity draws: a function of (seed, entity id) alone."""
    digest = hashlib.sha256(f"entitydrawbench|{seed}|{entity_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % n


def _vowel_sound(name: str) -> bool:
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
    if not folded or folded[0] not in "aeiou":
        return False
    return not folded.startswith(("eu", "uni", "use", "usu", "one"))


def fill(template: str, name: str) -> str:
    """Put the name into the template: 'A {}' becomes 'An {}' before a vowel sound, and a sentence that
    starts with the name starts with a capital letter."""
    text = template
    if _vowel_sound(name):
        text = text.replace("A {}", "An {}").replace(" a {}", " an {}")
    text = text.replace("{}", name)
    return text[:1].upper() + text[1:]


def build_prompt_table(entities: Sequence[Entity], seed: int = 0, templates: dict[str, list[str]] | None = None,
                       frequency_source: str = "wordfreq", caption_column: str | None = None) -> list[dict]:
    """One row per entity (manifest order) with its prompt and frequency split (see PROMPT_COLUMNS)."""
    templates = templates or load_templates()
    scores, source = frequency_scores(entities, frequency_source, caption_column)
    split = frequency_split(entities, scores)
    rows = []
    for e in entities:
        i = template_index(seed, e.id)
        t = templates[e.category][i]
        f = split[e.id]
        rows.append({"prompt_id": e.id, "entity_id": e.id, "name": e.name, "category": e.category,
                     "prompt": fill(t, e.name), "template_index": i, "template": t,
                     "reference_text": e.reference_text, "wiki": e.wiki, "page": e.page, "page_url": e.page_url,
                     "frequency_score": f.score, "frequency_rank": f.rank, "frequent": f.frequent,
                     "frequency_source": source})
    return rows


def export_prompts(rows: Sequence[dict], out: str | Path, columns: Sequence[str] = PROMPT_COLUMNS) -> list[Path]:
    """Write the prompt table to ``out`` (.jsonl or .csv; any other name writes both OUT.jsonl and OUT.csv);
    ``columns`` are the CSV's (list values joined by spaces)."""
    out = Path(out)
    both = [out.with_suffix(".jsonl"), out.with_suffix(".csv")]
    targets = [out] if out.suffix.lower() in (".jsonl", ".csv") else both
    for t in targets:
        if t.suffix.lower() == ".jsonl":
            write_jsonl(t, rows)
        else:
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            w.writerows({k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
            write_text(t, buf.getvalue())
    return targets


__all__ = ["BENCHMARK", "PROMPT_COLUMNS", "load_templates", "template_index", "fill", "build_prompt_table",
           "export_prompts"]
