"""Independent re-verification of adversarial examples: an attack's own bookkeeping is never trusted."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import ModelAdapter
from .geometry import lp_norm

__all__ = ["Verification", "verify", "BALL_TOLERANCE"]

# Relative slack for float round-off in the projection; far below any eps that means something.
BALL_TOLERANCE = 1e-6


@dataclass
class Verification:
    adversarial: torch.Tensor  # bool (N,): inside the ball, inside the bounds and misclassified
    distance: torch.Tensor  # (N,) Lp distance to the clean point
    in_ball: torch.Tensor
    in_bounds: torch.Tensor
    misclassified: torch.Tensor


def verify(model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, *, eps: float,
           norm: str) -> Verification:
    """Check every candidate with a fresh forward pass on the adapter."""
    if x_adv.shape != x.shape:
        raise ValueError(f"an attack returned shape {tuple(x_adv.shape)} for inputs of shape {tuple(x.shape)}")
    low, high = model.bounds
    finite = torch.isfinite(x_adv.flatten(1)).all(1)
    dist = lp_norm(x_adv - x, norm)
    in_ball = finite & (dist <= eps * (1 + BALL_TOLERANCE) + 1e-12)
    in_bounds = finite & (x_adv.flatten(1).amin(1) >= low) & (x_adv.flatten(1).amax(1) <= high)
    pred = model.logits(torch.where(finite.view(-1, *([1] * (x.dim() - 1))), x_adv, x)).argmax(1)
    mis = pred != y
    return Verification(in_ball & in_bounds & mis, dist, in_ball, in_bounds, mis)
