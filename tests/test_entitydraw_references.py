"""Reference fetching (entitydrawbench/references.py) against a fake MediaWiki API on 127.0.0.1.

The server answers ``action=query`` requests in the MediaWiki JSON format, built by the test from a table of
pages and files: normalisation and redirects, missing pages, pages without a lead image, ``extmetadata`` with
HTML in Artist, formatversion 2 (list of pages) on one wiki and formatversion 1 (pages keyed by id) on another,
``continue`` on the imageinfo query, a flaky image (503 once) and a broken one (404).
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from entitydrawbench.cli import register
from entitydrawbench.entities import Entity, load_entities
from entitydrawbench.references import (REFERENCES_FILE, FetchError, fetch_references, import_reference_folder,
                                        load_references, sha256_file, with_retries)


def png(seed: int, size=(20, 16)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def ent(eid, name, page, wiki="enwiki", **kw) -> Entity:
    return Entity(id=eid, name=name, category=eid.split("-")[0], wiki=wiki, page=page,
                  reference_text=f"{name}, a test entity.", **kw)


class FakeWiki:
    """Pages (title -> lead file or None), redirects, files (name -> bytes, licence...), per wiki."""

    def __init__(self):
        self.hits: dict[str, int] = {}
        self.fail_once = {"Flaky.png"}
        self.gone = {"Gone.png"}
        self.pages = {"Chortai": "Chortai_dog.png", "Cretan Hound": "Flaky.png", "Azawakh": "Gone.png",
                      "Sloughi": None, "Palau Güell": "Palau.png", "Ugnaught": "Ugnaught.png"}
        self.redirects = {"Tri-colour Armant": "Armant (dog)"}
        self.pages["Armant (dog)"] = "Armant.png"
        self.files = {name: png(i) for i, name in enumerate(["Chortai_dog.png", "Flaky.png", "Gone.png",
                                                               "Palau.png", "Ugnaught.png", "Armant.png"])}
        self.licences = {"Ugnaught.png": ("Fair use", "true")}

    def meta(self, name):
        lic, nonfree = self.licences.get(name, ("CC BY-SA 4.0", "false"))
        return {"LicenseShortName": {"value": lic, "source": "commons-desc-page"},
                "LicenseUrl": {"value": "https://creativecommons.org/licenses/by-sa/4.0"},
                "Artist": {"value": f'<a href="//commons.wikimedia.org/wiki/User:X">Photographer of {name}</a>'},
                "Credit": {"value": "<span>Own work</span>"}, "NonFree": {"value": nonfree},
                "AttributionRequired": {"value": "true"}}

    def query(self, base: str, q: dict[str, str], v1: bool) -> dict:
        titles = q["titles"].split("|")
        normalized, redirects, pages = [], [], []
        for t in titles:
            final = t.replace("_", " ")
            if final != t:
                normalized.append({"from": t, "to": final})
            if final in self.redirects and q.get("redirects"):
                redirects.append({"from": final, "to": self.redirects[final]})
                final = self.redirects[final]
            if q["prop"] == "pageimages":
                if final not in self.pages:
                    pages.append({"ns": 0, "title": final, "missing": "" if v1 else True})
                    continue
                page = {"pageid": 100 + len(pages), "ns": 0, "title": final}
                if self.pages[final]:
                    page["pageimage"] = self.pages[final].replace(" ", "_")
                    page["original"] = {"source": f"{base}/img/{self.pages[final]}", "width": 20, "height": 16}
                pages.append(page)
            else:
                name = final[len("File:"):].replace("_", " ").replace(" ", "_")
                page = {"ns": 6, "title": final, "imagerepository": "shared"}
                if name in self.files:
                    data = self.files[name]
                    info = {"url": f"{base}/img/{name}", "descriptionurl": f"{base}/wiki/File:{name}",
                            "sha1": hashlib.sha1(data).hexdigest(), "size": len(data), "width": 20, "height": 16,
                            "mime": "image/png", "extmetadata": self.meta(name)}
                    if "iiurlwidth" in q:
                        info["thumburl"] = f"{base}/img/thumb-{name}"
                    page["imageinfo"] = [info]
                else:
                    page["missing"] = "" if v1 else True
                pages.append(page)
        body: dict = {"batchcomplete": True, "query": {}}
        if normalized:
            body["query"]["normalized"] = normalized
        if redirects:
            body["query"]["redirects"] = redirects
        if q["prop"] == "imageinfo" and "iicontinue" not in q and len(pages) > 1:
            # answer in two rounds, as the API does when a result is too large
            body["continue"] = {"iicontinue": "x", "continue": "||"}
            for p in pages[1:]:
                p.pop("imageinfo", None)
        elif q["prop"] == "imageinfo" and "iicontinue" in q:
            pages = pages[1:]
        body["query"]["pages"] = {str(p.get("pageid", -1 - i)): p for i, p in enumerate(pages)} if v1 else pages
        return body


@pytest.fixture()
def server():
    wiki = FakeWiki()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def do_GET(self):
            url = urllib.parse.urlparse(self.path)
            wiki.hits[url.path] = wiki.hits.get(url.path, 0) + 1
            base = f"http://127.0.0.1:{self.server.server_port}"
            if url.path in ("/w/api.php", "/fandom/api.php"):
                q = dict(urllib.parse.parse_qsl(url.query))
                assert q["action"] == "query" and q["format"] == "json"
                data = json.dumps(wiki.query(base, q, v1=url.path.startswith("/fandom"))).encode()
                return self._send(200, data, "application/json")
            if url.path.startswith("/img/"):
                name = url.path[len("/img/"):].removeprefix("thumb-")
                if name in wiki.gone:
                    return self._send(404, b"not found", "text/plain")
                if name in wiki.fail_once and wiki.hits[url.path] == 1:
                    return self._send(503, b"busy", "text/plain")
                return self._send(200, wiki.files[name], "image/png")
            return self._send(404, b"?", "text/plain")

        def _send(self, code, data, ctype):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_port}"
    yield wiki, {"enwiki": f"{base}/w/api.php", "wookieepedia": f"{base}/fandom/api.php"}
    httpd.shutdown()
    httpd.server_close()


ENTITIES = [
    ent("dogs-chortai", "Chortai", "Chortai"),
    ent("dogs-cretan-hound", "Cretan Hound", "Cretan_Hound"),  # normalised title, flaky image (503 once)
    ent("dogs-azawakh", "Azawakh", "Azawakh"),  # image 404
    ent("dogs-sloughi", "Sloughi", "Sloughi"),  # page without a lead image
    ent("dogs-tri-colour-armant", "Tri-colour Armant", "Tri-colour Armant"),  # redirect
    ent("dogs-missing-breed", "Missing breed", "No such page"),
    ent("landmarks-palau-guell", "Palau Güell", "Palau Güell"),
    ent("characters-ugnaught", "Ugnaught", "Ugnaught", wiki="wookieepedia"),  # formatversion 1, non-free
]


def test_fetch_records_url_licence_attribution_checksums_and_lists_missing(server, tmp_path):
    wiki, apis = server
    report = fetch_references(ENTITIES, tmp_path, api_urls=apis, max_width=0, backoff=0.0)
    assert sorted(report.fetched) == ["characters-ugnaught", "dogs-chortai", "dogs-cretan-hound",
                                      "dogs-tri-colour-armant", "landmarks-palau-guell"]
    assert set(report.missing) == {"dogs-azawakh", "dogs-sloughi", "dogs-missing-breed"}
    assert "HTTP 404" in report.missing["dogs-azawakh"]
    assert "no lead image" in report.missing["dogs-sloughi"]
    assert "page not found" in report.missing["dogs-missing-breed"]
    assert wiki.hits["/img/Flaky.png"] == 2  # retried after the 503
    db = json.loads((tmp_path / REFERENCES_FILE).read_text())
    img = db["references"]["dogs-chortai"]["images"][0]
    assert img["path"] == "images/dogs-chortai.png" and img["url"].endswith("/img/Chortai_dog.png")
    assert img["licence"] == "CC BY-SA 4.0" and img["licence_url"].startswith("https://creativecommons.org/")
    assert img["attribution"] == "Photographer of Chortai_dog.png (Own work)"  # HTML stripped
    expected = hashlib.sha256(wiki.files["Chortai_dog.png"]).hexdigest()
    assert img["sha256"] == sha256_file(tmp_path / img["path"]) == expected
    assert img["sha1_original"] == hashlib.sha1(wiki.files["Chortai_dog.png"]).hexdigest()
    assert db["references"]["dogs-tri-colour-armant"]["images"][0]["file_title"] == "File:Armant.png"
    assert db["references"]["characters-ugnaught"]["images"][0]["non_free"] is True
    assert set(db["missing"]) == set(report.missing)
    # nothing invented: only fetched entities have files
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted(
        f"{e}.png" for e in report.fetched)
    # the filled manifest copy
    rows = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "entities.jsonl").read_text().splitlines()}
    assert rows["dogs-chortai"]["licence"] == "CC BY-SA 4.0" and rows["dogs-chortai"]["sha256"] == img["sha256"]
    assert rows["dogs-sloughi"]["licence"] == "" and "reference_image" not in rows["dogs-sloughi"]
    pairs, missing = load_references(tmp_path, ENTITIES)
    assert set(pairs) == set(report.fetched) and set(missing) == set(report.missing)
    assert pairs["dogs-chortai"][0].text == "Chortai, a test entity."


def test_rerun_keeps_verified_files_and_free_only_drops_non_free(server, tmp_path):
    wiki, apis = server
    fetch_references(ENTITIES[:1], tmp_path, api_urls=apis, max_width=0, backoff=0.0)
    before = dict(wiki.hits)
    again = fetch_references(ENTITIES[:1], tmp_path, api_urls=apis, max_width=0, backoff=0.0)
    assert again.kept == ["dogs-chortai"] and not again.fetched and wiki.hits == before  # no request at all
    (tmp_path / "images" / "dogs-chortai.png").write_bytes(b"tampered")
    third = fetch_references(ENTITIES[:1], tmp_path, api_urls=apis, max_width=0, backoff=0.0)
    assert third.fetched == ["dogs-chortai"]  # checksum mismatch -> fetched again
    free = fetch_references([ENTITIES[-1]], tmp_path / "free", api_urls=apis, free_only=True, backoff=0.0)
    assert "non-free" in free.missing["characters-ugnaught"] and not free.fetched


def test_thumbnails_are_downloaded_when_a_max_width_is_set(server, tmp_path):
    wiki, apis = server
    report = fetch_references(ENTITIES[:1], tmp_path, api_urls=apis, max_width=256, backoff=0.0)
    assert report.fetched == ["dogs-chortai"] and wiki.hits.get("/img/thumb-Chortai_dog.png") == 1
    db = json.loads((tmp_path / REFERENCES_FILE).read_text())
    assert db["references"]["dogs-chortai"]["images"][0]["original_url"].endswith("/img/Chortai_dog.png")


def test_retries_back_off_on_transient_errors_only():
    calls, sleeps = [], []

    def flaky(url):
        calls.append(url)
        if len(calls) < 3:
            raise FetchError("busy", 503)
        return b"ok"

    assert with_retries(flaky, retries=4, backoff=0.5, sleep=sleeps.append)("u") == b"ok"
    assert sleeps == [0.5, 1.0]

    def not_found(url):
        calls.append(url)
        raise FetchError("gone", 404)

    calls.clear()
    with pytest.raises(FetchError):
        with_retries(not_found, retries=4, sleep=sleeps.append)("u")
    assert len(calls) == 1


def test_user_folder_by_id_or_name_with_extra_pairs_and_text_override(tmp_path):
    src = tmp_path / "mine"
    src.mkdir()
    (src / "dogs-chortai.png").write_bytes(png(1))
    (src / "dogs-chortai__1.jpg").write_bytes(png(2))
    (src / "palau-guell.png").write_bytes(png(3))  # slug of the name
    (src / "palau-guell.txt").write_text("Palau Güell seen from the street.")
    (src / "Ugnaught.png").write_bytes(b"not an image")
    pairs, missing = load_references(src, ENTITIES)
    assert [p.path.name for p in pairs["dogs-chortai"]] == ["dogs-chortai.png", "dogs-chortai__1.jpg"]
    assert pairs["landmarks-palau-guell"][0].text == "Palau Güell seen from the street."
    assert "dogs-sloughi" in missing
    report = import_reference_folder(ENTITIES, src, tmp_path / "refs")
    assert sorted(report.fetched) == ["dogs-chortai", "landmarks-palau-guell"]
    assert "not a decodable image" in report.missing["characters-ugnaught"]
    db = json.loads((tmp_path / "refs" / REFERENCES_FILE).read_text())
    assert [i["path"] for i in db["references"]["dogs-chortai"]["images"]] == [
        "images/dogs-chortai.png", "images/dogs-chortai__1.jpg"]
    assert db["references"]["dogs-chortai"]["images"][0]["licence"] == "user-supplied"


def test_fetch_cli_against_the_local_api(server, tmp_path):
    _, apis = server
    app = typer.Typer()
    register(app)
    res = CliRunner().invoke(app, ["entitydraw-fetch", "--out", str(tmp_path / "refs"), "--categories", "dogs",
                                   "--per-category", "2", "--api", f"enwiki={apis['enwiki']}"])
    assert res.exit_code == 0, res.output
    assert "2 missing" in res.output and "page not found" in res.output  # the fake wiki lacks Labrador & co.
    res = CliRunner().invoke(app, ["entitydraw-fetch", "--out", str(tmp_path / "refs"), "--per-category", "1",
                                   "--api", f"enwiki={apis['enwiki']}", "--strict"])
    assert res.exit_code == 2 and "references missing" in res.output
    res = CliRunner().invoke(app, ["entitydraw-fetch", "--out", str(tmp_path / "x"), "--api", "nowiki=http://a"])
    assert res.exit_code == 2 and "unknown wiki 'nowiki'" in res.output
    assert load_entities()  # the packaged manifest is untouched by fetching
