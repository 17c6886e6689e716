"""Agreement and correlation statistics of the ratings, from the libraries made for them, each with a 95% interval.

    Fleiss' kappa         ``statsmodels.stats.inter_rater.fleiss_kappa`` on the tasks x {1, 0} count table of the
                          tasks rated by the most common number m >= 2 of raters
    Krippendorff's alpha  ``krippendorff.alpha`` (nominal) on the raters x tasks matrix (missing ratings allowed)
    Pearson r             ``scipy.stats.pearsonr`` and its Fisher-z interval (``.confidence_interval()``)
    Spearman rho,         ``scipy.stats.spearmanr`` / ``kendalltau``, intervals from ``scipy.stats.bootstrap``
    Kendall tau           over the (rating, score) pairs

Agreement intervals come from ``scipy.stats.bootstrap`` over tasks (percentile, 1,000 resamples, seed 0). The
libraries are imported when a statistic is asked for: ``human_eval`` loads without them.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Sequence

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def _bootstrap(n: int, stat: Callable[[np.ndarray], float], resamples: int = RESAMPLES,
               seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile interval of ``stat(indices)`` over resamples of n items (NaN replicates, e.g. a resample with one
    category only, are left out)."""
    if n < 3:
        return None, None
    import warnings

    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():  # a resample with a constant side: NaN, left out below
        warnings.simplefilter("ignore")
        vals = np.array([stat(rng.integers(0, n, n)) for _ in range(resamples)], dtype=float)
    vals = vals[np.isfinite(vals)]
    if len(vals) < resamples // 2:
        return None, None
    lo, hi = np.quantile(vals, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------- agreement

def fleiss_kappa(table: Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa of an items x categories count table (rows sum to the same m >= 2); None when undefined
    (every rating in one category)."""
    from statsmodels.stats.inter_rater import fleiss_kappa as fk

    t = np.asarray(table, dtype=float)
    t = t[t.sum(1) > 0]
    if len(t) == 0:
        return None
    if t.sum(1).min() < 2 or len(set(t.sum(1))) > 1:
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings for every item")
    p = t.sum(0) / t.sum()
    if np.isclose((p * p).sum(), 1.0):
        return None
    return float(fk(t, method="fleiss"))


def krippendorff_alpha(matrix: np.ndarray) -> float | None:
    """Nominal Krippendorff's alpha of a raters x units matrix (NaN = not rated); None when undefined."""
    import krippendorff

    m = np.asarray(matrix, dtype=float)
    pairable = (np.isfinite(m).sum(0) >= 2)
    m = m[:, pairable]
    if m.shape[1] == 0 or len(set(m[np.isfinite(m)].tolist())) < 2:
        return None
    return float(krippendorff.alpha(reliability_data=m, level_of_measurement="nominal"))


def units_matrix(units: Sequence[Sequence[Any]]) -> np.ndarray:
    """A raters x units matrix from per-unit value lists (the k-th value of a unit in row k)."""
    width = max((len(u) for u in units), default=0)
    m = np.full((width, len(units)), np.nan)
    for j, u in enumerate(units):
        m[:len(u), j] = u
    return m


def agreement_stats(by_task: dict[str, list[dict]], criterion: str) -> dict[str, Any]:
    """Fleiss' kappa, Krippendorff's alpha (each with a 95% bootstrap interval over tasks) and the unanimous fraction
    of one criterion over the tasks with 2+ raters."""
    multi = {tid: rs for tid, rs in by_task.items() if len(rs) >= 2}
    raters = sorted({r["rater"] for rs in multi.values() for r in rs})
    tids = sorted(multi)
    matrix = np.full((len(raters), len(tids)), np.nan)
    for j, tid in enumerate(tids):
        for r in multi[tid]:
            matrix[raters.index(r["rater"]), j] = r[criterion]
    sizes = Counter(len(rs) for rs in multi.values())
    m = sizes.most_common(1)[0][0] if sizes else None
    fl = [j for j, tid in enumerate(tids) if len(multi[tid]) == m]
    table = np.array([[np.nansum(matrix[:, j] == 1), np.nansum(matrix[:, j] == 0)] for j in fl]).reshape(-1, 2)

    def kappa_of(idx: np.ndarray) -> float:
        v = fleiss_kappa(table[idx])
        return math.nan if v is None else v

    def alpha_of(idx: np.ndarray) -> float:
        v = krippendorff_alpha(matrix[:, idx])
        return math.nan if v is None else v

    kappa = fleiss_kappa(table) if len(fl) else None
    alpha = krippendorff_alpha(matrix) if len(tids) else None
    k_lo, k_hi = _bootstrap(len(fl), kappa_of) if kappa is not None else (None, None)
    a_lo, a_hi = _bootstrap(len(tids), alpha_of) if alpha is not None else (None, None)
    unanimous = [len({r[criterion] for r in multi[t]}) == 1 for t in tids]
    return {"criterion": criterion, "tasks_with_2plus_raters": len(tids), "fleiss_kappa": kappa,
            "fleiss_kappa_lo": k_lo, "fleiss_kappa_hi": k_hi, "fleiss_raters_per_task": m, "fleiss_tasks": len(fl),
            "krippendorff_alpha": alpha, "krippendorff_alpha_lo": a_lo, "krippendorff_alpha_hi": a_hi,
            "unanimous_fraction": (sum(unanimous) / len(unanimous)) if unanimous else None}


# ---------------------------------------------------------------------------------------------- correlation

def correlations(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """Pearson, Spearman and Kendall correlation of ratings x with scores y, each with a 95% interval (None when
    fewer than 3 pairs or a constant side)."""
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    out: dict[str, Any] = {"n": int(len(x))}
    keys = ("pearson_r", "pearson_p", "pearson_lo", "pearson_hi", "spearman_rho", "spearman_lo", "spearman_hi",
            "kendall_tau", "kendall_lo", "kendall_hi")
    out.update(dict.fromkeys(keys))
    if len(x) < 3 or len(set(x.tolist())) < 2 or len(set(y.tolist())) < 2:
        return out
    pr = stats.pearsonr(x, y)
    ci = pr.confidence_interval(LEVEL)
    out.update(pearson_r=float(pr.statistic), pearson_p=float(pr.pvalue), pearson_lo=float(ci.low),
               pearson_hi=float(ci.high))
    for name, fn in (("spearman", lambda a, b: stats.spearmanr(a, b).statistic),
                     ("kendall", lambda a, b: stats.kendalltau(a, b).statistic)):
        value = float(fn(x, y))
        lo, hi = _bootstrap(len(x), lambda idx, fn=fn: float(fn(x[idx], y[idx])))
        out.update({f"{name}_{'rho' if name == 'spearman' else 'tau'}": value, f"{name}_lo": lo, f"{name}_hi": hi})
    return out


__all__ = ["fleiss_kappa", "krippendorff_alpha", "units_matrix", "agreement_stats", "correlations"]
