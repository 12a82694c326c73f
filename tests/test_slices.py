"""Failure slices: an under-represented subgroup that the model gets wrong is found as a coherent slice."""

import numpy as np

import brittle
from tests.conftest import train_tiny


def _subgroup_data(n_train=600, n_test=300, seed=0):
    """Class 0 has two looks; the second (close to class 1) is rare in training and half of class 0 at test."""
    g = np.random.default_rng(seed)
    p0a, p1, p2 = (g.uniform(0.1, 0.9, size=(1, 8, 8)) for _ in range(3))
    p0b = 0.85 * p1 + 0.15 * p0a

    def draw(n, rare_share):
        y = np.arange(n) % 3
        sub = (y == 0) & (g.random(n) < rare_share)
        proto = np.where(sub[:, None, None, None], p0b, np.stack([p0a, p1, p2])[y])
        x = np.clip(proto + g.normal(0, 0.12, size=(n, 1, 8, 8)), 0, 1).astype(np.float32)
        return x, y.astype(np.int64), sub

    return draw(n_train, 0.03), draw(n_test, 0.5)


def test_an_under_represented_subgroup_is_found_as_a_slice():
    (x_tr, y_tr, _), (x, y, subgroup) = _subgroup_data()
    model = train_tiny(x_tr, y_tr, classes=3, steps=200)
    r = brittle.audit(model, (x, y), checks=["slices"])["slices"]
    assert r.status == "warn" and r.metrics["slices_found"] >= 1
    members = r.arrays["slice0_members"]
    worst = r.details["slices"][0]
    assert worst["class"] == 0 and worst["accuracy"] < 0.6
    assert subgroup[members].mean() >= 0.8  # the slice is the subgroup, not a random part of class 0


def test_a_model_without_a_weak_subgroup_has_no_slice():
    (x_tr, y_tr, _), (x, y, _) = _subgroup_data()
    model = train_tiny(x_tr, y_tr, classes=3, steps=200)
    keep = y != 0  # classes 1 and 2 only: each has one look, learned well
    r = brittle.audit(model, (x[keep], y[keep]), checks=["slices"])["slices"]
    assert r.metrics["slices_found"] == 0


def _digits_mlp(seed):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[:1200]), torch.from_numpy(y[:1200])
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval(), x[1200:], y[1200:]


def test_clean_models_have_no_slice():
    """Every model fails more on some inputs than on others; only a gap beyond what random subsets of the same
    size show is a slice. Three clean digit models: no finding."""
    for seed in range(3):
        model, x, y = _digits_mlp(seed)
        r = brittle.audit(model, (x, y), checks=["slices"], config={"seed": seed})["slices"]
        assert r.metrics["slices_found"] == 0 and r.findings == [], r.details["slices"]
        assert r.details["candidates"] > 5


def test_tabular_slices_name_their_features(tmp_path):
    """A rare subgroup (high income, in class 0) that the model gets wrong is described by the CSV column."""
    g = np.random.default_rng(0)

    def draw(n, rare_share):
        y = g.integers(0, 2, n)
        income = g.normal(0, 1, n)
        age = g.normal(0, 1, n)
        sub = (y == 0) & (g.random(n) < rare_share)
        income[sub] += 4.0
        score = np.where(y == 1, 1.5, -1.5) + np.where(sub, 3.0, 0.0) + g.normal(0, 0.5, n)  # looks like class 1
        return np.stack([age, income, score], 1).astype(np.float32), y.astype(np.int64), sub

    (x_tr, y_tr, _), (x, y, sub) = draw(600, 0.02), draw(600, 0.3)
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.from_numpy(x_tr)), torch.from_numpy(y_tr)).backward()
        opt.step()
    path = tmp_path / "test.csv"
    rows = ["age,income,score,label"] + [f"{a},{b},{c},{lab}" for (a, b, c), lab in zip(x, y)]
    path.write_text("\n".join(rows) + "\n")
    r = brittle.audit(model.eval(), str(path), checks=["slices"],
                      config={"data": {"label_column": "label"}, "model": {"bounds": [-20, 20]}})["slices"]
    assert r.metrics["slices_found"] >= 1
    worst = r.details["slices"][0]
    assert "income high" in worst["description"] and worst["p_value"] < 0.05
    assert sub[r.arrays["slice0_members"]].mean() >= 0.6


class _RandomErrors(__import__("torch").nn.Module):
    """Wrong on a pseudo-random tenth of inputs, whatever they look like: no slice can exist."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        import torch

        out = self.inner(x)
        wrong = ((x.flatten(1).sum(1) * 9973).floor() % 10 == 0)[:, None]
        return torch.where(wrong, out.roll(1, dims=1), out)


def test_errors_that_no_feature_explains_give_no_slice():
    """The test of random subsets holds its false-alarm rate: on ten models whose only errors are independent of
    the inputs, at most one (alpha = 0.05 per audit) reports a slice."""
    from tests.conftest import make_blobs

    fired = 0
    for seed in range(10):
        x, y = make_blobs(n=600, seed=seed, noise=0.1)
        model = _RandomErrors(train_tiny(x[:300], y[:300], seed=seed))
        r = brittle.audit(model, (x[300:], y[300:]), checks=["slices"], config={"seed": seed})["slices"]
        fired += r.metrics["slices_found"] > 0
    assert fired <= 1
