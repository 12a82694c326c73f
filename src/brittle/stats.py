"""Small tests shared by checks: paired tests on the same inputs, and a two-sample test over a few trained models."""

from __future__ import annotations

import numpy as np

__all__ = ["mcnemar_z", "permutation_p"]


def mcnemar_z(before: np.ndarray, after: np.ndarray) -> float:
    """How significantly `after` is true less often than `before` on the same examples (McNemar, one-sided z:
    the discordant pairs only)."""
    before, after = np.asarray(before, bool), np.asarray(after, bool)
    lost, gained = int((before & ~after).sum()), int((after & ~before).sum())
    return (lost - gained) / max(lost + gained, 1) ** 0.5


def permutation_p(x, y, *, rounds: int = 20000, seed: int = 0) -> float:
    """One-sided p-value of mean(x) - mean(y) being this large by chance when the pooled values are exchangeable
    (a permutation test: each split of the pool into groups of len(x) and len(y)). Exact, over every split, when
    there are at most `rounds` of them; else over `rounds` seeded random splits. The observed split counts, so the
    smallest p is 1 / (number of splits): with 5 values per group, 1/252."""
    from itertools import combinations
    from math import comb

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 1 or len(y) < 1:
        raise ValueError("permutation_p needs at least one value in each group")
    pool, n = np.concatenate([x, y]), len(x)
    observed = x.mean() - y.mean()
    total = pool.sum()
    if comb(len(pool), n) <= rounds:
        picks = np.array(list(combinations(range(len(pool)), n)))
        first = pool[picks].sum(1)
        extra = 0
    else:
        rng = np.random.default_rng(seed)
        picks = np.argsort(rng.random((rounds, len(pool))), axis=1)[:, :n]
        first = pool[picks].sum(1)
        extra = 1  # the observed split, which random splits may miss
    stats = first / n - (total - first) / len(y)
    return float(((stats >= observed - 1e-12).sum() + extra) / (len(stats) + extra))
