"""Distances between feature sets, and their bootstrap confidence intervals over the generated images.

    Frechet    ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2))  (FID, FD-DINOv2, CLIP-FID: the backend's
               own formula for the point value; ``frechet_distance_scipy`` for the replicates)
    CMMD       1000 * MMD^2 with the Gaussian RBF kernel exp(-||x - y||^2 / (2 sigma^2)), sigma = 10, on unit-norm
               CLIP embeddings (Jayasumana et al. 2024). As in its reference implementation (google-research
               ``cmmd/distance.py``) each of the three kernel means runs over all pairs, the diagonal included.
    KID        the unbiased polynomial-kernel MMD^2 (x.y / d + 1)^3 (``evaluation.metrics.kid_from_files`` for the
               point value, as the libraries compute it on subsets; its interval here is that of the same
               U-statistic on the whole sets)

Bootstrap (``bootstrap_ci``): ``scipy.stats.bootstrap`` draws B resamples of the generated images (the reference
set is held fixed: its statistics are cached and it is not what is being compared); the interval is the
percentile interval of the bootstrap distribution centred on the estimate (see there why). A resample is
given to a statistic as the count c_i of each image in it, so the kernel sums of all B
resamples come from one pass over the kernel matrix (c^T K c, computed block by block, never stored) and a
Frechet replicate from a weighted mean and covariance.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
BLOCK = 2048  # rows per kernel block: memory O(BLOCK^2 + n B)


# ----------------------------------------------------------------------------------------------
# Kernel sums over resamples
# ----------------------------------------------------------------------------------------------
def _rbf(a: np.ndarray, b: np.ndarray, sigma: float) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.exp(-np.maximum(d2, 0.0) / (2.0 * sigma * sigma))


def _poly(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def weighted_kernel_sums(x: np.ndarray, y: np.ndarray, counts: np.ndarray,
                         kernel: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray,
                                                                                          np.ndarray, float]:
    """For counts C (B, n) of x's rows: (c^T K_xx c, c^T K_xy 1, c . diag(K_xx), 1^T K_yy 1), one value per
    resample for the first three; K computed in blocks of ``BLOCK`` rows, in float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    c = np.asarray(counts, np.float64)
    b = c.shape[0]
    xx, xy, diag = np.zeros(b), np.zeros(b), np.zeros(b)
    for i in range(0, len(x), BLOCK):
        xi, ci = x[i:i + BLOCK], c[:, i:i + BLOCK]
        for j in range(0, len(x), BLOCK):
            k = kernel(xi, x[j:j + BLOCK])
            xx += np.einsum("bi,ij,bj->b", ci, k, c[:, j:j + BLOCK], optimize=True)
            if i == j:
                diag += ci @ np.diagonal(k)
        for j in range(0, len(y), BLOCK):
            xy += ci @ kernel(xi, y[j:j + BLOCK]).sum(1)
    yy = sum(float(kernel(y[i:i + BLOCK], y[j:j + BLOCK]).sum())
             for i in range(0, len(y), BLOCK) for j in range(0, len(y), BLOCK))
    return xx, xy, diag, yy


def cmmd_from_counts(x: np.ndarray, y: np.ndarray, counts: np.ndarray, sigma: float = CMMD_SIGMA,
                     scale: float = CMMD_SCALE) -> np.ndarray:
    """CMMD of each resample of x (rows of ``counts``) against y; x and y already unit-norm."""
    xx, xy, _, yy = weighted_kernel_sums(x, y, counts, lambda a, b: _rbf(a, b, sigma))
    n, m = np.asarray(counts).sum(1), len(y)
    return scale * (xx / n ** 2 + yy / m ** 2 - 2.0 * xy / (n * m))


def cmmd(x: np.ndarray, y: np.ndarray, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> float:
    """CMMD of generated embeddings x against reference embeddings y (both normalised here)."""
    x, y = unit_norm(x), unit_norm(y)
    return float(cmmd_from_counts(x, y, np.ones((1, len(x))), sigma, scale)[0])


def kid_full_from_counts(x: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The unbiased polynomial-kernel MMD^2 of each resample of x against y, on the whole sets: pairs of distinct
    draws (a resample's draws of one image form pairs too) and distinct reference rows."""
    xx, xy, diag, yy = weighted_kernel_sums(x, y, counts, _poly)
    y64 = np.asarray(y, np.float64)
    yy_diag = float((((y64 * y64).sum(1) / y64.shape[1] + 1.0) ** 3).sum())
    n, m = np.asarray(counts).sum(1), len(y)
    return (xx - diag) / (n * (n - 1)) + (yy - yy_diag) / (m * (m - 1)) - 2.0 * xy / (n * m)


def unit_norm(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------------------------
# Frechet distance of a resample
# ----------------------------------------------------------------------------------------------
def weighted_stats(x: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (n - 1 normalised, as np.cov) of the multiset with ``counts`` copies of each row."""
    c = np.asarray(counts, np.float64)
    n = c.sum()
    x = np.asarray(x, np.float64)
    mu = c @ x / n
    xc = x - mu
    return mu, (xc * c[:, None]).T @ xc / (n - 1)


def frechet_from_counts(x: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray, counts: np.ndarray) -> np.ndarray:
    from .metrics import frechet_distance_scipy

    out = []
    for c in np.atleast_2d(counts):
        mu, sigma = weighted_stats(x, c)
        out.append(frechet_distance_scipy(mu, sigma, mu_ref, sigma_ref))
    return np.array(out)


# ----------------------------------------------------------------------------------------------
# The bootstrap
# ----------------------------------------------------------------------------------------------
def bootstrap_ci(n: int, statistic: Callable[[np.ndarray], np.ndarray], resamples: int = 100, seed: int = 0,
                 level: float = 0.95, batch: int = 25) -> tuple[float, float]:
    """A ``level`` interval of ``statistic`` from ``resamples`` bootstrap resamples of n items, drawn by
    ``scipy.stats.bootstrap``; ``statistic`` takes counts (B, n) and returns (B,) values.

    Centred percentile interval: theta_hat + (quantiles of theta* - mean of theta*). A resample repeats images,
    which by itself raises FID and CMMD (fewer distinct images: a narrower covariance, larger kernel means), so
    the plain percentile interval of theta* can lie wholly above theta_hat; centring keeps the spread of the
    bootstrap distribution and removes that shift. (BCa would need n jackknife evaluations of the metric.)"""
    from scipy.stats import bootstrap

    if resamples < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 resamples, got {resamples}")

    def stat(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.atleast_2d(np.asarray(idx, np.int64))
        counts = np.zeros((idx.shape[0], n))
        for row, ix in zip(counts, idx):
            np.add.at(row, ix, 1.0)
        return statistic(counts)

    res = bootstrap((np.arange(n),), stat, n_resamples=resamples, vectorized=True, batch=batch,
                    confidence_level=level, method="percentile", random_state=np.random.default_rng(seed))
    boot = np.asarray(res.bootstrap_distribution, np.float64)
    theta = float(statistic(np.ones((1, n)))[0])
    a = (1 - level) / 2
    lo, hi = np.quantile(boot, [a, 1 - a]) - boot.mean()
    return theta + float(lo), theta + float(hi)


__all__ = ["CMMD_SIGMA", "CMMD_SCALE", "cmmd", "cmmd_from_counts", "kid_full_from_counts", "unit_norm",
           "weighted_stats", "frechet_from_counts", "bootstrap_ci", "weighted_kernel_sums"]
