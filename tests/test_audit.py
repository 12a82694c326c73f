import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import torch
import pytest

import brittle
from brittle import AuditResult, audit
from tests.conftest import check_report_html
from brittle.checks.base import REGISTRY, Check, CheckResult

CFG = {"adversarial": {"eps": 0.3, "steps": 10, "max_samples": 60, "shard_size": 32},
       "gates": ["accuracy.accuracy >= 0.9", "adversarial.robust_accuracy >= 0.5"]}


@pytest.fixture(scope="module")
def audited(tmp_path_factory, tiny_model, blobs):
    out = tmp_path_factory.mktemp("audit")
    return audit(tiny_model, blobs, config=CFG, out=out), out


def test_api_result_matches_files(audited):
    result, out = audited
    assert result.verdict == "fail" and result.exit_code == 1  # robust accuracy at eps 0.3 is near zero
    # every check runs by default; those that need a training set are skipped with the reason
    assert [c.id for c in result.checks] == brittle.checks.available_checks()
    assert {c.id for c in result.checks if c.status == "skipped"} == {"attribution", "backdoor", "label_errors", "memorization", "model_diff",
                                                                      "shortcuts"}
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == result.to_json()
    assert on_disk["schema_version"] == brittle.SCHEMA_VERSION
    for c in on_disk["checks"]:
        assert set(c) >= {"id", "status", "metrics", "findings", "cost"}
    adv = result["adversarial"]
    assert adv.metrics["robust_accuracy"] < 0.2 and adv.metrics["n"] == 60
    assert adv.cost.backward_passes > 0 and adv.cost.forward_passes >= adv.cost.backward_passes


def test_schema_round_trip(audited):
    result, out = audited
    loaded = AuditResult.load(out)
    assert loaded.to_json() == result.to_json()
    np.testing.assert_array_equal(loaded["adversarial"].arrays["robust"], result["adversarial"].arrays["robust"])
    assert loaded["accuracy"].arrays["pred"].shape == (240,)


def test_report_html_is_self_contained(audited):
    _, out = audited
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "FAIL" in html
    assert not re.search(r"(https?|ftp):", html, re.I), "report.html must not reference any URL"
    assert not re.search(r"@import|url\(", html, re.I)
    # Every src/href is inline data or an anchor in the page: nothing to fetch, no link that goes nowhere.
    for ref in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html):
        assert ref.startswith(("data:", "#")) and "//" not in ref.split(",")[0], ref
    check_report_html(html)
    assert 'id="doc-adversarial-not-robust"' in html  # the meaning of each finding shown travels with the report
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert html.count("data:image/png;base64,") >= 3  # clean, adversarial and perturbation images
    assert html.index("Worst findings") < html.index('id="check-model"')


def test_junit_has_one_case_per_gate(audited):
    _, out = audited
    suite = ET.parse(out / "junit.xml").getroot()
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == CFG["gates"]
    assert suite.get("failures") == "1" and cases[1].find("failure") is not None


def test_gates_decide_the_verdict(tiny_model, blobs):
    passing = audit(tiny_model, blobs, config={"checks": ["accuracy"], "gates": ["accuracy.accuracy >= 0.5"]})
    assert passing.verdict == "pass" and passing.exit_code == 0
    failing = audit(tiny_model, blobs, config={"checks": ["accuracy"], "gates": ["accuracy.accuracy < 0.5"]})
    assert failing.verdict == "fail" and failing.exit_code == 1


@pytest.fixture
def exploding_check():
    class Exploding(Check):
        id = "exploding"
        title = "Always raises"
        order = 20

        def run(self, ctx) -> CheckResult:
            raise ZeroDivisionError("boom")

    yield "exploding"
    del REGISTRY["exploding"]


def test_a_failing_check_never_loses_the_others(tiny_model, blobs, exploding_check, tmp_path):
    result = audit(tiny_model, blobs, config={"checks": ["model", exploding_check, "accuracy"]}, out=tmp_path)
    statuses = {c.id: c.status for c in result.checks}
    assert statuses == {"model": "pass", "exploding": "error", "accuracy": "pass"}
    assert "ZeroDivisionError: boom" in result["exploding"].reason
    assert result.verdict == "error" and result.exit_code == 3
    assert (tmp_path / "state" / "exploding.traceback.txt").is_file()
    assert json.loads((tmp_path / "report.json").read_text())["checks"][2]["metrics"]["accuracy"] > 0.9


def test_contract_is_checked_when_a_check_is_defined():
    with pytest.raises(TypeError, match="lowercase identifier"):
        class Bad(Check):  # noqa: F841
            id = "Bad Id"
            title = "x"

            def run(self, ctx):
                return None
    with pytest.raises(TypeError, match="already taken"):
        class Dup(Check):  # noqa: F841
            id = "accuracy"
            title = "x"

            def run(self, ctx):
                return None


def test_black_box_model_falls_back_to_square_and_says_so(tiny_model, blobs):
    from brittle import ModelAdapter

    box = ModelAdapter(lambda x: tiny_model(x).detach(), differentiable=False, name="box", source_fingerprint="box")
    r = audit(box, blobs, config={"adversarial": {"eps": 0.3, "max_samples": 40, "escalated_queries": 200}})
    adv = r["adversarial"]
    assert adv.details["plan"] == ["Square(norm='Linf', eps=0.3, queries=200)"]
    assert "adversarial.black-box-model" in {f.id for f in adv.findings}
    assert adv.metrics["robust_accuracy"] < adv.metrics["clean_accuracy"] and adv.cost.backward_passes == 0


def test_unlabelled_data_runs_what_it_can(tiny_model, blobs):
    r = audit(tiny_model, (blobs[0], None))
    assert r["model"].status == "pass" and r["accuracy"].status == "skipped"


def test_labels_in_another_order_than_the_models_are_called_out(tiny_model, blobs, tmp_path):
    """String labels are numbered in sorted order; a model trained with another order scores below chance, and the
    audit says why instead of reporting meaningless numbers silently."""
    x, y = blobs
    names = np.array(["zebra", "ant", "moth"])  # the model's class 0 is 'zebra', but sorted order makes it 2
    path = tmp_path / "data.csv"
    rows = ["f" + ",f".join(str(i) for i in range(64)) + ",label"]
    rows += [",".join(f"{v:.4f}" for v in xi.ravel()) + f",{names[yi]}" for xi, yi in zip(x, y)]
    path.write_text("\n".join(rows) + "\n")
    model = torch.nn.Sequential(torch.nn.Unflatten(1, (1, 8, 8)), tiny_model)
    r = audit(model, str(path), checks=["accuracy"], config={"data": {"label_column": "label"}})["accuracy"]
    finding = next(f for f in r.findings if f.id == "accuracy.below-chance")
    assert finding.severity == "high" and "ant = 0, moth = 1, zebra = 2" in finding.message
    clean = audit(tiny_model, blobs, checks=["accuracy"])["accuracy"]
    assert not any(f.id == "accuracy.below-chance" for f in clean.findings)
