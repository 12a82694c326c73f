"""`brittle unlearn-check`: retrained without the forget set -> forgotten; the original model -> not forgotten;
gradient ascent on the forget set -> a verdict with its evidence. Digits MLPs trained here."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from brittle.cli import main
from brittle.errors import UsageError
from brittle.unlearning import unlearn_check
from tests import test_memorization
from tests.test_memorization import _digits, train_overfit

TRAIN_FN = "tests.test_memorization:train_overfit"


@pytest.fixture(scope="module")
def split():
    x_tr, y_tr, x_te, y_te, _ = _digits(seed=3)
    forget = np.arange(60)
    retain = np.arange(60, len(y_tr))
    return (x_tr[forget], y_tr[forget]), (x_tr[retain], y_tr[retain]), (x_te, y_te)


def _gradient_ascent(model: nn.Module, x, y, steps: int = 5, lr: float = 1e-3) -> nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (-nn.functional.cross_entropy(model(torch.as_tensor(x)), torch.as_tensor(y))).backward()
        opt.step()
    return model.eval()


def test_retrained_is_forgotten_and_the_original_is_not(split, tmp_path, monkeypatch):
    forget, retain, test = split
    retrained = train_overfit(*retain, seed=123)  # a seed none of the reference models uses
    original = train_overfit(np.concatenate([retain[0], forget[0]]), np.concatenate([retain[1], forget[1]]), seed=0)
    trained = []

    def counting(x, y, *, seed):
        trained.append(seed)
        return train_overfit(x, y, seed=seed)

    monkeypatch.setattr(test_memorization, "train_overfit", counting)
    cache = str(tmp_path / "reference")
    ok = unlearn_check(retrained, forget, retain, test, train_fn=TRAIN_FN, reference_models=4, reference_cache=cache)
    assert ok.verdict == "forgotten", ok.summary()
    assert ok.ks_p_value >= 0.05 and ok.membership_p_value >= 0.05
    assert len(trained) == 4
    # The second model is judged against the same retrained models: read from the cache, not trained again.
    bad = unlearn_check(original, forget, retain, test, train_fn=TRAIN_FN, reference_models=4, reference_cache=cache)
    assert len(trained) == 4
    assert bad.verdict == "not forgotten", bad.summary()
    assert bad.forget_confidence > bad.retrained_forget_confidence
    assert bad.membership_auc > 0.6 and bad.membership_p_value < 0.05 and bad.ks_p_value < 0.05
    assert bad.accuracy["forget"] > bad.accuracy["retrained_forget"]


def test_gradient_ascent_gets_a_verdict_with_its_evidence_through_the_cli(split, tmp_path):
    forget, retain, test = split
    original = train_overfit(np.concatenate([retain[0], forget[0]]), np.concatenate([retain[1], forget[1]]), seed=0)
    ascended = _gradient_ascent(original, *forget)
    path = tmp_path / "unlearned.ts"
    torch.jit.script(ascended).save(str(path))
    for name, (x, y) in {"forget": forget, "retain": retain, "test": test}.items():
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    code = main(["unlearn-check", "--model", str(path), "--forget", str(tmp_path / "forget.npz"), "--retain",
                 str(tmp_path / "retain.npz"), "--data", str(tmp_path / "test.npz"), "--train-fn", TRAIN_FN,
                 "--reference-models", "3", "--out", str(tmp_path / "u.json"), "--quiet"])
    result = json.loads((tmp_path / "u.json").read_text())
    assert result["verdict"] in ("forgotten", "not forgotten", "inconclusive") and result["reasons"]
    assert code == (0 if result["verdict"] == "forgotten" else 1)
    assert {"ks_p_value", "membership_p_value", "membership_auc", "accuracy"} <= set(result)


def test_unlearn_check_refuses_bad_input(split):
    forget, retain, test = split
    model = train_overfit(*retain, seed=1)
    with pytest.raises(UsageError, match="reference_models"):
        unlearn_check(model, forget, retain, test, train_fn=TRAIN_FN, reference_models=1)
    with pytest.raises(UsageError, match="no labels"):
        unlearn_check(model, forget[0], retain, test, train_fn=TRAIN_FN)
    with pytest.raises(UsageError):
        unlearn_check(model, forget, retain, test, train_fn="tests.nowhere:nothing")
