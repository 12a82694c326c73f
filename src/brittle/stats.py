"""Small paired tests shared by checks that compare predictions on the same inputs."""

from __future__ import annotations

import numpy as np

__all__ = ["mcnemar_z"]


def mcnemar_z(before: np.ndarray, after: np.ndarray) -> float:
    """How significantly `after` is true less often than `before` on the same examples (McNemar, one-sided z:
    the discordant pairs only)."""
    before, after = np.asarray(before, bool), np.asarray(after, bool)
    lost, gained = int((before & ~after).sum()), int((after & ~before).sum())
    return (lost - gained) / max(lost + gained, 1) ** 0.5
