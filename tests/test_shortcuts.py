"""Shortcuts: a class-dependent marker present in training and absent at test is found and located; a digit's own
strokes are not; a mark whose position encodes the label is one finding."""

import numpy as np
import pytest
import torch
from torch import nn

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


def _small_cnn(x, y, seed=0, epochs=12):
    """A small CNN like the one the false alarms were seen on (two convolutions, max pooling)."""
    torch.manual_seed(seed)
    side = x.shape[-1]
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * (side // 2) ** 2, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt, g = torch.from_numpy(x), torch.from_numpy(y), torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_a_digits_own_strokes_are_no_shortcut(seed):
    """A CNN on 8x8 digits relies on 2x2 strokes that carry a class (they are candidates), but their training and
    held-out pictures agree: no finding."""
    x_tr, y_tr, x_te, y_te = _digits(marker=False, seed=seed)
    model = _small_cnn(x_tr, y_tr, seed)
    r = brittle.audit(model, (x_te, y_te), train_data=(x_tr, y_tr), checks=["shortcuts"],
                      config={"seed": seed})["shortcuts"]
    assert r.metrics["shortcuts_found"] == 0 and r.status == "pass"
    relied = [c for c in r.details["candidates"] if c["relied_on"]]
    assert relied and not any(c["absent_at_test"] for c in relied)  # relied on, but the same at test


def test_a_mark_whose_position_encodes_the_label_is_one_finding():
    """A one-pixel mark in the top row at a class-dependent column, on 95% of the training images only."""
    x_tr, y_tr, x_te, y_te = _digits(marker=False)
    x_tr, x_te = (np.kron(a, np.ones((1, 1, 2, 2), np.float32)) for a in (x_tr, x_te))  # 16x16: a column per class
    marked = np.random.default_rng(1).random(len(y_tr)) < 0.95
    x_tr[marked, 0, 0, y_tr[marked]] = 1.0
    model = _small_cnn(x_tr, y_tr)
    r = brittle.audit(model, (x_te, y_te), train_data=(x_tr, y_tr), checks=["shortcuts"])["shortcuts"]
    assert r.metrics["shortcuts_found"] == 1 and len(r.findings) == 1
    finding = r.findings[0]
    assert "readable from rows 0-1" in finding.message and len(finding.evidence["classes"]) >= 3
    assert finding.evidence["readable_train"] > 0.5 > finding.evidence["readable_heldout"] + 0.1
    assert finding.evidence["accuracy"] - finding.evidence["accuracy_occluded"] > 0.01
