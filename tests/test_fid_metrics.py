"""FID / KID machinery (evaluation/metrics.py, backends.py, features.py, protocol.py): the two backends agree
on the same statistics, the statistic is the textbook one, our streamed extraction gives what the libraries'
own one-shot calls give, extraction resumes exactly, reference statistics are cached under a full key in a
user folder, and missing Inception weights produce an error that says what to download and where to put it."""

from __future__ import annotations

import os
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from evaluation import backends as bk
from evaluation import features as fx
from evaluation import metrics as mt
from evaluation.protocol import center_crop_resize, center_crop_resize_array, draw_prompts

EXTRACTOR = fx.resolve_extractor("random-conv-16")


def _gaussian_features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return (rng.normal(size=(n, d)) @ a + shift).astype(np.float32)


def _images(folder, n: int, seed: int, tint: int = 0) -> list[str]:
    """n small non-square images with per-image colour blobs (varied sizes, so the protocol crop matters)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(30, 60)), int(rng.integers(30, 60))
        arr = np.empty((h, w, 3), np.uint8)
        arr[:] = rng.integers(0, 200, 3) + tint
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        arr[y:y + h // 3, x:x + w // 3] = rng.integers(0, 256, 3)
        p = folder / f"{i:03d}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    return paths


def _scipy_fid(mu1, s1, mu2, s2) -> float:
    """Written out here, independent of evaluation.metrics: ||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)."""
    covmean = np.real(linalg.sqrtm(s1 @ s2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------
# The statistic
# ----------------------------------------------------------------------------------------------
def test_both_backends_give_the_same_fid_on_the_same_statistics_and_it_is_the_scipy_value():
    f1, f2 = _gaussian_features(400, 16, 0), _gaussian_features(300, 16, 1, shift=0.3)
    mu1, s1 = f1.mean(0, dtype=np.float64), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0, dtype=np.float64), np.cov(f2, rowvar=False)
    clean = bk.make_backend("clean-fid", EXTRACTOR).frechet(mu1, s1, mu2, s2)
    fidelity = bk.make_backend("torch-fidelity", EXTRACTOR).frechet(mu1, s1, mu2, s2)
    direct = _scipy_fid(mu1, s1, mu2, s2)
    assert direct > 1.0  # the two sets really differ
    assert clean == pytest.approx(direct, rel=1e-9)
    assert fidelity == pytest.approx(direct, rel=1e-9)
    assert mt.frechet_distance_scipy(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-12)
    assert bk.make_backend("clean-fid", EXTRACTOR).frechet(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)


def test_streamed_statistics_equal_numpy_mean_and_cov_even_far_from_the_origin(tmp_path):
    f = _gaussian_features(1000, 24, 2, shift=1000.0)  # large mean: naive sums would cancel catastrophically
    path = tmp_path / "f.npy"
    np.save(path, f)
    mu, sigma, n = mt.feature_stats(path, chunk=77)
    x = f.astype(np.float64)
    assert n == 1000
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(mt.read_rows(path, [5, 999, 0]), f[[5, 999, 0]])


def test_kid_is_the_same_for_both_backends_and_is_the_unbiased_polynomial_mmd(tmp_path):
    ref, gen = _gaussian_features(300, 8, 3), _gaussian_features(200, 8, 4, shift=0.5)
    np.save(tmp_path / "ref.npy", ref)
    np.save(tmp_path / "gen.npy", gen)
    got = {name: mt.kid_from_files(bk.make_backend(name, EXTRACTOR), tmp_path / "ref.npy", tmp_path / "gen.npy",
                                   subsets=5, subset_size=50, seed=7) for name in bk.BACKENDS}
    assert got["clean-fid"][2] == 50
    assert got["clean-fid"][0] == pytest.approx(got["torch-fidelity"][0], rel=1e-9)

    def mmd(x, y):  # unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, in float64
        x, y = x.astype(np.float64), y.astype(np.float64)
        m, d = len(x), x.shape[1]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        return ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()

    rng = np.random.default_rng(7)
    direct = []
    for _ in range(5):
        ri, gi = np.sort(rng.choice(300, 50, replace=False)), np.sort(rng.choice(200, 50, replace=False))
        direct.append(mmd(ref[ri], gen[gi]))
    assert got["clean-fid"][0] == pytest.approx(np.mean(direct), rel=1e-9)
    assert got["clean-fid"][0] > 0.01


# ----------------------------------------------------------------------------------------------
# Our streamed extraction = the libraries' own calls
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    return _images(root / "ref", 24, 0), _images(root / "gen", 20, 1, tint=40), root


def test_clean_fid_path_equals_cleanfid_compute_fid(two_folders, tmp_path):
    from cleanfid import fid as cfid

    from evaluation._cleanfid_data import ProtocolTransform

    ref, gen, root = two_folders
    b = bk.make_backend("clean-fid", EXTRACTOR, resolution=48).load()
    s_ref = mt.stats_for(b, ref, tmp_path / "ref", "r", batch_size=8)  # clean-fid's batches below
    s_gen = mt.stats_for(b, gen, tmp_path / "gen", "g", batch_size=8)
    ours = b.frechet(s_gen.mu, s_gen.sigma, s_ref.mu, s_ref.sigma)
    theirs = cfid.compute_fid(str(root / "gen"), str(root / "ref"), mode="clean", device=torch.device("cpu"),
                              num_workers=0, batch_size=8, verbose=False, custom_feat_extractor=b.feat_model(),
                              custom_image_tranform=ProtocolTransform(48))
    assert ours > 1e-3
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_torch_fidelity_path_equals_calculate_metrics(two_folders, tmp_path):
    import torch_fidelity

    ref, gen, _ = two_folders
    ref = ref[:20]  # equal sizes: KID over one subset of all rows does not depend on the subset draw
    b = bk.make_backend("torch-fidelity", EXTRACTOR, resolution=48).load()
    # the batches torch-fidelity forms below (8): the same kernel calls give the same features, so the comparison
    # is of the metric code; with other batches KID (a small difference of large kernel sums) amplifies the
    # float32 rounding of the features to ~2e-4 relative on some CPUs
    s_ref = mt.stats_for(b, ref, tmp_path / "ref", "r", batch_size=8)
    s_gen = mt.stats_for(b, gen, tmp_path / "gen", "g", batch_size=8)
    ours = b.frechet(s_gen.mu, s_gen.sigma, s_ref.mu, s_ref.sigma)
    kid, _, m = mt.kid_from_files(b, s_ref.features, s_gen.features, subsets=1, subset_size=20)
    theirs = torch_fidelity.calculate_metrics(input1=b.dataset(gen), input2=b.dataset(ref), fid=True, kid=True,
                                              kid_subsets=1, kid_subset_size=20, batch_size=8, cache=False,
                                              save_cpu_ram=True, **b.fidelity_kwargs())
    assert m == 20 and ours > 1e-3
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    # torch-fidelity computes KID in float32: a difference of kernel means of size |k| ~ 2 (here), so its own
    # rounding is ~eps32 * |k| in absolute terms (seen: 4.8e-7, 2e-4 relative, on an AMD EPYC; this bar was
    # 1e-4 relative before that machine). A wrong estimator (biased MMD, other rows) is off by ~|k| / m = 0.1.
    f_ref, f_gen = (mt.read_rows(f, range(20)).astype(np.float64) for f in (s_ref.features, s_gen.features))
    k_scale = float(np.abs((f_ref @ f_gen.T / f_ref.shape[1] + 1) ** 3).mean())
    assert kid == pytest.approx(theirs["kernel_inception_distance_mean"], abs=16 * float(np.finfo(np.float32).eps) * k_scale)


def test_interrupted_feature_extraction_resumes_to_identical_features(two_folders, tmp_path):
    ref, _, _ = two_folders
    b = bk.make_backend("clean-fid", EXTRACTOR, resolution=48).load()
    full = mt.extract_features(b, ref, tmp_path / "full.npy", fingerprint="x", batch_size=4)

    class Killed(Exception):
        pass

    real = b.extract
    calls = {"n": 0}

    def dying(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return real(batch)

    b.extract = dying
    with pytest.raises(Killed):
        mt.extract_features(b, ref, tmp_path / "resumed.npy", fingerprint="x", batch_size=4)
    assert (tmp_path / "resumed.npy.partial").is_file() and not (tmp_path / "resumed.npy").exists()
    b.extract = real
    seen = []
    b.extract = lambda batch: seen.append(len(batch)) or real(batch)
    resumed = mt.extract_features(b, ref, tmp_path / "resumed.npy", fingerprint="x", batch_size=4)
    assert sum(seen) == len(ref) - 8  # the two finished batches were not redone
    np.testing.assert_array_equal(np.load(resumed), np.load(full))


def test_reference_statistics_are_cached_in_a_user_folder_under_a_full_key(two_folders, tmp_path, monkeypatch):
    ref, _, _ = two_folders
    monkeypatch.setenv("REIMAGEN_CACHE", str(tmp_path / "cache"))
    b = bk.make_backend("clean-fid", EXTRACTOR, resolution=48).load()
    s1 = mt.reference_stats(b, "coco", "val2014", ref, batch_size=8)
    assert s1.folder.parent == tmp_path / "cache" / "fid_stats"
    key = s1.folder.name
    for part in ("coco-val2014", "clean-fid-clean", "random-conv", "48px", f"n{len(ref)}"):
        assert part in key
    b.extract = lambda batch: pytest.fail("the cached statistics should have been reused")
    s2 = mt.reference_stats(b, "coco", "val2014", ref, batch_size=8)
    np.testing.assert_array_equal(s1.sigma, s2.sigma)
    other = bk.make_backend("torch-fidelity", EXTRACTOR, resolution=48)
    assert mt.reference_key("coco", "val2014", other.key(), 48, len(ref), "f") != key
    site = os.path.dirname(os.path.dirname(np.__file__))
    with pytest.raises(ValueError, match="site-packages|dist-packages"):
        mt.stats_cache_dir(os.path.join(site, "cleanfid", "stats"))


# ----------------------------------------------------------------------------------------------
# Protocol, extractors, weights
# ----------------------------------------------------------------------------------------------
def test_protocol_center_crops_then_resizes_with_pil_bicubic_and_keeps_right_sized_images():
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, 10:50] = 200  # the center 40x40 square is all 200, the side strips 0
    out = center_crop_resize(Image.fromarray(arr), 20)
    assert out.size == (20, 20) and np.asarray(out).min() == 200
    expected = np.asarray(Image.fromarray(arr[:, 10:50]).resize((20, 20), Image.BICUBIC))
    np.testing.assert_array_equal(center_crop_resize_array(arr, 20), expected)
    same = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert center_crop_resize_array(same, 32) is same


def test_prompts_are_a_seeded_draw_without_replacement():
    ids, texts = [f"p{i}" for i in range(50)], [f"text {i}" for i in range(50)]
    a, b, c = draw_prompts(ids, texts, 10, 0), draw_prompts(ids, texts, 10, 0), draw_prompts(ids, texts, 10, 1)
    assert a == b and a != c and len({p.prompt_id for p in a}) == 10
    with pytest.raises(ValueError, match="fewer than the 51 prompts"):
        draw_prompts(ids, texts, 51, 0)


def test_random_conv_extractor_maps_299_images_to_fixed_features():
    x = torch.rand(2, 3, 299, 299) * 255
    a, b = fx.resolve_extractor("random-conv-16").build(), fx.resolve_extractor("random-conv-16").build()
    assert a(x).shape == (2, 16) and torch.equal(a(x), b(x))
    assert not torch.equal(a(x), fx.resolve_extractor("random-conv-16-seed1").build()(x))
    with pytest.raises(ValueError, match="unknown feature extractor"):
        fx.resolve_extractor("vgg-nonsense")
    for name in ("inception", "random-conv-8", *fx.ALIASES):  # built-in names cannot be taken by a plugin
        with pytest.raises(ValueError, match="reserved"):
            fx.register_feature_extractor(name, lambda: fx.random_conv(8))


@pytest.mark.parametrize("backend, weights", [("clean-fid", fx.CLEANFID_WEIGHTS),
                                              ("torch-fidelity", fx.FIDELITY_WEIGHTS)])
def test_missing_inception_weights_say_what_to_download_and_where_to_put_it(backend, weights, tmp_path, monkeypatch):
    monkeypatch.setenv("REIMAGEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fx, "library_weights_path", lambda w: tmp_path / "lib" / w.file)

    def offline(w):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(fx, "_download_with_library", offline)
    with pytest.raises(RuntimeError) as err:
        bk.make_backend(backend, fx.INCEPTION).load()
    msg = str(err.value)
    ours = str(tmp_path / "cache" / "weights" / weights.file)
    for needle in (weights.file, weights.url, "--inception-weights", ours):
        assert needle in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bk.make_backend(backend, fx.INCEPTION, inception_weights=tmp_path / "nope.pt").load()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(RuntimeError, match="cannot load"):
        bk.make_backend(backend, fx.INCEPTION, inception_weights=junk).load()
    # a file in our cache folder is found without --inception-weights (and without any download)
    (tmp_path / "cache" / "weights").mkdir(parents=True)
    junk.rename(tmp_path / "cache" / "weights" / weights.file)
    assert fx.resolve_inception_weights(weights) == tmp_path / "cache" / "weights" / weights.file


def test_clip_score_is_the_mean_clipped_cosine_times_100(tmp_path):
    import json

    from reimagen.retrieval.clip import ClipEncoder

    cfg = tmp_path / "tiny-clip-fid.json"
    cfg.write_text(json.dumps({"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
                                                                "patch_size": 8, "head_width": 16},
                               "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                                            "layers": 1}}))
    enc = ClipEncoder(str(cfg), None)
    paths = _images(tmp_path / "ims", 3, 5)
    texts = ["a red square", "a blue blob", "a green thing"]
    score = mt.clip_score(enc, paths, texts, resolution=32, batch_size=2)
    img = enc.encode_images([center_crop_resize(Image.open(p), 32) for p in paths])
    manual = 100 * np.maximum((img * enc.encode_texts(texts)).sum(1), 0).mean()
    assert 0 <= score <= 100 and score == pytest.approx(manual, rel=1e-5)
