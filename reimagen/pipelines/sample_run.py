"""``reimagen-eval sample``'s run folder: prompts in, retrieved (or hand-picked) neighbours, images, contact sheets.

    OUT/<prompt id>__<i>.png   the samples (a ``reimagen.pipelines.generate`` run folder: resumable, sharded by blocks)
    OUT/run.json               every setting that affects the images
    OUT/prompts.json           [{"prompt_id", "prompt"}]
    OUT/neighbours.json        {prompt id: [{"id", "text", "score", "image"}]}: what each prompt retrieved
    OUT/sheets/<prompt id>.png the prompt, its K neighbours with their texts, then its samples
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..utils.atomic import replacing_path, write_json
from ..utils.launch import shard_from_env
from ..utils.runlock import run_lock
from .generate import Job, generate_run, image_name

SHEETS = "sheets"
NEIGHBOURS_FILE = "neighbours.json"


PROMPT_KEYS = ("prompt", "text", "caption")
ID_KEYS = ("id", "prompt_id")


def read_prompts(path: Path) -> list[tuple[Optional[str], str, Optional[str]]]:
    """(id or None, prompt, retrieval query or None) per line of a .txt (one prompt per line), or per row of a
    .jsonl / .csv / .tsv with a prompt (or text / caption) column, and optional id and query columns: the query is
    what retrieval searches with (e.g. the entity's name), the prompt what the cascade draws. An empty prompt, or a
    table without a prompt column, is refused by line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".csv", ".tsv"):
        records = _records(path, suffix)
        key = next((k for k in PROMPT_KEYS if records and k in records[0]), None)
        if key is None:
            raise ValueError(f"{path}: needs a {' / '.join(PROMPT_KEYS)} column; it has "
                             f"{sorted(records[0]) if records else 'no rows'}")
        id_key = next((k for k in ID_KEYS if k in records[0]), None)
        rows = [(None if id_key is None or r.get(id_key) in (None, "") else str(r[id_key]), str(r.get(key) or ""),
                 str(r["query"]) if r.get("query") else None) for r in records]
    else:
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines = lines[:-1]  # the final newline
        rows = [(None, line.strip(), None) for line in lines]
    for n, (_, text, _) in enumerate(rows, 1):
        if not text.strip():
            raise ValueError(f"{path}:{n}: empty prompt line (one prompt per line, no blank lines)" if suffix not in
                             (".jsonl", ".csv", ".tsv") else f"{path}: prompt {n} has no text")
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def _records(path: Path, suffix: str) -> list[dict]:
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                raise ValueError(f"{path}:{n}: empty line")
            try:
                item = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path}:{n}: invalid JSON ({err})") from None
            out.append({"prompt": item} if isinstance(item, str) else item)
        return out
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False, sep="\t" if suffix == ".tsv" else ",")
    return df.to_dict("records")


def prompt_table(prompts: Sequence[str], prompt_file: Optional[Path]) -> tuple[list[str], list[str], list[str]]:
    """(ids, prompts, retrieval queries): --prompt values get p0000, p0001, ... and are their own queries; a
    file's ids and queries are kept (missing ones numbered the same way, or the prompt)."""
    if bool(prompts) == (prompt_file is not None):
        raise ValueError("give the prompts with --prompt (repeat it) or --prompts FILE, one of the two")
    rows = [(None, p, None) for p in prompts] if prompts else read_prompts(prompt_file)
    ids = [pid if pid else f"p{i:04d}" for i, (pid, _, _) in enumerate(rows)]
    for pid in ids:
        image_name(pid, 0)  # file-name safe
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate prompt ids in {prompt_file}")
    return ids, [t for _, t, _ in rows], [q or t for _, t, q in rows]


def contact_sheet(prompt: str, neighbours: Sequence[tuple[Any, str]], samples: Sequence[Any], path: Path,
                  cell: int = 160) -> Path:
    """One PNG: the prompt on top, a row of the K neighbours with their texts, a row of the samples."""
    import textwrap

    from PIL import Image, ImageDraw

    cols = max(1, len(neighbours), len(samples))
    pad, line_h = 8, 12
    head = textwrap.wrap(prompt, max(20, cols * cell // 7))[:3]
    cap_lines = 3
    h = pad + line_h * len(head) + pad
    rows = ([("retrieved", neighbours)] if neighbours else []) + [("samples", [(s, "") for s in samples])]
    height = h + sum(line_h + cell + (cap_lines * line_h if label == "retrieved" else 0) + pad for label, _ in rows)
    sheet = Image.new("RGB", (pad + cols * (cell + pad), height), "white")
    draw = ImageDraw.Draw(sheet)
    for j, line in enumerate(head):
        draw.text((pad, pad + j * line_h), line, fill="black")
    y = h
    for label, items in rows:
        draw.text((pad, y), label, fill="gray")
        y += line_h
        for j, (img, text) in enumerate(items):
            x = pad + j * (cell + pad)
            sheet.paste(img.convert("RGB").resize((cell, cell)), (x, y))
            for m, line in enumerate(textwrap.wrap(text, cell // 6)[:cap_lines]):
                draw.text((x, y + cell + 2 + m * line_h), line, fill="black")
        y += cell + (cap_lines * line_h if label == "retrieved" else 0) + pad
    with replacing_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def run_sample(generator, ids: Sequence[str], texts: Sequence[str], num_samples: int, out: Path, seed: int,
               batch_size: int, neighbour_rows: Optional[dict[str, list[dict]]],
               neighbours_for: Optional[Callable], load_image: Callable[[dict], Any],
               checkpoints: Sequence[str], wait: bool = False) -> dict[str, int]:
    """Generate into ``out`` (resumable, sharded by blocks), then write the neighbours table and the contact
    sheet of every prompt whose samples are all there. ``neighbour_rows`` (prompt id -> rows) are the prompts'
    neighbours (retrieved or hand-picked), None without; ``neighbours_for(jobs)`` turns them into a batch."""
    jobs = [Job(pid, text, s) for pid, text in zip(ids, texts) for s in range(num_samples)]
    settings = {"prompts": _digest(list(zip(ids, texts))), "samples_per_prompt": num_samples,
                "checkpoints": list(checkpoints),
                "neighbours": None if neighbour_rows is None else
                _digest({p: [(n["id"], n["text"]) for n in r] for p, r in neighbour_rows.items()})}
    with run_lock(out, shard_from_env()[0], wait=wait):  # the images, the tables and the sheets: one writer
        counts = generate_run(generator, jobs, out, seed=seed, neighbours_for=neighbours_for,
                              batch_size=batch_size, settings=settings)
        write_json(out / "prompts.json", [{"prompt_id": p, "prompt": t} for p, t in zip(ids, texts)], indent=2)
        if neighbour_rows is not None:
            write_json(out / NEIGHBOURS_FILE, neighbour_rows, indent=2, sort_keys=True)
        _write_sheets(ids, texts, num_samples, out, neighbour_rows, load_image)
    return counts


def _write_sheets(ids, texts, num_samples, out: Path, neighbour_rows, load_image) -> None:
    from PIL import Image

    for pid, text in zip(ids, texts):
        sheet = out / SHEETS / f"{pid}.png"
        files = [out / image_name(pid, s) for s in range(num_samples)]
        if sheet.exists() or not all(f.is_file() for f in files):  # another shard's images still missing
            continue
        sheet.parent.mkdir(parents=True, exist_ok=True)
        nbrs = [(load_image(n), n["text"]) for n in (neighbour_rows or {}).get(pid, [])]
        samples = []
        for f in files:
            with Image.open(f) as im:
                samples.append(im.convert("RGB"))
        contact_sheet(text, nbrs, samples, sheet)


__all__ = ["read_prompts", "prompt_table", "PROMPT_KEYS", "ID_KEYS", "contact_sheet", "run_sample", "SHEETS", "NEIGHBOURS_FILE"]
