"""Download helpers for the paper's datasets (for machines with internet access).

    download(url, dest, ...)       resumable, verified download (HTTP Range; size and sha256 checked)
    download_coco(root, ...)       COCO images + caption annotations in the layout ``read_coco`` expects
    instructions("webqa"|"laion"|"coco")   how to obtain the other collections

COCO sizes and sha256 digests in :data:`COCO_FILES` are those recorded by TensorFlow Datasets
(``tensorflow_datasets/url_checksums/coco.txt``); the byte sizes agree with independent download logs of the
same URLs (e.g. ``Length: 13510573713`` for train2014.zip).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable, Mapping, Sequence


class DownloadError(OSError):
    """A download that failed, was interrupted, or does not match its expected size or checksum."""


#: Official COCO archives: file name -> url, size in bytes, sha256.
COCO_FILES: dict[str, dict] = {
    "train2014.zip": {"url": "http://images.cocodataset.org/zips/train2014.zip", "size": 13510573713,
                      "sha256": "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775"},
    "val2014.zip": {"url": "http://images.cocodataset.org/zips/val2014.zip", "size": 6645013297,
                    "sha256": "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0"},
    "train2017.zip": {"url": "http://images.cocodataset.org/zips/train2017.zip", "size": 19336861798,
                      "sha256": "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929"},
    "val2017.zip": {"url": "http://images.cocodataset.org/zips/val2017.zip", "size": 815585330,
                    "sha256": "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05"},
    "annotations_trainval2014.zip": {"url": "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
                                     "size": 252872794,
                                     "sha256": "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009"},
    "annotations_trainval2017.zip": {"url": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
                                     "size": 252907541,
                                     "sha256": "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268"},
}

COCO_SPLITS = ("train2014", "val2014", "train2017", "val2017")


# ----------------------------------------------------------------------------------------------
# Resumable, verified download
# ----------------------------------------------------------------------------------------------
def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _check(path: Path, url: str, expected_size: int | None, sha256: str | None) -> None:
    """Raise DownloadError (removing ``path``) if it does not have the expected size / digest.
    A file that is merely shorter than expected is kept so that a later call can resume it."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        if size < expected_size:
            raise DownloadError(f"{url}: incomplete download, {size} of {expected_size} bytes in {path}; "
                                "run again to resume")
        path.unlink()
        raise DownloadError(f"{url}: got {size} bytes, expected {expected_size}; removed {path}")
    if sha256 is not None:
        digest = sha256_file(path)
        if digest.lower() != sha256.lower():
            path.unlink()
            raise DownloadError(f"{url}: sha256 {digest} does not match the expected {sha256.lower()}; removed {path}")


def _content_range(value: str | None) -> tuple[int, int | None] | None:
    """(first byte, total or None) of a ``Content-Range: bytes FIRST-LAST/TOTAL`` header."""
    m = re.match(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)", value or "")
    if not m:
        return None
    return int(m.group(1)), None if m.group(3) == "*" else int(m.group(3))


def _fetch(url: str, part: Path, start: int, expected_size: int | None, chunk: int, progress: bool,
           timeout: float) -> None:
    headers = {"User-Agent": "reimagen-download/1.0"}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start > 0:
            return  # nothing left to send: the .part is complete (or too long); verification decides
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"{url}: {getattr(err, 'reason', err)}") from None
    with resp:
        status = resp.status
        total: int | None = None
        if start > 0 and status == 206:
            cr = _content_range(resp.headers.get("Content-Range"))
            if cr is None or cr[0] != start:
                resp.close()
                part.unlink(missing_ok=True)
                return _fetch(url, part, 0, expected_size, chunk, progress, timeout)
            total = cr[1]
            mode = "ab"
        else:  # 200: the whole file (no Range asked, or the server ignored it): start over
            start, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        if expected_size is not None and total is not None and total != expected_size:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url}: the server's file has {total} bytes, expected {expected_size}; "
                                f"not downloaded (removed {part})")
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with open(part, mode) as fh, Progress(*columns, disable=not progress, transient=True) as bar:
            task = bar.add_task(part.name[:-len(".part")], total=total or expected_size, completed=start)
            try:
                while True:
                    block = resp.read(chunk)
                    if not block:
                        break
                    fh.write(block)
                    bar.advance(task, len(block))
            except (OSError, http.client.HTTPException) as err:
                fh.flush()
                raise DownloadError(f"{url}: interrupted after {fh.tell()} bytes ({err!r}); "
                                    f"{part} is kept, run again to resume") from None


def download(url: str, dest: str | Path, expected_size: int | None = None, sha256: str | None = None,
             resume: bool = True, chunk: int = 1 << 20, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    Data is streamed (urllib) into ``dest.part``; with ``resume`` an existing ``.part`` of N bytes is continued
    with an HTTP ``Range: bytes=N-`` request (a server that ignores it and answers 200 is handled by starting
    over from byte 0). When the stream ends the file is checked against ``expected_size`` and ``sha256`` (each
    only if given) and renamed to ``dest`` only if it matches. A size that differs from what the server announces,
    a final file that is too long, or a wrong digest raise :class:`DownloadError` and remove the ``.part``; an
    interrupted or short download keeps the ``.part`` for the next call. An existing ``dest`` that passes the
    checks is returned without a request.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if dest.is_file():
        size_ok = expected_size is None or dest.stat().st_size == expected_size
        if size_ok and (sha256 is None or sha256_file(dest).lower() == sha256.lower()):
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if part.exists() and (not resume or (expected_size is not None and part.stat().st_size > expected_size)):
        part.unlink()
    start = part.stat().st_size if part.exists() else 0
    if expected_size is None or start < expected_size:
        _fetch(url, part, start, expected_size, int(chunk), progress, timeout)
    if not part.exists():
        part.touch()
    _check(part, url, expected_size, sha256)
    os.replace(part, dest)
    return dest


# ----------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------
def _extract(zpath: Path, root: Path, keep: Callable[[str], bool] | None = None, progress: bool = True) -> int:
    """Extract the members of ``zpath`` accepted by ``keep`` into ``root`` (refusing paths that leave root)."""
    root_abs = os.path.abspath(root)
    n = 0
    with zipfile.ZipFile(zpath) as zf:
        members = [m for m in zf.infolist() if keep is None or keep(m.filename)]
        for m in members:
            target = os.path.abspath(os.path.join(root_abs, m.filename))
            if os.path.commonpath([target, root_abs]) != root_abs:
                raise DownloadError(f"{zpath}: member {m.filename!r} would be written outside {root}")
        seq = members
        if progress:
            from rich.progress import track

            seq = track(members, description=f"extracting {zpath.name}", transient=True)
        for m in seq:
            zf.extract(m, root_abs)
            n += 1
    return n


def download_coco(root: str | Path, splits: Sequence[str] = ("val2014",), annotations: bool = True,
                  extract: bool = True, keep_zips: bool = False, progress: bool = True,
                  files: Mapping[str, Mapping] | None = None) -> Path:
    """Download COCO into ``root`` in the layout ``reimagen.retrieval.readers.read_coco`` expects::

        root/annotations/captions_<split>.json     (from annotations_trainval<year>.zip: only the captions files)
        root/<split>/<file_name>.jpg               (from <split>.zip)

    Each archive is downloaded with :func:`download` (resumable, checked against :data:`COCO_FILES`), extracted,
    and deleted unless ``keep_zips`` (or ``extract=False``). A marker ``root/.<archive>.extracted`` makes later
    calls skip archives already extracted. ``files`` replaces :data:`COCO_FILES` (mirrors, tests).
    """
    root = Path(root)
    files = COCO_FILES if files is None else files
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    for s in splits:
        if s not in COCO_SPLITS:
            raise ValueError(f"unknown COCO split {s!r}; choose from {COCO_SPLITS}")
    jobs: list[tuple[str, Callable[[str], bool] | None]] = [(f"{s}.zip", None) for s in splits]
    if annotations:
        for year in sorted({s[-4:] for s in splits}):
            wanted = {f"annotations/captions_{s}.json" for s in ("train" + year, "val" + year)}
            jobs.append((f"annotations_trainval{year}.zip", lambda name, w=wanted: name in w))
    root.mkdir(parents=True, exist_ok=True)
    for name, keep in jobs:
        if name not in files:
            raise ValueError(f"no URL for {name}; known: {sorted(files)}")
        marker = root / f".{name}.extracted"
        if extract and marker.exists():
            continue
        info = files[name]
        zpath = download(info["url"], root / name, info.get("size"), info.get("sha256"), progress=progress)
        if extract:
            n = _extract(zpath, root, keep, progress)
            marker.write_text(f"{n} members of {info['url']}\n")
            if not keep_zips:
                zpath.unlink()
    return root


# ----------------------------------------------------------------------------------------------
# Instructions for the collections that cannot be fetched with one URL
# ----------------------------------------------------------------------------------------------
_INSTRUCTIONS = {
    "coco": """\
COCO (Sec. 4.1; read with `coco:ROOT?split=val2014`)
  python -c "from reimagen.retrieval.download import download_coco; download_coco('data/coco', splits=('train2014', 'val2014'))"
or by hand from https://cocodataset.org/#download:
  wget http://images.cocodataset.org/zips/val2014.zip http://images.cocodataset.org/annotations/annotations_trainval2014.zip
  unzip val2014.zip -d data/coco && unzip annotations_trainval2014.zip -d data/coco
giving data/coco/annotations/captions_val2014.json and data/coco/val2014/*.jpg.
""",
    "webqa": """\
WikiImages = the images of WebQA (Chang et al., 2022), Appendix B; read with `wikiimages:ROOT?split=train`.
The release is linked from the WebQA repository, https://github.com/WebQnA/WebQA ("Download Data"):
  - main data: WebQA_data_first_release.7z (http://tiger.lti.cs.cmu.edu/yingshac/WebQA_data_first_release/
    WebQA_data_first_release.7z) containing WebQA_train_val.json (and WebQA_test.json);
  - images: imgs.7z.001 ... imgs.7z.051 (1 GB chunks, fetched by the repository's download_imgs.sh from
    .../WebQA_data_first_release/WebQA_imgs_7z_chunks/) and imgs.lineidx; `7z x imgs.7z.001` merges the chunks
    into imgs.tsv. A Google Drive mirror is linked from the same README.
Put WebQA_train_val.json, imgs.tsv and imgs.lineidx in one folder ROOT. The reader checks that imgs.lineidx
matches imgs.tsv, applies the paper's filters (<= 15 tokens, no date, no wiki-id) and makes the seeded
train / val (22K) / prompts (20K) split.
""",
    "laion": """\
LAION-400M (the out-of-domain database, Sec. 4) as img2dataset webdataset shards; read with `webdataset:FOLDER`.
  pip install img2dataset
  # metadata: the LAION-400M parquet files (columns URL, TEXT, ...), historically at
  #   https://the-eye.eu/public/AI/cah/laion400m-met-release/laion400m-meta/
  #   (LAION withdrew its datasets for a safety review in 2023; use the re-released metadata if that is gone)
  img2dataset --url_list laion400m-meta --input_format parquet \\
      --url_col URL --caption_col TEXT --output_format webdataset \\
      --output_folder laion400m-data --image_size 256 \\
      --processes_count 16 --thread_count 128 \\
      --save_additional_columns '["NSFW","similarity","LICENSE"]'
This writes laion400m-data/00000.tar, ... with members KEY.jpg, KEY.txt, KEY.json (the reader needs only the
.tar shards). For a quick test add `--count 100000` to the command.
""",
}


def instructions(dataset: str) -> str:
    """Printable instructions to obtain ``dataset``: "webqa" (WikiImages), "laion" (LAION-400M) or "coco"."""
    key = str(dataset).strip().lower()
    key = {"wikiimages": "webqa", "laion400m": "laion", "laion-400m": "laion"}.get(key, key)
    if key not in _INSTRUCTIONS:
        raise ValueError(f"no instructions for {dataset!r}; choose from {sorted(_INSTRUCTIONS)}")
    return _INSTRUCTIONS[key]
