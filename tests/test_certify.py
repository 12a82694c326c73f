"""Certification: exact on a linear layer, sound on random networks, clear about what it cannot read."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from torch import nn

import brittle
from brittle.attacks.engine import evaluate_shard
from brittle.checks.adversarial import ensemble_plan
from brittle.certify import alpha_crown_margins, crown_margins, ibp_margins, interval_pass, network_from
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


class _Residual(nn.Module):
    """A BasicBlock-style residual network with BatchNorm, MaxPool, LeakyReLU, a sigmoid gate, concatenation and
    view(size(0), -1): the graph operations the chain reader refused."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect")
        self.c1, self.b1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.side = nn.Conv2d(4, 2, 1)
        self.fc = nn.Linear(6 * 3 * 3, 4)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.b2(self.c2(nn.functional.leaky_relu(self.b1(self.c1(h)), 0.1))))
        h = self.pool(h)
        h = torch.cat([h, torch.sigmoid(self.side(h))], 1)
        return self.fc(h.view(h.size(0), -1))


def _random_nets():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(36, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 6, 2, stride=2),
                        nn.ReLU(), nn.Flatten(), nn.Linear(6, 4))
    res = _Residual()
    for bn in (cnn[1], res.b1, res.b2):
        with torch.no_grad():
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return [mlp.eval(), cnn.eval(), res.eval()]


@pytest.mark.parametrize("which", [0, 1, 2])
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
        # the adversarial check's own ensemble: a certified point it breaks would be a bug on one side or the other
        attacked = evaluate_shard(adapter, x, y, ensemble_plan("Linf", eps), seed=0)
        if eps == 0.2 and which > 0:  # the ensemble is live here: it breaks points the bounds leave open
            assert not attacked.robust.all()
        for i in range(24):
            others = [j for j in range(out.shape[-1]) if j != y[i]]
            sampled = torch.stack([(out[i, :, y[i]] - out[i, :, j]).min() for j in others])
            for name, b in bounds.items():
                assert (b[i] <= sampled + 1e-4).all(), (name, eps, i)
                if (b[i] > 0).all():  # certified: the attack must not succeed
                    assert attacked.robust[i], (name, eps, i)


class _Squared(nn.Module):
    def forward(self, x):
        return (x.flatten(1) * x.flatten(1))[:, :3]


@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU(), nn.Flatten(), nn.Linear(32, 3)), "GELU"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Linear(8, 3)), "ceil_mode"),
    (_Squared(), "product .* of two tensors that depend on the input"),
])
def test_what_is_not_modelled_is_refused_by_name(model, match):
    with pytest.raises(UsageError, match=match):
        network_from(_adapter(model.eval(), torch.rand(2, 1, 6, 6)))


def _exact_interval_of_padded_conv(conv: nn.Conv2d, lo: torch.Tensor, hi: torch.Tensor):
    """Interval arithmetic of pad-then-convolve written out by loops: each padded entry is its source's
    interval; each output sums weight times interval."""
    pad = [p for p in reversed(conv.padding) for _ in range(2)]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    plo, phi = nn.functional.pad(lo, pad, mode=mode), nn.functional.pad(hi, pad, mode=mode)
    k, w, b = conv.kernel_size[0], conv.weight.detach(), conv.bias.detach()
    out_lo = torch.zeros(1, w.shape[0], lo.shape[2], lo.shape[3])
    out_hi = torch.zeros_like(out_lo)
    for o in range(w.shape[0]):
        for i in range(lo.shape[2]):
            for j in range(lo.shape[3]):
                wl, vl, vh = w[o], plo[0, :, i:i + k, j:j + k], phi[0, :, i:i + k, j:j + k]
                out_lo[0, o, i, j] = b[o] + (torch.where(wl > 0, wl * vl, wl * vh)).sum()
                out_hi[0, o, i, j] = b[o] + (torch.where(wl > 0, wl * vh, wl * vl)).sum()
    return out_lo, out_hi


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "zeros"])
def test_padding_modes_follow_interval_arithmetic_and_stay_sound(mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, padding=1, padding_mode=mode).eval()
    model = nn.Sequential(conv, nn.Flatten())
    x = torch.rand(1, 1, 3, 3)
    from brittle.certify import interval_pass, network_from_module

    net = network_from_module(model, example=x)
    lo, hi = (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1)
    got_lo, got_hi = interval_pass(net, lo, hi)[1]
    want_lo, want_hi = _exact_interval_of_padded_conv(conv, lo, hi)
    assert torch.allclose(got_lo, want_lo, atol=1e-6) and torch.allclose(got_hi, want_hi, atol=1e-6)
    # and every point of the box stays inside the bounds: at the corners of the box, and for CROWN too
    corners = torch.tensor(list(__import__("itertools").product([0, 1], repeat=9)), dtype=torch.float32)
    z = lo.flatten() + corners * (hi - lo).flatten()
    out = conv(z.view(-1, 1, 3, 3)).detach()
    assert (out >= got_lo - 1e-6).all() and (out <= got_hi + 1e-6).all()


def test_the_reflect_padding_toy_of_the_issue_is_not_certified():
    """A 3x3 network whose prediction flips at x - eps, inside the ball: zero-padded radii certified it."""
    conv = nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect", bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]]]))
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(9, 2)).eval()
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].weight[0, 0] = -1.0  # class 0 wins while the corner output stays below 0.5
        model[2].bias.copy_(torch.tensor([0.5, 0.0]))
    x, eps = torch.full((1, 1, 3, 3), 0.2), 0.1
    adapter = _adapter(model, x)
    net = network_from(adapter)
    flipped = model((x + eps).clamp(0, 1)).argmax(1)  # inside the ball, the corner output reaches 0.6 > 0.5
    assert int(model(x).argmax(1)) == 0 and int(flipped) == 1
    y = torch.tensor([0])
    for fn in (ibp_margins, crown_margins, alpha_crown_margins):
        assert float(fn(net, x, y, eps, (0.0, 1.0)).min()) <= 0, fn.__name__


def test_torchscript_and_the_demo_cnn_are_certifiable():
    from brittle.demo.model import DemoCNN

    torch.manual_seed(0)
    model = DemoCNN().eval()
    x = torch.rand(4, 1, 28, 28)
    y = model(x).argmax(1)
    for m in (model, torch.jit.script(model)):
        net = network_from(_adapter(m, x))
        assert "maxpool" in [n.op for n in net.nodes]
        b = crown_margins(net, x, y, 0.001, (0.0, 1.0))
        assert b.shape == (4, 9) and (b > 0).all()  # a tiny ball around a random input: provably the same class


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
    unsupported = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GELU(), nn.Flatten(), nn.Linear(72, 3))
    with pytest.raises(UsageError, match="'certified' was asked for but cannot run here: .*GELU"):
        brittle.audit(unsupported, (x, y), checks=["certified"])  # asked for by name: refused before any work
    skipped = brittle.audit(unsupported, (x, y), checks=None, config={"certified": {"max_samples": 4}})
    assert skipped["certified"].status == "skipped" and "GELU" in skipped["certified"].reason


def _margins_in_ball(module, x, y, eps, norm, draws, g):
    """Margins z_y - z_j (B, draws + 1, K-1) at random points of the ball clipped to [0, 1] and at a short PGD on
    each margin (upper bounds on the true minimum)."""
    k = module(x).shape[1]
    others = torch.tensor([[j for j in range(k) if j != int(t)] for t in y])
    u = torch.randn(len(x), draws, *x.shape[1:], generator=g)
    if norm == "Linf":
        noise = u.sign() * eps  # corners of the box: where linear pieces reach their extremes
    else:
        noise = u / u.flatten(2).norm(dim=2).view(len(x), draws, *[1] * (x.dim() - 1)) * eps
    z = (x[:, None] + noise).clamp(0, 1)
    out = module(z.reshape(-1, *x.shape[1:])).reshape(len(x), draws, k).detach()
    sampled = out.gather(2, y.view(-1, 1, 1).expand(-1, draws, 1)) - out.gather(2, others[:, None].expand(-1, draws, -1))
    pgd = []
    for col in range(k - 1):
        delta = torch.zeros_like(x)
        for _ in range(15):
            delta.requires_grad_(True)
            o = module((x + delta).clamp(0, 1))
            m = o.gather(1, y[:, None])[:, 0] - o.gather(1, others[:, col: col + 1])[:, 0]
            (grad,) = torch.autograd.grad(m.sum(), delta)
            with torch.no_grad():
                if norm == "Linf":
                    delta = (delta - eps / 6 * grad.sign()).clamp(-eps, eps)
                else:
                    delta = delta - eps / 6 * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                    delta = delta * (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1).view(-1, 1, 1, 1)
        o = module((x + delta).clamp(0, 1)).detach()
        pgd.append(o.gather(1, y[:, None])[:, 0] - o.gather(1, others[:, col: col + 1])[:, 0])
    return torch.cat([sampled, torch.stack(pgd, 1)[:, None]], 1)


def _activation(name):
    return {"relu": nn.ReLU(), "leaky": nn.LeakyReLU(0.2), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh()}[name]


class _TwoPath(nn.Module):
    """conv -> act, plus a second conv on the same input (residual addition) or concatenated."""

    def __init__(self, conv, act, side, join):
        super().__init__()
        self.conv, self.act, self.side, self.join = conv, act, side, join

    def forward(self, x):
        a, b = self.act(self.conv(x)), self.side(x)
        return a + b if self.join == "add" else torch.cat([a, b], 1)


@st.composite
def _small_networks(draw):
    torch.manual_seed(draw(st.integers(0, 10_000)))
    act = st.sampled_from(["relu", "leaky", "sigmoid", "tanh"])
    if draw(st.booleans()):
        widths = draw(st.lists(st.integers(2, 8), min_size=1, max_size=3))
        layers, prev = [nn.Flatten()], 36
        for w in widths:
            layers += [nn.Linear(prev, w), _activation(draw(act))]
            prev = w
        return nn.Sequential(*layers, nn.Linear(prev, 3)).eval()
    ch = draw(st.integers(1, 3))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    conv = nn.Conv2d(1, ch, 3, padding=1, padding_mode=mode)
    join = draw(st.sampled_from(["add", "cat", "none"]))
    first = _TwoPath(conv, _activation(draw(act)), nn.Conv2d(1, ch, 1), join) if join != "none" else \
        nn.Sequential(conv, _activation(draw(act)))
    width = ch * (2 if join == "cat" else 1)
    bn = nn.BatchNorm2d(width)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, 1.5)
    pool = draw(st.sampled_from([nn.MaxPool2d(2), nn.AvgPool2d(2), nn.MaxPool2d(3, stride=2, padding=1),
                                 nn.Identity()]))
    side = 3 if not isinstance(pool, nn.Identity) else 6
    return nn.Sequential(first, bn, pool, _activation(draw(act)), nn.Flatten(),
                         nn.Linear(width * side * side, 3)).eval()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(module=_small_networks(), eps=st.floats(0.01, 0.3), norm=st.sampled_from(["Linf", "L2"]))
def test_bounds_never_exceed_a_reachable_margin_on_generated_networks(module, eps, norm):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 6, 6, generator=g)
    y = module(x).argmax(1)
    net = network_from(_adapter(module, x))
    reached = _margins_in_ball(module, x, y, eps, norm, 64, g).amin(1)  # (B, K-1)
    for fn, kw in ((ibp_margins, {}), (crown_margins, {}), (alpha_crown_margins, {"steps": 4})):
        bound = fn(net, x, y, eps, (0.0, 1.0), norm=norm, **kw)
        assert (bound <= reached + 1e-4).all(), (fn.__name__, float((bound - reached).max()))


def test_crown_composes_affine_layers_before_the_first_relu():
    """Conv -> AvgPool and Conv -> Conv (two affine maps) and a reflect-padded conv (a row that uses one input twice): the intervals
    are loose there, so the bounds the ReLU after them gets must be the exact bounds of the composed map."""
    from brittle.certify import Problem

    torch.manual_seed(0)
    for first in (nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.AvgPool2d(2)),
                  nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)),
                  nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, padding_mode="reflect"))):
        model = nn.Sequential(*first, nn.ReLU(), nn.Flatten(), nn.Linear(3 * len(first(torch.zeros(1, 1, 6, 6))[0, 0]) ** 2, 2))
        model = model.eval()
        x = torch.rand(2, 1, 6, 6) * 0.5 + 0.25  # the balls stay inside [0, 1]
        eps = 0.05
        net = network_from(_adapter(model, x))
        relu = next(n for n in net.nodes if n.op == "relu")
        problem = Problem(net, x, eps, (0.0, 1.0), "Linf")
        problem.intermediate()
        lo, hi = problem.pre[relu.inputs[0]]
        pre = first(x).detach()
        rows = torch.autograd.functional.jacobian(lambda z: first(z[None]).flatten(), x[0]).reshape(pre[0].numel(), -1)
        radius = (eps * rows.abs().sum(1)).view_as(pre[0])
        unstable = (lo < 0) & (hi > 0)  # where the relaxation depends on the bounds, they are exact
        assert unstable.any()
        assert torch.allclose(lo[unstable], (pre - radius)[unstable], atol=1e-5)
        assert torch.allclose(hi[unstable], (pre + radius)[unstable], atol=1e-5)
        loose = interval_pass(net, *[(x - eps), (x + eps)])[relu.inputs[0]]
        assert (loose[0] < lo - 1e-4).any()  # and the intervals alone would have been looser


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (4, 9, 8)),
    (nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=(1, 0)), (2, 5, 7)),
    (nn.Conv1d(2, 4, 3, stride=2, padding=2, bias=False), (2, 9)),
    (nn.Linear(5, 3), (5,)),
])
def test_a_neurons_row_of_weights_equals_the_transposed_one_hot(layer, shape):
    """The shortcut CROWN takes at an intermediate neuron (its row of the map, not a transposed one-hot)."""
    from brittle.certify import network_from_module

    torch.manual_seed(0)
    net = network_from_module(nn.Sequential(layer, nn.Flatten()).eval(), example=torch.rand(2, *shape))
    node = net.nodes[1]
    cols = torch.randperm(math.prod(node.shape))[:20]
    rows, bias = node.rows_at(cols, shape)
    one_hot = torch.zeros(len(cols), 1, math.prod(node.shape))
    one_hot[torch.arange(len(cols)), 0, cols] = 1.0
    one_hot = one_hot.view(len(cols), 1, *node.shape)
    (dense,) = node.transpose(one_hot, [shape])
    assert torch.allclose(rows, dense[:, 0], atol=1e-6)
    assert torch.allclose(bias, node.offset(one_hot, [shape])[:, 0], atol=1e-6)


def test_the_cascade_proves_what_its_methods_prove_reusing_crowns_state():
    """The cascade's alpha stages start from CROWN's state on the points left (a row subset): they must prove
    exactly the points the methods prove when each runs from scratch, and the full stage only adds proofs."""
    from brittle.checks.certified import CertifiedOptions, cascade_positions

    module = _random_nets()[0]  # the MLP: at this eps the full stage proves 3 points the final slopes do not
    g = torch.Generator().manual_seed(3)
    x = torch.rand(24, 1, 6, 6, generator=g)
    y = module(x).argmax(1)
    adapter = _adapter(module, x)
    net = network_from(adapter)
    eps = 0.16
    statuses = {}
    for full in (False, True):
        options = CertifiedOptions(norm="Linf", eps=eps, alpha_steps=10, alpha_intermediate=full).model_dump()
        out = cascade_positions(adapter, x, y, np.arange(24), eps, options, seed=0)
        statuses[full] = out["status"]
    proven = torch.zeros(24, dtype=torch.bool)
    for full in (False, True):
        lb = alpha_crown_margins(net, x, y, eps, (0.0, 1.0), steps=10, intermediate=full)
        proven |= (lb > 0).all(1)
        proven |= (crown_margins(net, x, y, eps, (0.0, 1.0)) > 0).all(1) | (ibp_margins(net, x, y, eps, (0.0, 1.0)) > 0).all(1)
        want = proven.numpy() & (statuses[full] != "broken")
        assert ((statuses[full] == "certified") == want).all(), full
    assert (statuses[True] == "certified").sum() > (statuses[False] == "certified").sum()  # the full stage adds


def test_alpha_crown_leaves_the_models_weights_untouched():
    module = _random_nets()[1]
    x = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    y = module(x).argmax(1)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    from brittle.certify import network_from_module

    # read without an adapter, the network holds the module's own parameters (as IBP training needs)
    alpha_crown_margins(network_from_module(module, example=x), x, y, 0.1, (0.0, 1.0), steps=3)
    assert all(p.grad is None for p in module.parameters())  # no gradient left on the user's parameters
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_bounds_a_maxpool_reads_are_tightened_on_stable_neurons_too(monkeypatch):
    """A MaxPool's relaxation reads every input's bounds (its window choice, its constant upper bound): after a
    ReLU, the stable neurons' bounds matter too, and CROWN tightens them (sound: checked against sampled margins)."""
    import brittle.certify.linear as linear

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                           nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 10)).eval()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = module(x).argmax(1)
    net = network_from(_adapter(module, x))
    tight = crown_margins(net, x, y, 0.05, (0.0, 1.0))
    monkeypatch.setattr(linear, "_feeds_relaxation", lambda net, p: False)  # unstable neurons only
    loose = crown_margins(net, x, y, 0.05, (0.0, 1.0))
    # tighter intermediate bounds can change CROWN's adaptive choices, so not every margin gains; on the whole it does
    assert float((tight - loose).mean()) > 1e-3 and (tight > loose + 1e-3).float().mean() > 0.5
    reached = _margins_in_ball(module, x, y, 0.05, "Linf", 300, torch.Generator().manual_seed(2))
    assert (tight <= reached.min(1).values + 1e-5).all()


def test_a_batchnormed_layers_rows_give_the_same_bounds_as_the_dense_path(monkeypatch):
    from brittle.certify.linear import Problem

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.BatchNorm2d(6), nn.ReLU(),
                           nn.Flatten(), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        for bn in (module[3], module[7]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    module.eval()
    x = torch.rand(10, 1, 6, 6, generator=torch.Generator().manual_seed(5))
    y = module(x).argmax(1)
    net = network_from(_adapter(module, x))
    fast = crown_margins(net, x, y, 0.08, (0.0, 1.0))
    monkeypatch.setattr(Problem, "_rows_of", lambda self, p, cols: (p, None))
    dense = crown_margins(net, x, y, 0.08, (0.0, 1.0))
    assert torch.allclose(fast, dense, atol=1e-5)


class _Windows(nn.Module):
    """Every operation the window path of CROWN reads: strided, dilated, grouped and padded convolutions, BatchNorm,
    a residual block with a strided 1x1 shortcut, MaxPool with padding, average pooling, LeakyReLU / Tanh /
    Sigmoid, and windows that outgrow the image (a deep branch on a small input)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.a1, self.bn = nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4)
        self.a2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.short = nn.Conv2d(4, 4, 1, stride=2)
        # a deep branch through one channel (the fold path of a transposed convolution), dilated
        self.deep = nn.Sequential(nn.Conv2d(4, 1, 5, padding=2), nn.Tanh(), nn.Conv2d(1, 4, 3, padding=2, dilation=2))
        self.pool, self.post, self.avg = nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(4, 4, 1), nn.AvgPool2d(2)
        self.head = nn.Linear(4 + 4, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.short(h) + self.a2(nn.functional.leaky_relu(self.bn(self.a1(h)), 0.1)))
        h = torch.sigmoid(h + self.deep(h))
        h = torch.relu(self.post(self.pool(h)))
        return self.head(torch.cat([self.avg(h).flatten(1), h.mean((2, 3))], 1))


@pytest.mark.parametrize("unfold_ratio", [4, 0])  # relaxations read by unfolding (small images) or by indexing
def test_crowns_window_path_gives_the_dense_paths_bounds(monkeypatch, unfold_ratio):
    """Convolution neurons are bounded on windows (linear.py -> window.py); the dense path is the reference. In
    float64, so that no float noise flips a MaxPool's window choice between the two."""
    import brittle.certify.linear as linear
    import brittle.certify.window as window
    from brittle.certify import network_from_module

    monkeypatch.setattr(window, "UNFOLD_RATIO", unfold_ratio)
    torch.manual_seed(0)
    module = _Windows()
    with torch.no_grad():
        module.bn.running_mean.uniform_(-0.2, 0.2)
        module.bn.running_var.uniform_(0.5, 2.0)
    module = module.double().eval()
    x = torch.rand(5, 2, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    y = module(x).argmax(1)
    net = network_from_module(module, torch.tensor([0.4, 0.5]), torch.tensor([0.3, 0.25]), example=x)
    value = interval_pass(net, x, x)[net.output][0]  # the graph as read computes the model (normalised input)
    assert torch.allclose(value, module((x - torch.tensor([0.4, 0.5]).view(1, 2, 1, 1).double())
                                        / torch.tensor([0.3, 0.25]).view(1, 2, 1, 1).double()), atol=1e-10)
    used = []
    original = linear.window_bounds
    monkeypatch.setattr(linear, "window_bounds", lambda *a, **k: used.append(a[1]) or original(*a, **k))
    for norm, eps in (("Linf", 0.03), ("L2", 0.2)):
        windowed, state = crown_margins(net, x, y, eps, (0.0, 1.0), norm=norm, return_state=True)
        with monkeypatch.context() as m:
            m.setattr(linear, "windowable", lambda net, p: False)
            dense, reference = crown_margins(net, x, y, eps, (0.0, 1.0), norm=norm, return_state=True)
        for p, (lo, hi) in reference.pre.items():
            assert torch.allclose(state.pre[p][0], lo, atol=1e-9) and torch.allclose(state.pre[p][1], hi, atol=1e-9)
        assert torch.allclose(windowed, dense, atol=1e-9)
        if norm == "Linf" and unfold_ratio:
            # alpha-CROWN too: its optimised slopes read at the windows, and its optimisation started from the same
            # kept bounds (the same ties) whichever path computed them
            alpha = alpha_crown_margins(net, x[:3], y[:3], eps, (0.0, 1.0), norm=norm, steps=3)
            with monkeypatch.context() as m:
                m.setattr(linear, "windowable", lambda net, p: False)
                alpha_dense = alpha_crown_margins(net, x[:3], y[:3], eps, (0.0, 1.0), norm=norm, steps=3)
            assert torch.allclose(alpha, alpha_dense, atol=1e-7)
    assert len(set(used)) >= 4  # the stem, the block, the deep branch and the pooled layer went through windows


@pytest.mark.parametrize("pool, as_conv", [
    (nn.AvgPool2d(3, stride=2, padding=1), True),
    (nn.AdaptiveAvgPool2d(3), True),
    (nn.AdaptiveAvgPool2d((2, None)), True),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), False),  # the mean's divisor varies at the edge
    (nn.AdaptiveAvgPool2d(4), False),  # 6 does not split evenly into 4
])
def test_average_pooling_is_read_as_a_convolution_only_where_it_is_one(pool, as_conv):
    from brittle.certify import network_from_module

    module = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), pool, nn.Flatten()).eval()
    x = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(7))
    net = network_from_module(module, example=x)
    node = next(n for n in net.nodes if n.name == "_2")  # the pooling
    assert (node.params.get("kind") == "conv") == as_conv
    assert torch.allclose(interval_pass(net, x, x)[net.output][0], module(x), atol=1e-6)
    lo, hi = interval_pass(net, x - 0.1, x + 0.1)[net.output]  # the pooled intervals contain sampled values
    for _ in range(20):
        out = module((x + (torch.rand_like(x) * 0.2 - 0.1))).detach()
        assert (out >= lo - 1e-6).all() and (out <= hi + 1e-6).all()
