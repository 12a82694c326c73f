"""FGSM (Goodfellow et al. 2015): one gradient step of size eps. Cheap; a first pass for an ensemble."""

from __future__ import annotations

import torch

from ..model import ModelAdapter
from .base import Attack
from .geometry import project
from .losses import LOSSES
from .pgd import ascent_direction

__all__ = ["FGSM"]


class FGSM(Attack):
    name = "fgsm"

    def __init__(self, *, norm: str = "Linf", eps: float, loss: str = "margin"):
        super().__init__(norm=norm, eps=eps)
        if loss not in LOSSES:
            raise ValueError(f"The 'loss' parameter of FGSM must be one of {sorted(LOSSES)}; got {loss!r}.")
        self.loss = loss

    def perturb(self, model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator,
                trace: dict | None = None) -> torch.Tensor:
        loss_fn = LOSSES[self.loss]
        _, grad = model.logits_and_grad(x, lambda z: loss_fn(z, y))
        return project(x + self.eps * ascent_direction(grad, self.norm), x, self.eps, self.norm, model.bounds)
