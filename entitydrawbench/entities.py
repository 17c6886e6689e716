"""The EntityDrawBench entity manifest (paper Sec. 4.2, Appendix C).

``entities.jsonl`` (shipped in this package) holds one entity per line: 50 dog breeds, 50 foods, 50 landmarks,
50 birds, 50 Star Wars characters and 20 broader everyday objects, each listed from famous to obscure. Fields:

    id              file-name-safe id "<category>-<slug of name>"; also the prompt id of its prompt
    name            the name that goes into the prompt template ("Chortai", "Palau Güell")
    category        dogs | foods | landmarks | birds | characters | broader (Table 2's columns)
    wiki            the wiki that holds the reference image: enwiki (en.wikipedia.org), commons
                    (commons.wikimedia.org) or wookieepedia (starwars.fandom.com, the paper's "Fandom" source
                    for characters that have no Wikipedia article)
    page            the page title on that wiki whose lead image is the reference image
    reference_text  a one-line factual description: the text of the entity's reference (image, text) pair
    aliases         other spellings, counted with the name when frequencies come from a caption corpus
    image_file, image_url, licence, licence_url, attribution, sha256
                    empty here; filled in the copy written next to the images when a reference is fetched
                    (``entitydrawbench.references``)

The paper samples dogs and birds from Wikimedia Commons, landmarks from Google Landmarks v2, foods from
Wikipedia's list of cuisines and characters from Fandom; Google released neither its entities nor its prompts,
so this list is ours, built the same way.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

#: Table 2's categories, in its column order.
CATEGORIES: tuple[str, ...] = ("dogs", "foods", "landmarks", "birds", "characters", "broader")
#: Entities per category in the benchmark.
EXPECTED_COUNTS: dict[str, int] = {"dogs": 50, "foods": 50, "landmarks": 50, "birds": 50, "characters": 50,
                                   "broader": 20}
#: Column titles used in tables and plots.
CATEGORY_TITLES: dict[str, str] = {"dogs": "Dogs", "foods": "Foods", "landmarks": "Landmarks", "birds": "Birds",
                                   "characters": "Characters", "broader": "Broader"}
#: MediaWiki API endpoints of the wikis named in the manifest.
WIKIS: dict[str, str] = {
    "enwiki": "https://en.wikipedia.org/w/api.php",
    "commons": "https://commons.wikimedia.org/w/api.php",
    "wookieepedia": "https://starwars.fandom.com/api.php",
}
#: Fields every manifest line must have (all strings except aliases).
REQUIRED = ("id", "name", "category", "wiki", "page", "reference_text")
FETCH_FIELDS = ("image_file", "image_url", "licence", "licence_url", "attribution", "sha256")
_SAFE_ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")


@dataclass(frozen=True)
class Entity:
    id: str
    name: str
    category: str
    wiki: str
    page: str
    reference_text: str
    aliases: tuple[str, ...] = ()
    image_file: str = ""
    image_url: str = ""
    licence: str = ""
    licence_url: str = ""
    attribution: str = ""
    sha256: str = ""

    @property
    def page_url(self) -> str:
        """The human-readable URL of the entity's page."""
        base = WIKIS.get(self.wiki, "")
        site = base.rsplit("/w/api.php", 1)[0].rsplit("/api.php", 1)[0]
        return f"{site}/wiki/{self.page.replace(' ', '_')}" if site else self.page

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aliases"] = list(self.aliases)
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> "Entity":
        missing = [k for k in REQUIRED if not str(d.get(k) or "").strip()]
        if missing:
            raise ValueError(f"{where}entity {d.get('id', '?')!r} lacks {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["aliases"] = tuple(d.get("aliases") or ())
        for k in FETCH_FIELDS:
            kw[k] = str(kw.get(k) or "")
        return cls(**kw)


def slug(text: str) -> str:
    """ASCII, lower-case, dash-separated: 'Palau Güell' -> 'palau-guell'."""
    t = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", t).strip("-")


def manifest_path() -> Path:
    return Path(__file__).with_name("entities.jsonl")


def load_entities(path: str | Path | None = None, check_counts: bool | None = None) -> list[Entity]:
    """The entity manifest (the packaged one by default), validated: required fields present, ids unique and
    file-name safe, known categories and wikis, no duplicate names or pages. ``check_counts`` (default: only for
    the packaged manifest) also requires the benchmark's 5 x 50 + 20 entities."""
    packaged = path is None
    path = manifest_path() if packaged else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"entity manifest {path} does not exist")
    rows: list[dict] = []
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        rows = data["entities"] if isinstance(data, dict) else data
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as err:
                    raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
    ents = [Entity.from_dict(r, f"{path.name}: ") for r in rows]
    validate(ents, check_counts=packaged if check_counts is None else check_counts)
    return ents


def validate(entities: Sequence[Entity], check_counts: bool = False) -> None:
    seen: dict[str, set] = {"id": set(), "name": set(), "page": set()}
    for e in entities:
        if e.category not in CATEGORIES:
            raise ValueError(f"entity {e.id!r}: unknown category {e.category!r}; choose one of {', '.join(CATEGORIES)}")
        if e.wiki not in WIKIS:
            raise ValueError(f"entity {e.id!r}: unknown wiki {e.wiki!r}; choose one of {', '.join(WIKIS)}")
        if not _SAFE_ID.match(e.id):
            raise ValueError(f"entity id {e.id!r} is not file-name safe (lower-case letters, digits, '-')")
        for key, value in (("id", e.id), ("name", e.name.casefold()), ("page", (e.wiki, e.page.casefold()))):
            if value in seen[key]:
                raise ValueError(f"duplicate entity {key} {value!r}")
            seen[key].add(value)
    if check_counts:
        counts = {c: sum(e.category == c for e in entities) for c in CATEGORIES}
        if counts != EXPECTED_COUNTS:
            raise ValueError(f"the benchmark has {EXPECTED_COUNTS} entities per category, the manifest {counts}")


def parse_categories(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """'dogs,foods' (or a list) -> validated categories in Table 2 order; None/'' / 'all' -> all of them."""
    if spec is None:
        return CATEGORIES
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items or items == ["all"]:
        return CATEGORIES
    bad = [c for c in items if c not in CATEGORIES]
    if bad:
        raise ValueError(f"unknown category {', '.join(repr(b) for b in bad)}; choose from {', '.join(CATEGORIES)} "
                         "(comma-separated) or all")
    return tuple(c for c in CATEGORIES if c in items)


def select(entities: Sequence[Entity], categories: Sequence[str] = CATEGORIES,
           per_category: int | None = None) -> list[Entity]:
    """Entities of the given categories, manifest order; ``per_category`` keeps the first N of each (for quick
    runs and sweeps; since each list runs famous -> obscure, prefer the full set for reported numbers)."""
    if per_category is not None and per_category < 1:
        raise ValueError(f"per-category limit must be >= 1, got {per_category}")
    out, taken = [], {c: 0 for c in categories}
    for e in entities:
        if e.category in taken and (per_category is None or taken[e.category] < per_category):
            out.append(e)
            taken[e.category] += 1
    return out


# Atomic writes (temporary name, then rename) in this package's JSON format, by reimagen.utils.atomic. It is imported
# when a file is written, not at the top: ``import reimagen`` loads torch, which importing this package does not.
def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    from reimagen.utils import atomic

    return atomic.write_jsonl(path, rows, ensure_ascii=False)


def write_text(path: str | Path, text: str) -> Path:
    from reimagen.utils import atomic

    return atomic.write_text(path, text)


def write_json(path: str | Path, obj) -> Path:
    from reimagen.utils import atomic

    return atomic.write_json(path, obj, indent=2, ensure_ascii=False, default=str)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


__all__ = ["CATEGORIES", "EXPECTED_COUNTS", "CATEGORY_TITLES", "WIKIS", "Entity", "slug", "load_entities",
           "validate", "parse_categories", "select", "write_jsonl", "write_text", "write_json",
           "read_jsonl"]
