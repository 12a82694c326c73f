"""Accuracy without labels: answers known by construction, warnings where the estimators are known to fail."""

import json

import numpy as np

import brittle
from brittle.calibration import softmax
from brittle.label_free import estimate_accuracy, fit_source, transport_costs


def _calibrated(n, scale, seed, classes=5):
    """Logits and labels drawn from softmax(logits): calibrated by construction; a smaller scale, lower accuracy."""
    g = np.random.default_rng(seed)
    logits = g.normal(0, scale, size=(n, classes))
    y = (softmax(logits).cumsum(1) > g.random((n, 1))).argmax(1)
    return logits, y


def test_transport_cost_has_the_closed_form_answers():
    prior = np.full(4, 0.25)
    right = np.eye(4)[np.arange(400) % 4] * 0.999 + 0.00025
    assert transport_costs(right, prior).mean() < 0.01  # confident and in the right proportions: nothing to move
    piled = np.tile([0.997, 0.001, 0.001, 0.001], (400, 1))
    # three quarters of the mass must move from class 0 to the others at cost ~1
    assert abs(transport_costs(piled, prior).mean() - 0.75) < 0.01


def test_estimators_recover_the_source_accuracy_and_track_a_calibrated_shift():
    src_logits, y_src = _calibrated(4000, 3.0, seed=0)
    fit = fit_source(src_logits, y_src)
    on_source = estimate_accuracy(fit, src_logits)
    assert abs(on_source.methods["atc"] - fit.accuracy) < 2 / len(y_src)
    assert abs(on_source.methods["doc"] - fit.accuracy) < 1e-9
    for scale in (2.0, 1.0):  # the same predictor, less sure of itself and still calibrated: accuracy falls
        tgt_logits, y_tgt = _calibrated(4000, scale, seed=int(scale * 10))
        truth = float((tgt_logits.argmax(1) == y_tgt).mean())
        est = estimate_accuracy(fit, tgt_logits)
        assert truth < fit.accuracy - 0.1
        # mean confidence equals expected accuracy for a calibrated predictor; ATC only counts past a threshold
        for method in ("confidence", "doc", "cot"):
            assert abs(est.methods[method] - truth) < 0.06, (scale, method, est.methods[method], truth)
        assert est.methods["atc"] < fit.accuracy - 0.1
        assert abs(est.estimate - truth) < 0.06


def test_collapsed_predictions_are_warned_about_and_cot_sees_them():
    src_logits, y_src = _calibrated(2000, 3.0, seed=1)
    fit = fit_source(src_logits, y_src)
    collapsed = np.zeros((1000, 5))
    collapsed[:, 2] = 8.0  # every input confidently called class 2
    est = estimate_accuracy(fit, collapsed)
    assert est.methods["confidence"] > 0.9  # confidence is fooled ...
    assert abs(est.methods["cot"] - fit.prior[2] / sum(fit.prior)) < 0.03  # ... transport is not
    assert any("pile up" in w for w in est.warnings) and any("disagree" in w for w in est.warnings)
    assert est.interval[0] <= est.methods["cot"] and est.interval[1] >= est.methods["confidence"]


def test_agreement_estimates_with_other_models():
    src_logits, y_src = _calibrated(3000, 3.0, seed=2)
    g = np.random.default_rng(3)
    other_src = src_logits + g.normal(0, 1.0, size=src_logits.shape)
    fit = fit_source([src_logits, other_src], y_src)
    same = estimate_accuracy(fit, [src_logits, other_src])
    assert abs(same.methods["agreement_line"] - fit.accuracies[0]) < 1e-3  # nothing moved: accuracy did not either
    # Agreement collapses while both stay confident: the documented failure of confidence-based estimates.
    tgt = src_logits * 2
    other_tgt = g.normal(0, 6.0, size=src_logits.shape)
    est = estimate_accuracy(fit, [tgt, other_tgt])
    assert est.methods["gde"] < 0.4 and any("agree on only" in w for w in est.warnings)


def test_estimate_command(tmp_path, files, blobs):
    from brittle.cli import main

    model_path, data_path = files
    x, _ = blobs
    target = tmp_path / "target.npz"
    np.savez(target, x=np.clip(x + 0.3, 0, 1))
    out = tmp_path / "estimate.json"
    assert main(["estimate", "--model", str(model_path), "--data", str(data_path), "--target", str(target),
                 "--other-model", str(model_path), "--out", str(out), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert {"estimate", "interval", "methods", "warnings"} <= set(result) and result["methods"]["gde"] == 1.0
    assert result["interval"][0] <= result["estimate"] <= result["interval"][1]
    assert main(["estimate", "--model", str(model_path), "--data", str(target), "--target", str(target),
                 "--quiet"]) == 2  # the source must be labelled


def test_a_translation_that_fools_every_estimator_is_warned_about():
    """Shifted digits leave the model confident while accuracy collapses; the predictions' instability under tiny
    perturbations is what shows it. The same distribution raises no such warning."""
    from tests.test_slices import _digits_mlp

    model, x, y = _digits_mlp(0)
    moved = np.roll(x, 1, axis=3)  # every 8x8 digit one pixel to the right
    result = brittle.estimate_accuracy(model, (x[:300], y[:300]), (moved[300:], y[300:]))
    assert all(v > result.true_accuracy + 0.15 for v in result.methods.values())  # every estimator is fooled ...
    assert any("unstable" in w for w in result.warnings)  # ... the warning says so ...
    assert result.instability[1] > result.instability[0] + 0.1
    assert result.interval[0] <= result.true_accuracy  # ... and the interval reaches down to the truth
    calm = brittle.estimate_accuracy(model, (x[:300], y[:300]), (x[300:], y[300:]))
    assert not any("unstable" in w for w in calm.warnings)


def test_unstable_predictions_widen_the_interval_downwards_by_their_excess():
    """A mild geometric shift leaves every estimator a few points high and the instability warning silent: the
    excess of predictions that tiny perturbations flip is how far down the interval must reach."""
    src_logits, y_src = _calibrated(2000, 3.0, seed=4)
    fit = fit_source(src_logits, y_src)
    target, _ = _calibrated(1000, 3.0, seed=5)
    calm = estimate_accuracy(fit, target, instability=(0.06, 0.06))
    mild = estimate_accuracy(fit, target, instability=(0.06, 0.12))
    assert not any("unstable" in w for w in mild.warnings)  # below the warning's threshold
    assert mild.interval[0] <= mild.estimate - 0.06 + 1e-9 < calm.interval[0]
    assert mild.interval[1] == calm.interval[1] and mild.estimate == calm.estimate
