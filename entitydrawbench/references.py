"""Reference (image, text) pairs of the entities: fetched from the wikis, or taken from a user's folder.

Each entity's reference pair is Re-Imagen's retrieval on EntityDrawBench (Sec. 4.2: "its corresponding
image-text pairs as the retrieval") and the reference of the CLIP-I score. The text is the manifest's
``reference_text``; the image is the lead image of the entity's page.

Fetching (``fetch_references``), for machines with internet, per wiki and 50 titles per request:

1. ``action=query&prop=pageimages&piprop=original|name&pilicense=any&redirects=1`` resolves each page (following
   normalisation and redirects) to its lead image file. ``pilicense=any`` because Wikimedia's default returns
   only freely licensed images (many characters' images are non-free); ``--free-only`` drops those again.
2. ``action=query&prop=imageinfo&iiprop=url|extmetadata|sha1|size|mime&iiurlwidth=W`` gives the file's URL
   (and a W-px rendering, used for SVGs and when ``max_width`` is set), SHA-1, licence (``LicenseShortName``,
   ``LicenseUrl``, ``NonFree``) and attribution (``Artist``, ``Credit``).
3. The image is downloaded with retries (exponential back-off, honouring ``Retry-After``; 429 and 5xx retried),
   checked (SHA-1 against the API's when the original is downloaded; decodable by PIL), and written
   atomically to ``OUT/images/<entity id><ext>``.

``OUT/references.json`` records, per entity, the image path, URLs, licence, attribution, SHA-256 and SHA-1, and
the entities that have no reference with the reason ("page not found", "page has no lead image", "download
failed: ...", "non-free licence ..."): missing references are listed, never invented. ``OUT/entities.jsonl`` is
the manifest with the licence / attribution fields filled. A rerun skips entities whose file is present and
matches its recorded SHA-256.

A user's own folder (``import_reference_folder`` or directly ``load_references(folder)``) holds images named by
entity id (``dogs-chortai.jpg``), slug of the name (``chortai.png``) or name (``Chortai.jpg``); extra pairs of
the same entity as ``<id>__1.jpg``, ``<id>__2.jpg`` (used when k > 1). A ``<file>.txt`` next to an image
overrides the manifest's reference text for that image.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .entities import WIKIS, Entity, slug, write_json, write_jsonl

REFERENCES_FILE = "references.json"
FORMAT = "entitydrawbench-references-v1"
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# Wikimedia's User-Agent policy asks for a contact: pass yours with user_agent= (CLI --user-agent).
DEFAULT_USER_AGENT = "reimagen-entitydrawbench/0.1 (research benchmark; python-urllib)"
_EXT_META = "LicenseShortName|LicenseUrl|License|UsageTerms|Artist|Credit|AttributionRequired|NonFree"

Fetch = Callable[[str], bytes]


class FetchError(OSError):
    """A request that failed; ``status`` is the HTTP status when there was one."""

    def __init__(self, msg: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(msg)
        self.status = status
        self.retry_after = retry_after


# ----------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------
def urllib_fetch(user_agent: str = DEFAULT_USER_AGENT, timeout: float = 60.0) -> Fetch:
    """A ``fetch(url) -> bytes`` over urllib, raising FetchError (with the status) on failure."""

    def fetch(url: str) -> bytes:
        req = urllib.request.Request(url, headers={"User-Agent": user_agent})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as err:
            ra = err.headers.get("Retry-After") if err.headers else None
            raise FetchError(f"HTTP {err.code} {err.reason} for {url}", err.code,
                             float(ra) if ra and ra.isdigit() else None) from None
        except (urllib.error.URLError, OSError) as err:
            raise FetchError(f"{getattr(err, 'reason', err)} for {url}") from None

    return fetch


def with_retries(fetch: Fetch, retries: int = 4, backoff: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep) -> Fetch:
    """Retry network errors, 429 and 5xx up to ``retries`` times, waiting backoff * 2**attempt seconds (or the
    server's Retry-After); other HTTP errors (404, 403) fail at once."""

    def fetch_retrying(url: str) -> bytes:
        for attempt in range(retries + 1):
            try:
                return fetch(url)
            except FetchError as err:
                transient = err.status is None or err.status == 429 or err.status >= 500
                if not transient or attempt == retries:
                    raise
                sleep(err.retry_after if err.retry_after is not None else backoff * (2 ** attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    return fetch_retrying


# ----------------------------------------------------------------------------------------------
# The MediaWiki API
# ----------------------------------------------------------------------------------------------
def _pages(data: dict) -> list[dict]:
    """The page objects of a query response, formatversion 1 (dict by page id) or 2 (list)."""
    pages = (data.get("query") or {}).get("pages") or []
    return list(pages.values()) if isinstance(pages, dict) else list(pages)


def _flag(page: dict, key: str) -> bool:
    return key in page and page[key] is not False  # formatversion 1 uses "", 2 uses true


def api_query(api: str, params: dict[str, str], fetch: Fetch, max_rounds: int = 20) -> dict:
    """Run an ``action=query`` request, following ``continue``; returns {"pages": {title: page},
    "titles": {requested title: final title}} with normalisation and redirects resolved."""
    base = {"action": "query", "format": "json", "formatversion": "2", **params}
    pages: dict[str, dict] = {}
    renames: dict[str, str] = {}
    cont: dict[str, str] = {}
    for _ in range(max_rounds):
        url = f"{api}?{urllib.parse.urlencode({**base, **cont})}"
        raw = fetch(url)
        try:
            data = json.loads(raw)
        except ValueError:
            raise FetchError(f"{api} did not answer JSON (got {raw[:80]!r})") from None
        if "error" in data:
            err = data["error"]
            raise FetchError(f"{api}: API error {err.get('code')}: {err.get('info')}")
        q = data.get("query") or {}
        for key in ("normalized", "redirects"):
            for item in q.get(key) or []:
                renames[item["from"]] = item["to"]
        for p in _pages(data):
            pages.setdefault(p.get("title", ""), {}).update(p)
        if "continue" not in data:
            break
        cont = {k: str(v) for k, v in data["continue"].items()}
    titles = {}
    for t in params.get("titles", "").split("|"):
        final, seen = t, set()
        while final in renames and final not in seen:
            seen.add(final)
            final = renames[final]
        titles[t] = final
    return {"pages": pages, "titles": titles}


def _text(meta: dict, key: str) -> str:
    v = (meta.get(key) or {}).get("value", "")
    v = re.sub(r"<[^>]+>", "", str(v))
    return " ".join(html.unescape(v).split())


def _chunks(seq: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


@dataclass
class FetchReport:
    fetched: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # already present and verified
    missing: dict[str, str] = field(default_factory=dict)  # entity id -> reason

    def summary(self) -> str:
        return (f"{len(self.fetched)} fetched, {len(self.kept)} already present, {len(self.missing)} missing")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_image(data: bytes) -> tuple[int, int]:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
            return im.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as err:
        raise FetchError(f"not a decodable image ({err})") from None


def _read_db(out: Path) -> dict:
    p = out / REFERENCES_FILE
    if p.is_file():
        db = json.loads(p.read_text(encoding="utf-8"))
        if db.get("format") != FORMAT:
            raise ValueError(f"{p} is not an EntityDrawBench references file (format {db.get('format')!r})")
        return db
    return {"format": FORMAT, "references": {}, "missing": {}}


def _save_db(out: Path, db: dict, entities: Sequence[Entity]) -> None:
    db["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(out / REFERENCES_FILE, db)
    rows = []
    for e in entities:
        d = e.to_dict()
        ref = db["references"].get(e.id)
        if ref:
            img = ref["images"][0]
            d.update(image_file=img.get("file_title", ""), image_url=img.get("url", ""),
                     licence=img.get("licence", ""), licence_url=img.get("licence_url", ""),
                     attribution=img.get("attribution", ""), sha256=img.get("sha256", ""))
            d["reference_image"] = img["path"]
        rows.append(d)
    write_jsonl(out / "entities.jsonl", rows)


def fetch_references(
    entities: Sequence[Entity],
    out: str | Path,
    fetch: Fetch | None = None,
    api_urls: dict[str, str] | None = None,
    max_width: int = 1024,
    free_only: bool = False,
    retries: int = 4,
    backoff: float = 1.0,
    user_agent: str = DEFAULT_USER_AGENT,
    progress: Callable[[str], None] | None = None,
) -> FetchReport:
    """Fetch each entity's lead image into ``out`` (see the module docstring); returns what was fetched, kept
    and missing (with reasons). ``fetch(url) -> bytes`` is injectable (tests); by default urllib with
    ``user_agent``, wrapped in retries. ``max_width`` > 0 downloads the wiki's rendering at that width (smaller
    files; the only option for SVGs), 0 the original file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    apis = {**WIKIS, **(api_urls or {})}
    get = with_retries(fetch or urllib_fetch(user_agent), retries=retries, backoff=backoff)
    say = progress or (lambda msg: None)
    db = _read_db(out)
    report = FetchReport()
    todo: list[Entity] = []
    for e in entities:
        ref = db["references"].get(e.id)
        if ref and all((out / img["path"]).is_file() and sha256_file(out / img["path"]) == img.get("sha256")
                       for img in ref["images"]):
            report.kept.append(e.id)
        else:
            todo.append(e)
    for wiki in dict.fromkeys(e.wiki for e in todo):
        api = apis.get(wiki)
        if not api:
            for e in todo:
                if e.wiki == wiki:
                    report.missing[e.id] = f"no API URL for wiki {wiki!r}"
            continue
        group = [e for e in todo if e.wiki == wiki]
        for batch in _chunks(group, 50):
            _fetch_batch(batch, api, wiki, out, get, max_width, free_only, db, report, say)
            _save_db(out, db, entities)
    for eid in report.fetched + report.kept:
        db["missing"].pop(eid, None)
    db["missing"].update(report.missing)
    _save_db(out, db, entities)
    return report


def _fetch_batch(batch: Sequence[Entity], api: str, wiki: str, out: Path, get: Fetch, max_width: int,
                 free_only: bool, db: dict, report: FetchReport, say: Callable[[str], None]) -> None:
    # 1. Page -> lead image file (entities may name their file explicitly in image_file).
    files: dict[str, str] = {}
    need_lookup = [e for e in batch if not e.image_file]
    for e in batch:
        if e.image_file:
            files[e.id] = e.image_file if e.image_file.startswith("File:") else f"File:{e.image_file}"
    if need_lookup:
        try:
            res = api_query(api, {"prop": "pageimages", "piprop": "original|name", "pilicense": "any",
                                  "pilimit": "50", "redirects": "1",
                                  "titles": "|".join(e.page for e in need_lookup)}, get)
        except FetchError as err:
            for e in need_lookup:
                report.missing[e.id] = f"page lookup failed: {err}"
            return
        for e in need_lookup:
            page = res["pages"].get(res["titles"].get(e.page, e.page))
            if page is None or _flag(page, "missing"):
                report.missing[e.id] = f"page not found: {wiki}:{e.page}"
            elif _flag(page, "invalid"):
                report.missing[e.id] = f"invalid page title: {wiki}:{e.page}"
            elif not page.get("pageimage"):
                report.missing[e.id] = f"page has no lead image: {wiki}:{page.get('title', e.page)}"
            else:
                files[e.id] = f"File:{page['pageimage']}"
    if not files:
        return
    # 2. File -> URL, checksum, licence, attribution.
    params = {"prop": "imageinfo", "iiprop": "url|extmetadata|sha1|size|mime", "iiextmetadatafilter": _EXT_META,
              "iiextmetadatalanguage": "en", "titles": "|".join(dict.fromkeys(files.values()))}
    if max_width > 0:
        params["iiurlwidth"] = str(max_width)
    try:
        info = api_query(api, params, get)
    except FetchError as err:
        for eid in files:
            report.missing[eid] = f"image info lookup failed: {err}"
        return
    from reimagen.utils import atomic  # here, not at the top: ``import reimagen`` loads torch

    by_id = {e.id: e for e in batch}
    for eid, title in files.items():
        e = by_id[eid]
        page = info["pages"].get(info["titles"].get(title, title)) or {}
        ii = (page.get("imageinfo") or [None])[0]
        if not ii or not ii.get("url"):
            report.missing[eid] = f"no image information for {title}"
            continue
        meta = ii.get("extmetadata") or {}
        licence = _text(meta, "LicenseShortName") or _text(meta, "License") or _text(meta, "UsageTerms")
        non_free = _text(meta, "NonFree").lower() in ("true", "1", "yes")
        if free_only and (non_free or not licence):
            report.missing[eid] = f"non-free or unknown licence ({licence or 'none given'}) and --free-only"
            continue
        mime = ii.get("mime", "")
        use_thumb = bool(ii.get("thumburl")) and (max_width > 0 or mime == "image/svg+xml")
        url = ii["thumburl"] if use_thumb else ii["url"]
        try:
            data = get(url)
            if not use_thumb and ii.get("sha1") and hashlib.sha1(data).hexdigest() != ii["sha1"].lower():
                raise FetchError(f"SHA-1 mismatch (API {ii['sha1']})")
            width, height = _check_image(data)
        except FetchError as err:
            report.missing[eid] = f"download failed: {err}"
            continue
        ext = os.path.splitext(urllib.parse.urlparse(url).path)[1].lower()
        if ext not in IMAGE_EXTS:
            ext = {"image/png": ".png", "image/gif": ".gif", "image/webp": ".webp"}.get(mime, ".jpg")
        rel = f"images/{eid}{ext}"
        atomic.write_bytes(out / rel, data)
        artist, credit = _text(meta, "Artist"), _text(meta, "Credit")
        attribution = artist + (f" ({credit})" if credit and credit != artist else "") if artist else credit
        db["references"][eid] = {
            "text": e.reference_text, "source": f"mediawiki:{wiki}", "page": e.page, "page_url": e.page_url,
            "images": [{"path": rel, "file_title": title, "url": url, "original_url": ii["url"],
                        "file_page": ii.get("descriptionurl", ""), "licence": licence,
                        "licence_url": _text(meta, "LicenseUrl"), "non_free": non_free,
                        "attribution": attribution,
                        "attribution_required": _text(meta, "AttributionRequired").lower() == "true",
                        "sha256": sha256_bytes(data), "sha1_original": ii.get("sha1", ""),
                        "width": width, "height": height, "mime": mime,
                        "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]}
        report.fetched.append(eid)
        say(f"fetched {eid} <- {url}")


# ----------------------------------------------------------------------------------------------
# Folders and loading
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferencePair:
    path: Path
    text: str
    kb_id: str | None = None  # its id in a knowledge base, if it is also one of its rows (the toy world's)


def _scan_folder(folder: Path, entities: Sequence[Entity]) -> dict[str, list[Path]]:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."):
            files.setdefault(p.stem, p)
            files.setdefault(p.stem.casefold(), p)
    found: dict[str, list[Path]] = {}
    for e in entities:
        stems = [e.id, slug(e.name), e.name, e.name.casefold()]
        first = next((files[s] for s in stems if s in files), None)
        if first is None:
            continue
        extra = [files[f"{e.id}__{j}"] for j in range(1, 100) if f"{e.id}__{j}" in files]
        found[e.id] = [first, *extra]
    return found


def load_references(folder: str | Path, entities: Sequence[Entity]
                    ) -> tuple[dict[str, list[ReferencePair]], dict[str, str]]:
    """(entity id -> reference pairs, entity id -> reason it has none) from a fetched references folder (with
    references.json) or a plain folder of images named by entity id / name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder {folder} does not exist")
    pairs: dict[str, list[ReferencePair]] = {}
    missing: dict[str, str] = {}
    db_path = folder / REFERENCES_FILE
    if db_path.is_file():
        db = _read_db(folder)
        for e in entities:
            ref = db["references"].get(e.id)
            if not ref:
                missing[e.id] = db["missing"].get(e.id, "not fetched")
                continue
            ok = [img for img in ref["images"] if (folder / img["path"]).is_file()]
            if not ok:
                missing[e.id] = f"reference image {ref['images'][0]['path']} is missing from {folder}"
                continue
            pairs[e.id] = [ReferencePair((folder / img["path"]).resolve(), ref.get("text") or e.reference_text)
                           for img in ok]
        return pairs, missing
    found = _scan_folder(folder, entities)
    for e in entities:
        if e.id not in found:
            missing[e.id] = f"no image named {e.id}.* or {slug(e.name)}.* in {folder}"
            continue
        out = []
        for p in found[e.id]:
            txt = p.with_suffix(".txt")
            out.append(ReferencePair(p.resolve(), txt.read_text(encoding="utf-8").strip() if txt.is_file()
                                     else e.reference_text))
        pairs[e.id] = out
    return pairs, missing


def import_reference_folder(entities: Sequence[Entity], folder: str | Path, out: str | Path) -> FetchReport:
    """Copy a user's reference images into a references folder (``out``) with checksums, as if fetched;
    licence and attribution are recorded as "user-supplied" (fill them in references.json if known)."""
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder {folder} does not exist")
    if folder.resolve() == out.resolve():
        raise ValueError("the output folder must differ from the folder of reference images")
    pairs, missing = load_references(folder, entities)
    (out / "images").mkdir(parents=True, exist_ok=True)
    db = _read_db(out)
    report = FetchReport(missing=dict(missing))
    from reimagen.utils import atomic  # here, not at the top: ``import reimagen`` loads torch

    for e in entities:
        if e.id not in pairs:
            continue
        images = []
        for j, pair in enumerate(pairs[e.id]):
            data = pair.path.read_bytes()
            try:
                width, height = _check_image(data)
            except FetchError as err:
                report.missing[e.id] = f"{pair.path}: {err}"
                break
            rel = f"images/{e.id}{'' if j == 0 else f'__{j}'}{pair.path.suffix.lower()}"
            atomic.write_bytes(out / rel, data)
            images.append({"path": rel, "file_title": "", "url": "", "original_url": "",
                           "file_page": str(pair.path), "licence": "user-supplied", "licence_url": "",
                           "non_free": False, "attribution": "user-supplied", "attribution_required": False,
                           "sha256": sha256_bytes(data), "sha1_original": "", "width": width, "height": height,
                           "mime": "", "fetched": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        else:
            db["references"][e.id] = {"text": pairs[e.id][0].text, "source": f"folder:{folder.resolve()}",
                                      "page": e.page, "page_url": e.page_url, "images": images}
            db["missing"].pop(e.id, None)
            report.fetched.append(e.id)
    db["missing"].update(report.missing)
    _save_db(out, db, entities)
    return report


def references_fingerprint(pairs: dict[str, list[ReferencePair]]) -> str:
    """A digest of the reference images and texts a run used (recorded in the run manifest)."""
    h = hashlib.sha256()
    for eid in sorted(pairs):
        for p in pairs[eid]:
            h.update(f"{eid}\0{p.text}\0{sha256_file(p.path)}\0".encode())
    return h.hexdigest()


__all__ = ["FetchError", "FetchReport", "ReferencePair", "urllib_fetch", "with_retries", "api_query",
           "fetch_references", "load_references", "import_reference_folder", "references_fingerprint",
           "REFERENCES_FILE", "DEFAULT_USER_AGENT"]
