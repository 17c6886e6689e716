"""Entity frequency and the frequent / infrequent split of Figure 5 (paper Sec. 4.2).

The paper splits entities "based on their frequency (top 50% as frequent)" without saying what it counted. Two
sources here, both giving one score per entity (higher = more frequent):

    wordfreq   (default, offline) ``wordfreq.word_frequency(name, "en")``: the word frequency of the name in
               wordfreq's shipped corpus mix. Multi-word names are combined by wordfreq as 1 / sum(1 / f_i), so
               a name made of common words ("Cretan Hound") can look more frequent than it is, and many rare
               names score exactly 0.
    captions   the number of captions in a user-supplied corpus (e.g. LAION parquet shards) that mention the
               entity's name or one of its aliases, as whole words, case- and accent-insensitively. Counting is
               vectorised with pyarrow (tokens -> n-grams -> hash lookup), so millions of captions take seconds.

The split is made **within each category** (each of Table 2's sets is halved): entities are ranked by score,
highest first, ties broken by entity id (alphabetically), and the first floor(n / 2) are "frequent". The order
of the input never matters, so the split is stable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .entities import Entity

CAPTION_COLUMNS = ("caption", "TEXT", "text", "Caption", "captions", "prompt")


@dataclass(frozen=True)
class FrequencyInfo:
    score: float
    rank: int  # 1 = most frequent within its category
    frequent: bool
    tied_at_boundary: bool  # the score equals that of an entity on the other side of the split


# ----------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------
def wordfreq_scores(entities: Sequence[Entity], lang: str = "en") -> dict[str, float]:
    """Frequency of each entity's name in ``wordfreq``'s data (offline)."""
    try:
        import wordfreq
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(f"the default frequency source needs wordfreq ({err}); pip install 'reimagen[eval]', "
                          "or pass a caption corpus") from None
    return {e.id: float(wordfreq.word_frequency(e.name, lang)) for e in entities}


def _normalise(arr):
    """Accent-fold, lower-case, replace every run of non-letters/digits with one space (pyarrow, vectorised)."""
    import pyarrow.compute as pc

    arr = pc.utf8_normalize(arr, form="NFKD")
    arr = pc.replace_substring_regex(arr, pattern=r"\p{Mn}+", replacement="")
    arr = pc.utf8_lower(arr)
    return pc.replace_substring_regex(arr, pattern=r"[^\p{L}\p{N}]+", replacement=" ")


def entity_keys(entities: Sequence[Entity]) -> dict[str, list[int]]:
    """Normalised name/alias token strings -> indices of the entities they name."""
    import pyarrow as pa

    names, owners = [], []
    for i, e in enumerate(entities):
        for n in (e.name, *e.aliases):
            names.append(n)
            owners.append(i)
    norm = _normalise(pa.array(names, pa.string())).to_pylist()
    keys: dict[str, list[int]] = {}
    for key, i in zip(norm, owners):
        key = " ".join(key.split())
        if key and i not in keys.setdefault(key, []):
            keys[key].append(i)
    return keys


def count_mentions(captions: Iterable, entities: Sequence[Entity]) -> tuple[dict[str, int], int]:
    """(captions mentioning each entity, total captions) over an iterable of caption batches (lists of strings
    or pyarrow string arrays). A caption counts once per entity however often it repeats the name."""
    import pyarrow as pa
    import pyarrow.compute as pc

    keys = entity_keys(entities)
    n_ent = len(entities)
    by_len: dict[int, tuple] = {}  # n tokens -> (key strings, CSR pointers and owner indices)
    for n in sorted({len(k.split()) for k in keys}):
        ks = [k for k in keys if len(k.split()) == n]
        ptr = np.cumsum([0] + [len(keys[k]) for k in ks])
        own = np.asarray([o for k in ks for o in keys[k]], dtype=np.int64)
        by_len[n] = (pa.array(ks, pa.string()), ptr, own)
    counts = np.zeros(n_ent, dtype=np.int64)
    total = 0
    for batch in captions:
        arr = batch if isinstance(batch, (pa.Array, pa.ChunkedArray)) else pa.array(list(batch), pa.string())
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        arr = pc.fill_null(arr.cast(pa.string()), "")
        total += len(arr)
        tokens = pc.utf8_split_whitespace(_normalise(arr))
        flat = pc.list_flatten(tokens)
        parent = np.asarray(pc.list_parent_indices(tokens), dtype=np.int64)
        m = len(flat)
        found = []
        for n, (value_set, ptr, own) in by_len.items():
            if m < n:
                continue
            starts = np.flatnonzero(parent[: m - n + 1] == parent[n - 1:])  # n-grams inside one caption
            if not len(starts):
                continue
            grams = flat.take(pa.array(starts))
            for j in range(1, n):
                grams = pc.binary_join_element_wise(grams, flat.take(pa.array(starts + j)), " ")
            hit = np.asarray(pc.index_in(grams, value_set=value_set).fill_null(-1), dtype=np.int64)
            sel = hit >= 0
            if not sel.any():
                continue
            h, cap = hit[sel], parent[starts[sel]]
            per = ptr[h + 1] - ptr[h]  # owners per matched key (almost always 1)
            first = np.repeat(ptr[h], per) + (np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per))
            found.append(np.repeat(cap, per) * n_ent + own[first])
        if found:
            uniq = np.unique(np.concatenate(found))  # one count per (caption, entity)
            counts += np.bincount(uniq % n_ent, minlength=n_ent)
    return {e.id: int(c) for e, c in zip(entities, counts)}, total


def iter_caption_batches(source: str | Path, column: str | None = None, batch_size: int = 262_144) -> Iterator:
    """Caption batches from a .parquet file, a folder of .parquet files, a .txt file (one caption per line),
    or a .jsonl / .csv / .tsv table. ``column`` defaults to the first of caption, TEXT, text, ... present."""
    import pyarrow as pa

    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"caption corpus {source} does not exist")
    if source.is_dir():
        files = sorted(source.rglob("*.parquet"))
        if not files:
            raise ValueError(f"{source} holds no .parquet files")
    else:
        files = [source]
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".txt":
            with open(f, encoding="utf-8", errors="replace") as fh:
                buf: list[str] = []
                for line in fh:
                    buf.append(line.rstrip("\n"))
                    if len(buf) >= batch_size:
                        yield pa.array(buf, pa.string())
                        buf = []
                if buf:
                    yield pa.array(buf, pa.string())
            continue
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f)
            col = _pick_column(pf.schema_arrow.names, column, f)
            for rb in pf.iter_batches(batch_size=batch_size, columns=[col]):
                yield rb.column(0)
            continue
        if suffix in (".jsonl", ".json"):
            import pyarrow.json as pj

            table = pj.read_json(f)
        elif suffix in (".csv", ".tsv"):
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(f, parse_options=pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ","))
        else:
            raise ValueError(f"caption corpus {f}: unsupported format {suffix!r} (use .parquet, a folder of them, "
                             ".txt, .jsonl, .csv or .tsv)")
        col = _pick_column(table.column_names, column, f)
        for chunk in table.column(col).chunks:
            for start in range(0, len(chunk), batch_size):
                yield chunk.slice(start, batch_size)


def _pick_column(names: Sequence[str], column: str | None, where: Path) -> str:
    if column is not None:
        if column not in names:
            raise ValueError(f"{where} has no column {column!r} (columns: {', '.join(names)})")
        return column
    for c in CAPTION_COLUMNS:
        if c in names:
            return c
    raise ValueError(f"{where}: no caption column among {', '.join(names)}; pass the column name")


def caption_scores(entities: Sequence[Entity], source: str | Path, column: str | None = None) -> dict[str, float]:
    """Captions (per million) of a corpus that mention each entity."""
    counts, total = count_mentions(iter_caption_batches(source, column), entities)
    if total == 0:
        raise ValueError(f"caption corpus {source} is empty")
    return {k: 1e6 * v / total for k, v in counts.items()}


def frequency_scores(entities: Sequence[Entity], source: str = "wordfreq", column: str | None = None
                     ) -> tuple[dict[str, float], str]:
    """(scores, description of the source): ``source`` is "wordfreq", "wordfreq:<lang>" or a caption corpus path."""
    if source == "wordfreq" or source.startswith("wordfreq:"):
        lang = source.partition(":")[2] or "en"
        return wordfreq_scores(entities, lang), f"wordfreq:{lang}"
    return caption_scores(entities, source, column), f"captions:{Path(source).resolve()}"


# ----------------------------------------------------------------------------------------------
# The split
# ----------------------------------------------------------------------------------------------
def frequency_split(entities: Sequence[Entity], scores: dict[str, float]) -> dict[str, FrequencyInfo]:
    """Halve every category: the top floor(n / 2) by score are frequent; ties broken by entity id."""
    missing = [e.id for e in entities if e.id not in scores]
    if missing:
        raise ValueError(f"no frequency score for {len(missing)} entities (e.g. {missing[0]})")
    out: dict[str, FrequencyInfo] = {}
    for cat in dict.fromkeys(e.category for e in entities):
        members = sorted((e for e in entities if e.category == cat), key=lambda e: (-scores[e.id], e.id))
        n_freq = len(members) // 2
        boundary = ({scores[members[n_freq - 1].id]} & {scores[members[n_freq].id]}
                    if 0 < n_freq < len(members) else set())
        for rank, e in enumerate(members, 1):
            out[e.id] = FrequencyInfo(float(scores[e.id]), rank, rank <= n_freq, scores[e.id] in boundary)
    return out


__all__ = ["FrequencyInfo", "wordfreq_scores", "count_mentions", "iter_caption_batches", "caption_scores",
           "frequency_scores", "frequency_split", "entity_keys"]
