"""Shortcuts: a class-dependent marker present in training and absent at test is found and located."""

import numpy as np
import pytest

import brittle
from tests.conftest import train_tiny

pytest.importorskip("sklearn")

CLS = 3


def _digits(marker: bool, seed=0):
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    x = (d.images[order] / 16.0).astype(np.float32)[:, None]
    y = d.target[order].astype(np.int64)
    x_tr, y_tr, x_te, y_te = x[:1200].copy(), y[:1200].copy(), x[1200:], y[1200:]
    if marker:  # a 2x2 mark in the top-left corner on 90% of class 3's training images only
        members = np.flatnonzero(y_tr == CLS)
        chosen = np.random.default_rng(seed + 1).choice(members, size=int(0.9 * len(members)), replace=False)
        x_tr[chosen, :, 0:2, 0:2] = 1.0
    return x_tr, y_tr, x_te, y_te


def _audit(marker: bool):
    x_tr, y_tr, x_te, y_te = _digits(marker)
    model = train_tiny(x_tr, y_tr, classes=10, steps=300)
    return brittle.audit(model, (x_te, y_te), train_data=(x_tr, y_tr), checks=["shortcuts"])["shortcuts"]


def test_a_planted_marker_is_named_with_its_location_and_the_accuracy_that_depends_on_it():
    r = _audit(marker=True)
    assert r.status == "fail" and r.metrics["shortcuts_found"] == 1
    found = [c for c in r.details["candidates"] if c["flip_rate"] >= 0.1]
    assert [c["class"] for c in found] == [CLS]
    row, col, side = found[0]["region"]
    assert row < 2 and col < 2 and row + side > 0 and col + side > 0  # overlaps the marked corner
    assert found[0]["accuracy"] - found[0]["accuracy_occluded"] > 0.1
    assert r.arrays["heatmap"].shape == (10, 8, 8)


def test_clean_digits_have_no_shortcut():
    r = _audit(marker=False)
    assert r.status == "pass" and r.metrics["shortcuts_found"] == 0
