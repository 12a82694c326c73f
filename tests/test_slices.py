"""Failure slices: an under-represented subgroup that the model gets wrong is found as a coherent slice."""

import numpy as np

import brittle
from tests.conftest import train_tiny


def _subgroup_data(n_train=600, n_test=300, seed=0):
    """Class 0 has two looks; the second (close to class 1) is rare in training and half of class 0 at test."""
    g = np.random.default_rng(seed)
    p0a, p1, p2 = (g.uniform(0.1, 0.9, size=(1, 8, 8)) for _ in range(3))
    p0b = 0.85 * p1 + 0.15 * p0a

    def draw(n, rare_share):
        y = np.arange(n) % 3
        sub = (y == 0) & (g.random(n) < rare_share)
        proto = np.where(sub[:, None, None, None], p0b, np.stack([p0a, p1, p2])[y])
        x = np.clip(proto + g.normal(0, 0.12, size=(n, 1, 8, 8)), 0, 1).astype(np.float32)
        return x, y.astype(np.int64), sub

    return draw(n_train, 0.03), draw(n_test, 0.5)


def test_an_under_represented_subgroup_is_found_as_a_slice():
    (x_tr, y_tr, _), (x, y, subgroup) = _subgroup_data()
    model = train_tiny(x_tr, y_tr, classes=3, steps=200)
    r = brittle.audit(model, (x, y), checks=["slices"])["slices"]
    assert r.status == "warn" and r.metrics["slices_found"] >= 1
    members = r.arrays["slice0_members"]
    worst = r.details["slices"][0]
    assert worst["class"] == 0 and worst["accuracy"] < 0.6
    assert subgroup[members].mean() >= 0.8  # the slice is the subgroup, not a random part of class 0


def test_a_model_without_a_weak_subgroup_has_no_slice():
    (x_tr, y_tr, _), (x, y, _) = _subgroup_data()
    model = train_tiny(x_tr, y_tr, classes=3, steps=200)
    keep = y != 0  # classes 1 and 2 only: each has one look, learned well
    r = brittle.audit(model, (x[keep], y[keep]), checks=["slices"])["slices"]
    assert r.metrics["slices_found"] == 0
