"""TRAK: exact kernels, scores that rank like exact leave-one-out, resumable featurisation, lambda never 0."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import brittle
from brittle.attribution import Trak, _per_example_grads, spearman, featurize, margins
from brittle.errors import UsageError


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3)).eval()


def _full_kernel(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    grads, _ = _per_example_grads(model, names, x, y)
    flat = torch.cat([grads[n].reshape(len(x), -1) for n in names], 1).double()
    return (flat @ flat.T).numpy()


def test_exact_kernel_is_the_gradient_inner_product_and_projection_approximates_it():
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 4, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    truth = _full_kernel(model, x, y)
    exact = featurize(model, x, y)
    assert exact.exact and np.abs(exact.kernel() - truth).max() < 1e-4 * np.abs(truth).max()
    projected = featurize(model, x, y, proj_dim=512)  # 771 parameters, 3/4 of them kept after projection
    assert not projected.exact and projected.dim <= 512
    assert np.corrcoef(projected.kernel().ravel(), truth.ravel())[0, 1] > 0.9
    assert all(p.grad is None for p in model.parameters())  # the caller's module is left as it was


def _fit_logistic(x, y, weight_decay, init=None):
    model = nn.Linear(x.shape[1], 2, dtype=torch.float64)
    if init is not None:
        model.load_state_dict(init)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum") + weight_decay * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model.eval()


def test_scores_rank_like_exact_leave_one_out_on_logistic_regression():
    g = np.random.default_rng(0)
    n, d = 80, 5
    x = torch.from_numpy(g.normal(size=(n, d)))
    y = torch.from_numpy((x[:, 0].numpy() + 0.8 * g.normal(size=n) > 0).astype(np.int64))
    xt = torch.from_numpy(g.normal(size=(4, d)))
    yt = torch.tensor([0, 1, 0, 1])
    full = _fit_logistic(x, y, 0.5)
    base = margins(full, xt, yt)
    loo = np.zeros((len(xt), n))
    for i in range(n):
        keep = torch.as_tensor(np.delete(np.arange(n), i))
        loo[:, i] = base - margins(_fit_logistic(x[keep], y[keep], 0.5, init=full.state_dict()), xt, yt)
    model32 = nn.Linear(d, 2)
    model32.load_state_dict({k: v.float() for k, v in full.state_dict().items()})
    trak = Trak([featurize(model32, x.float(), y)], ridge=0.01)
    scores = trak.scores([featurize(model32, xt.float(), yt)])
    rho = [spearman(scores[t], loo[t]) for t in range(len(xt))]
    assert min(rho) > 0.8, rho


def test_featurisation_resumes_to_identical_features_and_refuses_a_stale_store(tmp_path):
    model = _mlp()
    x, y = torch.randn(50, 4, 5), torch.randint(0, 3, (50,))
    once = featurize(model, x, y, proj_dim=64, batch_size=8)
    with pytest.raises(KeyboardInterrupt):
        featurize(model, x, y, proj_dim=64, batch_size=8, store=tmp_path / "f", stop_after=3)
    assert json.loads((tmp_path / "f" / "metadata.json").read_text())["rows"] == 24
    resumed = featurize(model, x, y, proj_dim=64, batch_size=8, store=tmp_path / "f")
    assert np.array_equal(resumed.blocks[0], once.blocks[0]) and np.array_equal(resumed.weights, once.weights)
    with pytest.raises(UsageError, match="another model"):
        featurize(_mlp(seed=1), x, y, proj_dim=64, batch_size=8, store=tmp_path / "f")


def test_lambda_is_never_zero():
    model = _mlp()
    x, y = torch.randn(30, 4, 5), torch.randint(0, 3, (30,))
    feats = featurize(model, x, y, proj_dim=200)  # more projected dimensions than examples
    trak = Trak([feats])
    assert all(lam > 0 for lam in trak.lambdas)
    assert np.isfinite(trak.scores([feats])).all()
    with pytest.raises(UsageError, match="never 0"):
        Trak([feats], ridge=0.0)


def test_attribution_check_and_command(tmp_path, files, blobs, tiny_model):
    from brittle.cli import main

    model_path, data_path = files
    x, y = blobs
    flipped = y.copy()
    flipped[:6] = (y[:6] + 1) % 3  # six training labels made wrong: they must be memorised
    np.savez(tmp_path / "train.npz", x=x, y=flipped)
    r = brittle.audit(str(model_path), str(data_path), train_data=str(tmp_path / "train.npz"),
                      checks=["attribution"], out=tmp_path / "audit")["attribution"]
    # TorchScript read back as eager layers: a Linear-only model gets exact gradient kernels, and the per-example
    # gradients are counted (one forward and one backward pass per example).
    assert r.status == "pass" and r.metrics["targets"] == 20 and r.details["exact_gradients"]
    assert r.cost.backward_passes >= len(x) + 20 and r.cost.forward_passes >= r.cost.backward_passes
    t0 = r.details["targets"][0]
    assert len(t0["proponents"]) == 5 and t0["proponent_scores"][0] >= t0["opponent_scores"][0]
    assert r.arrays["scores"].shape == (20, len(x))
    # Wrong labels the model fitted anyway sit at the top of self-influence.
    assert len({0, 1, 2, 3, 4, 5} & set(r.details["self_influence_top"][:12])) >= 3
    assert "Highest self-influence" in (tmp_path / "audit" / "report.html").read_text()

    out = tmp_path / "attr"
    code = main(["attribute", "--model", str(model_path), "--data", str(data_path), "--train-data",
                 str(data_path), "--out", str(out), "--targets", "12", "--evaluate-lds", "--train-fn",
                 "tests.conftest:train_tiny_for_lds", "--subsets", "12", "--seeds", "1", "--quiet"])
    assert code == 0
    summary = json.loads((out / "attribution.json").read_text())
    assert np.load(out / "scores.npy").shape == (12, len(x)) and summary["lds"]["lds"] > 0.2
    assert main(["attribute", "--model", str(model_path), "--data", str(data_path), "--train-data", str(data_path),
                 "--out", str(out), "--evaluate-lds", "--quiet"]) == 2  # no --train-fn


@pytest.mark.parametrize("conv", [False, True])
def test_projection_from_layer_factors_equals_projection_of_gradients(conv):
    from brittle.attribution import Projector, _layer_factors

    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 2), nn.ReLU(),
                              nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).eval()
        x = torch.randn(16, 1, 6, 6)
    else:
        model, x = _mlp(), torch.randn(16, 4, 5)
    y = torch.randint(0, 3, (16,))
    projector = Projector(model, 60, seed=3)
    names = [n for gr in projector.groups for n in (gr.weight, gr.bias) if n]
    grads, _ = _per_example_grads(model, names, x, y)
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    factors, _ = _layer_factors(model, layers, x, y)
    assert torch.allclose(projector.project_factors(factors), projector(grads), atol=1e-5)
    assert np.allclose(featurize(model, x, y, proj_dim=60, seed=3).blocks[0], projector(grads).numpy(), atol=1e-5)
