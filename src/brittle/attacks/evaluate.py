"""Robust evaluation of one shard of samples: a per-point worst case over attacks, with early exit.

`evaluate_shard` is a pure function of (model, shard, attacks, seed): the same shard gives the same
result whether it runs first, last, after a resume or on another worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import ModelAdapter
from .base import Attack
from .verify import verify

__all__ = ["ShardOutcome", "evaluate_shard"]


@dataclass
class ShardOutcome:
    correct: torch.Tensor  # bool (n,) clean prediction is right
    robust: torch.Tensor  # bool (n,) correct and no verified adversarial example found
    distance: torch.Tensor  # (n,) Lp size of the verified adversarial perturbation, nan where none
    x_adv: torch.Tensor  # (n, ...) the verified adversarial example (the clean input where none)
    broken_by: list[str]  # per sample: the attack that broke it, "" where none
    forward: int
    backward: int


def evaluate_shard(model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, attacks: list[Attack], *,
                   eps: float, norm: str, seed: int) -> ShardOutcome:
    f0, b0 = model.counter.snapshot()
    correct = model.logits(x).argmax(1) == y
    robust = correct.clone()
    distance = torch.full((len(x),), float("nan"))
    x_adv = x.clone()
    broken_by = [""] * len(x)
    for k, attack in enumerate(attacks):
        idx = robust.nonzero().squeeze(1)
        if len(idx) == 0:
            break  # early exit: every point is already broken or was misclassified
        candidates = attack(model, x[idx], y[idx], seed=seed + k)
        check = verify(model, x[idx], y[idx], candidates, eps=eps, norm=norm)
        hit = idx[check.adversarial]
        robust[hit] = False
        distance[hit] = check.distance[check.adversarial]
        x_adv[hit] = candidates[check.adversarial]
        for i in hit.tolist():
            broken_by[i] = attack.name
    f1, b1 = model.counter.snapshot()
    return ShardOutcome(correct, robust, distance, x_adv, broken_by, f1 - f0, b1 - b0)
