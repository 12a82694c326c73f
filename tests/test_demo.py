"""The README's demo command, run for real (about 1.5 minutes on 2 cores)."""

import json

import numpy as np
import pytest

from brittle._atomic import _umask
from tests.conftest import check_report_html

pytest.importorskip("mlxtend")


def test_demo_runs_a_real_audit(tmp_path):
    from brittle.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    checks = {c["id"]: c for c in report["checks"]}
    assert checks["accuracy"]["metrics"]["accuracy"] > 0.9
    assert checks["adversarial"]["metrics"]["robust_accuracy"] < checks["adversarial"]["metrics"]["clean_accuracy"]
    assert report["verdict"] == "fail"  # the demo model is not robust at eps 0.15, and its gate says so
    # The planted backdoor is found: the right class, and the flagged set is the poisoned set.
    backdoor = checks["backdoor"]
    assert backdoor["metrics"]["backdoor_detected"] == 1 and backdoor["metrics"]["target_class"] == 7
    poisoned = np.load(tmp_path / "demo" / "inputs" / "train.npz")["poisoned"]
    flagged = np.load(tmp_path / "demo" / "report" / "arrays" / "backdoor.npz")["flagged"]
    assert poisoned[flagged].mean() >= 0.9 and poisoned[flagged].sum() >= 0.9 * poisoned.sum()
    # Certification runs on the demo's MaxPool CNN: proofs at small eps, none at the threat's eps, where the
    # attacks break most points; the lower bound never exceeds the upper one.
    cert = checks["certified"]
    assert cert["status"] != "skipped", cert
    curve = cert["details"]["curve"]
    assert curve["certified"][0] >= 0.8 and cert["metrics"]["certified_accuracy"] <= 0.1
    assert all(c <= e for c, e in zip(curve["certified"], curve["empirical"]))
    html = (tmp_path / "demo" / "report" / "report.html").read_text()
    assert "adversarial check (its points)" in html and "<th>unknown</th>" in html
    assert len(html) > 10_000
    check_report_html(html)
    assert oct((tmp_path / "demo" / "report" / "report.html").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
