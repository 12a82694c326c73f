"""Per-sample attack losses on logits. Attacks maximise them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["margin", "margin_loss", "ce_loss", "dlr_loss"]


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j: positive while the point is classified correctly."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return true - other.amax(1)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The negative margin (Carlini-Wagner style): unaffected by softmax saturation."""
    return -margin(logits, y)


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020): the margin divided by z_(1) - z_(3), scale-invariant."""
    sorted_logits, _ = logits.sort(dim=1, descending=True)
    scale = (sorted_logits[:, 0] - sorted_logits[:, 2]).clamp_min(1e-12)
    return -margin(logits, y) / scale
