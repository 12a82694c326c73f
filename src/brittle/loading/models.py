"""Load a model from a file without running arbitrary code.

Supported: TorchScript (`.ts`, `.pt`, `.pth` saved with `torch.jit.save`), `torch.export` programs
(`.pt2`), ONNX (`.onnx`, run with onnxruntime as a black box), and `package.module:factory` plus weights
(a state dict read with `torch.load(weights_only=True)`, or a `.safetensors` file). Pickled modules
(`torch.save(model)`) are refused: unpickling them runs whatever code the file names.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import InputError, UsageError, arg
from ..model import ModelAdapter

__all__ = ["ModelSpec", "load_model", "file_sha256"]


class ModelSpec(BaseModel):
    """Where the model comes from and its input domain. The `[model]` table of audit.toml."""

    model_config = ConfigDict(extra="forbid")

    path: str | None = Field(None, description="a model file: TorchScript, .pt2 or .onnx (or give --model)")
    factory: str | None = Field(None, description="package.module:function that builds the model (with weights)")
    factory_kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")
    weights: str | None = Field(None, description="the factory's state dict: .pt (weights_only) or .safetensors")
    bounds: tuple[float, float] = Field((0.0, 1.0), description="the input domain; attacks and checks stay inside it")
    mean: list[float] | None = Field(None, description="per-channel normalisation applied inside the adapter, so "
                                     "data and eps stay in input space")
    std: list[float] | None = Field(None, description="per-channel standard deviations of that normalisation")
    batch_size: int = Field(256, ge=1, description="inputs per forward pass (halved on an out-of-memory error)")
    device: str = Field("auto", description="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N or mps")
    autocast: Literal["off", "bf16", "fp16"] = Field("off", description="mixed precision for forward-only bulk work "
                                                     "(corruptions, overlays, occlusion); never for verification")

    @model_validator(mode="after")
    def _domain(self) -> "ModelSpec":
        low, high = self.bounds
        if not low < high:
            raise ValueError(f"bounds must be [low, high] with low < high; got {list(self.bounds)}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std for normalisation, or neither")
        if self.std is not None and (len(self.std) != len(self.mean) or min(self.std) <= 0):
            raise ValueError(f"std must be positive with one value per mean; got mean={self.mean}, std={self.std}")
        return self


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_model(spec: ModelSpec | str, **overrides: Any) -> ModelAdapter:
    """Load the model a spec names and wrap it in the adapter.

    `spec` may be a path (`model.ts`, `model.pt2`, `model.onnx`) or `package.module:factory`
    (then `weights=` is required).
    """
    if isinstance(spec, str):
        spec = ModelSpec(**({"factory": spec} if _looks_like_factory(spec) else {"path": spec}), **overrides)
    elif overrides:
        spec = spec.model_copy(update=overrides)
    common = dict(bounds=spec.bounds, mean=spec.mean, std=spec.std, batch_size=spec.batch_size, device=spec.device,
                  autocast=spec.autocast)
    if spec.factory:
        module, fp = _load_factory(spec)
        return ModelAdapter(module, name=spec.factory, source_fingerprint=fp, **common)
    if not spec.path:
        raise UsageError(f"No model given: give {arg('model')} as a path (TorchScript, .pt2 or .onnx) or as "
                         f"pkg.module:factory with {arg('weights')}.")
    path = Path(spec.path)
    if not path.is_file():
        raise InputError(path, "no such model file", f"check the path given as {arg('model')}")
    fp = file_sha256(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return ModelAdapter(_OnnxForward(path), name=path.name, differentiable=False, source_fingerprint=fp, **common)
    if suffix == ".pt2":
        return ModelAdapter(_load_exported(path), name=path.name, source_fingerprint=fp, **common)
    return ModelAdapter(_load_torchscript(path), name=path.name, source_fingerprint=fp, **common)


def import_callable(target: str, role: str, purpose: str):
    """The function named by 'package.module:function' (user code the user named: importing it runs it)."""
    mod_name, _, attr = target.partition(":")
    if not mod_name or not attr:
        raise UsageError(f"The {role} must look like 'package.module:function'; got {target!r}.")
    try:
        module = _import_from_here(mod_name)
    except ImportError as exc:
        raise UsageError(f"Cannot import module {mod_name!r} for the {role} {target!r}: {exc}. Make sure the "
                         "package is installed, or run from the folder that holds it (or set PYTHONPATH).") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"{mod_name!r} has no callable {attr!r}; {purpose}.")
    return fn


def train_and_predict(train_fn: str, x: torch.Tensor, y: torch.Tensor, fit, rows, seed: int) -> torch.Tensor:
    """The user's train function ('package.module:function', called as fn(x, y, seed=...)) on the rows `fit` of
    (x, y), and the trained model's logits on the rows `rows`, checked to be one row of class scores per input
    (label_errors' folds and the privacy checks' reference models both retrain this way)."""
    fit_fn = import_callable(train_fn, "train function", "it must train and return an nn.Module")
    trained = fit_fn(x[torch.as_tensor(fit)], y[torch.as_tensor(fit)], seed=seed)
    if not isinstance(trained, torch.nn.Module):
        raise UsageError(f"The train function {train_fn!r} returned {type(trained).__name__}, not an nn.Module.")
    trained.eval()
    inputs = x[torch.as_tensor(rows)]
    with torch.no_grad():
        logits = torch.cat([trained(part) for part in inputs.split(512)])
    classes = int(y.max()) + 1
    if logits.dim() != 2 or len(logits) != len(inputs) or logits.shape[1] < classes:
        raise UsageError(f"The model from {train_fn!r} returned outputs of shape {tuple(logits.shape)} for "
                         f"{len(inputs)} inputs; it must return one row of at least {classes} class scores per input.")
    return logits


def _import_from_here(name: str):
    """Import `name`; if its top-level package is not importable but sits in the working directory, import it from
    there, as `python -m` would (a user's `mymodels/nets.py` beside the data)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        top = name.split(".")[0]
        if exc.name != top or here in sys.path or not (Path(here, top).is_dir() or Path(here, f"{top}.py").is_file()):
            raise
        sys.path.insert(0, here)
        return importlib.import_module(name)


def _looks_like_factory(text: str) -> bool:
    return ":" in text and not Path(text).exists() and "/" not in text.split(":", 1)[0]


def _load_torchscript(path: Path) -> torch.nn.Module:
    if not zipfile.is_zipfile(path):
        raise InputError(path, "not a TorchScript archive (it is not a zip file; it may be truncated or a pickle)",
                         "save the model with torch.jit.save(torch.jit.script(model), path), or use "
                         f"give {arg('model')} as pkg.module:factory with {arg('weights')} state_dict.pt")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        names = zipfile.ZipFile(path).namelist()
        if any(n.endswith("data.pkl") for n in names) and not any("code/" in n for n in names):
            raise InputError(path, "this is a pickled torch.save file, not TorchScript; brittle does not unpickle "
                             "modules because that runs arbitrary code",
                             "save the state dict (torch.save(model.state_dict(), 'w.pt')) and pass "
                             f"give {arg('model')} as pkg.module:factory with {arg('weights')} w.pt") from None
        raise InputError(path, f"could not load TorchScript: {_first_line(exc)}",
                         "re-save with torch.jit.save, or use a factory plus weights") from None


def _load_exported(path: Path) -> torch.nn.Module:
    try:
        return torch.export.load(str(path)).module()
    except Exception as exc:
        raise InputError(path, f"could not load the torch.export program: {_first_line(exc)}",
                         "save it with torch.export.save(torch.export.export(model, (x,), dynamic_shapes=...), path)") from None


def _load_factory(spec: ModelSpec) -> tuple[torch.nn.Module, str]:
    target = spec.factory or ""
    factory = import_callable(target, "factory", "the factory must build an nn.Module")
    if not spec.weights:
        raise UsageError(f"The factory {target!r} needs weights: give {arg('weights')} (a .pt state dict or "
                         ".safetensors file).")
    state = load_state_dict(Path(spec.weights))
    model = factory(**spec.factory_kwargs)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"The factory {target!r} returned {type(model).__name__}, not an nn.Module.")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputError(spec.weights, f"the weights do not fit the model built by {target}: {_first_line(exc)}",
                         "check the factory arguments (factory_kwargs) match the ones used in training") from None
    h = hashlib.sha256((target + json.dumps(spec.factory_kwargs, sort_keys=True)).encode())
    h.update(file_sha256(spec.weights).encode())
    return model, h.hexdigest()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors` or from a torch file read with `weights_only=True`."""
    if not path.is_file():
        raise InputError(path, "no such weights file", f"check the path given as {arg('weights')}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UsageError("Reading .safetensors needs the safetensors package: pip install 'brittle[safetensors]'") from None
        try:
            return load_file(str(path))
        except Exception as exc:
            raise InputError(path, f"not a valid safetensors file: {_first_line(exc)}") from None
    state = _torch_load_safely(path, what="weights")
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "expected a state dict (a mapping of names to tensors)",
                         "save with torch.save(model.state_dict(), path)")
    return state


def _torch_load_safely(path: Path, what: str) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(path, f"refused to load the {what}: the file holds pickled Python objects that are not "
                         f"plain tensors, and unpickling them could run arbitrary code ({_first_line(exc)[:160]})",
                         "save only tensors (torch.save({'x': x, 'y': y}) or a state dict), or use safetensors") from None
    except Exception as exc:
        raise InputError(path, f"cannot read the {what} ({type(exc).__name__}: {_first_line(exc)[:200]}); "
                         "the file may be truncated or not a torch file") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _OnnxForward:
    """An ONNX model run by onnxruntime: a black box with no input gradients."""

    def __init__(self, path: Path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UsageError("Running an ONNX model needs onnxruntime: pip install 'brittle[onnx]'") from None
        try:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise InputError(path, f"onnxruntime cannot load this file: {_first_line(exc)[:200]}") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise InputError(path, f"the ONNX model has {len(inputs)} inputs; brittle needs exactly one (the batch)")
        self.input_name = inputs[0].name
        self.path = path

    def __getstate__(self) -> dict:
        return {"path": self.path}  # a session cannot be pickled; a worker opens its own

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().float().numpy()})[0]
        return torch.from_numpy(out)


def parse_floats(text: str | Sequence[float] | None, name: str) -> list[float] | None:
    """'0.5,0.25' -> [0.5, 0.25] for CLI options."""
    if text is None or not isinstance(text, str):
        return None if text is None else [float(v) for v in text]
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"The '{name}' option must be comma-separated numbers; got {text!r}.") from None
