"""Robust accuracy under an Lp-bounded attack, with every adversarial example re-verified.

Work is split into shards evaluated by `evaluate_shard`, a pure function of (model, shard, options,
seed). Each finished shard is saved at once, so a killed run resumes without redoing it and ends with
the numbers an uninterrupted run gives.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from ..attacks import PGD, evaluate_shard
from ..attacks.geometry import normalise_norm
from ..errors import UsageError
from ..result import CheckResult, Finding
from .base import AuditContext, Check, CheckOptions, Needs, shard_seed, status_from_findings


class AdversarialOptions(CheckOptions):
    norm: Literal["Linf", "L2"] = "Linf"
    eps: float = Field(8 / 255, gt=0)
    steps: int = Field(50, ge=1, le=100_000)
    restarts: int = Field(2, ge=1, le=1000)
    max_samples: int | None = Field(1000, ge=1)
    shard_size: int = Field(128, ge=1)
    examples_shown: int = Field(8, ge=0, le=64)

    @field_validator("norm", mode="before")
    @classmethod
    def _norm(cls, v: str) -> str:
        return normalise_norm(v)

    def validate_against(self, bounds: tuple[float, float]) -> None:
        span = bounds[1] - bounds[0]
        if self.norm == "Linf" and self.eps > span:
            hint = f" Did you mean {self.eps:g}/255 = {self.eps / 255:.4g}?" if self.eps >= 1 and span <= 1 else ""
            raise UsageError(f"The 'eps' option of [adversarial] must be at most the input range {span:g} "
                             f"for norm Linf (inputs lie in [{bounds[0]:g}, {bounds[1]:g}]); got {self.eps:g}.{hint}")


def attacks_for(options: AdversarialOptions) -> list:
    return [PGD(norm=options.norm, eps=options.eps, steps=options.steps, restarts=options.restarts)]


class Adversarial(Check):
    id = "adversarial"
    title = "Adversarial robustness"
    needs = Needs(labels=True, gradients=True)
    metrics = ("robust_accuracy", "clean_accuracy", "attack_success_rate", "n", "eps")
    Options = AdversarialOptions
    order = 50

    def run(self, ctx: AuditContext) -> CheckResult:
        o: AdversarialOptions = self.options
        model, data = ctx.model, ctx.data
        n_all = len(data)
        if o.max_samples is not None and o.max_samples < n_all:
            rng = np.random.default_rng(shard_seed(ctx.seed, self.id, -1))
            positions = np.sort(rng.choice(n_all, size=o.max_samples, replace=False))
        else:
            positions = np.arange(n_all)
        x, y = data.x[positions], data.y[positions]
        attacks = attacks_for(o)
        names = [a.name for a in attacks]
        starts = list(range(0, len(x), o.shard_size))
        correct, robust, distance = [], [], []
        broken_pos, broken_adv, broken_code = [], [], []
        ctx.progress.start(f"adversarial {o.norm} eps={o.eps:g}", len(starts))
        for s, start in enumerate(starts):
            key = f"shard-{s:05d}"
            saved = ctx.state.load(key)
            if saved is None:
                sl = slice(start, start + o.shard_size)
                out = evaluate_shard(model, x[sl], y[sl], attacks, eps=o.eps, norm=o.norm,
                                     seed=shard_seed(ctx.seed, self.id, s))
                hit = (out.correct & ~out.robust).nonzero().squeeze(1)
                saved = {
                    "correct": out.correct, "robust": out.robust, "distance": out.distance,
                    "broken_local": hit, "x_adv": out.x_adv[hit],
                    "broken_code": torch.tensor([names.index(out.broken_by[i]) for i in hit.tolist()], dtype=torch.long),
                    "passes": torch.tensor([out.forward, out.backward]),
                }
                ctx.state.save(key, saved)
                saved = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in saved.items()}
            else:
                ctx.credit_passes(int(saved["passes"][0]), int(saved["passes"][1]))
            correct.append(saved["correct"])
            robust.append(saved["robust"])
            distance.append(saved["distance"])
            broken_pos.append(saved["broken_local"] + start)
            broken_adv.append(saved["x_adv"])
            broken_code.append(saved["broken_code"])
            ctx.progress.advance()
        ctx.progress.finish()
        correct_a, robust_a = np.concatenate(correct).astype(bool), np.concatenate(robust).astype(bool)
        distance_a = np.concatenate(distance).astype(np.float32)
        b_pos, b_code = np.concatenate(broken_pos).astype(np.int64), np.concatenate(broken_code).astype(np.int64)
        b_adv = np.concatenate(broken_adv) if len(b_pos) else np.zeros((0, *x.shape[1:]), np.float32)
        return self._summarise(ctx, positions, x, y, correct_a, robust_a, distance_a, b_pos, b_adv, b_code, names)

    def _summarise(self, ctx, positions, x, y, correct, robust, distance, b_pos, b_adv, b_code, names) -> CheckResult:
        o: AdversarialOptions = self.options
        n = len(correct)
        clean_acc = float(correct.mean())
        robust_acc = float(robust.mean())
        success = float((correct & ~robust).sum() / max(int(correct.sum()), 1))
        c = ctx.model.num_classes or int(y.max()) + 1
        y_np = y.numpy()
        per_class = [float(robust[y_np == k].mean()) if (y_np == k).any() else None for k in range(c)]
        findings = []
        if clean_acc > 0 and robust_acc < 0.5 * clean_acc:
            severity = "high" if robust_acc < 0.1 * clean_acc else "medium"
            findings.append(Finding(
                "adversarial.not-robust", severity,
                f"Under {o.norm} perturbations of size {o.eps:g}, accuracy falls from {clean_acc:.1%} to "
                f"{robust_acc:.1%}: {success:.1%} of correctly classified points have a verified adversarial example.",
                {"clean_accuracy": clean_acc, "robust_accuracy": robust_acc, "eps": o.eps, "norm": o.norm}))
        # Most fragile first: the smallest verified perturbations.
        order = np.argsort(distance[b_pos], kind="stable")[: o.examples_shown] if len(b_pos) else np.zeros(0, np.int64)
        shown = b_pos[order]
        arrays = {"sample_index": positions.astype(np.int64), "correct": correct, "robust": robust,
                  "perturbation_norm": distance}
        if len(shown):
            x_clean = x[torch.as_tensor(shown)].numpy()
            x_adv = b_adv[order]
            arrays.update({
                "example_index": positions[shown], "example_clean": x_clean.astype(np.float32),
                "example_adversarial": x_adv.astype(np.float32), "example_label": y_np[shown],
                "example_adversarial_pred": ctx.model.logits(torch.as_tensor(x_adv)).argmax(1).numpy(),
            })
        metrics = {"robust_accuracy": robust_acc, "clean_accuracy": clean_acc, "attack_success_rate": success,
                   "n": n, "eps": o.eps}
        details = {
            "norm": o.norm, "eps": o.eps, "attacks": [repr(a) for a in attacks_for(o)],
            "per_class_robust_accuracy": per_class,
            "broken_by": {name: int((b_code == i).sum()) for i, name in enumerate(names)},
            "median_perturbation_norm": float(np.nanmedian(distance)) if np.isfinite(distance).any() else None,
            "samples_evaluated": n, "samples_total": len(ctx.data),
        }
        return CheckResult(self.id, status_from_findings(findings), metrics, findings, details, arrays)
