"""Projected gradient descent (Madry et al. 2018) with random restarts and the margin loss."""

from __future__ import annotations

from typing import Callable

import torch

from ..model import ModelAdapter
from .base import Attack
from .geometry import project, random_start
from .losses import LOSSES, margin

__all__ = ["PGD", "ascent_direction"]


class PGD(Attack):
    """PGD with `restarts` runs (the first from the clean point, the rest from random starts).

    Every iterate whose forward pass already shows a misclassification is kept, so the result is the
    first adversarial point found or, failing that, the iterate with the lowest margin. Points stop being
    attacked once broken.
    """

    name = "pgd"

    def __init__(self, *, norm: str = "Linf", eps: float, steps: int = 50, restarts: int = 1,
                 step_size: float | None = None,
                 loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "margin"):
        super().__init__(norm=norm, eps=eps)
        if steps < 1 or restarts < 1:
            raise ValueError(f"PGD needs steps >= 1 and restarts >= 1; got steps={steps}, restarts={restarts}.")
        if isinstance(loss, str) and loss not in LOSSES or not (isinstance(loss, str) or callable(loss)):
            raise ValueError(f"The 'loss' parameter of PGD must be one of {sorted(LOSSES)} or a function (logits, "
                             f"labels) -> per-sample loss; got {loss!r}.")
        self.steps, self.restarts = int(steps), int(restarts)
        self.loss = LOSSES[loss] if isinstance(loss, str) else loss
        # Madry et al.'s 2.5 * eps / steps lets a run cross the ball from one side to the other.
        self.step_size = float(step_size) if step_size else 2.5 * self.eps / self.steps

    def perturb(self, model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, *,
                generator: torch.Generator, trace: dict | None = None) -> torch.Tensor:
        best = x.clone()
        best_margin = torch.full((len(x),), float("inf"), device=x.device)
        open_ = torch.ones(len(x), dtype=torch.bool, device=x.device)
        for restart in range(self.restarts):
            idx = open_.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            x0, y0 = x[idx], y[idx]
            xa = x0.clone() if restart == 0 else random_start(x0, self.eps, self.norm, model.bounds, generator)
            for step in range(self.steps + 1):
                logits, grad = model.logits_and_grad(xa, lambda z: self.loss(z, y0))
                m = margin(logits, y0)
                improved = m < best_margin[idx]
                best[idx[improved]] = xa[improved]
                best_margin[idx[improved]] = m[improved]
                broken = m < 0
                if step == self.steps or bool(broken.all()):
                    break
                # Drop broken points from the batch: their best iterate is already kept.
                if bool(broken.any()):
                    keep = ~broken
                    idx, xa, x0, y0, grad = idx[keep], xa[keep], x0[keep], y0[keep], grad[keep]
                xa = project(xa + self.step_size * ascent_direction(grad, self.norm), x0, self.eps, self.norm,
                             model.bounds)
            open_ = best_margin >= 0
        return best


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "Linf":
        return grad.sign()
    n = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
    return grad / n
