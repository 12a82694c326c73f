"""Drift monitor: quiet on same-distribution windows at the nominal rate, alerts on shifted ones."""

import json

import numpy as np
import pytest

import brittle
from brittle.drift import ks_2samp, mmd_permutation_test
from tests.conftest import make_blobs


def test_ks_matches_scipy_asymptotic():
    stats = pytest.importorskip("scipy.stats")
    g = np.random.default_rng(0)
    a, b = g.normal(0, 1, 300), g.normal(0.2, 1, 200)
    d, p = ks_2samp(a, b)
    ref = stats.ks_2samp(a, b, method="asymp")
    assert abs(d - ref.statistic) < 1e-12 and abs(p - ref.pvalue) < 0.01


def test_mmd_p_values_are_uniform_enough_under_the_null_and_small_under_a_shift():
    g = np.random.default_rng(1)
    null_p = [mmd_permutation_test(g.normal(size=(60, 4)), g.normal(size=(40, 4)), permutations=99, seed=s)[1]
              for s in range(40)]
    assert np.mean(np.array(null_p) < 0.1) <= 0.2
    shifted = mmd_permutation_test(g.normal(size=(60, 4)), g.normal(0.8, 1, size=(40, 4)), permutations=99)[1]
    assert shifted <= 0.02


def test_monitor_false_alarm_rate_and_power(tiny_model):
    x, _ = make_blobs(n=3000, seed=0)  # the same prototypes as the training blobs
    reference = x[:1000]
    alarms = sum(brittle.monitor(tiny_model, reference, x[1000 + 100 * k: 1100 + 100 * k], permutations=99,
                                 seed=k).drift for k in range(20))
    assert alarms <= 3  # nominal 5% of 20 windows is 1; binomial(20, 0.05) exceeds 3 with probability 1.6%
    g = np.random.default_rng(5)
    shifted = np.clip(x[2000:2100] + g.normal(0, 0.3, size=x[2000:2100].shape), 0, 1).astype(np.float32)
    result = brittle.monitor(tiny_model, reference, shifted, permutations=99)
    assert result.drift and result.n_batch == 100


def test_monitor_cli_exit_codes(tmp_path, tiny_model):
    import torch

    from brittle.cli import main

    x, y = make_blobs(n=1200, seed=0)
    torch.jit.script(tiny_model).save(str(tmp_path / "m.ts"))
    np.savez(tmp_path / "ref.npz", x=x[:1000], y=y[:1000])
    np.savez(tmp_path / "same.npz", x=x[1000:], y=y[1000:])
    np.savez(tmp_path / "dark.npz", x=(x[1000:] * 0.3).astype(np.float32), y=y[1000:])
    common = ["monitor", "--model", str(tmp_path / "m.ts"), "--reference", str(tmp_path / "ref.npz"), "--quiet"]
    assert main(common + ["--batch", str(tmp_path / "same.npz")]) == 0
    assert main(common + ["--batch", str(tmp_path / "dark.npz"), "--out", str(tmp_path / "d.json")]) == 1
    assert json.loads((tmp_path / "d.json").read_text())["drift"] is True
    assert main(common + ["--batch", str(tmp_path / "dark.npz"), "--alpha", "2"]) == 2


def test_monitor_sees_an_input_change_the_model_ignores():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        model[1].weight[:, 32:] = 0.0  # the model reads only the top half of the image
    x, _ = make_blobs(n=1300, seed=0)
    moved = x[1000:].copy()
    moved[:, :, 4:] = np.clip(moved[:, :, 4:] + 0.3, 0, 1)  # a change in the half it ignores
    result = brittle.monitor(model, x[:1000], moved, permutations=99)
    assert result.drift and result.input_mmd_p < 0.05 / 3
    assert result.ks_min_p > 0.05 / 3 / 3 and result.mmd_p > 0.05 / 3  # outputs and features did not move
