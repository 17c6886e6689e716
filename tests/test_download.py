"""Resumable, verified downloads against a local HTTP server on 127.0.0.1 (Range-aware, Range-ignoring, and
one that drops the connection), COCO download + extraction into read_coco's layout, and the instructions."""

import hashlib
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from reimagen.retrieval.download import (COCO_FILES, DownloadError, download, download_coco, instructions,
                                         sha256_file)
from reimagen.retrieval.readers import read_coco

PAYLOAD = np.random.default_rng(0).integers(0, 256, size=300_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    log: list[dict] = []
    ignore_range = False
    drop_after: int | None = None  # send Content-Length for the whole body, then close after this many bytes

    def do_GET(self):  # noqa: N802
        data = self.files.get(self.path)
        rng = self.headers.get("Range")
        entry = {"path": self.path, "range": rng, "status": None, "sent": 0}
        self.log.append(entry)
        if data is None:
            entry["status"] = 404
            self.send_error(404)
            return
        start = 0
        if rng and not self.ignore_range:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                entry["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            entry["status"] = 206
        else:
            self.send_response(200)
            entry["status"] = 200
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if self.drop_after is not None:
            body = body[:self.drop_after]
        entry["sent"] = len(body)  # recorded before writing: the client may finish before this thread resumes
        self.wfile.write(body)
        self.wfile.flush()
        if self.drop_after is not None:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(monkeypatch):
    """Start a loopback server; yields a function making handler variants: serve(files, **class attributes)."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    started = []

    def serve(files, **attrs):
        cls = type("H", (Handler,), {"files": dict(files), "log": [], **attrs})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), cls)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        started.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}", cls

    yield serve
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def test_full_download_with_checks(server, tmp_path):
    base, h = server({"/f.bin": PAYLOAD})
    dest = download(f"{base}/f.bin", tmp_path / "f.bin", len(PAYLOAD), SHA, chunk=4096, progress=False)
    assert dest.read_bytes() == PAYLOAD and not (tmp_path / "f.bin.part").exists()
    assert [(e["range"], e["status"], e["sent"]) for e in h.log] == [(None, 200, len(PAYLOAD))]
    # an existing verified file is returned without a request
    download(f"{base}/f.bin", dest, len(PAYLOAD), SHA, progress=False)
    assert len(h.log) == 1


def test_resume_requests_only_the_remaining_bytes(server, tmp_path):
    base, h = server({"/f.bin": PAYLOAD})
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD[:123_456])
    dest = download(f"{base}/f.bin", tmp_path / "f.bin", len(PAYLOAD), SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert [(e["range"], e["status"], e["sent"]) for e in h.log] == [("bytes=123456-", 206, len(PAYLOAD) - 123_456)]


def test_resume_disabled_starts_over(server, tmp_path):
    base, h = server({"/f.bin": PAYLOAD})
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)
    download(f"{base}/f.bin", tmp_path / "f.bin", sha256=SHA, resume=False, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD and h.log[0]["range"] is None


def test_server_ignoring_range_gives_the_right_file(server, tmp_path):
    base, h = server({"/f.bin": PAYLOAD}, ignore_range=True)
    (tmp_path / "f.bin.part").write_bytes(b"\0" * 5000)  # wrong bytes: appending the 200 body would corrupt it
    dest = download(f"{base}/f.bin", tmp_path / "f.bin", len(PAYLOAD), SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert [(e["range"], e["status"]) for e in h.log] == [("bytes=5000-", 200)]


def test_interrupted_download_keeps_part_and_resumes(server, tmp_path):
    base, h = server({"/f.bin": PAYLOAD}, drop_after=100_000)
    with pytest.raises(DownloadError, match="resume"):
        download(f"{base}/f.bin", tmp_path / "f.bin", len(PAYLOAD), SHA, progress=False)
    part = tmp_path / "f.bin.part"
    assert not (tmp_path / "f.bin").exists() and part.read_bytes() == PAYLOAD[:100_000]
    h.drop_after = None
    download(f"{base}/f.bin", tmp_path / "f.bin", len(PAYLOAD), SHA, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert h.log[-1]["range"] == "bytes=100000-" and h.log[-1]["sent"] == len(PAYLOAD) - 100_000


@pytest.mark.parametrize("size_delta", [+7, -7])
def test_size_mismatch_raises_and_leaves_no_file(server, tmp_path, size_delta):
    base, _ = server({"/f.bin": PAYLOAD})
    with pytest.raises(DownloadError, match=f"expected {len(PAYLOAD) + size_delta}"):
        download(f"{base}/f.bin", tmp_path / "f.bin", len(PAYLOAD) + size_delta, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_sha_mismatch_raises_and_removes_part(server, tmp_path):
    base, _ = server({"/f.bin": PAYLOAD})
    with pytest.raises(DownloadError, match="sha256"):
        download(f"{base}/f.bin", tmp_path / "f.bin", len(PAYLOAD), "0" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []
    # a corrupted partial file is detected after resuming, and removed
    (tmp_path / "f.bin.part").write_bytes(b"\1" * 1000)
    with pytest.raises(DownloadError, match="sha256"):
        download(f"{base}/f.bin", tmp_path / "f.bin", len(PAYLOAD), SHA, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_http_error_is_a_download_error(server, tmp_path):
    base, _ = server({})
    with pytest.raises(DownloadError, match="404"):
        download(f"{base}/nothing.zip", tmp_path / "x.zip", progress=False)


def test_complete_part_with_416_is_verified(server, tmp_path):
    base, h = server({"/f.bin": PAYLOAD})
    (tmp_path / "f.bin.part").write_bytes(PAYLOAD)
    download(f"{base}/f.bin", tmp_path / "f.bin", sha256=SHA, progress=False)  # size unknown: asks, gets 416
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD and [e["status"] for e in h.log] == [416]


# ----------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------
def png(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_download_coco_into_read_coco_layout(server, tmp_path):
    caps = {"images": [{"id": 7, "file_name": "COCO_val2014_000000000007.jpg"}],
            "annotations": [{"id": 70, "image_id": 7, "caption": "A small test image."}]}
    val = zip_bytes({"val2014/COCO_val2014_000000000007.jpg": png(7)})
    ann = zip_bytes({"annotations/captions_val2014.json": json.dumps(caps).encode(),
                     "annotations/captions_train2014.json": json.dumps(caps).encode(),
                     "annotations/instances_val2014.json": b"{}"})
    base, h = server({"/zips/val2014.zip": val, "/annotations/annotations_trainval2014.zip": ann})
    files = {"val2014.zip": {"url": f"{base}/zips/val2014.zip", "size": len(val),
                             "sha256": hashlib.sha256(val).hexdigest()},
             "annotations_trainval2014.zip": {"url": f"{base}/annotations/annotations_trainval2014.zip",
                                              "size": len(ann), "sha256": None}}
    root = download_coco(tmp_path / "coco", splits=("val2014",), files=files, progress=False)
    kb = read_coco(root, "val2014", progress=False)
    assert kb.ids == ["7-70"] and kb.texts == ["A small test image."]
    np.testing.assert_array_equal(np.asarray(kb.image(0)), np.asarray(Image.open(io.BytesIO(png(7))).convert("RGB")))
    assert not (root / "annotations" / "instances_val2014.json").exists()  # only the captions files are extracted
    assert not (root / "val2014.zip").exists()  # archives are deleted after extraction by default
    n = len(h.log)
    download_coco(root, splits=("val2014",), files=files, progress=False)  # already extracted: no request
    assert len(h.log) == n == 2


def test_download_coco_refuses_paths_outside_root(server, tmp_path):
    evil = zip_bytes({"../evil.txt": b"x"})
    base, _ = server({"/v.zip": evil})
    files = {"val2014.zip": {"url": f"{base}/v.zip", "size": len(evil)}}
    with pytest.raises(DownloadError, match="outside"):
        download_coco(tmp_path / "coco", files=files, annotations=False, progress=False)
    assert not (tmp_path / "evil.txt").exists()


def test_download_coco_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="test2014"):
        download_coco(tmp_path, splits=("test2014",))


def test_coco_files_table():
    assert set(COCO_FILES) == {"train2014.zip", "val2014.zip", "train2017.zip", "val2017.zip",
                               "annotations_trainval2014.zip", "annotations_trainval2017.zip"}
    for name, info in COCO_FILES.items():
        assert info["url"].startswith("http://images.cocodataset.org/") and info["url"].endswith("/" + name)
        assert isinstance(info["size"], int) and info["size"] > 100_000_000
        assert len(info["sha256"]) == 64


def test_sha256_file(tmp_path):
    (tmp_path / "a").write_bytes(PAYLOAD)
    assert sha256_file(tmp_path / "a", chunk=1000) == SHA


def test_instructions():
    webqa = instructions("webqa")
    for s in ("github.com/WebQnA/WebQA", "WebQA_train_val.json", "imgs.tsv", "imgs.lineidx"):
        assert s in webqa
    laion = instructions("LAION")
    for s in ("img2dataset --url_list", "--input_format parquet", "--url_col URL", "--caption_col TEXT",
              "--output_format webdataset", "--image_size 256"):
        assert s in laion
    assert "download_coco" in instructions("coco")
    with pytest.raises(ValueError, match="laion"):
        instructions("imagenet")
