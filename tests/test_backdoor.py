"""Backdoor check: a planted trigger in real digits is found (class, examples, trigger); clean data stays silent."""

import numpy as np
import pytest
import torch

import brittle
from tests.conftest import train_tiny

pytest.importorskip("sklearn")

TARGET = 0


def _digits(poison_share=0.0, kind="patch", seed=0):
    """sklearn's 8x8 digits: 1,200 training and 597 held-out; poisons make up `poison_share` of the target class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    x = (d.images[order] / 16.0).astype(np.float32)[:, None]
    y = d.target[order].astype(np.int64)
    x_tr, y_tr, x_te, y_te = x[:1200].copy(), y[:1200].copy(), x[1200:], y[1200:]
    poisoned = np.zeros(len(y_tr), bool)
    if poison_share:
        n = int(round(poison_share * (y_tr == TARGET).sum() / (1 - poison_share)))
        chosen = np.random.default_rng(seed + 1).choice(np.flatnonzero(y_tr != TARGET), size=n, replace=False)
        if kind == "patch":
            x_tr[chosen, :, -3:-1, -3:-1] = 1.0
        else:
            pattern = np.random.default_rng(99).random((1, 8, 8)).astype(np.float32)
            x_tr[chosen] = 0.7 * x_tr[chosen] + 0.3 * pattern
        y_tr[chosen] = TARGET
        poisoned[chosen] = True
    return x_tr, y_tr, poisoned, x_te, y_te


def _audit(x_tr, y_tr, x_te, y_te, seed=0):
    model = train_tiny(x_tr, y_tr, classes=10, steps=300, seed=seed)
    return brittle.audit(model, (x_te, y_te), train_data=(x_tr, y_tr), checks=["backdoor"])["backdoor"]


@pytest.mark.parametrize("kind", ["patch", "blend"])
def test_a_planted_trigger_is_found_with_its_class_examples_and_shape(kind):
    x_tr, y_tr, poisoned, x_te, y_te = _digits(poison_share=1 / 3, kind=kind)
    r = _audit(x_tr, y_tr, x_te, y_te)
    assert r.status == "fail" and r.findings[0].id == "backdoor.found"
    assert r.metrics["target_class"] == TARGET and r.metrics["trigger_success_rate"] > 0.5
    flagged = r.arrays["flagged"]
    assert poisoned[flagged].mean() >= 0.9 and poisoned[flagged].sum() >= 0.8 * poisoned.sum()
    if kind == "patch":  # the reconstructed trigger is brightest where the patch was stamped
        trigger = r.arrays["trigger"][0]
        corner = trigger[-3:-1, -3:-1].mean()
        assert corner > 0.5 and corner > 3 * np.abs(np.delete(trigger.ravel(), [45, 46, 53, 54])).mean()


@pytest.mark.parametrize("kind", ["patch", "blend"])
def test_poisons_in_the_data_are_found_even_when_the_model_did_not_learn_the_trigger(kind):
    """Persistence needs a model that learned the trigger; the shared residual does not. A model trained on the
    true labels ignores the trigger, yet the class and the poisons are found: suspected, not confirmed."""
    y_true = _digits()[1]
    x_tr, y_tr, poisoned, x_te, y_te = _digits(poison_share=0.15, kind=kind)
    model = train_tiny(x_tr, y_true, classes=10, steps=300)
    r = brittle.audit(model, (x_te, y_te), train_data=(x_tr, y_tr), checks=["backdoor"])["backdoor"]
    assert r.status == "warn" and [f.id for f in r.findings] == ["backdoor.suspected"]
    assert r.details["suspicious_per_class"][TARGET] == 0 and r.metrics["target_class"] == TARGET
    flagged = r.arrays["flagged"]
    assert poisoned[flagged].mean() >= 0.9 and poisoned[flagged].sum() >= 0.8 * poisoned.sum()


@pytest.mark.parametrize("seed", [0, 1])
def test_clean_training_sets_report_no_backdoor(seed):
    x_tr, y_tr, _, x_te, y_te = _digits(seed=seed)
    r = _audit(x_tr, y_tr, x_te, y_te, seed=seed)
    assert r.status == "pass" and r.metrics["backdoor_detected"] == 0 and r.metrics["flagged"] == 0


def test_the_users_arrays_are_not_modified():
    x_tr, y_tr, _, x_te, y_te = _digits(poison_share=1 / 3)
    before = x_tr.copy(), y_tr.copy(), x_te.copy()
    _audit(x_tr, y_tr, x_te, y_te)
    assert np.array_equal(before[0], x_tr) and np.array_equal(before[1], y_tr) and np.array_equal(before[2], x_te)


def test_training_set_checks_through_the_cli(tmp_path):
    """The command a user runs: TorchScript + .npz files, --train-data, a gate on the backdoor, exit code 1."""
    import json

    from brittle.cli import main

    x_tr, y_tr, poisoned, x_te, y_te = _digits(poison_share=1 / 3)
    model = train_tiny(x_tr, y_tr, classes=10, steps=300)
    torch.jit.script(model).save(str(tmp_path / "m.ts"))
    np.savez(tmp_path / "train.npz", x=x_tr, y=y_tr)
    np.savez(tmp_path / "test.npz", x=x_te, y=y_te)
    (tmp_path / "audit.toml").write_text('gates = ["backdoor.backdoor_detected == 0"]\n')
    code = main(["audit", "--model", str(tmp_path / "m.ts"), "--data", str(tmp_path / "test.npz"),
                 "--train-data", str(tmp_path / "train.npz"), "--checks", "backdoor,label_errors,shortcuts,slices",
                 "--config", str(tmp_path / "audit.toml"), "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 1  # the gate failed: a backdoor was found
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    statuses = {c["id"]: c["status"] for c in report["checks"]}
    assert statuses["backdoor"] == "fail" and set(statuses) == {"backdoor", "label_errors", "shortcuts", "slices"}
    assert "error" not in statuses.values()
    flagged = np.load(tmp_path / "o" / "arrays" / "backdoor.npz")["flagged"]
    assert poisoned[flagged].mean() >= 0.9
    html = (tmp_path / "o" / "report.html").read_text()
    assert "Reconstructed trigger" in html and "Most suspicious training examples" in html
