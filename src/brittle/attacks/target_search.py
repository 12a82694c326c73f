"""Targeted APGD-DLR with the targets chosen per point by a short sweep over every other class.

AutoAttack runs 100 targeted steps against each of the 9 highest other classes; most of those passes go to
targets a point was never going to reach. The logits' ranking is a poor guide on robust models: a point often
falls only to its 4th or 5th class. Here a short run against *every* other class measures how close each one
gets (the scale-free targeted DLR loss it reached), and the full runs go to the few targets that got closest,
best first, on the points still robust (A3's idea of spending by promise, Liu et al. 2022). A full run drops a
point whose loss is still far below the boundary at its first step-size checkpoint; restarts from new random
starts alternate between each remaining point's two closest targets, and a point that ended within a hair of
the boundary gets more of them.
"""

from __future__ import annotations

import torch

from ..model import ModelAdapter
from .apgd import FIRST_CHECKPOINT, targeted_run
from .base import Attack

__all__ = ["TargetSearch"]

# A point whose best targeted run ended this close to the boundary (targeted DLR loss, scale-free) crosses it on
# about every other new random start: a coin flip that more starts win.
NEAR_LOSS = -0.05


class TargetSearch(Attack):
    """Sweep every target briefly, then run targeted APGD-DLR in full against each point's most promising ones.

    - `sweep_steps`: steps per target in the sweep (0: no sweep, targets ranked by the logits as AutoAttack does);
      a sweep run drops a point at half its steps when its loss is below `give_up_loss`.
    - `n_targets`: full runs of `steps` per point, against the targets whose sweep loss was highest and at least
      `select_loss` (a target that stayed hopeless gets none).
    - `give_up_loss`: a full run drops a point whose loss is still below this at its first checkpoint
      (None: never). Restarts give up at half of it: they go to the points nearest the boundary.
    - `restarts`: further full runs from new random starts, alternating between each point's two best targets so
      far; `near_restarts` more on the points whose best run ended within `NEAR_LOSS` of the boundary.
    """

    name = "target-search"
    targeted = True

    def __init__(self, *, norm: str = "Linf", eps: float, steps: int = 100, sweep_steps: int = 10, n_targets: int = 3,
                 restarts: int = 2, near_restarts: int = 4, give_up_loss: float | None = -0.3,
                 select_loss: float = -0.5):
        super().__init__(norm=norm, eps=eps)
        if steps < 1 or sweep_steps < 0 or n_targets < 1 or restarts < 0 or near_restarts < 0:
            raise ValueError(f"TargetSearch needs steps >= 1, sweep_steps >= 0, n_targets >= 1, restarts >= 0, "
                             f"near_restarts >= 0; got {steps}, {sweep_steps}, {n_targets}, {restarts}, "
                             f"{near_restarts}.")
        if give_up_loss is not None and give_up_loss > 0:
            raise ValueError(f"give_up_loss must be <= 0 (a loss below the boundary); got {give_up_loss}.")
        self.steps, self.sweep_steps, self.n_targets = int(steps), int(sweep_steps), int(n_targets)
        self.restarts, self.near_restarts = int(restarts), int(near_restarts)
        self.give_up_loss, self.select_loss = give_up_loss, float(select_loss)

    def perturb(self, model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator,
                trace: dict | None = None) -> torch.Tensor:
        n = len(x)
        logits = model.logits(x)
        c = logits.shape[1]
        if c < 2:
            return x.clone()
        # Other classes by logit, highest first: the order of the sweep, and the ranking without one.
        ranked = logits.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)[:, : c - 1]
        best, best_margin = x.clone(), torch.full((n,), float("inf"), device=x.device)
        # Per point and target (column = logit rank): the highest targeted loss reached so far.
        promise = torch.full((n, c - 1), float("-inf"), device=x.device)

        def run(idx, targets, steps, give_up, record):
            return targeted_run(model, x, y, idx, targets, best, best_margin, eps=self.eps, norm=self.norm, steps=steps,
                                generator=generator, trace=trace if record else None,
                                give_up=None if give_up is None else (max(1, int(give_up[0] * steps)), give_up[1]))

        if self.sweep_steps:
            sweep_give_up = None if self.give_up_loss is None else (0.5, self.give_up_loss)
            for t in range(c - 1):
                idx = (best_margin >= 0).nonzero().squeeze(1)
                if len(idx) == 0:
                    return best
                promise[idx, t] = run(idx, ranked[idx, t], self.sweep_steps, sweep_give_up, record=False)
            order = promise.argsort(1, descending=True)  # columns of `ranked`, most promising first
            eligible = promise.gather(1, order) >= self.select_loss
        else:
            order = torch.arange(c - 1, device=x.device).expand(n, -1)
            eligible = torch.ones(n, c - 1, dtype=torch.bool, device=x.device)
        give_up = None if self.give_up_loss is None else (FIRST_CHECKPOINT, self.give_up_loss)
        reached = torch.full((n, c - 1), float("-inf"), device=x.device)  # best loss of the full runs
        for k in range(min(self.n_targets, c - 1)):
            idx = ((best_margin >= 0) & eligible[:, k]).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            col = order[idx, k]
            reached[idx, col] = run(idx, ranked[idx, col], self.steps, give_up, record=True)
        # Restarts alternate between each point's two closest targets: one run's loss is a noisy estimate of how
        # close a target is, and a point near the boundary of two classes should get a fresh try at both.
        restart_give_up = None if give_up is None else (FIRST_CHECKPOINT, 0.5 * self.give_up_loss)
        for r in range(self.restarts + self.near_restarts):
            tried = reached > float("-inf")
            left = (best_margin >= 0) & tried.any(1)
            if r >= self.restarts:
                left &= reached.amax(1) >= NEAR_LOSS
            idx = left.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            top = reached[idx].topk(min(2, c - 1), dim=1).indices
            pick = top[:, r % top.shape[1]]
            pick = torch.where(tried[idx, pick], pick, top[:, 0])  # a point with one target tried keeps it
            loss = run(idx, ranked[idx, pick], self.steps, restart_give_up, record=True)
            reached[idx, pick] = torch.maximum(reached[idx, pick], loss)
        return best

    @property
    def label(self) -> str:
        return "apgd-t"  # what reports call targeted APGD-DLR, whichever way its targets were chosen

    def __repr__(self) -> str:
        return (f"TargetSearch(norm={self.norm!r}, eps={self.eps:g}, steps={self.steps}, "
                f"sweep_steps={self.sweep_steps}, "
                f"n_targets={self.n_targets}, restarts={self.restarts}, near_restarts={self.near_restarts})")
