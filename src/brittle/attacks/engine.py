"""The attack ensemble: a per-point worst case over attacks, with early exit and independent verification.

`evaluate_shard` is a pure function of (model, shard, plan, seed): the same shard gives the same result
whether it runs first, last, after a resume or on another worker. A plan lists the stages in order; each
stage attacks only the points no earlier stage broke. The minimum-norm stage (when the plan asks for the
robustness curve) gives every correctly classified point a distance, because the curve needs each one's: a
search from scratch on points still robust, a short warm-started one from the adversarial example on points an
earlier stage broke (`Plan.min_norm_after`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model import ModelAdapter
from .base import Attack
from .verify import verify

__all__ = ["Plan", "ShardOutcome", "evaluate_shard", "majority_predict", "LATE_GAIN_FRACTION"]

LATE_GAIN_FRACTION = 0.25


@dataclass(frozen=True)
class Plan:
    norm: str
    eps: float
    stages: tuple[Attack, ...]
    min_norm: Attack | None = None  # FMN: distances for the robustness curve
    eot_samples: int = 1  # expectation over randomness for gradients
    votes: int = 1  # forwards per verification; the majority decides (random models)
    straight_through: bool = False  # BPDA through piecewise-constant ops
    log_outputs: bool = False  # attack log-probabilities of a model that outputs probabilities
    max_passes_per_point: float | None = None  # forward + backward passes, in samples
    # The minimum-norm search runs after this many stages, cold on the points they left robust; the points they
    # broke get their distance refined from their adversarial examples in `refine_steps` warm-started iterations
    # (0: before every stage, on every correctly classified point).
    min_norm_after: int = 0
    refine_steps: int = 10

    @property
    def uses_gradients(self) -> bool:
        return any(stage.needs_gradients for stage in self.stages)

    def describe(self) -> list[str]:
        names = ([repr(self.min_norm)] if self.min_norm else []) + [repr(s) for s in self.stages]
        extras = []
        if self.eot_samples > 1:
            extras.append(f"EOT x{self.eot_samples}")
        if self.votes > 1:
            extras.append(f"majority of {self.votes} forwards")
        if self.straight_through:
            extras.append("straight-through gradients")
        if self.log_outputs:
            extras.append("log of probability outputs")
        return names + extras


@dataclass
class ShardOutcome:
    correct: torch.Tensor  # bool (n,)
    robust: torch.Tensor  # bool (n,) correct and no verified adversarial example within eps
    distance: torch.Tensor  # (n,) smallest verified adversarial distance found (any size), inf where none
    x_adv: torch.Tensor  # (n, ...) the verified adversarial example within eps (the input where none)
    broken_by: list[str]  # per sample: the stage that broke it within eps, "" where none
    late_gain: torch.Tensor  # (n,) 1 where a stage's loss still rose in its last fifth on a point left robust
    min_norm_distance: torch.Tensor  # (n,) the minimum-norm attack's own distance, inf where none/not run
    forward: int
    backward: int
    budget_exhausted: bool = False
    stage_passes: dict[str, list[int]] = field(default_factory=dict)

    def to(self, device: torch.device) -> "ShardOutcome":
        moved = {f: getattr(self, f).to(device) for f in ("correct", "robust", "distance", "x_adv", "late_gain",
                                                          "min_norm_distance")}
        return ShardOutcome(**{**self.__dict__, **moved})


def majority_predict(model: ModelAdapter, x: torch.Tensor, votes: int) -> torch.Tensor:
    if votes <= 1:
        return model.logits(x).argmax(1)
    counts = torch.zeros(len(x), model.num_classes or 2, dtype=torch.long, device=x.device)
    for _ in range(votes):
        pred = model.logits(x).argmax(1)
        counts[torch.arange(len(x), device=x.device), pred] += 1
    return counts.argmax(1)


def _verify(model, x, y, cand, plan: Plan, eps: float):
    v = verify(model, x, y, cand, eps=eps, norm=plan.norm)
    if plan.votes > 1 and bool(v.adversarial.any()):
        # A random model: one wrong forward is not a broken point; the majority of several must be wrong.
        idx = v.adversarial.nonzero().squeeze(1)
        wrong = majority_predict(model, cand[idx], plan.votes) != y[idx]
        v.adversarial[idx[~wrong]] = False
    return v


def evaluate_shard(model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, plan: Plan, *, seed: int) -> ShardOutcome:
    """The plan on (x, y), on the model's device (the shard moves there once); results come back on the device x
    came from."""
    home = x.device
    return _evaluate(model, x.to(model.device), y.to(model.device), plan, seed=seed).to(home)


def _evaluate(model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, plan: Plan, *, seed: int) -> ShardOutcome:
    f0, b0 = model.counter.snapshot()
    n = len(x)
    correct = majority_predict(model, x, plan.votes) == y
    robust = correct.clone()
    distance = torch.full((n,), float("inf"), device=x.device)
    distance[~correct] = 0.0
    x_adv = x.clone()
    broken_by = [""] * n
    late_gain = torch.zeros(n, device=x.device)
    min_norm_distance = torch.full((n,), float("inf"), device=x.device)
    min_norm_distance[~correct] = 0.0
    stage_passes: dict[str, list[int]] = {}
    exhausted = False

    def spent() -> float:
        f1, b1 = model.counter.snapshot()
        return (f1 - f0 + b1 - b0) / max(n, 1)

    def min_norm_stage() -> None:
        s0 = model.counter.snapshot()
        cold = robust.nonzero().squeeze(1)  # no adversarial example yet: a search from scratch
        warm = (correct & ~robust).nonzero().squeeze(1)  # broken by an earlier stage: refine its example
        for idx, start in ((cold, None), (warm, x_adv)):
            if len(idx) == 0:
                continue
            if start is None:
                cand, _ = plan.min_norm.distances(model, x[idx], y[idx])
            else:
                cand, _ = plan.min_norm.refine(model, x[idx], y[idx], start[idx], plan.refine_steps)
            check = _verify(model, x[idx], y[idx], cand, plan, eps=float("inf"))
            found = check.adversarial
            distance[idx[found]] = torch.minimum(distance[idx[found]], check.distance[found])
            min_norm_distance[idx[found]] = check.distance[found]
            if start is None:
                within = found & (check.distance <= plan.eps * (1 + 1e-6))
                _mark(robust, x_adv, broken_by, idx[within], cand[within], plan.min_norm.label)
        stage_passes[plan.min_norm.label] = _delta(model, s0)

    with model.escalated(eot_samples=plan.eot_samples, straight_through=plan.straight_through,
                         log_outputs=plan.log_outputs):
        for k, attack in enumerate(plan.stages):
            if k == plan.min_norm_after and plan.min_norm is not None and bool(correct.any()):
                min_norm_stage()
            idx = robust.nonzero().squeeze(1)
            if len(idx) == 0:
                break  # early exit: every point is broken or was misclassified
            if plan.max_passes_per_point is not None and spent() >= plan.max_passes_per_point:
                exhausted = True
                break
            s0 = model.counter.snapshot()
            trace: dict = {}
            cand = attack(model, x[idx], y[idx], seed=seed + 1000 * (k + 1), trace=trace)
            check = _verify(model, x[idx], y[idx], cand, plan, eps=plan.eps)
            hit = check.adversarial
            distance[idx[hit]] = torch.minimum(distance[idx[hit]], check.distance[hit])
            _mark(robust, x_adv, broken_by, idx[hit], cand[hit], attack.label)
            if "late_gain" in trace and "total_gain" in trace:
                # Still rising: over a quarter of the run's whole gain came in its last fifth.
                rising = (trace["late_gain"] > LATE_GAIN_FRACTION * trace["total_gain"].abs().clamp_min(1e-6)) & ~hit
                late_gain[idx[rising]] = 1.0
            elif "late_gain" in trace:
                late_gain[idx[(trace["late_gain"] > 0) & ~hit]] = 1.0
            stage_passes[attack.label] = _add(stage_passes.get(attack.label), _delta(model, s0))
        if (plan.min_norm is not None and plan.min_norm.label not in stage_passes and bool(correct.any())
                and not exhausted):
            min_norm_stage()  # after the last stage, or the stages ended early (every point broken)
    late_gain[~robust] = 0.0
    f1, b1 = model.counter.snapshot()
    return ShardOutcome(correct, robust, distance, x_adv, broken_by, late_gain, min_norm_distance, f1 - f0, b1 - b0,
                        exhausted, stage_passes)


def _mark(robust, x_adv, broken_by, idx, cand, label):
    robust[idx] = False
    x_adv[idx] = cand
    for i in idx.tolist():
        broken_by[i] = label


def _delta(model, s0) -> list[int]:
    f1, b1 = model.counter.snapshot()
    return [f1 - s0[0], b1 - s0[1]]


def _add(a, b):
    return b if a is None else [a[0] + b[0], a[1] + b[1]]

