"""Label Studio as the rating front end: export a study as a project, import the annotations back.

    export   creates (or reuses, by title) a project with the labelling config below, makes the images reachable
             and imports one Label Studio task per study task. Tasks carry the study's opaque task id
             (``reimagen_task_id``); tasks already in the project are skipped, so exporting twice adds nothing.
             Images: ``upload`` embeds them as data URIs (works with any server); ``local-files`` copies them
             under opaque names into DOCUMENT_ROOT/<study-id>/ and registers that folder as local-files storage
             (the server must run with LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true and that document root).
    import   reads every (non-cancelled) annotation and upserts it into the study's ratings table as rater
             ``labelstudio:<user>`` (one row per user and task; re-annotation updates the row).

Connection: ``url`` / ``api_key`` arguments or LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY. The key is never printed
or logged; server errors are reported with their status code only (the key is masked if echoed).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .store import RatingStore
from .tasks import Study, atomic_write_text, check_task_id

STATE_FILE = "labelstudio.json"
LETTERS = "ABCDEFGH"
YES, NO = "Yes", "No"


def label_config(n_candidates: int, rate_all: bool = False) -> str:
    """Prompt, reference image and text, the generated image (or the candidates + a 'best' choice), two yes/no;
    ``rate_all`` (``--mode rate-all``): the two yes/no for every candidate (``faithfulness_A`` ...), then the best."""
    if rate_all and n_candidates > 1:
        return _rate_all_config(n_candidates)
    if n_candidates == 1:
        images = '  <Image name="image" value="$image_A" maxWidth="384px"/>\n'
        best, target = "", "image"
    else:
        images = '  <View style="display: flex; gap: 8px">\n' + "".join(
            f'    <View><Header value="{L}" size="5"/><Image name="image_{L}" value="$image_{L}" maxWidth="256px"/>'
            "</View>\n" for L in LETTERS[:n_candidates]) + "  </View>\n"
        target = "image_A"
        best = (f'  <Header value="Which image is best?" size="5"/>\n  <Choices name="best" toName="{target}" '
                'choice="single-radio" required="true" showInline="true">\n'
                + "".join(f'    <Choice value="{L}"/>\n' for L in LETTERS[:n_candidates]) + "  </Choices>\n")
    yesno = lambda name, title, hint: (  # noqa: E731
        f'  <Header value="{title}" size="5"/>\n  <Text name="{name}_hint" value="{hint}"/>\n'
        f'  <Choices name="{name}" toName="{target}" choice="single-radio" required="true" showInline="true">\n'
        f'    <Choice value="{YES}"/>\n    <Choice value="{NO}"/>\n  </Choices>\n')
    return ("<View>\n  <Header value=\"$prompt\"/>\n"
            '  <View style="display: flex; gap: 16px">\n'
            '    <View><Header value="Reference" size="5"/><Image name="reference" value="$reference_image" '
            'maxWidth="256px"/><Text name="reference_text" value="$reference_text"/></View>\n  </View>\n'
            + images + best
            + yesno("faithfulness", "Faithfulness",
                    "Yes if faithful to both the entity's appearance (reference) and the text prompt.")
            + yesno("photorealism", "Photorealism", "Yes if moderately realistic without noticeable artifacts.")
            + "</View>\n")


def _rate_all_config(n: int) -> str:
    def choices(name: str, target: str) -> str:
        return (f'      <Choices name="{name}" toName="{target}" choice="single-radio" required="true" '
                f'showInline="true">\n        <Choice value="{YES}"/>\n        <Choice value="{NO}"/>\n'
                "      </Choices>\n")

    cells = "".join(f'    <View><Header value="{L}" size="5"/><Image name="image_{L}" value="$image_{L}" '
                    f'maxWidth="256px"/>\n      <Text name="f_{L}" value="Faithful?"/>\n'
                    + choices(f"faithfulness_{L}", f"image_{L}")
                    + f'      <Text name="p_{L}" value="Photorealistic?"/>\n'
                    + choices(f"photorealism_{L}", f"image_{L}") + "    </View>\n" for L in LETTERS[:n])
    best = (f'  <Header value="Which image is best?" size="5"/>\n  <Choices name="best" toName="image_A" '
            'choice="single-radio" required="true" showInline="true">\n'
            + "".join(f'    <Choice value="{L}"/>\n' for L in LETTERS[:n]) + "  </Choices>\n")
    return ("<View>\n  <Header value=\"$prompt\"/>\n"
            '  <View><Header value="Reference" size="5"/><Image name="reference" value="$reference_image" '
            'maxWidth="256px"/><Text name="reference_text" value="$reference_text"/></View>\n'
            '  <Text name="hint" value="Faithful: to both the entity (reference) and the prompt. Photorealistic: '
            'moderately realistic without noticeable artifacts."/>\n'
            '  <View style="display: flex; gap: 8px">\n' + cells + "  </View>\n" + best + "</View>\n")


def _client(url: str | None, api_key: str | None):
    url = url or os.environ.get("LABEL_STUDIO_URL")
    api_key = api_key or os.environ.get("LABEL_STUDIO_API_KEY")
    if not url:
        raise ValueError("no Label Studio URL: pass --url or set LABEL_STUDIO_URL")
    if not api_key:
        raise ValueError("no Label Studio API key: pass --api-key or set LABEL_STUDIO_API_KEY")
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=60), api_key


class _Scrub:
    """Turn SDK / HTTP errors into RuntimeErrors that never contain the API key."""

    def __init__(self, key: str):
        self.key = key

    def __enter__(self):
        return self

    def __exit__(self, et, err, tb):
        if err is None or isinstance(err, (ValueError, KeyError, FileNotFoundError, PermissionError)):
            return False
        status = getattr(err, "status_code", None)
        detail = f"HTTP {status}" if status else type(err).__name__
        if status in (401, 403):
            detail += " (the API key was refused)"
        elif not status:
            detail += f": {str(err)[:200]}"
        raise RuntimeError(f"Label Studio request failed: {detail}".replace(self.key, "***")) from None


def _data_uri(path: Path) -> str:
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(
        path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _study_key(study: Study) -> str:
    import hashlib

    return "s" + hashlib.sha256(study.secret.encode()).hexdigest()[:12]


def task_payloads(study: Study, images: str = "upload",
                  document_root: str | Path | None = None) -> tuple[list[dict], Path | None]:
    """One Label Studio task ``data`` dict per study task (opaque ids only; no model names)."""
    if images not in ("upload", "local-files"):
        raise ValueError(f"unknown images mode {images!r}; choose upload or local-files")
    media = None
    if images == "local-files":
        if not document_root:
            raise ValueError("--images local-files needs --document-root (the server's "
                             "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT)")
        root = Path(document_root).resolve()
        media = root / "reimagen" / _study_key(study)
        media.mkdir(parents=True, exist_ok=True)

    def url(image_id: str | None) -> str:
        if image_id is None:
            return ""
        src = study.image_path(image_id)
        if media is None:
            return _data_uri(src)
        dst = media / f"{image_id}{src.suffix.lower()}"
        if not dst.exists():
            shutil.copyfile(src, dst)
        return f"/data/local-files/?d={dst.relative_to(root).as_posix()}"

    out = []
    for tid in sorted(study.tasks):  # sorted by opaque id: a model-independent order
        v = study.rater_view(tid)
        cands = study.candidates_for("labelstudio", tid)
        data = {"reimagen_task_id": tid, "prompt": v["prompt"], "reference_text": v["reference_text"] or "",
                "reference_image": url(v["reference_image_id"]), "candidate_ids": cands}
        for L, iid in zip(LETTERS, cands):
            data[f"image_{L}"] = url(iid)
        out.append(data)
    return out, media


def _find_project(ls, title: str):
    for p in ls.projects.list(title=title):
        if p.title == title:
            return p
    return None


def _existing_task_ids(ls, project_id: int) -> dict[str, int]:
    found = {}
    for t in ls.tasks.list(project=project_id, fields="all"):
        tid = (t.data or {}).get("reimagen_task_id")
        if tid:
            found[tid] = t.id
    return found


def export_study(study: Study, url: str | None = None, api_key: str | None = None, title: str | None = None,
                 images: str = "upload", document_root: str | Path | None = None) -> dict[str, Any]:
    """Create or reuse the project and import the study's tasks that it does not hold yet."""
    n_cands = {len(t["candidates"]) for t in study.tasks.values()}
    if len(n_cands) != 1:
        raise ValueError("all tasks of a study must have the same number of candidate images")
    ls, key = _client(url, api_key)
    title = title or f"EntityDrawBench rating {_study_key(study)}"
    payloads, media = task_payloads(study, images, document_root)
    with _Scrub(key):
        project = _find_project(ls, title)
        created = project is None
        if created:
            project = ls.projects.create(title=title, label_config=label_config(n_cands.pop(),
                                                                                study.mode == "rate-all"),
                                         description="Blind EntityDrawBench rating (Re-Imagen, Table 2).")
        if media is not None:
            storages = ls.import_storage.local.list(project=project.id)
            if not any(getattr(s, "path", None) == str(media) for s in storages):
                ls.import_storage.local.create(project=project.id, path=str(media), use_blob_urls=True,
                                               title="reimagen images", regex_filter=r".*\.(png|jpe?g|webp)$")
        existing = _existing_task_ids(ls, project.id)
        new = [{"data": d} for d in payloads if d["reimagen_task_id"] not in existing]
        for i in range(0, len(new), 100):
            ls.projects.import_tasks(project.id, request=new[i:i + 100])
    state = {"url": (url or os.environ.get("LABEL_STUDIO_URL", "")).rstrip("/"), "project_id": project.id,
             "title": title}
    atomic_write_text(study.folder / STATE_FILE, json.dumps(state, indent=2))
    return {"project_id": project.id, "created": created, "imported": len(new), "skipped": len(existing)}


def _choice(result: list[dict], name: str) -> str | None:
    for r in result or []:
        if r.get("from_name") == name:
            vals = (r.get("value") or {}).get("choices") or []
            return vals[0] if vals else None
    return None


def annotations_to_rows(study: Study, tasks: list[dict]) -> tuple[list[tuple], list[str]]:
    """Label Studio export JSON -> (rater, task_id, f, p, chosen, 'labelstudio') rows, plus problems found."""
    rows, problems = [], []
    for t in tasks:
        data = t.get("data") or {}
        tid = data.get("reimagen_task_id")
        try:
            check_task_id(tid)
        except ValueError:
            problems.append(f"Label Studio task {t.get('id')}: no valid reimagen_task_id")
            continue
        if tid not in study.tasks:
            problems.append(f"Label Studio task {t.get('id')}: task {tid} is not in this study")
            continue
        cands = list(data.get("candidate_ids") or [])
        for a in t.get("annotations") or []:
            if a.get("was_cancelled"):
                continue
            res = a.get("result") or []
            f, p, best = _choice(res, "faithfulness"), _choice(res, "photorealism"), _choice(res, "best")
            per_image = None
            if study.mode == "rate-all" and len(cands) > 1:
                answers = {iid: (_choice(res, f"faithfulness_{L}"), _choice(res, f"photorealism_{L}"))
                           for L, iid in zip(LETTERS, cands)}
                if any(x not in (YES, NO) for pair in answers.values() for x in pair) or best not in LETTERS:
                    problems.append(f"task {tid}: an annotation lacks an answer")
                    continue
                per_image = {iid: (int(a == YES), int(b == YES)) for iid, (a, b) in answers.items()}
                f, p = answers[cands[LETTERS.index(best)]]
            if f not in (YES, NO) or p not in (YES, NO):
                problems.append(f"task {tid}: an annotation lacks an answer")
                continue
            chosen = None
            if best is not None:
                if best not in LETTERS[:len(cands)]:
                    problems.append(f"task {tid}: unknown best choice {best!r}")
                    continue
                chosen = cands[LETTERS.index(best)]
            elif len(cands) == 1:
                chosen = cands[0]
            user = a.get("completed_by")
            if isinstance(user, dict):
                user = user.get("email") or user.get("id")
            if user in (None, ""):
                problems.append(f"task {tid}: an annotation has no annotator")
                continue
            rows.append((f"labelstudio:{user}", tid, int(f == YES), int(p == YES), chosen, "labelstudio")
                        + ((per_image,) if per_image is not None else ()))
    return rows, problems


def import_annotations(study: Study, url: str | None = None, api_key: str | None = None,
                       project_id: int | None = None) -> dict[str, Any]:
    """Pull the project's annotations into the study's ratings table (idempotent: rows are upserted)."""
    state_path = study.folder / STATE_FILE
    if project_id is None:
        if not state_path.is_file():
            raise FileNotFoundError(f"{study.folder} was not exported to Label Studio (no {STATE_FILE}); "
                                    "pass --project-id or run `rate labelstudio-export` first")
        project_id = json.loads(state_path.read_text())["project_id"]
    ls, key = _client(url, api_key)
    with _Scrub(key):
        raw = b"".join(ls.projects.exports.download_sync(project_id, export_type="JSON", download_all_tasks=True))
    tasks = json.loads(raw.decode("utf-8"))
    rows, problems = annotations_to_rows(study, tasks)
    store = RatingStore(study)
    try:
        n = store.record_many(rows)
    finally:
        store.close()
    return {"project_id": project_id, "tasks": len(tasks), "ratings": n, "problems": problems}
