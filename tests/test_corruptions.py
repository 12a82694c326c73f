"""Corruptions: every one changes images and keeps shape, range and seed determinism; the check end to end."""

import numpy as np
import pytest
import torch

import brittle
from brittle.corruptions import COMMON, EXTRA, TABULAR, corrupt, corrupt_tabular, corruption_names

_RANDOM_FREE = {"defocus_blur", "gaussian_blur", "zoom_blur", "brightness", "contrast", "saturate", "pixelate",
                "jpeg_compression"}


@pytest.mark.parametrize("channels,size", [(1, (28, 28)), (3, (20, 24)), (3, (9, 40))])
def test_every_corruption_changes_images_and_keeps_shape_range_and_determinism(channels, size):
    x = torch.rand(6, channels, *size, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1
    before = x.clone()
    names = corruption_names(channels)
    assert len(names) == (19 if channels == 3 else 18) and set(COMMON) <= set(names)
    for name in names:
        for severity in (1, 5):
            out = corrupt(x, name, severity, seed=3)
            assert out.shape == x.shape and out.dtype == torch.float32, name
            assert float(out.min()) >= 0 and float(out.max()) <= 1, name
            assert (out - x).abs().mean() > 1e-3, f"{name} {severity} left the images unchanged"
            assert torch.equal(out, corrupt(x, name, severity, seed=3)), f"{name} is not seeded"
            if name not in _RANDOM_FREE:
                assert not torch.equal(out, corrupt(x, name, severity, seed=4)), f"{name} ignores the seed"
    assert torch.equal(x, before), "a corruption modified its input"


def test_severity_makes_corruptions_stronger():
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name in ("gaussian_noise", "impulse_noise", "contrast", "gaussian_blur", "fog", "pixelate"):
        change = [float((corrupt(x, name, s) - x).abs().mean()) for s in (1, 3, 5)]
        assert change[0] < change[1] < change[2], (name, change)


def test_bad_corruption_requests_say_what_is_wrong():
    with pytest.raises(ValueError, match="needs 3-channel"):
        corrupt(torch.rand(2, 1, 8, 8), "saturate", 1)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(torch.rand(2, 1, 8, 8), "rain", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(torch.rand(2, 1, 8, 8), "fog", 6)
    assert set(EXTRA) - set(corruption_names(1)) == {"saturate"}


def test_tabular_corruptions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) * torch.tensor([1.0, 10, 0.1, 5, 2, 1]) + 3
    for name in TABULAR:
        out = corrupt_tabular(x, name, 3, seed=1)
        assert out.shape == x.shape and not torch.equal(out, x)
        assert torch.equal(out, corrupt_tabular(x, name, 3, seed=1))
    noisy = corrupt_tabular(x, "feature_noise", 5)
    # noise in units of each feature's spread: relative change is the same for wide and narrow features
    rel = ((noisy - x).std(0) / x.std(0)).numpy()
    assert np.allclose(rel, 0.8, rtol=0.15)
    missing = corrupt_tabular(x, "missing_values", 5)
    filled = missing != x
    assert 0.4 < float(filled.float().mean()) < 0.6
    assert torch.allclose(missing[filled], x.mean(0).expand_as(x)[filled])


def test_corruptions_check_end_to_end(tmp_path, tiny_model, blobs, files):
    model_path, _ = files
    x, y = blobs
    cfg = {"corruptions": {"corruptions": ["gaussian_noise", "contrast", "fog"], "severities": [1, 5],
                           "reference_model": str(model_path), "other_models": [str(model_path)]}}
    r = brittle.audit(tiny_model, (x, y), checks=["corruptions"], config=cfg, out=tmp_path / "a")["corruptions"]
    m = r.metrics
    assert m["mean_corruption_accuracy"] < m["clean_accuracy"]
    assert abs(m["mce"] - 1.0) < 1e-9  # the reference is the same model: every corruption error ratio is 1
    acc = r.details["accuracy"]
    assert all(len(v) == 2 for v in acc.values()) and acc["fog"][1] <= acc["fog"][0]
    assert len(r.details["estimates"]) == 6 and 0 <= m["estimate_mae"] <= 1
    assert r.arrays["example_corrupted"].shape == (3, 1, 8, 8)
    html = (tmp_path / "a" / "report.html").read_text()
    assert "Accuracy per corruption" in html and "estimate vs truth" in html

    strict = {"corruptions": {"corruptions": ["fog"], "severities": [5], "max_relative_drop": 0.01,
                              "max_type_drop": 0.01}}
    r2 = brittle.audit(tiny_model, (x, y), checks=["corruptions"], config=strict)["corruptions"]
    assert [f.id for f in r2.findings][:1] == ["corruptions.fragile"]


def test_corruptions_check_on_tabular_data(tmp_path):
    g = np.random.default_rng(0)
    x = g.normal(size=(300, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    model = torch.nn.Linear(5, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-1.0, -1, 0, 0, 0], [1.0, 1, 0, 0, 0]]))
        model.bias.zero_()
    r = brittle.audit(model, (x, y), checks=["corruptions"], config={"model": {"bounds": [-10, 10]}})["corruptions"]
    assert r.details["kind"] == "tabular" and set(r.details["per_type"]) == set(TABULAR)
    assert r.metrics["clean_accuracy"] == 1.0 and r.metrics["mean_corruption_accuracy"] < 1.0


def test_resume_refuses_a_replaced_reference_model(tmp_path, tiny_model, blobs, files):
    """Models named in check options are fingerprinted by content: replacing one between an interrupted run and
    --resume must not mix two models' results."""
    from brittle.errors import ResumeMismatchError

    model_path, _ = files
    reference = tmp_path / "reference.ts"
    reference.write_bytes(model_path.read_bytes())
    x, y = blobs
    cfg = {"corruptions": {"corruptions": ["contrast"], "severities": [3], "reference_model": str(reference)}}
    brittle.audit(tiny_model, (x, y), checks=["corruptions"], config=cfg, out=tmp_path / "a")
    brittle.audit(tiny_model, (x, y), checks=["corruptions"], config=cfg, out=tmp_path / "a", resume=True)
    reference.write_bytes(model_path.read_bytes() + b"\0")  # same path, other content
    with pytest.raises(ResumeMismatchError):
        brittle.audit(tiny_model, (x, y), checks=["corruptions"], config=cfg, out=tmp_path / "a", resume=True)
