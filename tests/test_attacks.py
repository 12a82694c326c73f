"""Attack properties and an analytic ground truth on a linear model."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from brittle import ModelAdapter
from brittle.attacks import PGD, evaluate_shard, lp_norm, margin, verify


def _linear_binary(seed=0, d=16):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(d, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, d, generator=g))
        lin.bias.copy_(torch.randn(2, generator=g) * 0.1)
    return lin


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), norm=st.sampled_from(["Linf", "L2"]), eps=st.floats(0.01, 0.8),
       steps=st.integers(1, 8), restarts=st.integers(1, 3))
def test_every_example_is_inside_its_ball_and_the_bounds(seed, norm, eps, steps, restarts):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    model = ModelAdapter(net, bounds=(-1.0, 2.0))
    x = torch.rand(10, 3, 4) * 3 - 1
    y = torch.randint(0, 4, (10,))
    x_adv = PGD(norm=norm, eps=eps, steps=steps, restarts=restarts)(model, x, y, seed=seed)
    assert x_adv.shape == x.shape
    assert bool((lp_norm(x_adv - x, norm) <= eps * (1 + 1e-5)).all())
    assert float(x_adv.min()) >= -1.0 and float(x_adv.max()) <= 2.0


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_pgd_breaks_exactly_the_points_within_the_analytic_margin(norm):
    """For a 2-class linear model, the worst case under ||d||_p <= eps moves the margin by eps*||w1-w0||_q."""
    d = 16
    lin = _linear_binary(d=d)
    model = ModelAdapter(lin, bounds=(-10.0, 10.0))  # bounds far away: the ball is never clipped
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, d, generator=g)
    logits = lin(x).detach()
    y = logits.argmax(1)
    w = (lin.weight[1] - lin.weight[0]).detach()
    q = 1 if norm == "Linf" else 2
    eps = float(margin(logits, y).median() / w.norm(p=q))
    distance = margin(logits, y) / w.norm(p=q)  # analytic distance to the boundary
    x_adv = PGD(norm=norm, eps=eps, steps=20, restarts=1)(model, x, y)
    broken = verify(model, x, y, x_adv, eps=eps, norm=norm).adversarial
    clear = (distance - eps).abs() > 1e-3 * eps  # leave out points numerically on the sphere
    assert clear.sum() > 350
    assert torch.equal(broken[clear], (distance < eps)[clear])


def test_verifier_rejects_what_an_attack_claims_wrongly(tiny_model, blobs):
    model = ModelAdapter(tiny_model)
    x, y = torch.from_numpy(blobs[0][:20]), torch.from_numpy(blobs[1][:20])
    outside = (x + 0.5).clamp(0, 1)  # far outside a 0.1 ball
    v = verify(model, x, y, outside, eps=0.1, norm="Linf")
    assert not bool(v.in_ball.all()) and not bool(v.adversarial[~v.in_ball].any())
    beyond = x.clone()
    beyond[:, 0, 0, 0] = 1.05  # outside the bounds
    assert not bool(verify(model, x, y, beyond, eps=0.5, norm="Linf").adversarial.any())
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert not bool(verify(model, x, y, nan, eps=0.5, norm="Linf").adversarial[0])


def test_attack_lowers_accuracy_and_counts_passes(tiny_model, blobs):
    model = ModelAdapter(tiny_model)
    x, y = torch.from_numpy(blobs[0][:90]), torch.from_numpy(blobs[1][:90])
    weak = evaluate_shard(model, x, y, [PGD(eps=0.02, steps=10)], eps=0.02, norm="Linf", seed=0)
    strong = evaluate_shard(model, x, y, [PGD(eps=0.3, steps=20, restarts=2)], eps=0.3, norm="Linf", seed=0)
    clean = float(strong.correct.float().mean())
    assert clean > 0.9
    assert float(strong.robust.float().mean()) < 0.1  # prototypes are ~0.3 apart per pixel
    assert float(weak.robust.float().mean()) > float(strong.robust.float().mean())
    assert strong.backward > 0 and strong.forward >= strong.backward
    again = evaluate_shard(model, x, y, [PGD(eps=0.3, steps=20, restarts=2)], eps=0.3, norm="Linf", seed=0)
    assert torch.equal(again.robust, strong.robust) and torch.equal(again.x_adv, strong.x_adv)


def test_attack_accepts_a_plain_module(tiny_model, blobs):
    x, y = torch.from_numpy(blobs[0][:8]), torch.from_numpy(blobs[1][:8])
    x_adv = PGD(eps=0.1, steps=3)(tiny_model, x, y)
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6


def test_bad_attack_parameters():
    with pytest.raises(ValueError, match="'eps' parameter of PGD must be > 0"):
        PGD(eps=0)
    with pytest.raises(ValueError, match="norm"):
        PGD(eps=0.1, norm="L7")
