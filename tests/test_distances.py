"""evaluation.distances: CMMD, KID and Frechet distances of bootstrap resamples, each against a direct computation
on the resampled rows, and the bootstrap interval."""

import numpy as np
import pytest
import torch

from evaluation.distances import (bootstrap_ci, cmmd, cmmd_from_counts, frechet_from_counts, kid_full_from_counts,
                                  unit_norm, weighted_stats)
from evaluation.metrics import frechet_distance_scipy


def _sets(n=60, m=50, d=8, shift=0.3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) + shift, rng.normal(size=(m, d))


def _direct_cmmd(x, y, sigma=10.0):
    """The reference implementation's formula, written out in numpy on the given rows."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)

    def k(a, b):
        return np.exp(-((a[:, None, :] - b[None, :, :]) ** 2).sum(-1) / (2 * sigma ** 2))

    return 1000 * (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def _counts(idx, n):
    return np.bincount(idx, minlength=n)[None].astype(float)


def test_cmmd_equals_a_direct_numpy_mmd_and_grows_with_the_shift():
    x, y = _sets()
    assert cmmd(x, y) == pytest.approx(_direct_cmmd(x, y), rel=1e-9)
    far, _ = _sets(shift=1.5)
    assert cmmd(far, y) > cmmd(x, y) > 0


def test_a_resample_as_counts_equals_the_resampled_rows():
    x, y = _sets()
    idx = np.random.default_rng(1).integers(0, len(x), len(x))
    c = _counts(idx, len(x))
    got = cmmd_from_counts(unit_norm(x), unit_norm(y), c)[0]
    assert got == pytest.approx(_direct_cmmd(x[idx], y), rel=1e-9)
    mu, sigma = weighted_stats(x, c[0])
    np.testing.assert_allclose(mu, x[idx].mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x[idx], rowvar=False), rtol=1e-10, atol=1e-12)
    ref_mu, ref_sigma = y.mean(0), np.cov(y, rowvar=False)
    assert frechet_from_counts(x, ref_mu, ref_sigma, c)[0] == pytest.approx(
        frechet_distance_scipy(x[idx].mean(0), np.cov(x[idx], rowvar=False), ref_mu, ref_sigma), rel=1e-8)


def test_kid_on_whole_sets_equals_torch_fidelity_and_the_u_statistic_of_a_resample():
    from reimagen.utils.compat import patch_torchvision_if_broken

    patch_torchvision_if_broken()
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    x, y = _sets(n=50, m=50)
    ones = np.ones((1, len(x)))
    lib = kid_features_to_metric(torch.from_numpy(y), torch.from_numpy(x), kid_subsets=1, kid_subset_size=50,
                                 verbose=False)[KEY_METRIC_KID_MEAN]
    assert kid_full_from_counts(x, y, ones)[0] == pytest.approx(float(lib), rel=1e-6)
    idx = np.random.default_rng(2).integers(0, len(x), len(x))
    xr = x[idx]
    k = (xr @ xr.T / x.shape[1] + 1) ** 3
    kyy = (y @ y.T / x.shape[1] + 1) ** 3
    n, m = len(xr), len(y)
    u = ((k.sum() - np.trace(k)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
         - 2 * ((xr @ y.T / x.shape[1] + 1) ** 3).mean())
    assert kid_full_from_counts(x, y, _counts(idx, n))[0] == pytest.approx(u, rel=1e-9)


def test_the_bootstrap_interval_holds_the_estimate_shrinks_with_n_and_repeats_with_the_seed():
    x, y = _sets(n=40)
    xs, ys = unit_norm(x), unit_norm(y)
    stat = lambda c: cmmd_from_counts(xs, ys, c)  # noqa: E731
    lo, hi = bootstrap_ci(len(x), stat, resamples=60, seed=0)
    assert lo < cmmd(x, y) < hi
    assert (lo, hi) == bootstrap_ci(len(x), stat, resamples=60, seed=0)
    big, _ = _sets(n=400, seed=3)
    bs = unit_norm(big)
    lo2, hi2 = bootstrap_ci(len(big), lambda c: cmmd_from_counts(bs, ys, c), resamples=60, seed=0)
    assert hi2 - lo2 < hi - lo
    with pytest.raises(ValueError, match="at least 2 resamples"):
        bootstrap_ci(10, stat, resamples=1)
