"""Randomized smoothing (Cohen et al. 2019): a certified L2 radius for the Gaussian-smoothed classifier.

g(x) = the class the base model predicts most often under x + N(0, sigma^2 I). `certify` picks the class
from n0 noisy samples, estimates its probability pA from n fresh samples with a one-sided Clopper-Pearson
lower bound at level alpha, and returns radius sigma * Phi^-1(pA_lower) when pA_lower > 1/2, else abstains
(class -1). `predict` returns the top class only when a binomial test says it beats the runner-up at
level alpha. Noise is drawn in batches from a seeded generator; no scipy needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

__all__ = ["SmoothingResult", "certify", "predict", "clopper_pearson_lower", "binomial_tail"]

ABSTAIN = -1


def _log_factorials(n: int) -> np.ndarray:
    """log(m!) for m = 0..n, vectorised (the bisection below asks for them dozens of times per point)."""
    return np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1, dtype=np.float64)))])


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) >= k), from log-pmfs (stable for n in the hundreds of thousands)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    i = np.arange(k, n + 1)
    log_fact = _log_factorials(n)
    logpmf = log_fact[n] - log_fact[i] - log_fact[n - i] + i * math.log(p) + (n - i) * math.log1p(-p)
    top = logpmf.max()
    return float(min(1.0, math.exp(top) * np.exp(logpmf - top).sum()))


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) lower confidence bound on p from k successes in n trials."""
    if k == 0:
        return 0.0
    if k == n:
        return alpha ** (1.0 / n)
    lo, hi = 0.0, k / n
    for _ in range(60):  # bisection: the tail probability grows with p
        mid = (lo + hi) / 2
        if binomial_tail(k, n, mid) > alpha:
            hi = mid
        else:
            lo = mid
    return lo


def _counts(model, x: torch.Tensor, sigma: float, n: int, batch: int, g: torch.Generator, k: int) -> np.ndarray:
    counts = np.zeros(k, dtype=np.int64)
    left = n
    while left > 0:
        m = min(batch, left)
        noise = torch.randn((m, *x.shape), generator=g, device="cpu")  # seeded on the CPU: the same on every device
        noisy = x[None].expand(m, *x.shape) + sigma * noise.to(x.device)
        pred = model.predict(noisy).numpy()
        counts += np.bincount(pred, minlength=k)[:k]
        left -= m
    return counts


@dataclass
class SmoothingResult:
    prediction: np.ndarray  # class, or -1 (abstain)
    radius: np.ndarray  # certified L2 radius (0 when abstaining)
    p_lower: np.ndarray


def certify(model, x: torch.Tensor, *, sigma: float, n0: int = 100, n: int = 10_000, alpha: float = 0.001,
            batch: int = 1000, seed: int = 0, num_classes: int | None = None) -> SmoothingResult:
    """Cohen et al.'s CERTIFY for each input of `x` (a ModelAdapter `model`; noise in input space, not clipped)."""
    if sigma <= 0 or not 0 < alpha < 1 or n0 < 1 or n < 1:
        raise ValueError(f"smoothing needs sigma > 0, 0 < alpha < 1, n0 >= 1, n >= 1; got {sigma}, {alpha}, {n0}, {n}")
    k = num_classes or model.num_classes
    g = torch.Generator().manual_seed(seed)
    preds, radii, lows = [], [], []
    for xi in x:
        guess = int(_counts(model, xi, sigma, n0, batch, g, k).argmax())
        n_a = int(_counts(model, xi, sigma, n, batch, g, k)[guess])
        p = clopper_pearson_lower(n_a, n, alpha)
        lows.append(p)
        if p > 0.5:
            preds.append(guess)
            radii.append(sigma * NormalDist().inv_cdf(p))
        else:
            preds.append(ABSTAIN)
            radii.append(0.0)
    return SmoothingResult(np.array(preds), np.array(radii), np.array(lows))


def predict(model, x: torch.Tensor, *, sigma: float, n: int = 1000, alpha: float = 0.001, batch: int = 1000,
            seed: int = 0, num_classes: int | None = None) -> np.ndarray:
    """Cohen et al.'s PREDICT: the top class when a two-sided binomial test (top vs runner-up) passes, else -1."""
    k = num_classes or model.num_classes
    g = torch.Generator().manual_seed(seed)
    out = []
    for xi in x:
        counts = _counts(model, xi, sigma, n, batch, g, k)
        first, second = np.argsort(counts)[::-1][:2]
        na, nb = int(counts[first]), int(counts[second])
        p_value = min(1.0, 2 * binomial_tail(na, na + nb, 0.5)) if na + nb else 1.0
        out.append(int(first) if p_value <= alpha else ABSTAIN)
    return np.array(out)
