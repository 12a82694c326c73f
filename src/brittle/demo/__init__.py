"""`brittle demo`: train a small CNN on MNIST digits with a planted backdoor, then audit it for real.

The model is exported as TorchScript and the data written as .npz, and the audit reads them back
through the same loaders a user's files go through.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .._progress import Progress
from ..result import AuditResult

__all__ = ["run_demo", "DEMO_CONFIG"]

DEMO_CONFIG = """\
# The demo's audit configuration: the same format `brittle audit --config` reads.
seed = 0
gates = [
  "accuracy.accuracy >= 0.9",
  "adversarial.robust_accuracy >= 0.5",
  "backdoor.backdoor_detected == 0",
]

[model]
bounds = [0.0, 1.0]

[threat]  # what the adversarial and certified checks measure against
norm = "Linf"
eps = 0.15

[adversarial]
max_samples = 500

[certified]
# Bound propagation costs seconds per point on this CNN: a few points, and a curve down to small eps
# (0.01-0.05 of the threat's), where proofs are within reach of an undefended model.
max_samples = 10
eps_curve = [0.01, 0.02, 0.05, 1.0]
"""


def run_demo(out: str | Path = "brittle-demo", *, progress: Progress | None = None) -> AuditResult:
    from ..runner import audit
    from .data import TARGET_CLASS, demo_data, stamp_trigger
    from .model import DemoCNN
    from .train import train_classifier

    progress = progress or Progress()
    out = Path(out)
    files = out / "inputs"
    files.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    progress.message("brittle demo: training a small CNN on 4,000 MNIST digits (5% carry a planted backdoor)...")
    d = demo_data(seed=0)
    torch.manual_seed(0)  # the initial weights too: the demo gives the same numbers on every run
    model = train_classifier(DemoCNN(), d.x_train, d.y_train, epochs=4, seed=0)
    scripted = torch.jit.script(model)
    scripted.save(str(files / "demo_cnn.ts"))
    torch.save(model.state_dict(), files / "demo_cnn_state_dict.pt")
    np.savez(files / "test.npz", x=d.x_test, y=d.y_test)
    np.savez(files / "train.npz", x=d.x_train, y=d.y_train, poisoned=d.poisoned)
    np.savez(files / "test_triggered.npz", x=stamp_trigger(d.x_test[d.y_test != TARGET_CLASS]),
             y=d.y_test[d.y_test != TARGET_CLASS])
    (files / "audit.toml").write_text(DEMO_CONFIG)
    progress.message(f"trained in {time.monotonic() - t0:.0f} s; auditing...")
    return audit(str(files / "demo_cnn.ts"), str(files / "test.npz"), train_data=str(files / "train.npz"),
                 config=files / "audit.toml", out=out / "report", overwrite=True, progress=progress)
