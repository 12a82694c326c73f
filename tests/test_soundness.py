"""The evaluation checks itself: probes fire on masked and randomised models, stay silent on a plain one,
and escalation brings the numbers back to the truth."""

import pytest
import torch
from torch import nn

from brittle import audit

from .conftest import Noisy

FAST = {"eps": 0.1, "max_samples": 60, "steps": 20, "first_steps": 10, "curve_steps": 20, "probe_size": 16,
        "square_queries": 100, "escalated_queries": 300, "eot_samples": 4, "votes": 5}


class Quantised(nn.Module):
    """Rounds inputs to 8 levels: zero gradients almost everywhere."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 7) / 7)


class Saturated(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 1000


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return -g


class Deceptive(nn.Module):
    """Gradients that point the wrong way: every gradient attack walks away from the boundary."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(_Reverse.apply(x))


def _run(model, blobs, **options):
    return audit(model, blobs, checks=["adversarial"], config={"adversarial": {**FAST, **options}})["adversarial"]


def _fired(result):
    return {p["id"]: p["settled"] for p in result.details["soundness"]}


@pytest.fixture(scope="module")
def plain(tiny_model, blobs):
    return _run(tiny_model, blobs)


def test_silent_on_a_plain_model(plain):
    assert _fired(plain) == {} and plain.metrics["reliable"] is True and plain.status in ("pass", "warn")


def test_quantised_model_escalates_to_straight_through(tiny_model, blobs, plain):
    r = _run(Quantised(tiny_model), blobs)
    assert _fired(r).get("adversarial.zero-gradients") is True
    assert "straight-through gradients" in r.details["plan"]
    assert r.metrics["robust_accuracy"] <= plain.metrics["robust_accuracy"] + 0.1
    assert r.metrics["reliable"] is True


def test_saturated_logits_give_the_unwrapped_models_number(tiny_model, blobs, plain):
    r = _run(Saturated(tiny_model), blobs)
    assert "adversarial.saturated-softmax" in _fired(r)
    assert abs(r.metrics["robust_accuracy"] - plain.metrics["robust_accuracy"]) <= 0.02
    # Settled by escalation: a note on how the number was obtained, not a warning about it.
    note = next(f for f in r.findings if f.id == "adversarial.saturated-softmax")
    assert note.severity == "info" and r.metrics["reliable"] is True
    assert r.status == plain.status


def _soundness_warnings(result) -> bool:
    return any(f.severity in ("medium", "high") for f in result.findings if f.id != "adversarial.not-robust")


def test_reliable_and_the_findings_agree(tiny_model, blobs, plain):
    from brittle import ModelAdapter

    box = ModelAdapter(lambda x: tiny_model(x).detach(), differentiable=False, name="box", source_fingerprint="box")
    black_box = audit(box, blobs, checks=["adversarial"], config={"adversarial": {**FAST, "escalated_queries": 100}})
    results = [plain, _run(Saturated(tiny_model), blobs), _run(Thresholded(tiny_model), blobs),
               black_box["adversarial"]]
    for r in results:
        assert r.metrics["reliable"] is (not _soundness_warnings(r)), r.findings
    assert black_box["adversarial"].metrics["reliable"] is False  # only the weaker black-box attack could run


def test_probability_outputs_are_attacked_through_their_log(tiny_model, blobs, plain):
    r = _run(nn.Sequential(tiny_model, nn.Softmax(1)), blobs)
    assert _fired(r).get("adversarial.probability-outputs") is True
    assert abs(r.metrics["robust_accuracy"] - plain.metrics["robust_accuracy"]) <= 0.05


def test_random_forward_uses_eot_and_majority_votes(tiny_model, blobs):
    r = _run(Noisy(tiny_model), blobs)
    assert _fired(r).get("adversarial.random-forward") is True
    assert any("EOT" in step for step in r.details["plan"])


def test_misleading_gradients_are_caught_by_the_black_box_probe(tiny_model, blobs, plain):
    r = _run(Deceptive(tiny_model), blobs)
    fired = _fired(r)
    masking_probes = {"adversarial.black-box-stronger", "adversarial.eps-not-monotonic", "adversarial.large-eps-survives"}
    assert masking_probes & set(fired)
    # Square, escalated, finds what the gradients hid; without escalation the model would look far more robust.
    naive = _run(Deceptive(tiny_model), blobs, escalate=False)
    assert r.metrics["robust_accuracy"] < naive.metrics["robust_accuracy"] - 0.2
    assert r.details["broken_by"].get("square", 0) > 0


class Thresholded(nn.Module):
    """Binarises its input: no gradient path at all, and straight-through does not apply to comparisons."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner((x > 0.5).float())


def test_unsettled_masking_marks_the_number_unreliable(tiny_model, blobs):
    r = _run(Thresholded(tiny_model), blobs)
    assert _fired(r).get("adversarial.zero-gradients") is False
    assert r.metrics["reliable"] is False and r.status == "fail"
    assert r.details["plan"][0].startswith("Square(")  # the black-box attack carries the evaluation
    assert any(f.id == "adversarial.zero-gradients" and f.severity == "high" for f in r.findings)
