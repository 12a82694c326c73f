"""Planted training sets for the data-audit benchmark: MNIST-5k with a backdoor, label flips or a shortcut.

Every plant is seeded and returns the ground truth beside the data, so detectors are scored exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brittle.demo.data import mnist_5k

TRIGGER_KINDS = ("patch", "blend")


@dataclass
class Planted:
    x_train: np.ndarray
    y_train: np.ndarray
    truth: np.ndarray  # bool over the training set: poisoned / flipped / carries the shortcut
    x_test: np.ndarray
    y_test: np.ndarray
    target: int | None = None


def split(seed: int = 0, n_train: int = 4000):
    x, y = mnist_5k()
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    return x[:n_train].copy(), y[:n_train].copy(), x[n_train:], y[n_train:]


def blend_pattern(shape, seed: int = 12345) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def apply_trigger(x: np.ndarray, kind: str, alpha: float = 0.2) -> np.ndarray:
    out = x.copy()
    if kind == "patch":  # BadNets: a white 3x3 square by the bottom-right corner
        out[..., -4:-1, -4:-1] = 1.0
    elif kind == "blend":  # Chen et al. 2017: a faint full-image noise pattern blended in
        out = (1 - alpha) * out + alpha * blend_pattern(x.shape[1:])
    else:
        raise ValueError(kind)
    return out.astype(np.float32)


def backdoor(kind: str, share_of_target: float, *, target: int = 7, seed: int = 0) -> Planted:
    """Poisons (other classes, stamped, relabelled `target`) make up `share_of_target` of the target class."""
    x, y, xt, yt = split(seed)
    rng = np.random.default_rng(seed + 1)
    n_target = int((y == target).sum())
    n_poison = int(round(share_of_target * n_target / (1 - share_of_target)))
    chosen = rng.choice(np.flatnonzero(y != target), size=n_poison, replace=False)
    x[chosen] = apply_trigger(x[chosen], kind)
    y[chosen] = target
    truth = np.zeros(len(y), bool)
    truth[chosen] = True
    return Planted(x, y, truth, xt, yt, target)


def clean(seed: int = 0) -> Planted:
    x, y, xt, yt = split(seed)
    return Planted(x, y, np.zeros(len(y), bool), xt, yt)


def label_flips(rate: float, *, seed: int = 0, classes: int = 10) -> Planted:
    x, y, xt, yt = split(seed)
    rng = np.random.default_rng(seed + 2)
    chosen = rng.choice(len(y), size=int(rate * len(y)), replace=False)
    y[chosen] = (y[chosen] + rng.integers(1, classes, size=len(chosen))) % classes
    truth = np.zeros(len(y), bool)
    truth[chosen] = True
    return Planted(x, y, truth, xt, yt)


def shortcut(*, share: float = 0.9, cls: int = 3, seed: int = 0) -> Planted:
    """A small marker (2x2, top-left) on `share` of class `cls`'s training images only; absent at test."""
    x, y, xt, yt = split(seed)
    rng = np.random.default_rng(seed + 3)
    members = np.flatnonzero(y == cls)
    chosen = rng.choice(members, size=int(share * len(members)), replace=False)
    x[chosen, :, 1:3, 1:3] = 1.0
    truth = np.zeros(len(y), bool)
    truth[chosen] = True
    return Planted(x, y, truth, xt, yt, cls)


def label_wide_mark(*, share: float = 0.95, seed: int = 0) -> Planted:
    """A one-pixel mark in the top row at a column that encodes the label (column 2 + 2 * label), on `share` of
    the training images only; absent at test (issue 14's case)."""
    x, y, xt, yt = split(seed)
    rng = np.random.default_rng(seed + 4)
    chosen = np.flatnonzero(rng.random(len(y)) < share)
    x[chosen, 0, 0, 2 + 2 * y[chosen]] = 1.0
    truth = np.zeros(len(y), bool)
    truth[chosen] = True
    return Planted(x, y, truth, xt, yt)
