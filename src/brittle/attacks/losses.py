"""Per-sample attack losses on logits. Attacks maximise them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["margin", "margin_loss", "ce_loss", "dlr_loss", "dlr_targeted_loss", "LOSSES"]


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
    """Difference of logits ratio (Croce & Hein 2020): the margin divided by z_(1) - z_(3), scale-invariant.

    With two classes z_(3) does not exist and the ratio would be +-1 with no gradient: the margin is used.
    """
    if logits.shape[1] < 3:
        return margin_loss(logits, y)
    sorted_logits, _ = logits.sort(dim=1, descending=True)
    scale = (sorted_logits[:, 0] - sorted_logits[:, 2]).clamp_min(1e-12)
    return -margin(logits, y) / scale


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: pushes the target's logit above the true one, scaled by z_(1) - (z_(3) + z_(4)) / 2.

    With three classes the scale is z_(1) - z_(3); with two, 1 (the plain targeted margin).
    """
    sorted_logits, _ = logits.sort(dim=1, descending=True)
    c = logits.shape[1]
    if c >= 4:
        scale = sorted_logits[:, 0] - 0.5 * (sorted_logits[:, 2] + sorted_logits[:, 3])
    elif c == 3:
        scale = sorted_logits[:, 0] - sorted_logits[:, 2]
    else:
        scale = torch.ones(len(logits), device=logits.device)
    gap = logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, target[:, None]).squeeze(1)
    return -gap / scale.clamp_min(1e-12)


LOSSES = {"margin": margin_loss, "ce": ce_loss, "dlr": dlr_loss}
