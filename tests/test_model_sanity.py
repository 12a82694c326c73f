import torch
from torch import nn

from brittle import audit

from .conftest import Noisy


class Softmaxed(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.softmax(self.inner(x), 1)


def _ids(result):
    return {f.id for f in result["model"].findings}


def test_plain_model_is_silent(tiny_model, blobs):
    r = audit(tiny_model, blobs, checks=["model"])
    assert _ids(r) == set() and r["model"].status == "pass"


def test_probabilities_random_forward_and_training_mode_are_flagged(tiny_model, blobs):
    assert "model.outputs-probabilities" in _ids(audit(Softmaxed(tiny_model), blobs, checks=["model"]))
    assert "model.random-forward" in _ids(audit(Noisy(tiny_model), blobs, checks=["model"]))
    dropout = nn.Sequential(nn.Dropout(0.5), tiny_model).train()
    r = audit(dropout, blobs, checks=["model"])
    assert "model.training-mode" in _ids(r) and r["model"].status == "fail"
    assert dropout.training  # the caller's module is left as it was
    assert "model.outputs-log-probabilities" in _ids(
        audit(nn.Sequential(tiny_model, nn.LogSoftmax(1)), blobs, checks=["model"]))
