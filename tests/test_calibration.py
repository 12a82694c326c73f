"""Calibration measures against synthetic predictors with known answers; temperature scaling end to end."""

import numpy as np
import torch

import brittle
from brittle.calibrate import calibrate
from brittle.calibration import classwise_ece, ece, fit_temperature, softmax


def _sampled(n=20000, classes=5, temperature=1.0, seed=0):
    """Logits and labels drawn from softmax(logits / temperature): calibrated at that temperature."""
    g = np.random.default_rng(seed)
    logits = g.normal(0, 3, size=(n, classes))
    p = softmax(logits, temperature)
    y = (p.cumsum(1) > g.random((n, 1))).argmax(1)
    return logits, y


def test_a_perfectly_calibrated_predictor_has_ece_near_zero():
    logits, y = _sampled()
    p = softmax(logits)
    assert ece(p, y) < 0.015 and ece(p, y, scheme="mass") < 0.015 and classwise_ece(p, y) < 0.01
    overconfident = softmax(logits * 3)
    assert ece(overconfident, y) > 0.1


def test_temperature_scaling_recovers_a_known_temperature():
    for t in (0.5, 2.0, 4.0):
        logits, y = _sampled(temperature=t, seed=int(t * 10))
        assert abs(fit_temperature(logits, y) - t) / t < 0.05


def test_calibration_check_and_calibrate_command(tmp_path, tiny_model):
    from brittle.cli import main
    from tests.conftest import make_blobs

    x, y = make_blobs(n=600, noise=0.8, seed=0)  # noisier than the training blobs: the model errs (~80%)
    overconfident = torch.nn.Sequential(tiny_model, _Scale(8.0))  # same decisions, logits x8
    r = brittle.audit(overconfident, (x, y), checks=["calibration"], out=tmp_path / "audit")["calibration"]
    assert "Reliability diagram" in (tmp_path / "audit" / "report.html").read_text()
    assert r.metrics["temperature"] > 2 and r.metrics["ece_after_scaling"] < r.metrics["ece"]
    assert r.status == "warn" and r.findings[0].id == "calibration.overconfident"

    torch.jit.script(overconfident).save(str(tmp_path / "m.ts"))
    np.savez(tmp_path / "val.npz", x=x, y=y)
    fit = calibrate(str(tmp_path / "m.ts"), (x, y), tmp_path / "cal.ts")
    assert fit.ece_after < fit.ece_before and fit.nll_after < fit.nll_before
    assert main(["calibrate", "--model", str(tmp_path / "m.ts"), "--data", str(tmp_path / "val.npz"),
                 "--out", str(tmp_path / "cal2.ts"), "--quiet"]) == 0
    scaled = brittle.audit(str(tmp_path / "cal2.ts"), (x, y), checks=["accuracy", "calibration"])
    original = brittle.audit(overconfident, (x, y), checks=["accuracy"])
    assert scaled["accuracy"].metrics["accuracy"] == original["accuracy"].metrics["accuracy"]  # same decisions
    assert abs(scaled["calibration"].metrics["temperature"] - 1.0) < 0.05  # nothing left to scale


class _Scale(torch.nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, z):
        return z * self.k
