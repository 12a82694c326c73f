"""brittle compare: exactly what changed between two audits, regression gates, and refusals of what does not
compare."""

import copy
import json
import time

import numpy as np
import pytest
import torch

from brittle import audit, compare_audits
from brittle.cli import main
from brittle.errors import UsageError
from tests.conftest import check_report_html, make_blobs

BASE = {"checks": ["accuracy", "calibration", "adversarial"],
        "adversarial": {"eps": 0.2, "steps": 10, "max_samples": 60, "shard_size": 30}}


def _regressed(model, x):
    """A planted regression: the same model with its class-0 logit pushed up (as a bad re-calibration would),
    far enough to flip about a third of the other classes' points to class 0."""
    weak = copy.deepcopy(model)
    with torch.no_grad():
        z = model(torch.from_numpy(x))
        others = z.argmax(1) != 0
        weak.net[3].bias[0] += torch.quantile((z.max(1).values - z[:, 0])[others], 0.3)
    return weak


@pytest.fixture(scope="module")
def audits(tmp_path_factory, tiny_model, blobs):
    root = tmp_path_factory.mktemp("compare")
    base = audit(tiny_model, blobs, config=BASE, out=root / "base")
    option = audit(tiny_model, blobs, config={**BASE, "calibration": {"bins": 10}}, out=root / "option")
    weak = audit(_regressed(tiny_model, blobs[0]), blobs, config=BASE, out=root / "weak")
    assert base.check("accuracy").metrics["accuracy"] - weak.check("accuracy").metrics["accuracy"] > 0.05
    return root


def test_one_changed_option_is_reported_exactly(audits):
    t0 = time.perf_counter()
    cmp = compare_audits(audits / "base", audits / "option", gates=["accuracy.accuracy >= baseline - 0.01"])
    assert time.perf_counter() - t0 < 1.0
    assert [c["key"] for c in cmp.config_changes] == ["check_options.calibration.bins"]
    assert cmp.config_changes[0]["baseline"] is None and cmp.config_changes[0]["candidate"] == 10
    changed = {(m["check"], m["metric"]) for m in cmp.metrics if m["change"] not in (None, 0)}
    assert changed and {c for c, _ in changed} == {"calibration"}  # the same model: only the binned ECE moves
    assert all(not p["lost"] and not p["gained"] for p in cmp.per_sample)
    assert cmp.exit_code == 0 and cmp.gates[0]["passed"]


def test_a_planted_regression_fails_its_gate_and_names_the_points(audits, tmp_path, capsys):
    cmp = compare_audits(audits / "base", audits / "weak")
    acc = next(p for p in cmp.per_sample if p["check"] == "accuracy")
    b = np.load(audits / "base" / "arrays" / "accuracy.npz")["correct"]
    w = np.load(audits / "weak" / "arrays" / "accuracy.npz")["correct"]
    assert acc["lost"] == np.flatnonzero(b & ~w).tolist() and acc["gained"] == np.flatnonzero(~b & w).tolist()
    adv = next(p for p in cmp.per_sample if p["check"] == "adversarial")
    assert adv["compared"] == 60
    code = main(["compare", str(audits / "base"), str(audits / "weak"), "--gate",
                 "accuracy.accuracy >= baseline - 0.01", "--out", str(tmp_path / "cmp")])
    assert code == 1
    assert "gate FAIL accuracy.accuracy >= baseline - 0.01" in capsys.readouterr().out
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["verdict"] == "fail" and saved["gates"][0]["passed"] is False
    check_report_html((tmp_path / "cmp" / "compare.html").read_text())
    # without the regression, the same gate holds: exit 0
    assert main(["compare", str(audits / "base"), str(audits / "option"), "--gate",
                 "accuracy.accuracy >= baseline - 0.01", "--quiet"]) == 0


def test_gates_from_the_candidates_configuration_apply(tmp_path, tiny_model, blobs, audits):
    cand = tmp_path / "cand"
    audit(_regressed(tiny_model, blobs[0]), blobs, out=cand,
          config={**BASE, "compare_gates": ["accuracy.accuracy >= baseline - 0.01"]})
    assert main(["compare", str(audits / "base"), str(cand), "--quiet"]) == 1


def test_what_does_not_compare_is_refused_with_the_reason(audits, tmp_path, tiny_model, blobs, capsys):
    other_data = audit(tiny_model, make_blobs(seed=5), config=BASE)
    with pytest.raises(UsageError, match="different data"):
        compare_audits(audits / "base", other_data)
    other_eps = audit(tiny_model, blobs, config={**BASE, "adversarial": {**BASE["adversarial"], "eps": 0.1}})
    with pytest.raises(UsageError, match=r"different threat models \(baseline Linf eps 0.2, candidate Linf eps 0.1"):
        compare_audits(audits / "base", other_eps)
    # the same shared threat model, one check overriding it
    override = audit(tiny_model, blobs, config={**BASE, "threat": {"eps": 0.2},
                                                "adversarial": {**BASE["adversarial"], "eps": 0.1}})
    with pytest.raises(UsageError, match=r"adversarial ran at eps 0.2 in the baseline and 0.1 in the candidate"):
        compare_audits(audits / "base", override)
    with pytest.raises(UsageError, match="no numeric metric 'robustness'"):
        compare_audits(audits / "base", audits / "option", gates=["adversarial.robustness >= baseline"])
    assert main(["compare", str(audits / "base"), str(tmp_path / "missing"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compare", str(audits / "base"), str(audits / "option"), "--gate", "accuracy >= 1"]) == 2
    with pytest.raises(UsageError, match="compare_gates"):
        audit(tiny_model, blobs, config={"checks": ["accuracy"], "compare_gates": ["accuracy.accuracy >= basline"]})
