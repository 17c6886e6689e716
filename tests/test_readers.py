"""Knowledge-base readers on tiny fixtures written in the official formats (COCO, WebQA, img2dataset shards,
tables, image folders): counts, texts, skip reasons, lazy image loading, errors, and the WikiImages split."""

import base64
import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reimagen.retrieval.base import KnowledgeBase
from reimagen.retrieval.readers import open_knowledge_base
from reimagen.retrieval.readers import (DATE_RE, WIKI_ID_RE, coco_image_id, coco_reference_images, read_coco,
                                        read_folder, read_parquet_collection, read_webdataset, read_wikiimages,
                                        webqa_image_offsets, wikiimages_filter_reason)


def pattern(seed: int, size: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)


def solid(seed: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.broadcast_to(rng.integers(30, 226, size=3, dtype=np.uint8), (size, size, 3)).copy()


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    opts = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    Image.fromarray(arr).save(buf, format=fmt, **opts)
    return buf.getvalue()


def pixels(kb: KnowledgeBase, pid: str) -> np.ndarray:
    return np.asarray(kb.image(kb.index_of(pid)))


# ----------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------
COCO_IMAGES = {1: "COCO_val2014_000000000001.png", 2: "COCO_val2014_000000000002.jpg",
               3: "COCO_val2014_000000000003.jpg", 4: "COCO_val2014_000000000004.jpg"}


def coco_captions() -> dict:
    anns = [  # deliberately not sorted: rows must come out sorted by (image id, annotation id)
        {"id": 21, "image_id": 2, "caption": "A red bus on a street.  "},
        {"id": 11, "image_id": 1, "caption": "A dog lying on grass."},
        {"id": 30, "image_id": 3, "caption": "An image whose file is missing."},
        {"id": 12, "image_id": 1, "caption": " A brown dog outside."},
        {"id": 13, "image_id": 1, "caption": "   "},
        {"id": 20, "image_id": 2, "caption": "A double-decker bus."},
        {"id": 40, "image_id": 4, "caption": "A corrupt image file."},
    ]
    images = [{"id": i, "file_name": f, "height": 8, "width": 8} for i, f in COCO_IMAGES.items()]
    return {"info": {}, "licenses": [], "images": images, "annotations": anns}


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(coco_captions()))
    (root / "val2014").mkdir()
    (root / "val2014" / COCO_IMAGES[1]).write_bytes(encode(pattern(1), "PNG"))
    (root / "val2014" / COCO_IMAGES[2]).write_bytes(encode(solid(2), "JPEG"))
    # image 3 is missing; image 4 is not an image at all
    (root / "val2014" / COCO_IMAGES[4]).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


def test_coco_pairs_texts_order_and_skips(coco_root):
    kb = read_coco(coco_root, "val2014", progress=False)
    assert kb.name == "coco-val2014" and kb.root == str(coco_root)
    assert kb.ids == ["1-11", "1-12", "2-20", "2-21", "4-40"]
    assert kb.texts == ["A dog lying on grass.", "A brown dog outside.", "A double-decker bus.",
                        "A red bus on a street.", "A corrupt image file."]
    assert kb.image_refs[0] == f"val2014/{COCO_IMAGES[1]}"
    assert kb.skipped == {"missing image": 1, "empty caption": 1}
    assert [coco_image_id(i) for i in kb.ids] == [1, 1, 2, 2, 4]


def test_coco_lazy_images_have_the_written_pixels(coco_root):
    kb = read_coco(coco_root, progress=False)
    np.testing.assert_array_equal(pixels(kb, "1-12"), pattern(1))
    assert np.abs(pixels(kb, "2-20").astype(int) - solid(2).astype(int)).max() <= 3  # JPEG, nearly exact


def test_coco_verify_drops_corrupt_images(coco_root):
    kb = read_coco(coco_root, "val2014", verify=True, progress=False)
    assert kb.ids == ["1-11", "1-12", "2-20", "2-21"]
    assert kb.skipped == {"missing image": 1, "empty caption": 1, "corrupt image": 1}


def test_coco_via_open_knowledge_base(coco_root):
    kb = open_knowledge_base(f"coco:{coco_root}?split=val2014&verify=true&progress=0")
    assert len(kb) == 4 and kb.skipped["corrupt image"] == 1
    kb = open_knowledge_base(f"coco:{coco_root}?split=val2014")  # default progress bar
    assert len(kb) == 5


def test_coco_reference_images_are_the_full_split(coco_root):
    with pytest.raises(FileNotFoundError, match=r"1 of the 4 images.*COCO_val2014_000000000003"):
        coco_reference_images(coco_root, "val2014")
    paths = coco_reference_images(coco_root, "val2014", skip_missing=True)
    assert [Path(p).name for p in paths] == [COCO_IMAGES[1], COCO_IMAGES[2], COCO_IMAGES[4]]
    assert all(Path(p).is_absolute() for p in paths)


def test_coco_missing_annotation_file_names_it_and_where_to_get_it(coco_root):
    with pytest.raises(FileNotFoundError) as err:
        read_coco(coco_root, "train2014", progress=False)
    msg = str(err.value)
    assert str(coco_root / "annotations" / "captions_train2014.json") in msg
    assert "annotations_trainval2014.zip" in msg and "https://cocodataset.org/#download" in msg
    assert "reimagen.retrieval.download" in msg


@pytest.mark.parametrize("mutate, key", [
    (lambda d: d.pop("annotations"), "'annotations'"),
    (lambda d: d.pop("images"), "'images'"),
    (lambda d: d["annotations"][3].pop("caption"), "'caption'"),
    (lambda d: d["images"][0].pop("file_name"), "'file_name'"),
])
def test_coco_wrong_schema_names_file_and_key(tmp_path, mutate, key):
    data = coco_captions()
    mutate(data)
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "captions_val2014.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        read_coco(tmp_path, progress=False)
    assert str(path) in str(err.value) and key in str(err.value)


def test_coco_duplicate_ids_name_the_file(tmp_path):
    data = coco_captions()
    data["annotations"].append({"id": 11, "image_id": 1, "caption": "the same annotation id again"})
    (tmp_path / "annotations").mkdir()
    path = tmp_path / "annotations" / "captions_val2014.json"
    path.write_text(json.dumps(data))
    (tmp_path / "val2014").mkdir()
    (tmp_path / "val2014" / COCO_IMAGES[1]).write_bytes(encode(pattern(1), "PNG"))
    with pytest.raises(ValueError, match=r"duplicate id '1-11'") as err:
        read_coco(tmp_path, progress=False)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------------------------
# WikiImages (WebQA)
# ----------------------------------------------------------------------------------------------
KEEP = {
    30000001: "Eiffel Tower at night",
    30000002: "Golden Gate Bridge in fog",
    30000004: "Audi Q5 parked outside a museum",
    30000005: "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen",
}
DROP = {
    30000010: ("Statue of Liberty 1886", "text with a date"),
    30000011: ("Parade on 12 May in Madrid", "text with a date"),
    30000012: ("Bridge opened 2003-05-12", "text with a date"),
    30000013: ("Skyline seen in May 2003", "text with a date"),
    30000014: ("Q243 tower", "text with a wiki-id"),
    30000015: ("File:Big Ben at dusk.jpg", "text with a wiki-id"),
    30000016: ("Church of the village (wikidata id Q9188)", "text with a wiki-id"),
    30000017: ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
               "sixteen", "text over 15 tokens"),
}
FILLER = {30000100 + i: f"Harbor view number {i} with boats" for i in range(30)}
NOT_IN_TSV = 30000099
TITLE_ONLY = 30000003  # empty caption: the title is the text


def webqa_fact(iid: int, caption: str, title: str = "") -> dict:
    return {"image_id": iid, "title": title or f"title of {iid}", "caption": caption,
            "url": f"https://commons.wikimedia.org/wiki/File:{iid}.jpg", "imgUrl": f"https://upload.example/{iid}.jpg"}


def webqa_records() -> dict:
    texts = {**KEEP, **{k: v[0] for k, v in DROP.items()}, **FILLER, NOT_IN_TSV: "Lonely lighthouse on a rock"}
    facts = [webqa_fact(i, t) for i, t in sorted(texts.items())] + [webqa_fact(TITLE_ONLY, "", "Sydney Opera House")]
    records = {}
    for r in range(6):
        chunk = facts[r::6]
        half = len(chunk) // 2
        records[f"d5be{r:04d}"] = {"Q": f"question {r}?", "A": [f"answer {r}"], "split": "train" if r < 4 else "val",
                                   "Qcate": "Others", "topic": "t", "txt_posFacts": [], "txt_negFacts": [],
                                   "img_posFacts": chunk[:half], "img_negFacts": chunk[half:]}
    # the same image in a later record (sorted by guid) with another caption: the first record's text wins
    records["zz-late"] = {"Q": "q", "A": ["a"], "split": "val", "Qcate": "YesNo", "txt_posFacts": [],
                          "txt_negFacts": [], "img_posFacts": [webqa_fact(30000001, "A different caption")],
                          "img_negFacts": []}
    records["text-only"] = {"Q": "q", "A": ["a"], "split": "train", "Qcate": "text", "img_posFacts": [],
                            "img_negFacts": [], "txt_posFacts": [{"title": "t", "fact": "f", "snippet_id": "s"}],
                            "txt_negFacts": []}
    return records


def tsv_ids() -> list[int]:
    ids = sorted({*KEEP, *DROP, *FILLER, TITLE_ONLY, 30000500})  # 30000500: in imgs.tsv, not in the JSON
    return ids


def write_webqa(root: Path, reverse: bool = False, corrupt: int | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    records = webqa_records()
    keys = sorted(records, reverse=reverse) if reverse else list(records)
    (root / "WebQA_train_val.json").write_text(json.dumps({k: records[k] for k in keys}))
    ids = tsv_ids()
    ids = ids[::-1] if reverse else ids[1::2] + ids[0::2]  # line order unrelated to id order
    offsets, data = [], bytearray()
    for iid in ids:
        offsets.append(len(data))
        payload = b"%%%not base64 image%%%" if iid == corrupt else base64.b64encode(encode(solid(iid), "JPEG"))
        data += str(iid).encode() + b"\t" + payload + b"\n"
    (root / "imgs.tsv").write_bytes(bytes(data))
    (root / "imgs.lineidx").write_text("".join(f"{o}\n" for o in offsets))
    return root


@pytest.fixture(scope="module")
def webqa_root(tmp_path_factory):
    return write_webqa(tmp_path_factory.mktemp("webqa"))


def test_wikiimages_filters_texts_and_counts(webqa_root):
    kb = read_wikiimages(webqa_root, split="all", progress=False)
    expected = {**KEEP, **FILLER, TITLE_ONLY: "Sydney Opera House"}
    assert kb.name == "wikiimages-all"
    assert kb.ids == [str(i) for i in sorted(expected)]
    assert kb.texts == [expected[i] for i in sorted(expected)]
    assert kb.skipped == {"text with a date": 4, "text with a wiki-id": 3, "text over 15 tokens": 1,
                          "image not in imgs.tsv": 1}
    assert all(r.startswith("tsv://imgs.tsv#") for r in kb.image_refs)
    assert "A different caption" not in kb.texts


def test_wikiimages_lazy_images_have_the_written_pixels(webqa_root):
    kb = read_wikiimages(webqa_root, split="all", progress=False)
    for iid in (30000001, TITLE_ONLY, 30000129):
        got = pixels(kb, str(iid)).astype(int)
        assert np.abs(got - solid(iid).astype(int)).max() <= 3


def test_wikiimages_offsets_come_from_lineidx_and_ids(webqa_root):
    offsets = webqa_image_offsets(webqa_root)
    assert set(offsets) == {str(i) for i in tsv_ids()}
    raw = (webqa_root / "imgs.tsv").read_bytes()
    for iid, off in offsets.items():
        assert raw[off:].split(b"\t", 1)[0] == iid.encode()


def test_wikiimages_does_not_decode_images_unless_verify(tmp_path):
    root = write_webqa(tmp_path / "w", corrupt=30000001)
    kb = read_wikiimages(root, split="all", progress=False)
    assert "30000001" in kb  # undecodable payload is not noticed at read time
    kb = read_wikiimages(root, split="all", verify=True, progress=False)
    assert "30000001" not in kb and kb.skipped["corrupt image"] == 1


def test_wikiimages_split_sizes_disjoint_and_prompts_in_val(webqa_root):
    kw = dict(seed=7, val_size=10, num_prompts=4, progress=False)
    train, val, prompts = (read_wikiimages(webqa_root, split=s, **kw) for s in ("train", "val", "prompts"))
    all_ids = set(read_wikiimages(webqa_root, split="all", progress=False).ids)
    assert len(val) == 10 and len(prompts) == 4 and len(train) == len(all_ids) - 10
    assert not set(train.ids) & set(val.ids)
    assert set(train.ids) | set(val.ids) == all_ids
    assert set(prompts.ids) <= set(val.ids)
    assert prompts.name == "wikiimages-prompts"


def test_wikiimages_split_is_deterministic_and_seeded(webqa_root):
    kw = dict(val_size=10, num_prompts=4, progress=False)
    a = read_wikiimages(webqa_root, split="val", seed=1, **kw).ids
    assert read_wikiimages(webqa_root, split="val", seed=1, **kw).ids == a
    assert read_wikiimages(webqa_root, split="val", seed=2, **kw).ids != a


def test_wikiimages_split_independent_of_file_order(webqa_root, tmp_path):
    other = write_webqa(tmp_path / "reordered", reverse=True)
    assert (other / "imgs.lineidx").read_text() != (webqa_root / "imgs.lineidx").read_text()
    for split in ("train", "val", "prompts"):
        a = read_wikiimages(webqa_root, split=split, seed=3, val_size=10, num_prompts=4, progress=False)
        b = read_wikiimages(other, split=split, seed=3, val_size=10, num_prompts=4, progress=False)
        assert a.ids == b.ids and a.texts == b.texts


def test_wikiimages_via_open_knowledge_base(webqa_root):
    kb = open_knowledge_base(f"wikiimages:{webqa_root}?split=val&seed=3&val_size=10&num_prompts=4&progress=0")
    direct = read_wikiimages(webqa_root, split="val", seed=3, val_size=10, num_prompts=4, progress=False)
    assert kb.ids == direct.ids


def test_wikiimages_val_size_too_large(webqa_root):
    with pytest.raises(ValueError, match="smaller val_size"):
        read_wikiimages(webqa_root, split="train", progress=False)  # default 22000 > 35 pairs
    with pytest.raises(ValueError, match="num_prompts"):
        read_wikiimages(webqa_root, split="prompts", val_size=5, num_prompts=6, progress=False)


def test_wikiimages_missing_files_and_mismatched_lineidx(webqa_root, tmp_path):
    root = write_webqa(tmp_path / "w")
    (root / "imgs.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"imgs\.tsv.*WebQA"):
        read_wikiimages(root, split="all", progress=False)
    root = write_webqa(tmp_path / "w2")
    offsets = (root / "imgs.lineidx").read_text().split()
    offsets[3] = str(int(offsets[3]) + 5)
    (root / "imgs.lineidx").write_text("\n".join(offsets) + "\n")
    with pytest.raises(ValueError, match="not the start of a line"):
        read_wikiimages(root, split="all", progress=False)


@pytest.mark.parametrize("text, reason", [
    ("Eiffel Tower at night", None),
    ("Statue of Liberty 1886", "text with a date"),
    ("Q243 tower", "text with a wiki-id"),
    ("Houses built in the 1920s", "text with a date"),
    ("Market on 05/12/2003", "text with a date"),
    ("Opening day, March 3rd", "text with a date"),
    ("You may see 3 boats", None),           # "may" the verb, a small number
    ("Infiniti Q50 sedan", None),            # model names are not Wikidata ids
    ("See Category:Bridges in Paris", "text with a wiki-id"),
    ("from en.wikipedia.org", "text with a wiki-id"),
    ("", "no text"),
    (" ".join(["w"] * 15), None),
    (" ".join(["w"] * 16), "text over 15 tokens"),
])
def test_wikiimages_filter_reason(text, reason):
    assert wikiimages_filter_reason(text) == reason


def test_filter_regexes_are_exported():
    assert DATE_RE.search("12 May 2003") and DATE_RE.search("2003-05-12") and not DATE_RE.search("Route 66")
    assert WIKI_ID_RE.search("(wikidata id Q42)") and not WIKI_ID_RE.search("Quarry 12 at dawn")


# ----------------------------------------------------------------------------------------------
# webdataset / img2dataset shards
# ----------------------------------------------------------------------------------------------
def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                add_member(tf, f"{key}.{ext}", data)


def meta(key: str, caption: str | None = None) -> bytes:
    d = {"key": key, "url": f"https://example.com/{key}.jpg", "status": "success"}
    if caption is not None:
        d["caption"] = caption
    return json.dumps(d).encode()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("laion")
    write_shard(root / "00000.tar", [
        ("000000000", {"jpg": encode(solid(100), "JPEG"), "txt": b"a photo of a cat", "json": meta("000000000")}),
        ("000000001", {"png": encode(pattern(101), "PNG"), "json": meta("000000001", "caption from json")}),
        ("000000002", {"jpg": encode(solid(102), "JPEG"), "json": meta("000000002")}),        # no caption
        ("000000003", {"txt": b"caption without an image", "json": meta("000000003")}),      # no image
    ])
    write_shard(root / "00001.tar", [
        ("000000000", {"png": encode(pattern(110), "PNG"), "txt": b"same key, other shard"}),
        ("000000004", {"webp": encode(pattern(104), "WEBP"),
                       "txt": "  naïve café   au lait ".encode()}),
        ("000000005", {"jpg": b"not an image", "txt": b"corrupt bytes"}),
    ])
    return root


def test_webdataset_samples_ids_texts_and_skips(shards):
    kb = read_webdataset(shards, progress=False)
    assert kb.ids == ["00000/000000000", "000000001", "00001/000000000", "000000004", "000000005"]
    assert kb.texts == ["a photo of a cat", "caption from json", "same key, other shard", "naïve café au lait",
                        "corrupt bytes"]
    assert kb.skipped == {"no caption": 1, "no image member": 1}
    assert kb.image_refs[1] == "tar://00000.tar#000000001.png"
    assert kb.meta["keys_in_several_shards"] == 1


def test_webdataset_lazy_images_have_the_written_pixels(shards):
    kb = read_webdataset(shards, progress=False)
    np.testing.assert_array_equal(pixels(kb, "000000001"), pattern(101))
    np.testing.assert_array_equal(pixels(kb, "00001/000000000"), pattern(110))
    np.testing.assert_array_equal(pixels(kb, "000000004"), pattern(104))  # lossless webp
    assert np.abs(pixels(kb, "00000/000000000").astype(int) - solid(100).astype(int)).max() <= 3


def test_webdataset_glob_single_shard_verify_and_open(shards):
    kb = read_webdataset(str(shards / "0000[0].tar"), progress=False)
    assert kb.ids == ["000000000", "000000001"] and kb.root == str(shards)  # no collision within one shard
    kb = read_webdataset(shards / "00001.tar", verify=True, progress=False)
    assert kb.ids == ["000000000", "000000004"] and kb.skipped == {"corrupt image": 1}
    kb = open_knowledge_base(f"webdataset:{shards}?progress=0")
    assert len(kb) == 5


def test_webdataset_reads_shards_written_by_the_webdataset_package(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "shard.tar")) as sink:
        for i in range(3):
            sink.write({"__key__": f"{i:09d}", "png": encode(pattern(200 + i), "PNG"), "txt": f"caption {i}",
                        "json": {"key": f"{i:09d}"}})
    kb = read_webdataset(tmp_path, progress=False)
    assert kb.ids == ["000000000", "000000001", "000000002"] and kb.texts == ["caption 0", "caption 1", "caption 2"]
    np.testing.assert_array_equal(pixels(kb, "000000002"), pattern(202))


def test_webdataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .tar shards"):
        read_webdataset(tmp_path, progress=False)
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ValueError, match="bad.tar"):
        read_webdataset(tmp_path, progress=False)


# ----------------------------------------------------------------------------------------------
# Tables (img2dataset parquet or any table)
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def table_dir(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(3):
        (tmp_path / "images" / f"{i}.png").write_bytes(encode(pattern(300 + i), "PNG"))
    (tmp_path / "images" / "bad.png").write_bytes(b"garbage")
    return tmp_path


def write_table(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    pd.DataFrame(rows).to_parquet(path)
    return path


TABLE_ROWS = [
    {"key": "k0", "caption": "first image", "path": "images/0.png", "status": "success"},
    {"key": "k1", "caption": "  second   image ", "path": "images/1.png", "status": "success"},
    {"key": "k2", "caption": "missing file", "path": "images/nope.png", "status": "success"},
    {"key": "k3", "caption": "", "path": "images/2.png", "status": "success"},
    {"key": "k4", "caption": "failed download", "path": None, "status": "failed_to_download"},
    {"key": "k5", "caption": "no path", "path": None, "status": "success"},
    {"key": "k6", "caption": "garbage bytes", "path": "images/bad.png", "status": "success"},
]


def test_parquet_rows_and_skips(table_dir):
    path = write_table(table_dir / "part-0.parquet", TABLE_ROWS)
    kb = read_parquet_collection(path, progress=False)
    assert kb.ids == ["k0", "k1", "k6"] and kb.texts == ["first image", "second image", "garbage bytes"]
    assert kb.skipped == {"missing image": 1, "no caption": 1, "download failed": 1, "no image path": 1}
    np.testing.assert_array_equal(pixels(kb, "k1"), pattern(301))
    kb = read_parquet_collection(path, verify=True, progress=False)
    assert kb.ids == ["k0", "k1"] and kb.skipped["corrupt image"] == 1


def test_parquet_id_columns_folder_and_open(table_dir):
    rows = [{"text": "a", "file": str(table_dir / "images" / "0.png"), "myid": "x"},  # absolute path
            {"text": "b", "file": "images/1.png", "myid": "y"}]
    path = write_table(table_dir / "t.parquet", rows)
    kb = read_parquet_collection(path, caption_col="text", path_col="file", progress=False)
    assert kb.ids == ["0", "1"]  # no key column: row numbers
    kb = open_knowledge_base(f"parquet:{path}?caption_col=text&path_col=file&id_col=myid&progress=0")
    assert kb.ids == ["x", "y"] and kb.name == "parquet-t"
    np.testing.assert_array_equal(pixels(kb, "x"), pattern(300))
    write_table(table_dir / "u.parquet", [{"text": "c", "file": "images/2.png", "myid": "z"}])
    kb = read_parquet_collection(table_dir, caption_col="text", path_col="file", progress=False)
    assert kb.ids == ["0", "1", "2"]  # a folder of parquet files, in sorted order, rows numbered across files


def test_parquet_errors_name_the_file(table_dir):
    path = write_table(table_dir / "t.parquet", TABLE_ROWS)
    with pytest.raises(ValueError, match=r"t\.parquet.*'TEXT'"):
        read_parquet_collection(path, caption_col="TEXT", progress=False)
    dup = write_table(table_dir / "d.parquet", [dict(TABLE_ROWS[0]), dict(TABLE_ROWS[1], key="k0")])
    with pytest.raises(ValueError, match=r"d\.parquet.*duplicate id 'k0'"):
        read_parquet_collection(dup, progress=False)


# ----------------------------------------------------------------------------------------------
# A folder of images with a JSONL or CSV of texts
# ----------------------------------------------------------------------------------------------
@pytest.fixture()
def image_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, seed in (("a.png", 400), ("b.png", 401), ("c.png", 402), ("sub/d.png", 403)):
        (tmp_path / name).write_bytes(encode(pattern(seed), "PNG"))
    return tmp_path


FOLDER_RECORDS = [
    {"file": "a.png", "text": "an apple", "id": "alpha"},
    {"image": "b.png", "text": "a banana"},
    {"file": "missing.png", "text": "nothing here"},
    {"file": "sub/d.png", "text": "   "},
]


def test_folder_jsonl(image_folder):
    (image_folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in FOLDER_RECORDS))
    kb = read_folder(image_folder, progress=False)
    assert kb.ids == ["alpha", "b"] and kb.texts == ["an apple", "a banana"]
    assert kb.skipped == {"missing image": 1, "no text": 1, "image without text": 1}  # c.png has no record
    np.testing.assert_array_equal(pixels(kb, "b"), pattern(401))
    assert kb.name == f"folder-{image_folder.name}"


def test_folder_csv_and_open(image_folder):
    with open(image_folder / "texts.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "text", "id"])
        w.writeheader()
        w.writerow({"file": "c.png", "text": "a cherry, red", "id": ""})
        w.writerow({"file": "sub/d.png", "text": "a date", "id": "d1"})
    kb = open_knowledge_base(f"folder:{image_folder}?texts=texts.csv&progress=0")
    assert kb.ids == ["c", "d1"] and kb.texts == ["a cherry, red", "a date"]
    assert kb.skipped == {"image without text": 2}
    np.testing.assert_array_equal(pixels(kb, "d1"), pattern(403))


def test_folder_errors(image_folder):
    with pytest.raises(FileNotFoundError, match="captions.jsonl"):
        read_folder(image_folder, progress=False)
    (image_folder / "bad.jsonl").write_text('{"file": "a.png", "text": "ok"}\n{"file": "b.png"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2.*'text'"):
        read_folder(image_folder, texts="bad.jsonl", progress=False)
    (image_folder / "dup.jsonl").write_text('{"file": "a.png", "text": "x"}\n{"file": "sub/a.png", "text": "y"}\n')
    (image_folder / "sub" / "a.png").write_bytes(encode(pattern(9), "PNG"))
    with pytest.raises(ValueError, match=r"dup\.jsonl.*duplicate id 'a'"):
        read_folder(image_folder, texts="dup.jsonl", progress=False)
