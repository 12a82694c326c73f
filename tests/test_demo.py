"""The README's demo command, run for real (about half a minute on 2 cores)."""

import json

import pytest

pytest.importorskip("mlxtend")


def test_demo_runs_a_real_audit(tmp_path):
    from brittle.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    checks = {c["id"]: c for c in report["checks"]}
    assert checks["accuracy"]["metrics"]["accuracy"] > 0.9
    assert checks["adversarial"]["metrics"]["robust_accuracy"] < checks["adversarial"]["metrics"]["clean_accuracy"]
    assert report["verdict"] == "fail"  # the demo model is not robust at eps 0.1, and its gate says so
    assert (tmp_path / "demo" / "report" / "report.html").stat().st_size > 10_000
