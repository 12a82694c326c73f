"""The adversarial benchmark's model suite: 16 MNIST-5k models, trained here with fixed seeds and cached in
bench/.cache, split into a design half (looked at while changing the attack ensemble) and a held-out half
(evaluated only once the design is frozen).

Every model has its threat model (norm, eps) next to it: the eps it was trained for, or the usual MNIST one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from _mnist import Quantised, Saturated, cached_model, split
from _models import BasicBlock

from brittle.demo.model import DemoCNN


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    norm: str
    eps: float
    half: str  # "design", or "held-out", "held-out-2", "held-out-3": rounds of new models, one per design change


# ----- architectures --------------------------------------------------------------------------------------

def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def cnn_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))


class ResNet(nn.Module):
    """A small residual network: stem, two BasicBlock-style blocks (one after a stride-2 convolution), pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = BasicBlock(16)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.block2 = BasicBlock(32)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.head(self.block2(self.down(self.block1(self.stem(x)))))


def small_cnn() -> nn.Module:
    """A CNN without pooling or BatchNorm, which interval bounds can train (IBP)."""
    return nn.Sequential(nn.Conv2d(1, 16, 4, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(800, 100), nn.ReLU(), nn.Linear(100, 10))


# ----- training -------------------------------------------------------------------------------------------

def _attack(model, x, y, eps, norm, steps, loss):
    """PGD with a random start, in the training loop (the model in eval mode while attacking)."""
    if norm == "Linf":
        delta = (torch.rand_like(x) * 2 - 1) * eps
    else:
        delta = torch.randn_like(x)
        delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * eps * torch.rand(len(x), 1, 1, 1)
    step = 2.5 * eps / steps
    for _ in range(steps):
        delta.requires_grad_(True)
        (g,) = torch.autograd.grad(loss(model((x + delta).clamp(0, 1))), delta)
        if norm == "Linf":
            delta = (delta.detach() + step * g.sign()).clamp(-eps, eps)
        else:
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = delta.detach() + step * g
            delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(eps).view(-1, 1, 1, 1))
    return (x + delta).clamp(0, 1).detach()


def fit(build: Callable[[], nn.Module], name: str, *, kind: str = "standard", eps: float = 0.0, norm: str = "Linf",
        epochs: int = 5, seed: int = 0, sigma: float = 0.0) -> nn.Module:
    """Train (or load from the cache) `build()` with `kind`: standard, pgd, trades, ibp or noise."""
    torch.manual_seed(seed)  # the initial weights come from the seed too
    model = build()
    return cached_model(f"suite_{name}.pt", model,
                        lambda: _train(model, name, kind=kind, eps=eps, norm=norm, epochs=epochs, seed=seed, sigma=sigma))


def _train(model: nn.Module, name: str, *, kind: str, eps: float, norm: str, epochs: int, seed: int,
           sigma: float) -> nn.Module:
    (x, y), _ = split()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    ibp = None
    if kind == "ibp":
        from brittle.certify import ibp_margins, network_from_module

        ibp = (ibp_margins, network_from_module(model, example=x[:2]))
    t0 = time.time()
    for epoch in range(epochs):
        ramp = min(1.0, (epoch + 1) / max(1, epochs // 3))  # eps ramps up over the first third
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            xb, yb = x[idx], y[idx]
            e = eps * ramp
            if kind in ("pgd", "trades"):
                model.eval()
                if kind == "pgd":
                    xa = _attack(model, xb, yb, e, norm, 10, lambda out: F.cross_entropy(out, yb))
                else:
                    with torch.no_grad():
                        clean = F.softmax(model(xb), 1)
                    xa = _attack(model, xb, yb, e, norm, 10,
                                 lambda out: F.kl_div(F.log_softmax(out, 1), clean, reduction="batchmean"))
                model.train()
            opt.zero_grad()
            if kind == "pgd":
                loss = F.cross_entropy(model(xa), yb)
            elif kind == "trades":
                logits = model(xb)
                loss = F.cross_entropy(logits, yb) + 6.0 * F.kl_div(F.log_softmax(model(xa), 1), F.softmax(logits, 1),
                                                                    reduction="batchmean")
            elif kind == "noise":
                loss = F.cross_entropy(model((xb + sigma * torch.randn_like(xb)).clamp(0, 1)), yb)
            elif kind == "ibp":
                margins = ibp[0](ibp[1], xb, yb, e, (0.0, 1.0), differentiable=True)
                worst = torch.zeros(len(xb), 10).masked_scatter(torch.arange(10)[None] != yb[:, None], -margins)
                kappa = 1.0 - 0.5 * ramp
                loss = kappa * F.cross_entropy(model(xb), yb) + (1 - kappa) * F.cross_entropy(worst, yb)
            else:
                loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
        print(f"  [{name}] epoch {epoch + 1}/{epochs} ({time.time() - t0:.0f} s)", flush=True)
    return model


def _standard_cnn() -> nn.Module:
    return fit(DemoCNN, "cnn", epochs=5)


SUITE = [
    Case("standard MLP", lambda: fit(mlp, "mlp", epochs=10), "Linf", 0.1, "design"),
    Case("standard CNN", _standard_cnn, "Linf", 0.1, "design"),
    Case("CNN with BatchNorm", lambda: fit(cnn_bn, "cnn_bn", epochs=5), "Linf", 0.1, "held-out"),
    Case("residual net", lambda: fit(ResNet, "resnet", epochs=5), "Linf", 0.1, "held-out"),
    Case("PGD-trained CNN, eps 0.1", lambda: fit(DemoCNN, "pgd_0.1", kind="pgd", eps=0.1, epochs=10), "Linf", 0.1,
         "held-out"),
    Case("PGD-trained CNN, eps 0.2", lambda: fit(DemoCNN, "pgd_0.2", kind="pgd", eps=0.2, epochs=15), "Linf", 0.2,
         "design"),
    Case("PGD-trained CNN, eps 0.3, seed 0", lambda: fit(DemoCNN, "pgd_0.3_s0", kind="pgd", eps=0.3, epochs=15),
         "Linf", 0.3, "design"),
    Case("PGD-trained CNN, eps 0.3, seed 1", lambda: fit(DemoCNN, "pgd_0.3_s1", kind="pgd", eps=0.3, epochs=15, seed=1),
         "Linf", 0.3, "held-out"),
    Case("PGD-trained CNN, eps 0.3, seed 2", lambda: fit(DemoCNN, "pgd_0.3_s2", kind="pgd", eps=0.3, epochs=15, seed=2),
         "Linf", 0.3, "held-out"),
    Case("TRADES CNN, eps 0.3", lambda: fit(DemoCNN, "trades_0.3", kind="trades", eps=0.3, epochs=15), "Linf", 0.3,
         "design"),
    Case("IBP-trained CNN, eps 0.1", lambda: fit(small_cnn, "ibp_0.1", kind="ibp", eps=0.1, epochs=20), "Linf", 0.1,
         "held-out"),
    Case("noise-trained CNN, sigma 0.5", lambda: fit(DemoCNN, "noise_0.5", kind="noise", sigma=0.5, epochs=5),
         "Linf", 0.1, "design"),
    Case("quantised CNN", lambda: Quantised(_standard_cnn()), "Linf", 0.1, "design"),
    Case("saturated CNN", lambda: Saturated(_standard_cnn()), "Linf", 0.1, "held-out"),
    Case("standard CNN, L2", _standard_cnn, "L2", 1.5, "held-out"),
    Case("L2-PGD-trained CNN, eps 1.5", lambda: fit(DemoCNN, "pgd_l2_1.5", kind="pgd", eps=1.5, norm="L2", epochs=10),
         "L2", 1.5, "design"),
    # Round 2 of the held-out half: added after round 1 fell short and the design changed (on models of the
    # design half and on round 1's misses); never looked at before the new design was frozen.
    Case("CNN with BatchNorm, seed 1", lambda: fit(cnn_bn, "cnn_bn_s1", epochs=5, seed=1), "Linf", 0.1, "held-out-2"),
    Case("PGD-trained CNN with BatchNorm, eps 0.1", lambda: fit(cnn_bn, "cnn_bn_pgd_0.1", kind="pgd", eps=0.1,
                                                                 epochs=10), "Linf", 0.1, "held-out-2"),
    Case("PGD-trained CNN, eps 0.3, seed 3", lambda: fit(DemoCNN, "pgd_0.3_s3", kind="pgd", eps=0.3, epochs=15, seed=3),
         "Linf", 0.3, "held-out-2"),
    # Round 3: added after round 2 missed 4 points (0.7%) and the design changed again.
    Case("CNN with BatchNorm, seed 2", lambda: fit(cnn_bn, "cnn_bn_s2", epochs=5, seed=2), "Linf", 0.1, "held-out-3"),
    Case("PGD-trained CNN, eps 0.3, seed 4", lambda: fit(DemoCNN, "pgd_0.3_s4", kind="pgd", eps=0.3, epochs=15, seed=4),
         "Linf", 0.3, "held-out-3"),
]
