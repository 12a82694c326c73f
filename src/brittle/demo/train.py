"""Train the demo CNN. This is the script behind the demo model: `python -m brittle.demo.train OUT_DIR`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .model import DemoCNN


def train_classifier(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 4, batch_size: int = 64,
                     lr: float = 2e-3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def fit_demo_cnn(x, y, *, seed: int = 0) -> torch.nn.Module:
    """A training function in the form brittle's options take (`train_fn = "brittle.demo.train:fit_demo_cnn"`):
    inputs and labels (tensors or arrays) in, a trained DemoCNN out."""
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)
    torch.manual_seed(seed)
    return train_classifier(DemoCNN(channels=x.shape[1], num_classes=int(y.max()) + 1), x, y, seed=seed)


def main(argv: list[str] | None = None) -> int:
    from .data import demo_data

    out = Path((argv or sys.argv[1:] or ["brittle-demo"])[0])
    out.mkdir(parents=True, exist_ok=True)
    d = demo_data()
    torch.manual_seed(0)
    model = train_classifier(DemoCNN(), d.x_train, d.y_train)
    torch.save(model.state_dict(), out / "demo_cnn.pt")
    print(out / "demo_cnn.pt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
