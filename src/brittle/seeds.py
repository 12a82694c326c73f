"""One seed scheme: every random choice derives its own seed from the run seed and what it is for.

A derived seed depends only on (run seed, purpose), never on what ran before, so a check, a shard or a
subset gives the same result whether it runs first, last, alone, after a resume or on another worker.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["derive_seed", "rng", "seeded_subset"]


def derive_seed(seed: int, *purpose: object) -> int:
    """A 63-bit seed for (run seed, purpose...), e.g. derive_seed(0, "adversarial", "main", 3)."""
    text = ":".join(str(p) for p in (seed, *purpose))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def rng(seed: int, *purpose: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *purpose))


def seeded_subset(n: int, size: int | None, seed: int, *purpose: object) -> np.ndarray:
    """Sorted positions of a random subset of `size` of range(n) (all of them when size is None or >= n)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(rng(seed, "subset", *purpose).choice(n, size=size, replace=False))
