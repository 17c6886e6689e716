"""EntityDrawBench data (entitydrawbench/): the entity manifest, templates, prompts and the frequency split.

No model here: these tests check the benchmark's definition (Sec. 4.2, Appendix C) and run in about a second.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata

import pytest
import typer
from typer.testing import CliRunner

from entitydrawbench.cli import register
from entitydrawbench.entities import (CATEGORIES, EXPECTED_COUNTS, FETCH_FIELDS, REQUIRED, Entity, load_entities,
                                      parse_categories, select, slug)
from entitydrawbench.frequency import count_mentions, frequency_split
from entitydrawbench.prompts import build_prompt_table, fill, load_templates

SLIDE_EXAMPLES = {  # the paper's and slides' examples (Sec. 1, slides "Examples")
    "dogs": ["Chortai", "Bergamasco Shepherd", "Tri-colour Armant", "Cretan Hound", "Barbado da Terceira",
             "Austrian Pinscher", "Braque Saint-Germain"],
    "foods": ["Chilaquiles", "Tomato bredie", "Picarones", "Escudella"],
    "landmarks": ["Palau Güell", "Visoki Dečani"],
    "characters": ["Weequay", "Ugnaught"],
    "broader": ["pair of sunglasses", "backpack", "vase", "teapot"],
}


@pytest.fixture(scope="module")
def entities():
    return load_entities()


@pytest.fixture(scope="module")
def app():
    a = typer.Typer()
    register(a)
    return a


def test_manifest_has_5x50_plus_20_unique_entries_with_all_fields(entities):
    assert len(entities) == 270
    assert {c: sum(e.category == c for e in entities) for c in CATEGORIES} == EXPECTED_COUNTS
    for key in ("id", "name"):
        values = [getattr(e, key).casefold() for e in entities]
        assert len(set(values)) == len(values), key
    assert len({(e.wiki, e.page.casefold()) for e in entities}) == 270
    raw = [json.loads(line) for line in open(load_entities.__globals__["manifest_path"](), encoding="utf-8")]
    for row, e in zip(raw, entities):
        assert all(isinstance(row[k], str) and row[k].strip() for k in REQUIRED), row
        assert all(row[k] == "" for k in FETCH_FIELDS), "licence / attribution fields stay empty until fetched"
        assert e.id == f"{e.category}-{slug(e.name)}"
        text = e.reference_text
        assert "\n" not in text and text.endswith(".") and 20 < len(text) < 200, text
        assert e.page == e.page.strip() and "_" not in e.page, "page titles use spaces, as MediaWiki displays them"


def test_manifest_holds_the_papers_examples_and_lists_run_famous_to_obscure(entities):
    names = {c: [e.name for e in entities if e.category == c] for c in CATEGORIES}
    for cat, examples in SLIDE_EXAMPLES.items():
        missing = [x for x in examples if x not in names[cat]]
        assert not missing, (cat, missing)
    assert names["dogs"][0] == "Labrador Retriever" and "Chortai" in names["dogs"][-5:]
    assert names["characters"][0] == "Darth Vader" and "Ugnaught" in names["characters"][-5:]
    assert names["foods"][0] == "Pizza"
    by_name = {e.name: e for e in entities}
    assert by_name["Tri-colour Armant"].page == "Armant (dog)"  # the lead-image caption of Wikipedia's page
    assert by_name["Weequay"].wiki == "wookieepedia"  # no Wikipedia article: the paper's Fandom source


def test_custom_manifest_with_bad_entries_is_refused(tmp_path):
    good = load_entities()[0].to_dict()
    bad = tmp_path / "m.jsonl"
    bad.write_text(json.dumps({**good, "category": "cats"}) + "\n")
    with pytest.raises(ValueError, match="unknown category 'cats'"):
        load_entities(bad)
    bad.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "dogs-other"}) + "\n")
    with pytest.raises(ValueError, match="duplicate entity name"):
        load_entities(bad)
    bad.write_text(json.dumps({**good, "reference_text": ""}) + "\n")
    with pytest.raises(ValueError, match="lacks reference_text"):
        load_entities(bad)
    with pytest.raises(ValueError, match="unknown category 'cat'"):
        parse_categories("dogs,cat")
    assert parse_categories("birds, dogs") == ("dogs", "birds")


def test_templates_five_per_category_each_with_one_placeholder():
    t = load_templates()
    assert set(t) == set(CATEGORIES)
    for cat, ts in t.items():
        assert len(ts) == 5 == len(set(ts)) and all(x.count("{}") == 1 for x in ts)
    assert "A {} is running on the moon." in t["dogs"] and "{} is served with wine." in t["foods"]
    assert "A flock of birds fly around {}." in t["landmarks"]


def test_articles_and_capitals_follow_the_name():
    assert fill("A {} is chasing a rabbit.", "Austrian Pinscher") == "An Austrian Pinscher is chasing a rabbit."
    assert fill("A {} is flying over a city.", "European robin") == "A European robin is flying over a city."
    assert fill("A {} in the middle of a jungle.", "umbrella") == "An umbrella in the middle of a jungle."
    assert fill("{} is served with wine.", "pad thai") == "Pad thai is served with wine."


def test_prompts_are_deterministic_per_seed_and_every_entity_appears_once(entities):
    a = build_prompt_table(entities, seed=0)
    assert [r["prompt"] for r in a] == [r["prompt"] for r in build_prompt_table(entities, seed=0)]
    assert [r["prompt_id"] for r in a] == [e.id for e in entities]  # every entity, once, in manifest order
    for r in a:
        assert r["name"] in r["prompt"] and r["template"].replace("{}", "") != r["prompt"]
    b = build_prompt_table(entities, seed=1)
    assert sum(x["prompt"] != y["prompt"] for x, y in zip(a, b)) > 100  # another seed draws other templates
    # a prompt depends only on (seed, entity): a subset of the manifest gives the same prompts
    sub = build_prompt_table(entities[::7], seed=0)
    assert {r["prompt_id"]: r["prompt"] for r in sub} == {r["prompt_id"]: r["prompt"] for r in a[::7]}
    assert len({r["template_index"] for r in a}) == 5


def test_frequency_split_halves_each_category_with_stable_ties(entities):
    rows = build_prompt_table(entities, seed=0)
    for cat, n in EXPECTED_COUNTS.items():
        members = [r for r in rows if r["category"] == cat]
        assert sum(r["frequent"] for r in members) == n // 2
        assert sorted(r["frequency_rank"] for r in members) == list(range(1, n + 1))
        freq = [r["frequency_score"] for r in members if r["frequent"]]
        rare = [r["frequency_score"] for r in members if not r["frequent"]]
        assert min(freq) >= max(rare)
    by_name = {r["name"]: r for r in rows}
    assert by_name["Labrador Retriever"]["frequent"] and not by_name["Chortai"]["frequent"]
    assert by_name["Pizza"]["frequent"] and not by_name["Picarones"]["frequent"]

    # ties: everything scores 0 -> split by entity id, whatever the input order
    dogs = [e for e in entities if e.category == "dogs"]
    zero = {e.id: 0.0 for e in dogs}
    split = frequency_split(dogs, zero)
    shuffled = dogs[:]
    random.Random(3).shuffle(shuffled)
    assert frequency_split(shuffled, zero) == split
    frequent = sorted(e.id for e in dogs if split[e.id].frequent)
    assert frequent == sorted(e.id for e in dogs)[:25]
    assert all(info.tied_at_boundary for info in split.values())
    # a tie across the boundary is broken by id; ties away from it are harmless
    scores = {e.id: float(i // 2) for i, e in enumerate(sorted(dogs, key=lambda e: e.id))}
    s = frequency_split(dogs, scores)
    assert sum(v.frequent for v in s.values()) == 25 and s == frequency_split(shuffled, scores)


def _fold(text: str) -> str:
    t = unicodedata.normalize("NFKD", text)
    t = "".join(ch for ch in t if not unicodedata.combining(ch)).lower()
    return " " + " ".join(re.sub(r"[\W_]+", " ", t).split()) + " "


def test_caption_counts_match_a_naive_whole_word_count(entities):
    ents = [e for e in entities if e.name in ("Pug", "Palau Güell", "Chortai", "Great Dane", "R2-D2", "Kea",
                                               "Bergamasco Shepherd", "Pizza")]
    rng = random.Random(0)
    pieces = ["a", "photo", "of", "pugnacious", "great", "dane", "pug", "PUG", "Palau Guell", "palau güell", "kea",
              "keas", "r2-d2", "R2 D2", "pizza", "pizzas", "Bergamasco shepherd dog", "Chortai", "hortaya borzaya",
              "Great Dane", "—", "!"]
    captions = [" ".join(rng.choice(pieces) for _ in range(rng.randint(0, 9))) for _ in range(3000)]
    captions += [None, "", "Pug pug PUG"]  # nulls and empties count as captions; repeats count once
    counts, total = count_mentions([captions[:1000], captions[1000:]], ents)
    assert total == len(captions)
    for e in ents:
        keys = [_fold(n) for n in (e.name, *e.aliases)]
        naive = sum(any(k in _fold(c or "") for k in keys) for c in captions)
        assert counts[e.id] == naive, e.name
    assert counts[next(e.id for e in ents if e.name == "Pug")] > 0


def test_prompts_export_jsonl_and_csv_with_a_caption_corpus(app, tmp_path):
    import pandas as pd

    corpus = tmp_path / "laion.parquet"
    pd.DataFrame({"TEXT": ["a Chortai in the snow", "Chortai puppies", "a pizza", None]}).to_parquet(corpus)
    res = CliRunner().invoke(app, ["entitydraw-prompts", "--out", str(tmp_path / "p"), "--categories", "dogs,foods",
                                   "--frequency-source", str(corpus)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    csv_rows = pd.read_csv(tmp_path / "p.csv")
    assert len(rows) == 100 == len(csv_rows) and list(csv_rows["prompt_id"]) == [r["prompt_id"] for r in rows]
    chortai = next(r for r in rows if r["name"] == "Chortai")
    assert chortai["frequency_source"].startswith("captions:") and chortai["frequent"]
    assert chortai["frequency_score"] == pytest.approx(2 / 4 * 1e6)


@pytest.mark.parametrize("args, message", [
    (["--categories", "cats"], "unknown category 'cats'"),
    (["--per-category", "0"], "per-category limit must be >= 1"),
    (["--frequency-source", "/nonexistent/captions.parquet"], "does not exist"),
])
def test_prompt_export_bad_input_is_one_red_line(app, tmp_path, args, message):
    res = CliRunner().invoke(app, ["entitydraw-prompts", "--out", str(tmp_path / "p"), *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output
    assert not list(tmp_path.iterdir())


def test_select_keeps_manifest_order_per_category(entities):
    sub = select(entities, ("dogs", "birds"), per_category=3)
    assert [e.name for e in sub] == ["Labrador Retriever", "German Shepherd", "Golden Retriever",
                                     "Bald eagle", "American robin", "Northern cardinal"]
    assert isinstance(sub[0], Entity)
