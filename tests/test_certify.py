"""Certification: exact on a linear layer, sound on random networks, clear about what it cannot read."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import brittle
from brittle.attacks.apgd import APGD
from brittle.certify import alpha_crown_margins, crown_margins, ibp_margins, network_from
from brittle.errors import UsageError
from brittle.model import ModelAdapter
from brittle.smoothing import certify, clopper_pearson_lower


def _adapter(module, x):
    a = ModelAdapter(module)
    a.bind(x[:2])
    return a


def test_crown_is_exact_on_a_linear_layer():
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    x = torch.rand(5, 6) * 0.6 + 0.2  # the balls stay inside [0, 1]: no clipping
    y = torch.tensor([0, 1, 2, 0, 1])
    net = network_from(_adapter(lin, x))
    w, b = lin.weight.detach(), lin.bias.detach()
    for norm, eps, dual in (("Linf", 0.05, 1), ("L2", 0.1, 2)):
        bound = crown_margins(net, x, y, eps, (0.0, 1.0), norm=norm)
        for i in range(5):
            others = [j for j in range(3) if j != y[i]]
            for col, j in enumerate(others):
                d = w[y[i]] - w[j]
                exact = float(d @ x[i] + b[y[i]] - b[j] - eps * d.norm(p=dual))
                assert abs(float(bound[i, col]) - exact) < 1e-5, (norm, i, j)


def _random_nets():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 6, 2, stride=2),
                        nn.ReLU(), nn.Flatten(), nn.Linear(6, 4))
    with torch.no_grad():
        cnn[1].running_mean.uniform_(-0.2, 0.2)
        cnn[1].running_var.uniform_(0.5, 2.0)
    return [mlp.eval(), cnn.eval()]


@pytest.mark.parametrize("which", [0, 1])
def test_no_certified_point_is_ever_broken_and_bounds_hold_on_samples(which):
    net_module = _random_nets()[which]
    g = torch.Generator().manual_seed(2)
    x = torch.rand(24, 1, 6, 6, generator=g)
    y = net_module(x).argmax(1)
    adapter = _adapter(net_module, x)
    net = network_from(adapter)
    for eps in (0.01, 0.05, 0.2):
        bounds = {"ibp": ibp_margins(net, x, y, eps, (0.0, 1.0)), "crown": crown_margins(net, x, y, eps, (0.0, 1.0)),
                  "alpha": alpha_crown_margins(net, x, y, eps, (0.0, 1.0), steps=10)}
        assert (bounds["alpha"] >= bounds["crown"] - 1e-6).all()
        noise = (torch.rand(24, 400, 1, 6, 6, generator=g) * 2 - 1) * eps
        z = (x[:, None] + noise).clamp(0, 1).reshape(-1, 1, 6, 6)
        out = net_module(z).reshape(24, 400, -1).detach()
        attack = APGD(norm="Linf", eps=eps, steps=30, loss="ce")(adapter, x, y, seed=0)
        out_adv = net_module(attack).detach()
        for i in range(24):
            others = [j for j in range(out.shape[-1]) if j != y[i]]
            sampled = torch.stack([(out[i, :, y[i]] - out[i, :, j]).min() for j in others])
            for name, b in bounds.items():
                assert (b[i] <= sampled + 1e-4).all(), (name, eps, i)
                if (b[i] > 0).all():  # certified: the attack must not succeed
                    assert out_adv[i].argmax() == y[i], (name, eps, i)


def test_unsupported_layers_are_named():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(UsageError, match="MaxPool2d"):
        network_from(_adapter(model, torch.rand(2, 1, 6, 6)))


class _Threshold(nn.Module):
    """Class 0 when x_0 < 0.3: the distance to the decision boundary is 0.3 - x_0."""

    def forward(self, x):
        s = x[:, 0] - 0.3
        return torch.stack([-s, s], 1)


def test_smoothing_radius_matches_the_closed_form():
    # Under N(0, sigma^2), pA = Phi((0.3 - x0) / sigma), so the exact radius sigma * Phi^-1(pA) = 0.3 - x0.
    model = _adapter(_Threshold(), torch.zeros(2, 4))
    x = torch.zeros(3, 4)
    x[:, 0] = torch.tensor([0.1, 0.2, 0.25])
    r = certify(model, x, sigma=0.1, n=20000, alpha=0.001, seed=0)
    assert (r.prediction == 0).all()
    distance = 0.3 - x[:, 0].numpy()
    assert (r.radius <= distance + 1e-9).all() and (r.radius > distance - 0.02).all()
    assert abs(clopper_pearson_lower(100, 100, 0.01) - 0.01 ** (1 / 100)) < 1e-12
    far = certify(model, torch.full((1, 4), 0.3), sigma=0.1, n=2000, seed=0)  # on the boundary: abstain
    assert far.prediction[0] == -1 and far.radius[0] == 0


def test_certified_check_end_to_end(tmp_path, blobs, tiny_model):
    x, y = blobs
    cfg = {"certified": {"eps": 0.05, "max_samples": 40, "smoothing_sigma": 0.1, "smoothing_n": 500,
                         "smoothing_samples": 10}}
    r = brittle.audit(tiny_model, (x, y), checks=["certified"], config=cfg, out=tmp_path / "a")["certified"]
    m = r.metrics
    assert m["certified_accuracy"] <= m["empirical_robust_accuracy"] <= m["clean_accuracy"]
    assert math.isclose(m["certified_accuracy"] + m["unknown_share"] + (1 - m["empirical_robust_accuracy"]), 1.0)
    curve = r.details["curve"]
    assert curve["certified"] == sorted(curve["certified"], reverse=True)  # fewer proofs as eps grows
    assert all(c <= e for c, e in zip(curve["certified"], curve["empirical"]))
    assert r.arrays["status"].shape == (40,) and set(np.unique(r.arrays["status"])) <= {0, 1, 2}
    assert 0 <= m["smoothed_certified_accuracy"] <= 1
    unsupported = nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 3))
    with pytest.raises(UsageError, match="'certified' was asked for but cannot run here: .*MaxPool2d"):
        brittle.audit(unsupported, (x, y), checks=["certified"])  # asked for by name: refused before any work
    skipped = brittle.audit(unsupported, (x, y), checks=None, config={"certified": {"max_samples": 4}})
    assert skipped["certified"].status == "skipped" and "MaxPool2d" in skipped["certified"].reason
