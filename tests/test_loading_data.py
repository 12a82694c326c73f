import numpy as np
import pytest
import torch
from PIL import Image

from brittle import InputError, UsageError, audit, load_data
from brittle.loading.data import validate_for_model
from brittle.model import ModelAdapter


def test_npz_and_pt(tmp_path, blobs):
    x, y = blobs
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = load_data(tmp_path / "d.npz")
    assert d.x.shape == (240, 1, 8, 8) and d.y.dtype == torch.int64
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y)}, tmp_path / "d.pt")
    assert torch.equal(load_data(tmp_path / "d.pt").x, d.x)


def test_image_folder(tmp_path):
    g = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(g.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    d = load_data(tmp_path / "imgs")
    assert d.x.shape == (6, 1, 8, 8) and d.class_names == ["cat", "dog"] and d.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert 0 <= float(d.x.min()) and float(d.x.max()) <= 1
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "imgs" / "dog" / "odd.png")
    with pytest.raises(InputError, match="odd.png.*differs"):
        load_data(tmp_path / "imgs")


def test_csv_with_label_column(tmp_path):
    (tmp_path / "t.csv").write_text("a,b,label\n0.1,0.2,yes\n0.3,0.4,no\n0.5,0.6,yes\n")
    d = load_data(tmp_path / "t.csv", label_column="label")
    assert d.x.shape == (3, 2) and d.class_names == ["no", "yes"] and d.y.tolist() == [1, 0, 1]
    assert d.feature_names == ["a", "b"]  # named in reports
    with pytest.raises(UsageError, match="label_column"):  # the Python API names its own argument
        load_data(tmp_path / "t.csv")
    with pytest.raises(InputError, match="no column named 'target'"):
        load_data(tmp_path / "t.csv", label_column="target")
    (tmp_path / "bad.csv").write_text("a,label\nx,1\n")
    with pytest.raises(InputError, match="line 2: column 'a' is not a number"):
        load_data(tmp_path / "bad.csv", label_column="label")


@pytest.mark.parametrize("case, match", [
    ("nan", "NaN or inf"),
    ("labels_shape", "one-hot"),
    ("length", "240 inputs but 239 labels"),
    ("uint8", "does not rescale silently"),
    ("float_labels", "as integers"),
    ("negative", "must be >= 0"),
    ("no_x", "no 'x'"),
])
def test_bad_npz_contents(tmp_path, blobs, case, match):
    x, y = blobs[0].copy(), blobs[1].copy()
    if case == "nan":
        x[3, 0, 0, 0] = np.nan
    elif case == "labels_shape":
        y = np.eye(3)[y].astype(np.int64)
    elif case == "length":
        y = y[:-1]
    elif case == "uint8":
        x = (x * 255).astype(np.uint8)
    elif case == "float_labels":
        y = y.astype(np.float32)
    elif case == "negative":
        y[0] = -1
    arrays = {"x": x, "y": y} if case != "no_x" else {"inputs": x, "y": y}
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(InputError, match=match) as err:
        load_data(tmp_path / "d.npz")
    assert "d.npz" in str(err.value)


def test_truncated_npz_and_object_arrays(tmp_path, blobs):
    np.savez(tmp_path / "d.npz", x=blobs[0], y=blobs[1])
    (tmp_path / "cut.npz").write_bytes((tmp_path / "d.npz").read_bytes()[:500])
    with pytest.raises(InputError, match="truncated"):
        load_data(tmp_path / "cut.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([object()] * 3, dtype=object), y=np.zeros(3))
    with pytest.raises(InputError, match="does not unpickle"):
        load_data(tmp_path / "obj.npz")


def test_malicious_pt_data_is_refused(tmp_path):
    from .test_loading_models import _Boom

    marker = tmp_path / "pwned"
    torch.save({"x": _Boom(marker), "y": torch.zeros(2)}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="arbitrary code"):
        load_data(tmp_path / "evil.pt")
    assert not marker.exists()


def test_model_dependent_validation(blobs, tiny_model):
    x, y = blobs
    adapter = ModelAdapter(tiny_model)
    with pytest.raises(InputError, match="label 7 is out of range: the model has 3 classes"):
        audit(tiny_model, (x, np.where(y == 0, 7, y)), checks=["accuracy"])
    with pytest.raises(InputError, match="look like 0-255 pixels"):
        audit(tiny_model, (x * 255, y), checks=["accuracy"])
    with pytest.raises(InputError, match="look normalised"):
        audit(tiny_model, ((x - 0.5) / 0.25, y), checks=["accuracy"])
    with pytest.raises(InputError, match="model failed on inputs of shape"):
        audit(tiny_model, (x[:, :, :4], y), checks=["accuracy"])
    # Round-off just outside the bounds is tolerated (and clipped in brittle's copy, not the caller's).
    x2 = x.copy()
    x2[0, 0, 0, 0] = 1 + 1e-7
    adapter.bind(torch.from_numpy(x2))
    from brittle import Dataset

    ds = Dataset.from_arrays(x2, y)
    validate_for_model(ds, adapter)
    assert float(ds.x.max()) <= 1.0 and x2[0, 0, 0, 0] > 1.0
