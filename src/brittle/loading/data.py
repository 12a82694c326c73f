"""Load evaluation or training data: `.npz` (arrays x, y), `.pt` tensors (weights_only), a folder of
images with one subfolder per class, or a CSV table with a named label column.

Everything is checked at the boundary: a bad file raises `InputError` naming the file, the problem and
the fix. Nothing is silently converted: uint8 images in a [0, 1] domain are an error with a hint.
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, UsageError, arg
from .models import _torch_load_safely

__all__ = ["Dataset", "load_data", "validate_for_model"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
BOUNDS_TOLERANCE = 1e-5


@dataclass
class Dataset:
    """Inputs in the model's input space (float32) and integer labels (or None when unlabelled)."""

    x: torch.Tensor
    y: torch.Tensor | None
    source: str = "<memory>"
    class_names: list[str] | None = None
    indices: np.ndarray | None = field(default=None, repr=False)  # positions in the source file after subsampling
    feature_names: list[str] | None = None  # tabular inputs: the column of each feature (a CSV's header)

    def __len__(self) -> int:
        return len(self.x)

    @classmethod
    def from_arrays(cls, x, y=None, source: str = "<memory>") -> "Dataset":
        x_t = _to_float_tensor(x, source)
        y_t = None if y is None else _to_label_tensor(y, source, len(x_t))
        return cls(x_t, y_t, source)

    def subset(self, idx: np.ndarray) -> "Dataset":
        t = torch.as_tensor(idx, dtype=torch.long)
        base = self.indices if self.indices is not None else np.arange(len(self))
        return Dataset(self.x[t], None if self.y is None else self.y[t], self.source, self.class_names, base[idx],
                       self.feature_names)

    def positions(self, idx: np.ndarray) -> np.ndarray:
        """Positions in the source file of the rows `idx` (reports name examples by these)."""
        idx = np.asarray(idx, dtype=np.int64)
        return (self.indices[idx] if self.indices is not None else idx).astype(np.int64)

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.x.numpy()).tobytes())
        if self.y is not None:
            h.update(np.ascontiguousarray(self.y.numpy()).tobytes())
        return h.hexdigest()


def load_data(path: str | Path, *, label_column: str | None = None, role: str = "data") -> Dataset:
    """Load a dataset file or image folder. `label_column` is required for CSV files; `role` names the argument
    the path came from, for messages."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such file or folder", f"check the path given as {arg(role)}")
    if p.is_dir():
        return _load_image_folder(p)
    suffix = p.suffix.lower()
    if suffix == ".npz":
        return _load_npz(p)
    if suffix in (".pt", ".pth"):
        return _load_pt(p)
    if suffix == ".csv":
        return _load_csv(p, label_column)
    raise InputError(p, f"unknown data format {suffix!r}",
                     f"use .npz (arrays x, y), .pt (a dict with tensors x, y), .csv with {arg('label_column')}, "
                     "or a folder with one subfolder of PNG/JPEG images per class")


def _load_npz(p: Path) -> Dataset:
    try:
        with np.load(p, allow_pickle=False) as f:
            names = list(f.keys())
            if "x" not in names:
                raise InputError(p, f"the archive has arrays {names} but no 'x'",
                                 "save with np.savez(path, x=inputs, y=labels)")
            x = f["x"]
            y = f["y"] if "y" in names else None
    except InputError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise InputError(p, "the archive holds Python objects (object arrays); brittle does not unpickle them",
                             "store numeric arrays only: np.savez(path, x=x.astype('float32'), y=y.astype('int64'))") from None
        raise InputError(p, f"cannot read the archive: {exc}") from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise InputError(p, f"cannot read the archive ({type(exc).__name__}: {exc}); it may be truncated",
                         "write it again with np.savez") from None
    return Dataset(_to_float_tensor(x, p), None if y is None else _to_label_tensor(y, p, len(x)), str(p))


def _load_pt(p: Path) -> Dataset:
    obj = _torch_load_safely(p, what="data")
    if isinstance(obj, dict):
        if "x" not in obj:
            raise InputError(p, f"the file holds keys {sorted(obj)} but no 'x'", "save with torch.save({'x': x, 'y': y}, path)")
        x, y = obj["x"], obj.get("y")
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        x, y = obj
    else:
        raise InputError(p, f"expected a dict with 'x' and 'y' (or a pair), found {type(obj).__name__}",
                         "save with torch.save({'x': x, 'y': y}, path)")
    return Dataset(_to_float_tensor(x, p), None if y is None else _to_label_tensor(y, p, len(x)), str(p))


def _load_image_folder(root: Path) -> Dataset:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - pillow is a runtime dependency
        raise UsageError("Reading image folders needs pillow: pip install pillow") from None
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise InputError(root, "the folder has no class subfolders",
                         "lay out images as ROOT/<class name>/<image>.png, one subfolder per class")
    images, labels, size, mode = [], [], None, None
    files = [(ci, f) for ci, c in enumerate(classes) for f in sorted((root / c).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise InputError(root, "the class subfolders hold no .png/.jpg/.jpeg images")
    # Grayscale only if every image is grayscale; otherwise everything becomes RGB.
    opened = []
    for ci, f in files:
        try:
            im = Image.open(f)
            im.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise InputError(f, f"cannot decode this image ({exc})", "remove the file or re-save it as PNG/JPEG") from None
        opened.append((ci, f, im))
    mode = "L" if all(im.mode in ("L", "1", "I;16", "I") for _, _, im in opened) else "RGB"
    for ci, f, im in opened:
        if size is None:
            size = im.size
        elif im.size != size:
            raise InputError(f, f"image size {im.size[0]}x{im.size[1]} differs from the first image's {size[0]}x{size[1]}",
                             "resize all images to one size before the audit (the model sees fixed-size inputs)")
        arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        labels.append(ci)
    x = torch.from_numpy(np.stack(images))
    return Dataset(x, torch.tensor(labels, dtype=torch.long), str(root), class_names=classes)


def _load_csv(p: Path, label_column: str | None) -> Dataset:
    if not label_column:
        raise UsageError(f"{p}: CSV data needs the name of its label column: give {arg('label_column')} "
                         "(the [data] label_column of audit.toml).")
    with open(p, newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(p, "the CSV file is empty") from None
        header = [h.strip() for h in header]
        if label_column not in header:
            raise InputError(p, f"no column named {label_column!r}; the columns are {header}",
                             f"give the right name with {arg('label_column')}")
        li = header.index(label_column)
        rows, raw_labels = [], []
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise InputError(p, f"line {lineno} has {len(row)} fields, the header has {len(header)}")
            raw_labels.append(row[li].strip())
            try:
                rows.append([float(v) for i, v in enumerate(row) if i != li])
            except ValueError:
                bad = next(header[i] for i, v in enumerate(row) if i != li and not _is_float(v))
                raise InputError(p, f"line {lineno}: column {bad!r} is not a number",
                                 "encode categorical features as numbers before the audit") from None
    if not rows:
        raise InputError(p, "the CSV file has a header but no rows")
    class_names = None
    if all(_is_int(v) for v in raw_labels):
        y = torch.tensor([int(float(v)) for v in raw_labels], dtype=torch.long)
    else:
        class_names = sorted(set(raw_labels))
        lookup = {c: i for i, c in enumerate(class_names)}
        y = torch.tensor([lookup[v] for v in raw_labels], dtype=torch.long)
    x = _to_float_tensor(np.asarray(rows, dtype=np.float64), p)
    features = [h for i, h in enumerate(header) if i != li]
    return Dataset(x, y, str(p), class_names=class_names, feature_names=features)


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _is_int(v: str) -> bool:
    try:
        f = float(v)
    except ValueError:
        return False
    return math.isfinite(f) and f == int(f)


def _to_float_tensor(x, source) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x.detach().cpu()
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise InputError(source, f"inputs 'x' have dtype {t.dtype}; numeric inputs are needed")
    if t.dim() < 2:
        raise InputError(source, f"inputs 'x' have shape {tuple(t.shape)}; expected (N, features...) with one row per sample")
    if len(t) == 0:
        raise InputError(source, "inputs 'x' are empty (0 samples)")
    if not t.is_floating_point():
        hi = int(t.max())
        raise InputError(source, f"inputs 'x' are integers ({t.dtype}, max {hi}); brittle does not rescale silently",
                         "convert to float32 in the model's input range, e.g. x.astype('float32') / 255 for 8-bit "
                         "images with bounds [0, 1], or set the model bounds to [0, 255]")
    t = t.float().contiguous()
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n_bad = int(bad.flatten(1).any(1).sum())
        first = int(bad.flatten(1).any(1).nonzero()[0])
        raise InputError(source, f"{n_bad} sample(s) contain NaN or inf (the first is sample {first})",
                         "drop or impute those samples before the audit")
    return t


def _to_label_tensor(y, source, n: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y.detach().cpu()
    t = t.squeeze(-1) if t.dim() == 2 and t.shape[-1] == 1 else t
    if t.dim() != 1:
        raise InputError(source, f"labels 'y' have shape {tuple(t.shape)}; expected (N,) class indices",
                         "pass integer class indices, not one-hot vectors (y.argmax(1))")
    if len(t) != n:
        raise InputError(source, f"{n} inputs but {len(t)} labels", "give exactly one label per input")
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise InputError(source, "labels 'y' are floats that are not whole numbers", "labels must be class indices 0..C-1")
        raise InputError(source, f"labels 'y' have dtype {t.dtype}", "store labels as integers: y.astype('int64')")
    if t.dtype == torch.bool:
        raise InputError(source, "labels 'y' are booleans", "store labels as integer class indices: y.astype('int64')")
    t = t.long()
    if bool((t < 0).any()):
        raise InputError(source, f"labels must be >= 0; found {int(t.min())}", "labels must be class indices 0..C-1")
    return t


def validate_for_model(data: Dataset, model, *, role: str = "data") -> None:
    """Checks that need the model: labels within its classes, values within its input bounds."""
    low, high = model.bounds
    tol = BOUNDS_TOLERANCE * max(1.0, high - low)
    x_min, x_max = float(data.x.min()), float(data.x.max())
    if x_min < low - tol or x_max > high + tol:
        hint = f"scale the inputs into the model's domain, or set the model's input bounds ({arg('bounds')})"
        if data.x.dim() == 2:  # tabular features have their own ranges: the bounds are the fix, not rescaling
            lo, hi = math.floor(min(x_min, low)), math.ceil(max(x_max, high))
            example = f"--bounds={lo},{hi}" if arg("bounds").startswith("--") else f"config {{'model': {{'bounds': [{lo}, {hi}]}}}}"
            hint = (f"tabular features: set the model's input bounds to the range the features can take, e.g. "
                    f"{example} or bounds = [{lo}, {hi}] in the [model] table of audit.toml (the domain that attacks "
                    "and corruptions stay in; brittle never rescales inputs)")
        elif x_min >= 0 and x_max > 1.5 and high <= 1.0 + tol:
            hint = "the values look like 0-255 pixels: divide by 255, or set bounds = [0, 255]"
        elif x_min < -tol and low >= 0:
            hint = ("the values look normalised (negative): pass raw inputs in [0, 1] and give mean/std in the "
                    "model spec, so that perturbations are measured in input space")
        raise InputError(data.source, f"{role} values span [{x_min:.4g}, {x_max:.4g}] but the model's input bounds "
                         f"are [{low:g}, {high:g}]", hint)
    if data.y is not None and model.num_classes is not None:
        top = int(data.y.max())
        if top >= model.num_classes:
            raise InputError(data.source, f"label {top} is out of range: the model has {model.num_classes} classes "
                             f"(labels 0..{model.num_classes - 1})", "check that the labels and the model match")
    # Inputs may sit a hair outside the bounds from float round-off; clip them to keep every check sound.
    if x_min < low or x_max > high:
        data.x = data.x.clamp(low, high)
