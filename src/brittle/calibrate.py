"""`brittle calibrate`: fit a temperature on labelled held-out data and write the scaled model.

The written model is TorchScript that divides the original model's outputs by T: the same inputs
(normalisation stays the user's, as before), the same predictions, better-calibrated probabilities, and
a file `brittle audit` accepts. Saving code is the point here, so the output is TorchScript, never a pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .calibration import ece, fit_temperature, nll, softmax
from .errors import UsageError

__all__ = ["TemperatureScaled", "CalibrationFit", "calibrate"]


class TemperatureScaled(nn.Module):
    def __init__(self, inner: nn.Module, temperature: float):
        super().__init__()
        self.inner = inner
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) / self.temperature


@dataclass
class CalibrationFit:
    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    n: int
    path: Path | None = None


def calibrate(model, data, out: str | Path | None = None, *, config=None) -> CalibrationFit:
    """Fit T on `data` (labelled) and, when `out` is given, write the scaled model there as TorchScript.

    `model` and `data` take what `brittle.audit` takes. The fit is on all of `data`: give data the model
    was not trained on (a validation split), and audit on other data.
    """
    from .config import as_config
    from .prepare import prepare_data, prepare_model

    cfg = as_config(config)
    adapter = prepare_model(model, cfg)
    ds = prepare_data(data, adapter, cfg, role="data")
    if ds.y is None:
        raise UsageError(f"{ds.source}: calibration needs labels; give labelled held-out data.")
    logits = adapter.logits(ds.x).numpy().astype(np.float64)
    y = ds.y.numpy()
    t = fit_temperature(logits, y)
    before, after = softmax(logits), softmax(logits, t)
    fit = CalibrationFit(t, ece(before, y), ece(after, y), nll(before, y), nll(after, y), len(y))
    if out is not None:
        fit.path = _write(adapter, t, ds.x[:8], Path(out))
    return fit


def _write(adapter, t: float, example: torch.Tensor, out: Path) -> Path:
    inner = adapter.module
    if inner is None:
        raise UsageError(f"{adapter.name} runs as a black box (ONNX): brittle cannot write a scaled copy. Divide its "
                         f"outputs by the fitted temperature {t:.4f} where you serve it.")
    wrapped = TemperatureScaled(inner, t).eval()
    try:
        scripted = torch.jit.script(wrapped)
    except Exception:  # eager code TorchScript cannot compile: trace it on real inputs instead
        try:
            scripted = torch.jit.trace(wrapped, adapter.normalise(example), check_trace=False)
        except Exception as exc:
            raise UsageError(f"Could not save {adapter.name} as TorchScript ({type(exc).__name__}: {exc}). Divide "
                             f"its logits by the fitted temperature {t:.4f} in your own code.") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    scripted.save(str(tmp))
    tmp.replace(out)
    return out
