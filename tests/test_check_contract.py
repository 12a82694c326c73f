"""Every registered check keeps one contract (the way scikit-learn's common tests run every estimator): it runs on
real data with its quick options; its metrics, details, arrays and findings are the ones it declares and
documents; its options are documented; its cost is counted; it renders; and a resumed run gives the same
result as the first."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import brittle
from brittle.checks import REGISTRY, available_checks
from tests.conftest import check_report_html

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _digits_cnn():
    """A small CNN on scikit-learn's 8x8 digits (every layer certifiable), 600 training and 200 audit images."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    x = (d.images[order] / 16.0).astype(np.float32)[:, None]
    y = d.target[order].astype(np.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[:600]), torch.from_numpy(y[:600])
    for _ in range(80):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval(), (x[1000:1200], y[1000:1200]), (x[:600], y[:600])


def _perturbed_copy(model: nn.Module) -> nn.Module:
    import copy

    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.1 * p.std() * torch.randn(p.shape, generator=g))
    return twin.eval()


@pytest.fixture(scope="module")
def contract(tmp_path_factory):
    pytest.importorskip("sklearn")
    model, data, train = _digits_cnn()
    config = {"seed": 3, "threat": {"eps": 0.1}, **{cid: REGISTRY[cid].quick_options for cid in available_checks()}}
    out = tmp_path_factory.mktemp("contract")
    # model_diff compares with another model file: the same network with perturbed weights.
    other = tmp_path_factory.mktemp("other") / "other.ts"
    twin = _perturbed_copy(model)
    torch.jit.trace(twin, torch.from_numpy(data[0][:1])).save(str(other))
    config["model_diff"] = {**config["model_diff"], "other_model": str(other)}
    result = brittle.audit(model, data, train_data=train, config=config, out=out)
    return result, out, model, data, train, config


@pytest.mark.parametrize("cid", available_checks())
def test_every_check_keeps_the_contract(cid, contract):
    result, out, *_ = contract
    cls, r = REGISTRY[cid], result[cid]
    assert r.status in ("pass", "warn", "fail"), r.reason  # it ran
    assert set(r.metrics) <= set(cls.metrics), "a metric that is not declared"
    cls.Details.model_validate(r.details)  # every details key declared, of the declared type
    patterns = [re.compile("^" + re.escape(name).replace("<k>", r"\d+") + "$") for name in cls.arrays]
    assert all(any(p.match(name) for p in patterns) for name in r.arrays), sorted(r.arrays)
    findings_doc = (DOCS / "findings.md").read_text()
    for f in r.findings:
        assert f.id in cls.findings and f"### {f.id.replace('.', '-')}\n" in findings_doc, f.id
    config_doc = (DOCS / "config.md").read_text()
    table = config_doc.split(f"\n[{cid}]", 1)[1].split("\n[", 1)[0] if cls.Options.model_fields else ""
    for name, info in cls.Options.model_fields.items():
        assert info.description, f"[{cid}] {name} has no description"
        assert re.search(rf"^(# )?{name} =", table, re.M), f"[{cid}] {name} missing from docs/config.md"
    assert all(f"`{m}`" in (DOCS / "checks.md").read_text() for m in cls.metrics)
    assert r.cost.forward_passes > 0  # every check uses the model, and says how much
    assert isinstance(cls.render(r, result), str)


def test_the_whole_report_reads_well(contract):
    _, out, *_ = contract
    check_report_html((out / "report.html").read_text())


def test_a_resumed_run_gives_the_same_result(contract):
    """Each check's finished result is dropped; the resumed run redoes it from its saved shards, and every number,
    array and pass count is the same."""
    result, out, model, data, train, config = contract
    shutil.rmtree(out / "state" / "results")
    (out / "report.json").unlink()
    again = brittle.audit(model, data, train_data=train, config=config, out=out, resume=True)
    for first, second in zip(result.checks, again.checks):
        assert json.dumps(first.metrics, sort_keys=True) == json.dumps(second.metrics, sort_keys=True), first.id
        assert json.dumps(first.to_json()["details"], sort_keys=True) == json.dumps(second.to_json()["details"],
                                                                                    sort_keys=True), first.id
        assert sorted(first.arrays) == sorted(second.arrays)
        for name in first.arrays:
            np.testing.assert_array_equal(first.arrays[name], second.arrays[name], err_msg=f"{first.id}.{name}")
        assert (first.cost.forward_passes, first.cost.backward_passes) == \
            (second.cost.forward_passes, second.cost.backward_passes), first.id
