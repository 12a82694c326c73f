"""Adversarial attacks, each usable on its own: `PGD(norm="Linf", eps=0.1)(model, x, y)`.

`model` is a `brittle.ModelAdapter` (or an `nn.Module`, wrapped with input bounds [0, 1]).
"""

from .apgd import APGD, APGDTargeted
from .base import ATTACKS, Attack
from .fgsm import FGSM
from .fmn import FMN
from .square import Square
from .target_search import TargetSearch
from .engine import Plan, ShardOutcome, evaluate_shard
from .geometry import lp_norm, project
from .losses import ce_loss, dlr_loss, margin, margin_loss
from .pgd import PGD
from .verify import Verification, verify

__all__ = [
    "APGD", "APGDTargeted", "ATTACKS", "Attack", "FGSM", "FMN", "PGD", "Plan", "Square", "ShardOutcome", "TargetSearch", "Verification", "ce_loss", "dlr_loss", "evaluate_shard",
    "lp_norm", "margin", "margin_loss", "project", "verify",
]
