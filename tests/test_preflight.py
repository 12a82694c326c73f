"""Mistakes in what an audit is asked to do are usage errors (exit 2) before any work, naming the check and the
reason; robustness checks share one threat model and every robustness number is printed with its eps."""

import numpy as np
import pytest
import torch
from torch import nn

import brittle
from brittle import UsageError
from brittle.cli import main


def test_a_requested_check_that_cannot_run_is_refused(tiny_model, blobs):
    x, _ = blobs
    with pytest.raises(UsageError, match="'accuracy' was asked for but cannot run here: needs labels"):
        brittle.audit(tiny_model, x, checks=["accuracy"])
    # Not asked for by name: the same check is skipped with its reason, and the rest runs.
    r = brittle.audit(tiny_model, x, config={"checks": None})
    assert r["accuracy"].status == "skipped" and r["model"].status == "pass"


@pytest.mark.parametrize("config, match", [
    ({"checks": ["accuracy"], "gates": ["calibration.ece <= 0.1"]},
     r"gate 'calibration.ece <= 0.1' is on the check 'calibration', which this audit does not run"),
    ({"gates": ["backdoor.flagged == 0"]}, r"gate 'backdoor.flagged == 0' needs the check 'backdoor', which cannot "
                                           r"run here: needs the training set"),
    ({"corruptions": {"corruptions": ["fog"]}, "checks": ["corruptions"]},
     r"\[corruptions\] corruptions: 'fog' do not apply to these tabular inputs"),
    ({"checks": ["accuracy"], "adversarial": {"esp": 0.1}}, r"unknown key \[adversarial\] 'esp' \(did you mean 'eps'"),
    ({"checks": ["accuracy"], "adversarial": {"eps": 8}}, r"Did you mean 8/255"),
    ({"checks": ["accuracy"], "certified": {"eps": 8}}, r"'eps' option of \[certified\]"),
])
def test_configuration_mistakes_are_usage_errors_before_any_work(config, match):
    g = np.random.default_rng(0)
    x = g.random(size=(60, 5)).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    model = nn.Sequential(nn.Linear(5, 2))
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(UsageError, match=match):
        brittle.audit(model, (x, y), config=config)
    assert len(calls) <= 1  # at most the two-sample probe that learns the output width: no check ran


def test_the_cli_exits_2_and_names_the_check(files, tmp_path, capsys):
    model, data = files
    x = np.load(data)["x"]
    np.savez(tmp_path / "unlabelled.npz", x=x)
    code = main(["audit", "--model", str(model), "--data", str(tmp_path / "unlabelled.npz"), "--checks", "accuracy",
                 "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "'accuracy' was asked for but cannot run here: needs labels" in err
    assert not (tmp_path / "o" / "report.json").exists()


def test_one_threat_model_for_every_robustness_check(tiny_model, blobs):
    cfg = {"checks": ["adversarial", "certified"], "adversarial": {"eps": 0.05, "norm": "linf", "max_samples": 20,
                                                                    "steps": 5, "curve": False},
           "certified": {"max_samples": 10, "methods": ["ibp", "crown"]}}
    r = brittle.audit(tiny_model, blobs, config=cfg)
    assert r["certified"].details["eps"] == 0.05 == r["adversarial"].details["eps"]  # inherited, not 8/255
    assert r["certified"].details["norm"] == "Linf"
    # A [threat] table sets both; a check's own value still overrides it; "l2" is the same as "L2" everywhere.
    cfg = {"checks": ["adversarial", "certified"], "threat": {"norm": "l2", "eps": 0.4},
           "adversarial": {"max_samples": 20, "steps": 5, "curve": False},
           "certified": {"max_samples": 10, "methods": ["ibp"], "eps": 0.2}}
    r = brittle.audit(tiny_model, blobs, config=cfg)
    assert (r["adversarial"].details["norm"], r["adversarial"].details["eps"]) == ("L2", 0.4)
    assert (r["certified"].details["norm"], r["certified"].details["eps"]) == ("L2", 0.2)
    from brittle.report import render_summary

    text = render_summary(r)
    assert "at L2 eps 0.4" in text and "at L2 eps 0.2" in text
    assert r.run["threat"] == {"norm": "L2", "eps": 0.4, "eps_curve": [0.25, 0.5, 1.0]}


def test_resume_refusal_says_what_changed(tiny_model, blobs, tmp_path):
    cfg = {"checks": ["accuracy"]}
    brittle.audit(tiny_model, blobs, config=cfg, out=tmp_path)
    other = brittle.audit  # the same model, other data
    x, y = blobs
    with pytest.raises(UsageError, match=r"changed since it was started: the data\. Use overwrite=True"):
        other(tiny_model, (x[:100], y[:100]), config=cfg, out=tmp_path, resume=True)
    with torch.no_grad():
        changed = type(tiny_model)()
    with pytest.raises(UsageError, match=r"the model \(its weights or file\)"):
        brittle.audit(changed, blobs, config=cfg, out=tmp_path, resume=True)
