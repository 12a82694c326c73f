"""Calibration measures and temperature scaling (Guo et al. 2017), on numpy arrays of probabilities/logits.

`ece` bins the top-class confidence in equal-width or equal-mass bins; `classwise_ece` averages the
equal-width ECE of every class's probability (Kull et al. 2019). Temperature scaling fits one scalar T
minimising the NLL of softmax(logits / T) on held-out labelled data; it never changes a prediction.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ece", "classwise_ece", "nll", "brier", "reliability", "fit_temperature", "softmax"]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _bin_edges(conf: np.ndarray, bins: int, scheme: str) -> np.ndarray:
    if scheme == "width":
        return np.linspace(0.0, 1.0, bins + 1)
    if scheme == "mass":
        edges = np.quantile(conf, np.linspace(0.0, 1.0, bins + 1))
        edges[0], edges[-1] = 0.0, 1.0
        return edges
    raise ValueError(f"The 'scheme' parameter must be 'width' or 'mass'; got {scheme!r}.")


def reliability(probs: np.ndarray, y: np.ndarray, *, bins: int = 15, scheme: str = "width") -> dict[str, list]:
    """Per bin of top-class confidence: mean confidence, accuracy and count (empty bins left out)."""
    conf = probs.max(1)
    correct = probs.argmax(1) == y
    edges = _bin_edges(conf, bins, scheme)
    which = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, bins - 1)
    out: dict[str, list] = {"confidence": [], "accuracy": [], "count": [], "lower": [], "upper": []}
    for b in range(bins):
        members = which == b
        if not members.any():
            continue
        out["confidence"].append(float(conf[members].mean()))
        out["accuracy"].append(float(correct[members].mean()))
        out["count"].append(int(members.sum()))
        out["lower"].append(float(edges[b]))
        out["upper"].append(float(edges[b + 1]))
    return out


def ece(probs: np.ndarray, y: np.ndarray, *, bins: int = 15, scheme: str = "width") -> float:
    """Expected calibration error of the top-class confidence: sum over bins of |acc - conf| * share."""
    r = reliability(probs, y, bins=bins, scheme=scheme)
    n = max(len(y), 1)
    return float(sum(abs(a - c) * k / n for a, c, k in zip(r["accuracy"], r["confidence"], r["count"])))


def classwise_ece(probs: np.ndarray, y: np.ndarray, *, bins: int = 15) -> float:
    """Mean over classes of the equal-width ECE of p(class) against 1[y == class]."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    total = 0.0
    for c in range(probs.shape[1]):
        p = probs[:, c]
        hit = (y == c).astype(np.float64)
        which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
        for b in range(bins):
            members = which == b
            if members.any():
                total += abs(hit[members].mean() - p[members].mean()) * members.sum() / len(y)
    return float(total / probs.shape[1])


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)).mean())


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((probs - onehot) ** 2).sum(1).mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, *, low: float = 0.05, high: float = 20.0) -> float:
    """T minimising the NLL of softmax(logits / T): golden-section search on log T (the NLL is unimodal
    in log T for fixed logits), to a relative precision of 1e-4. Never 0, never negative."""
    logits = np.asarray(logits, dtype=np.float64)

    def loss(log_t: float) -> float:
        return nll(softmax(logits, float(np.exp(log_t))), y)

    a, b = np.log(low), np.log(high)
    phi = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = loss(c), loss(d)
    while b - a > 1e-4:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = loss(d)
    return float(np.exp((a + b) / 2.0))
