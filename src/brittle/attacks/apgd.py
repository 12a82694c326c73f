"""APGD (Croce & Hein 2020): PGD with momentum and a step size that adapts per sample.

The step starts at 2*eps and halves at checkpoints when too few steps since the last one increased the
loss (condition 1) or when neither the step nor the best loss changed (condition 2); after a halving the
iterate restarts from the best point so far. Losses: cross-entropy, DLR (scale-invariant, immune to
logit rescaling) and the margin; `APGDTargeted` runs targeted DLR against the top-k other classes.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..model import ModelAdapter
from .base import Attack
from .geometry import project, random_start
from .losses import LOSSES, dlr_targeted_loss, margin
from .pgd import ascent_direction

__all__ = ["APGD", "APGDTargeted", "FIRST_CHECKPOINT", "apgd_checkpoints", "targeted_run"]

LossOnSubset = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, batch indices) -> loss


FIRST_CHECKPOINT = 0.22  # p_1: the first step-size checkpoint, as a fraction of the run


def apgd_checkpoints(steps: int) -> list[int]:
    """w_j = ceil(p_j * steps) with p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [0.0, FIRST_CHECKPOINT]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(v * steps) for v in p if 0 < v <= 1})


def apgd_run(model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, loss_fn: LossOnSubset, *, eps: float, norm: str,
             steps: int, generator: torch.Generator, start_random: bool = True, rho: float = 0.75,
             momentum: float = 0.75, trace: dict | None = None,
             give_up: tuple[int, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run. Returns the lowest-margin iterate per sample and its margin (negative: broken).

    `give_up = (step, loss)`: at that step, stop attacking points whose best loss is still below `loss`
    (hopeless points, in the spirit of A3's discarding; the loss must be scale-free, e.g. DLR).
    """
    n = len(x)
    bounds = model.bounds
    view = (-1,) + (1,) * (x.dim() - 1)
    x_cur = random_start(x, eps, norm, bounds, generator) if start_random else x.clone()
    everyone = torch.arange(n, device=x.device)
    logits, grad = model.logits_and_grad(x_cur, lambda z: loss_fn(z, everyone))
    loss_cur = loss_fn(logits, everyone).detach()
    adv_margin = margin(logits, y)
    x_adv = x_cur.clone()
    x_prev = x_cur.clone()
    best_loss, x_best, g_best = loss_cur.clone(), x_cur.clone(), grad.clone()
    eta = torch.full((n,), 2.0 * eps, device=x.device)
    successes = torch.zeros(n, device=x.device)
    ckpt_loss, ckpt_eta = best_loss.clone(), eta.clone()
    checkpoints = apgd_checkpoints(steps)
    last_ckpt = 0
    start_loss = best_loss.clone()
    loss_at_late = None
    late_step = max(int(0.8 * steps), 1)
    active = adv_margin >= 0
    for k in range(steps):
        if k == late_step:
            loss_at_late = best_loss.clone()
        if give_up is not None and k == give_up[0]:
            active &= best_loss >= give_up[1]
        a = active.nonzero().squeeze(1)
        if len(a) == 0:
            break
        xa, x0 = x_cur[a], x[a]
        z = project(xa + eta[a].view(view) * ascent_direction(grad[a], norm), x0, eps, norm, bounds)
        if k > 0:
            z = project(xa + momentum * (z - xa) + (1 - momentum) * (xa - x_prev[a]), x0, eps, norm, bounds)
        x_prev[a] = xa
        x_cur[a] = z
        logits, g = model.logits_and_grad(z, lambda out: loss_fn(out, a))
        grad[a] = g
        loss_new = loss_fn(logits, a).detach()
        m = margin(logits, y[a])
        better_adv = m < adv_margin[a]
        x_adv[a[better_adv]] = z[better_adv]
        adv_margin[a[better_adv]] = m[better_adv]
        successes[a] += (loss_new > loss_cur[a]).float()
        loss_cur[a] = loss_new
        better = loss_new > best_loss[a]
        best_loss[a[better]] = loss_new[better]
        x_best[a[better]] = z[better]
        g_best[a[better]] = g[better]
        active[a[m < 0]] = False
        if (k + 1) in checkpoints:
            height = (k + 1) - last_ckpt
            reduce = (successes < rho * height) | ((eta == ckpt_eta) & (best_loss == ckpt_loss))
            eta[reduce] /= 2
            x_cur[reduce] = x_best[reduce]
            grad[reduce] = g_best[reduce]
            successes.zero_()
            ckpt_loss, ckpt_eta, last_ckpt = best_loss.clone(), eta.clone(), k + 1
    if trace is not None:
        # A run that stopped before its last fifth (every point broken or given up) gained nothing late.
        late = loss_at_late if loss_at_late is not None else best_loss
        trace["late_gain"] = best_loss - late
        trace["total_gain"] = best_loss - start_loss
        trace["best_loss"] = best_loss
    return x_adv, adv_margin


def _record(trace: dict | None, run: dict, idx: torch.Tensor, n: int) -> None:
    """Scatter one run's per-sample diagnostics (on the subset idx) into the caller's full-size arrays."""
    if trace is None:
        return
    for key, values in run.items():
        full = trace.setdefault(key, torch.zeros(n, device=values.device))
        full[idx] = values.float()


def targeted_run(model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor,
                 best: torch.Tensor, best_margin: torch.Tensor, *, eps: float, norm: str, steps: int,
                 generator: torch.Generator, give_up: tuple[int, float] | None = None,
                 trace: dict | None = None) -> torch.Tensor:
    """One targeted APGD-DLR run on the points `idx` (one target each), folded into the running `best` examples
    and `best_margin` in place; its diagnostics go into `trace`. Returns each point's best targeted loss."""
    ys, run = y[idx], {}
    xa, m = apgd_run(model, x[idx], ys, lambda z, i: dlr_targeted_loss(z, ys[i], targets[i]), eps=eps, norm=norm,
                     steps=steps, generator=generator, trace=run, give_up=give_up)
    _record(trace, run, idx, len(x))
    better = m < best_margin[idx]
    best[idx[better]], best_margin[idx[better]] = xa[better], m[better]
    return run["best_loss"]


class APGD(Attack):
    """Untargeted APGD with loss 'ce', 'dlr' or 'margin'."""

    name = "apgd"

    def __init__(self, *, norm: str = "Linf", eps: float, steps: int = 100, restarts: int = 1, loss: str = "ce",
                 random_start: bool = True):
        super().__init__(norm=norm, eps=eps)
        if loss not in LOSSES:
            raise ValueError(f"The 'loss' parameter of APGD must be one of {sorted(LOSSES)}; got {loss!r}.")
        if steps < 1 or restarts < 1:
            raise ValueError(f"APGD needs steps >= 1 and restarts >= 1; got steps={steps}, restarts={restarts}.")
        self.steps, self.restarts, self.loss, self.random_start = int(steps), int(restarts), loss, random_start

    @property
    def label(self) -> str:
        return f"apgd-{self.loss}"

    def perturb(self, model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator,
                trace: dict | None = None) -> torch.Tensor:
        base = LOSSES[self.loss]
        best, best_margin = x.clone(), torch.full((len(x),), float("inf"), device=x.device)
        for r in range(self.restarts):
            idx = (best_margin >= 0).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            ys, run = y[idx], {}
            xa, m = apgd_run(model, x[idx], ys, lambda z, i: base(z, ys[i]), eps=self.eps, norm=self.norm,
                             steps=self.steps, generator=generator, start_random=self.random_start or r > 0,
                             trace=run)
            _record(trace, run, idx, len(x))
            better = m < best_margin[idx]
            best[idx[better]], best_margin[idx[better]] = xa[better], m[better]
        return best

    def __repr__(self) -> str:
        return f"APGD(norm={self.norm!r}, eps={self.eps:g}, loss={self.loss!r}, steps={self.steps}, restarts={self.restarts})"


class APGDTargeted(Attack):
    """APGD with the targeted DLR loss, run once per target among the `n_targets` highest other classes."""

    name = "apgd-t"

    def __init__(self, *, norm: str = "Linf", eps: float, steps: int = 100, n_targets: int = 3,
                 give_up: tuple[float, float] | None = None):
        super().__init__(norm=norm, eps=eps)
        # give_up = (fraction of steps, targeted-DLR loss): points still below that loss then are dropped.
        self.give_up = give_up
        if steps < 1 or n_targets < 1:
            raise ValueError(f"APGDTargeted needs steps >= 1 and n_targets >= 1; got {steps}, {n_targets}.")
        self.steps, self.n_targets = int(steps), int(n_targets)

    targeted = True

    def perturb(self, model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator,
                trace: dict | None = None) -> torch.Tensor:
        logits = model.logits(x)
        ranked = logits.scatter(1, y[:, None], float("-inf")).argsort(1, descending=True)
        best, best_margin = x.clone(), torch.full((len(x),), float("inf"), device=x.device)
        for t in range(min(self.n_targets, logits.shape[1] - 1)):
            idx = (best_margin >= 0).nonzero().squeeze(1)
            if len(idx) == 0:
                break
            give_up = None if self.give_up is None else (int(self.give_up[0] * self.steps), self.give_up[1])
            targeted_run(model, x, y, idx, ranked[idx, t], best, best_margin, eps=self.eps, norm=self.norm,
                         steps=self.steps, generator=generator, give_up=give_up, trace=trace)
        return best

    def __repr__(self) -> str:
        return f"APGDTargeted(norm={self.norm!r}, eps={self.eps:g}, steps={self.steps}, n_targets={self.n_targets})"
