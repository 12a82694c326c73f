"""`brittle demo`: train a small CNN on MNIST digits with a planted backdoor, then audit it for real.

The model is exported as TorchScript and the data written as .npz, and the audit reads them back
through the same loaders a user's files go through.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from .._progress import Progress
from ..errors import UsageError
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

# Sample sizes are smaller than the defaults so that the demo takes about a minute on 2 cores;
# a real audit keeps the defaults (or sets its own here).
[adversarial]
max_samples = 300

[corruptions]
max_samples = 500
severities = [1, 3, 5]

[certified]
# CROWN costs about 1 s per point on this MaxPool CNN on CPU: 20 points, and a curve down to small eps
# (0.01 and 0.05 of the threat's), where proofs are within reach of an undefended model.
max_samples = 20
eps_curve = [0.01, 0.05, 1.0]
"""


def run_demo(out: str | Path = "brittle-demo", *, progress: Progress | None = None,
             workers: int | None = None) -> AuditResult:
    """Train the demo's model, write its inputs to `out`/inputs and audit them into `out`/report. The audit's
    shards run on a pool of `workers` processes (default: 2 where there are 2 CPUs; 1 = in this process); the
    numbers are the same either way."""
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise UsageError(f"The 'workers' option must be >= 1; got {workers}.")
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
                 config=files / "audit.toml", out=out / "report", overwrite=True, progress=progress,
                 backend="process" if workers > 1 else "local", workers=workers)
