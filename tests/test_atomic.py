"""reimagen.utils.atomic: the bytes are those the four helpers it replaced wrote (evaluation.metrics, entitydrawbench.
entities, human_eval.tasks, reimagen.retrieval.clip), no temporary file stays behind, a write that fails
midway leaves the destination's previous content, and ``replacing_path`` lets a library that picks its format by
the file name (PIL) write to the temporary name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from entitydrawbench import entities
from evaluation.metrics import JSON_FORMAT
from human_eval.tasks import atomic_write_text
from reimagen.utils import atomic

SAMPLE = {"b": 1, "a": ["Palau Güell", 2.5, None], "p": Path("/x/y"), "t": (1, 2)}
PLAIN = {"b": 1, "a": ["Palau Güell", 2.5, None]}
ROWS = [PLAIN, {"z": "ñ\n"}, {}]
# What the old helpers wrote for SAMPLE / PLAIN / ROWS (checked against them before they were removed).
METRICS_JSON = (b'{\n  "a": [\n    "Palau G\\u00fcell",\n    2.5,\n    null\n  ],\n  "b": 1,\n  "p": "/x/y",\n'
                b'  "t": [\n    1,\n    2\n  ]\n}')
ENTITIES_JSON = (b'{\n  "b": 1,\n  "a": [\n    "Palau G\xc3\xbcell",\n    2.5,\n    null\n  ],\n  "p": "/x/y",\n'
                 b'  "t": [\n    1,\n    2\n  ]\n}')
ENTITIES_JSONL = b'{"b": 1, "a": ["Palau G\xc3\xbcell", 2.5, null]}\n{"z": "\xc3\xb1\\n"}\n{}\n'
CLIP_STATE_JSON = b'{"b": 1, "a": ["Palau G\\u00fcell", 2.5, null]}'

WRITES = {
    "evaluation.metrics json": (lambda p: atomic.write_json(p, SAMPLE, **JSON_FORMAT), METRICS_JSON),
    "evaluation text": (lambda p: atomic.write_text(p, "x ñ\n"), b"x \xc3\xb1\n"),
    "bytes": (lambda p: atomic.write_bytes(p, b"\x00\xff"), b"\x00\xff"),
    "entities.write_json": (lambda p: entities.write_json(p, SAMPLE), ENTITIES_JSON),
    "entities.write_jsonl": (lambda p: entities.write_jsonl(p, ROWS), ENTITIES_JSONL),
    "entities.write_jsonl generator": (lambda p: entities.write_jsonl(p, (r for r in ROWS)), ENTITIES_JSONL),
    "entities.write_text": (lambda p: entities.write_text(p, "a\nñ"), b"a\n\xc3\xb1"),
    "human_eval atomic_write_text": (lambda p: atomic_write_text(p, "a\nñ"), b"a\n\xc3\xb1"),
    "clip state json": (lambda p: atomic.write_json(p, PLAIN), CLIP_STATE_JSON),
    "empty jsonl": (lambda p: atomic.write_jsonl(p, []), b""),
}


@pytest.mark.parametrize("name", WRITES)
def test_bytes_as_before_and_no_temporary_file(tmp_path, name):
    write, expected = WRITES[name]
    path = tmp_path / "new" / "sub" / "out.json"  # the parent folders are made
    assert write(path) == path
    assert path.read_bytes() == expected
    assert os.listdir(path.parent) == ["out.json"]
    write(path)  # replacing an existing file
    assert path.read_bytes() == expected
    assert os.listdir(path.parent) == ["out.json"]


def test_save_npz(tmp_path):
    path = tmp_path / "stats.npz"
    mu, sigma = np.arange(3.0), np.eye(3)
    assert atomic.save_npz(path, mu=mu, sigma=sigma, n=np.array(7)) == path
    with np.load(path) as z:
        assert sorted(z.files) == ["mu", "n", "sigma"]
        np.testing.assert_array_equal(z["sigma"], sigma)
        assert int(z["n"]) == 7
    assert os.listdir(tmp_path) == ["stats.npz"]


def _previous(tmp_path: Path) -> Path:
    path = tmp_path / "out.json"
    path.write_bytes(b"previous\n")
    return path


def test_json_failure_keeps_previous_content(tmp_path):
    path = _previous(tmp_path)
    with pytest.raises(TypeError):
        atomic.write_json(path, {"x": object()})  # default=None: json refuses it
    assert path.read_bytes() == b"previous\n"
    assert os.listdir(tmp_path) == ["out.json"]


def test_jsonl_failure_midway_keeps_previous_content_and_removes_temporary_file(tmp_path):
    path = _previous(tmp_path)
    seen = []

    def rows():
        yield {"ok": 1}
        seen.extend(sorted(os.listdir(tmp_path)))  # the first row is in the temporary file by now
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        entities.write_jsonl(path, rows())
    assert seen == [f".out.tmp{os.getpid()}.json", "out.json"]
    assert path.read_bytes() == b"previous\n"
    assert os.listdir(tmp_path) == ["out.json"]


def test_jsonl_unserialisable_row_midway(tmp_path):
    path = _previous(tmp_path)
    with pytest.raises(TypeError):
        atomic.write_jsonl(path, [{"ok": 1}, {"bad": object()}])
    assert path.read_bytes() == b"previous\n"
    assert os.listdir(tmp_path) == ["out.json"]


def test_text_failure_leaves_no_file(tmp_path):
    path = tmp_path / "out.txt"
    with pytest.raises(UnicodeEncodeError):
        atomic.write_text(path, "lone surrogate \ud800")
    assert os.listdir(tmp_path) == []


def test_replacing_path_lets_a_library_write_by_suffix(tmp_path):
    """PIL picks the format by the file name: the temporary name keeps the destination's suffix."""
    from PIL import Image

    path = tmp_path / "new" / "grid.png"  # the parent folder is made
    seen = []
    for colour in ((255, 0, 0), (0, 0, 255)):  # a new file, then replacing it
        with atomic.replacing_path(path) as tmp:
            assert tmp.parent == path.parent and tmp.suffix == ".png" and tmp.name.startswith(".")
            Image.new("RGB", (3, 2), colour).save(tmp)
            seen.append(tmp.name)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            assert (im.format, im.size, im.getpixel((0, 0))) == ("PNG", (3, 2), colour)
        assert os.listdir(path.parent) == ["grid.png"]
    assert seen == [f".grid.tmp{os.getpid()}.png"] * 2


@pytest.mark.parametrize("written", [True, False], ids=["written", "not written"])
def test_replacing_path_error_keeps_previous_content(tmp_path, written):
    path = tmp_path / "plot.png"
    path.write_bytes(b"previous\n")
    with pytest.raises(RuntimeError, match="library broke"):
        with atomic.replacing_path(path) as tmp:
            if written:
                tmp.write_bytes(b"half")
            raise RuntimeError("library broke")
    assert path.read_bytes() == b"previous\n"
    assert os.listdir(tmp_path) == ["plot.png"]


def test_entitydrawbench_and_human_eval_tasks_import_without_reimagen():
    """Their writers import reimagen.utils.atomic when they write: ``import reimagen`` loads torch (seconds), which
    ``import entitydrawbench`` and the rating app (human_eval.tasks) do without."""
    code = ("import sys, entitydrawbench.entities, human_eval.tasks; "
            "print(json.dumps(sorted(m for m in ('reimagen', 'torch') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert json.loads(out.stdout) == []
