"""Fast Minimum-Norm attack (Pintor et al. 2021): each point's distance to the decision boundary.

The radius eps_k adapts per sample: it shrinks by (1 - gamma_k) around an adversarial iterate, grows by
(1 + gamma_k) when one was found before but the iterate is clean, and before any success jumps to the
linear estimate of the boundary distance, ||d|| + margin / ||grad||_q. A gradient step on the margin is
followed by projection onto the eps_k-ball and the bounds. A final bisection along the best perturbation
sharpens the distance (exact for a linear model). gamma_k and the step decay with a cosine schedule.
"""

from __future__ import annotations

import math

import torch

from ..model import ModelAdapter
from .base import Attack
from .geometry import dual_norm_order, lp_norm, project
from .losses import margin
from .pgd import ascent_direction

__all__ = ["FMN"]


class FMN(Attack):
    """Minimum-norm attack. `eps` caps the search radius; `distances(...)` returns per-point distances."""

    name = "fmn"
    minimum_norm = True

    def __init__(self, *, norm: str = "Linf", eps: float = float("inf"), steps: int = 100, gamma: float = 0.05,
                 bisection_steps: int = 12, n_targets: int = 0):
        super().__init__(norm=norm, eps=eps if math.isfinite(eps) else 1e12)
        if steps < 1 or n_targets < 0:
            raise ValueError(f"FMN needs steps >= 1 and n_targets >= 0; got {steps}, {n_targets}.")
        self.steps, self.gamma, self.bisection_steps = int(steps), float(gamma), int(bisection_steps)
        # 0: untargeted (the nearest class by the current margin); k: also the k highest other classes in turn,
        # which finds the nearest boundary when the untargeted descent settles on a farther one.
        self.n_targets = int(n_targets)

    def __repr__(self) -> str:
        cap = f", eps={self.eps:g}" if self.eps < 1e12 else ""
        targets = f", n_targets={self.n_targets}" if self.n_targets else ""
        return f"FMN(norm={self.norm!r}, steps={self.steps}{cap}{targets})"

    def perturb(self, model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator,
                trace: dict | None = None) -> torch.Tensor:
        x_adv, _ = self.search(model, x, y)
        return project(x_adv, x, self.eps, self.norm, model.bounds)

    def distances(self, model: ModelAdapter, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_adv, distance) with distance = inf where no adversarial example was found."""
        return self.search(model, x, y)

    def refine(self, model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor,
               steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_adv, distance) from `steps` iterations warm-started at adversarial examples `start` (e.g. another
        attack's, found within eps): the radius starts at their size and shrinks from there, then the bisection.
        Where `start` is not adversarial the search starts from it all the same."""
        return self._search(model, x, y, None, start=start, steps=steps)

    def search(self, model: ModelAdapter, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best, best_norm = self._search(model, x, y, None)
        if self.n_targets:
            ranked = model.logits(x).scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)
            for t in range(min(self.n_targets, ranked.shape[1] - 1)):
                cand, size = self._search(model, x, y, ranked[:, t])
                better = size < best_norm
                best[better], best_norm[better] = cand[better], size[better]
        return best, best_norm

    def _search(self, model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, *,
                start: torch.Tensor | None = None, steps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        def loss(z: torch.Tensor) -> torch.Tensor:
            if target is None:
                return margin(z, y)
            return z.gather(1, y[:, None]).squeeze(1) - z.gather(1, target[:, None]).squeeze(1)

        n, view = len(x), (-1,) + (1,) * (x.dim() - 1)
        q = dual_norm_order(self.norm)
        delta = torch.zeros_like(x) if start is None else start - x
        radius = torch.full((n,), float("inf"), device=x.device)
        best = x.clone()
        best_norm = torch.full((n,), float("inf"), device=x.device)
        steps = self.steps if steps is None else int(steps)
        for k in range(steps):
            cos = 0.5 * (1 + math.cos(math.pi * k / steps))
            gamma = self.gamma * cos + 0.001
            step = 0.1 + 0.9 * cos  # in units of the current radius
            logits, grad = model.logits_and_grad(x + delta, loss)
            m = loss(logits)
            size = lp_norm(delta, self.norm)
            adv = m < 0
            better = adv & (size < best_norm)
            best[better], best_norm[better] = (x + delta)[better], size[better]
            found = torch.isfinite(best_norm)
            # Coordinates pinned at a bound cannot move in the descent direction; leaving them out keeps the
            # linear estimate honest near the edges of the input domain.
            xc, low, high = x + delta, model.bounds[0], model.bounds[1]
            movable = ~(((xc <= low + 1e-7) & (grad > 0)) | ((xc >= high - 1e-7) & (grad < 0)))
            grad = grad * movable
            gnorm = grad.flatten(1).norm(p=q, dim=1).clamp_min(1e-12)
            linear_estimate = size + m.clamp_min(0) / gnorm
            radius = torch.where(adv, torch.minimum(radius, size) * (1 - gamma),
                                 torch.where(found, radius * (1 + gamma), linear_estimate * (1 + gamma)))
            radius = torch.minimum(radius, torch.where(found, best_norm, torch.full_like(radius, self.eps)))
            # Step down the margin; the step is a fraction of the radius, overshooting slightly past the boundary.
            delta = delta - (step * (1 + gamma) * radius).view(view) * ascent_direction(grad, self.norm)
            delta = project(x + delta, x, radius.clamp_min(0), self.norm, model.bounds) - x
        logits = model.logits(x + delta)
        size = lp_norm(delta, self.norm)
        last = (margin(logits, y) < 0) & (size < best_norm)
        best[last], best_norm[last] = (x + delta)[last], size[last]
        return self._bisect(model, x, y, best, best_norm)

    def _bisect(self, model, x, y, best, best_norm):
        """Shrink each found perturbation along its direction to the smallest scale that still fools the model."""
        found = torch.isfinite(best_norm)
        if not bool(found.any()) or self.bisection_steps == 0:
            return best, best_norm
        idx = found.nonzero().squeeze(1)
        x0, d, yy = x[idx], best[idx] - x[idx], y[idx]
        view = (-1,) + (1,) * (x.dim() - 1)
        lo, hi = torch.zeros(len(idx), device=x.device), torch.ones(len(idx), device=x.device)
        for _ in range(self.bisection_steps):
            mid = (lo + hi) / 2
            adv = model.logits(x0 + mid.view(view) * d).argmax(1) != yy
            hi = torch.where(adv, mid, hi)
            lo = torch.where(adv, lo, mid)
        best[idx] = x0 + hi.view(view) * d
        best_norm[idx] = lp_norm(best[idx] - x0, self.norm)
        return best, best_norm
