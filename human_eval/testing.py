"""Test helpers for human_eval: synthetic run folders, free ports, and the real components (Chromium, a Label
Studio server in its own venv) that the end-to-end tests start. On CI (CI=true) a component that cannot be
installed is a failure, elsewhere the caller may skip."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
LS_VENV = REPO / ".venv-labelstudio"
LS_VERSION = "1.23.2"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def make_run(folder: str | Path, categories=("dogs", "birds"), per_category: int = 2, samples: int = 4,
             scored: bool = True, seed: int = 0) -> Path:
    """A tiny EntityDrawBench run folder in the format of entitydrawbench/run.py (random 16x16 PNGs)."""
    folder = Path(folder)
    refs = folder / "_refs"
    refs.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, rank = [], 0
    for cat in categories:
        for e in range(per_category):
            eid = f"{cat}-{e}"
            pid = f"{eid}-p0"
            ref = refs / f"{eid}.png"
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(ref)
            rank += 1
            clip = rng.random(samples)
            for i in range(samples):
                name = f"{pid}__{i}.png"
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / name)
                row = {"image": name, "prompt_id": pid, "sample_index": i, "entity_id": eid, "name": f"Entity {eid}",
                       "category": cat, "prompt": f"A photo of Entity {eid} on the moon.", "template_index": 0,
                       "frequency_score": 1.0 / rank, "frequency_rank": rank, "frequent": e % 2 == 0,
                       "frequency_source": "test", "reference_image": str(ref), "reference_images": [str(ref)],
                       "reference_text": f"Entity {eid} is a {cat[:-1]}.", "neighbour_ids": [eid],
                       "neighbour_texts": [f"Entity {eid}"], "seed": i}
                if scored:
                    row.update(clip_t=float(clip[i]), clip_i=float(1 - clip[i]), selected=bool(i == clip.argmax()),
                               select_score=float(clip[i]))
                rows.append(row)
    (folder / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = {"benchmark": "entitydrawbench-open-v1", "samples_per_prompt": samples}
    (folder / "run.json").write_text(json.dumps(manifest))
    for extra in ("provenance.json", "skipped.json"):
        (folder / extra).write_text("{}")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server we started (its own process group, by its PID)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def ensure_chromium() -> Path:
    """/usr/bin/chromium, installed with apt-get when missing (root). Raises RuntimeError if impossible."""
    if CHROMIUM.exists():
        return CHROMIUM
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise RuntimeError("Chromium is missing and cannot be installed here (needs root and apt-get): "
                           "apt-get install -y chromium")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        res = subprocess.run(cmd, capture_output=True, text=True,
                             env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr[-500:]}")
    if not CHROMIUM.exists():
        raise RuntimeError("apt-get install chromium did not provide /usr/bin/chromium")
    return CHROMIUM


def ensure_labelstudio_venv() -> Path:
    """The Label Studio server's own venv (its pins conflict with ours); built once (~90 s)."""
    exe = LS_VENV / "bin" / "label-studio"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(LS_VENV)], check=True, capture_output=True)
    res = subprocess.run([str(LS_VENV / "bin" / "pip"), "install", "-q", f"label-studio=={LS_VERSION}"],
                         capture_output=True, text=True)
    if res.returncode != 0 or not exe.exists():
        shutil.rmtree(LS_VENV, ignore_errors=True)
        raise RuntimeError(f"pip install label-studio=={LS_VERSION} failed: {res.stderr[-800:]}")
    return exe


def start_labelstudio(data_dir: Path, document_root: Path, timeout: float = 180) -> dict:
    """A Label Studio server on a free loopback port with a fresh legacy API token. Returns url, token, proc."""
    exe = ensure_labelstudio_venv()
    port, token = free_port(), secrets.token_hex(20)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "DJANGO"))}
    env.update(LABEL_STUDIO_BASE_DATA_DIR=str(data_dir), LABEL_STUDIO_USERNAME="admin@example.com",
               LABEL_STUDIO_PASSWORD=secrets.token_hex(12), LABEL_STUDIO_USER_TOKEN=token,
               LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true", LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
               LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(document_root),
               LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true",
               SENTRY_DSN="", FRONTEND_SENTRY_DSN="", PATH=f"{LS_VENV / 'bin'}:{os.environ.get('PATH', '')}")
    log = open(data_dir / "server.log", "wb")
    proc = subprocess.Popen([str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=data_dir)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/health", timeout, proc)
    except BaseException:
        stop(proc)
        raise
    return {"url": url, "token": token, "proc": proc, "log": data_dir / "server.log"}


PLAYWRIGHT_VERSION = "1.65.2"
PLAYWRIGHT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reimagen-tests" / \
    f"playwright-{PLAYWRIGHT_VERSION}"


def ensure_playwright() -> None:
    """Import playwright; when the environment lacks it (it is in constraints.txt), install the pinned wheel into a
    cache folder with ``pip install --target`` (never into the project venv) and put that on sys.path."""
    try:
        import playwright.sync_api  # noqa: F401
        return
    except ImportError:
        pass
    if not (PLAYWRIGHT_CACHE / "playwright").is_dir():
        res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(PLAYWRIGHT_CACHE),
                              f"playwright=={PLAYWRIGHT_VERSION}"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"playwright is not installed and pip install playwright=={PLAYWRIGHT_VERSION} "
                               f"failed: {res.stderr[-500:]}")
    sys.path.insert(0, str(PLAYWRIGHT_CACHE))
    import playwright.sync_api  # noqa: F401
