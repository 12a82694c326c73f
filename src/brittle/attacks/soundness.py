"""Checks that the evaluation itself is sound, each with the escalation that answers it.

Probes run on a small, seeded probe set. Pre-probes (before the ensemble) decide how gradients are taken:
randomness -> expectation over transformation and majority votes; zero/NaN gradients -> straight-through
(BPDA) gradients; probability outputs -> attack their logarithm; a saturated softmax -> no cross-entropy.
Post-probes (after it) look for signs that the ensemble was fooled: a black-box attack beating it,
robust accuracy that does not fall as eps grows or survives a huge eps, losses still rising at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import ModelAdapter
from .apgd import APGD
from .losses import ce_loss, margin
from .square import Square

__all__ = ["Probe", "forwards_differ", "gradient_health", "is_random", "outputs_probabilities", "robust_fraction",
           "rows_are_probabilities"]

ZERO_GRADIENT_SHARE = 0.1  # more than this share of probe points with an all-zero gradient fires the probe


@dataclass
class Probe:
    id: str  # the finding id, e.g. "adversarial.zero-gradients"
    fired: bool
    message: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    escalation: str = ""  # what the engine did about it
    settled: bool | None = None  # None: did not fire; True: escalation answered it; False: unreliable

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "fired": self.fired, "message": self.message, "evidence": self.evidence,
                "escalation": self.escalation, "settled": self.settled}


def forwards_differ(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    """Whether two forwards on the same inputs differ beyond float noise, and by how much."""
    diff = float((a - b).abs().max())
    return diff > 1e-5 * max(1.0, float(a.abs().max())), diff


def rows_are_probabilities(out: torch.Tensor) -> bool:
    """Every row in [0, 1] and summing to 1: a softmax output, not logits."""
    return bool(((out >= -1e-6) & (out <= 1 + 1e-6)).all()) and bool(((out.sum(1) - 1).abs() < 1e-3).all())


def is_random(model: ModelAdapter, x: torch.Tensor) -> tuple[bool, float]:
    return forwards_differ(model.logits(x), model.logits(x))


def outputs_probabilities(model: ModelAdapter, x: torch.Tensor) -> bool:
    return rows_are_probabilities(model.logits(x))


def gradient_health(model: ModelAdapter, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Shares of probe points whose margin gradient is all zero or not finite, and whose cross-entropy
    gradient vanishes while the margin's does not (a saturated softmax)."""
    _, g_margin = model.logits_and_grad(x, lambda z: margin(z, y))
    _, g_ce = model.logits_and_grad(x, lambda z: ce_loss(z, y))
    flat_m, flat_c = g_margin.flatten(1), g_ce.flatten(1)
    finite = torch.isfinite(flat_m).all(1)
    zero_m = finite & (flat_m.abs().amax(1) == 0)
    tiny_ce = torch.isfinite(flat_c).all(1) & (flat_c.abs().amax(1) <= 1e-12 * flat_m.abs().amax(1).clamp_min(1e-30)
                                              + 1e-30)
    return {
        "zero": float(zero_m.float().mean()),
        "nan": float((~finite).float().mean()),
        "ce_vanishing": float((tiny_ce & ~zero_m & finite).float().mean()),
    }


def robust_fraction(model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str, steps: int,
                    seed: int, votes: int = 1, square_queries: int = 0, gradients: bool = True) -> float:
    """Robust share of (x, y) under APGD-DLR (plus Square when asked; Square alone without gradients)."""
    from .engine import Plan, evaluate_shard

    stages = [APGD(norm=norm, eps=eps, steps=steps, loss="dlr")] if gradients else []
    if square_queries:
        stages.append(Square(norm=norm, eps=eps, queries=square_queries))
    out = evaluate_shard(model, x, y, Plan(norm=norm, eps=eps, stages=tuple(stages), votes=votes,
                                           eot_samples=model.eot_samples, straight_through=model.straight_through,
                                           log_outputs=model.log_outputs), seed=seed)
    return float(out.robust.float().mean())
