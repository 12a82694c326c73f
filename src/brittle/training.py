"""Robust training: the fixes an audit points to. `brittle train` and `brittle.train`.

Methods (`method`):
- `standard`: cross-entropy;
- `pgd`: adversarial training (Madry et al. 2018) on PGD examples with a random start;
- `trades`: cross-entropy on clean inputs + beta * KL(f(x_adv) || f(x)) with x_adv maximising that KL
  (Zhang et al. 2019);
- `ibp`: certified training with interval bounds (Gowal et al. 2018): kappa * CE(clean) + (1 - kappa) *
  CE(worst-case margins), eps and kappa ramped over the first `ramp_epochs`;
- `noise`: Gaussian data augmentation (sigma), the base model randomized smoothing needs (Cohen et al.).
The model comes from a factory (`package.module:function` + keyword arguments): checkpoints are weights plus
those constructor arguments, never a pickled module, so `brittle audit --model FACTORY --weights
OUT/weights.safetensors` (or `.pt`) reads the result. Every epoch writes `OUT/checkpoint.pt` (weights,
optimiser, epoch, random state) atomically; `resume=True` continues from it and ends with the same weights as
an uninterrupted run.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._atomic import write_bytes, write_text
from ._progress import Progress
from .errors import UsageError, arg

__all__ = ["TrainConfig", "TrainResult", "train", "METHODS"]

METHODS = ("standard", "pgd", "trades", "ibp", "noise")


@dataclass
class TrainConfig:
    method: str = "standard"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    eps: float = 0.1  # Linf, in input units (pgd, trades, ibp)
    steps: int = 7  # attack steps (pgd, trades)
    beta: float = 6.0  # trades
    sigma: float = 0.25  # noise
    ramp_epochs: int = 0  # eps (and kappa for ibp) ramp from 0; default: a third of the epochs for pgd/ibp
    bounds: tuple[float, float] = (0.0, 1.0)
    seed: int = 0

    def check(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"The 'method' parameter must be one of {', '.join(METHODS)}; got {self.method!r}.")
        for name in ("epochs", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"The '{name}' parameter must be >= 1; got {getattr(self, name)}.")
        for name in ("lr", "eps", "sigma"):
            if not getattr(self, name) > 0:
                raise UsageError(f"The '{name}' parameter must be > 0; got {getattr(self, name)}.")
        if self.bounds[0] >= self.bounds[1]:
            raise UsageError(f"bounds must be [low, high] with low < high; got {list(self.bounds)}.")


@dataclass
class TrainResult:
    weights: Path
    epochs_run: int
    history: list[dict]


def _ramp(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    ramp = cfg.ramp_epochs or (max(1, cfg.epochs // 3) if cfg.method in ("pgd", "ibp", "trades") else 0)
    if ramp == 0:
        return 1.0
    return min(1.0, (epoch + step / steps_per_epoch + 1.0 / steps_per_epoch) / ramp)


def _pgd(model, x, y, eps, steps, bounds, g, loss_fn):
    low, high = bounds
    delta = (torch.rand(x.shape, generator=g) * 2 - 1) * eps
    step = 2.5 * eps / steps
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_fn(model((x + delta).clamp(low, high)))
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(low, high).detach()


def _loss(model, net, x, y, cfg: TrainConfig, scale: float, g: torch.Generator) -> torch.Tensor:
    eps = cfg.eps * scale
    if cfg.method == "standard":
        return F.cross_entropy(model(x), y)
    if cfg.method == "noise":
        return F.cross_entropy(model(x + cfg.sigma * torch.randn(x.shape, generator=g)), y)
    if cfg.method == "pgd":
        model.eval()
        adv = _pgd(model, x, y, eps, cfg.steps, cfg.bounds, g, lambda out: F.cross_entropy(out, y))
        model.train()
        return F.cross_entropy(model(adv), y)
    if cfg.method == "trades":
        model.eval()
        with torch.no_grad():
            clean_p = F.softmax(model(x), 1)
        adv = _pgd(model, x, y, eps, cfg.steps, cfg.bounds, g,
                   lambda out: F.kl_div(F.log_softmax(out, 1), clean_p, reduction="batchmean"))
        model.train()
        logits = model(x)
        kl = F.kl_div(F.log_softmax(model(adv), 1), F.softmax(logits, 1), reduction="batchmean")
        return F.cross_entropy(logits, y) + cfg.beta * kl
    # ibp: worst-case logits from interval bounds on the margins (0 for the true class, -lower bound otherwise)
    from .certify import ibp_margins

    margins = ibp_margins(net, x, y, eps, cfg.bounds, differentiable=True)
    worst = torch.zeros(len(x), margins.shape[1] + 1)
    others = torch.arange(worst.shape[1])[None] != y[:, None]
    worst = worst.masked_scatter(others, -margins)
    kappa = 1.0 - 0.5 * scale
    return kappa * F.cross_entropy(model(x), y) + (1 - kappa) * F.cross_entropy(worst, y)


def _rng_state(g: torch.Generator) -> dict:
    return {"generator": g.get_state(), "torch": torch.get_rng_state()}


def train(factory: str, data, *, out: str | Path, factory_kwargs: dict | None = None, config: TrainConfig | None = None,
          resume: bool = False, progress: Progress | None = None) -> TrainResult:
    """Train the model `factory(**factory_kwargs)` on `data` ((x, y) arrays, a Dataset or a data file) with
    `config.method`; write weights, constructor arguments and checkpoints to `out`."""
    from .loading.data import Dataset, load_data
    from .loading.models import import_callable

    cfg = config or TrainConfig()
    cfg.check()
    kwargs = factory_kwargs or {}
    ds = load_data(data) if isinstance(data, (str, Path)) else (data if isinstance(data, Dataset)
                                                               else Dataset.from_arrays(*data))
    if ds.y is None:
        raise UsageError("Training needs labels in the data.")
    low, high = cfg.bounds
    if float(ds.x.min()) < low - 1e-6 or float(ds.x.max()) > high + 1e-6:
        raise UsageError(f"The inputs span [{float(ds.x.min()):g}, {float(ds.x.max()):g}], outside bounds "
                         f"[{low:g}, {high:g}]: give the bounds the inputs live in.")
    build = import_callable(factory, "factory", "it must build an nn.Module")
    torch.manual_seed(cfg.seed)
    model = build(**kwargs)
    if not isinstance(model, nn.Module):
        raise UsageError(f"The factory {factory!r} returned {type(model).__name__}, not an nn.Module.")
    net = None
    if cfg.method == "ibp":
        from .certify import network_from_module

        if any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules()):
            raise UsageError("IBP training does not support BatchNorm layers (their batch statistics make the "
                             "interval bounds depend on the batch); build the model without them.")
        try:
            net = network_from_module(model, example=ds.x[:2])
        except UsageError as exc:
            raise UsageError(f"IBP training propagates bounds through the model, and: {exc}") from None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    meta = {"factory": factory, "factory_kwargs": kwargs, "config": {**asdict(cfg), "bounds": list(cfg.bounds)},
            "data": ds.fingerprint()}
    g = torch.Generator().manual_seed(cfg.seed)
    start, history = 0, []
    if resume and ckpt_path.is_file():
        saved = torch.load(ckpt_path, weights_only=True)
        if json.loads(saved["meta"]) != meta:
            raise UsageError(f"{ckpt_path} was made with another factory, configuration or data; use another "
                             f"{arg('out')} or drop {arg('resume', 'True')}.")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        g.set_state(saved["generator"])
        torch.set_rng_state(saved["torch"])
        start, history = int(saved["epoch"]), json.loads(saved["history"])
    elif ckpt_path.is_file() and not resume:
        raise UsageError(f"{out} already has a training run; pass {arg('resume', 'True')} to continue it or choose "
                         f"another {arg('out')}.")
    progress = progress or Progress()
    n = len(ds)
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    for epoch in range(start, cfg.epochs):
        model.train()
        progress.start(f"{cfg.method} training, epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch)
        t0, total, correct, seen = time.monotonic(), 0.0, 0, 0
        for step, idx in enumerate(torch.randperm(n, generator=g).split(cfg.batch_size)):
            x, y = ds.x[idx], ds.y[idx]
            loss = _loss(model, net, x, y, cfg, _ramp(cfg, epoch, step, steps_per_epoch), g)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            progress.advance()
        progress.finish()
        model.eval()
        with torch.no_grad():
            correct = int((model(ds.x[:2000]).argmax(1) == ds.y[:2000]).sum())
        history.append({"epoch": epoch + 1, "loss": total / seen, "train_accuracy": correct / min(n, 2000),
                        "seconds": time.monotonic() - t0})
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                    "history": json.dumps(history), "meta": json.dumps(meta), **_rng_state(g)}, buf)
        write_bytes(ckpt_path, buf.getvalue())
    weights = out / "weights.pt"
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    write_bytes(weights, buf.getvalue())
    write_text(out / "model.json", json.dumps({**meta, "history": history, "weights": weights.name}, indent=2))
    return TrainResult(weights, len(history), history)
