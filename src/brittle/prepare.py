"""The one preparation boundary: configuration -> model adapter -> datasets -> seeded subsets.

Every entry point (audit, calibrate, monitor, estimate, attribute, train) prepares its inputs here and
nowhere else, so a model or a data file is loaded, bound and validated the same way whichever command
reads it. Nothing here knows the checks or the runner.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import AuditConfig
from .errors import InputError, UsageError, arg
from .loading.data import Dataset, load_data, validate_for_model
from .loading.models import ModelSpec, load_model
from .model import ModelAdapter
from .seeds import seeded_subset

__all__ = ["prepare_model", "prepare_other_model", "prepare_data", "load_dataset", "other_model_spec"]


def prepare_model(model, cfg: AuditConfig) -> ModelAdapter:
    """The adapter for `model`: an nn.Module (a private eval-mode copy), an adapter as given, a model file or a
    factory string; None takes the model from the config's `[model]` table."""
    spec = cfg.model
    if isinstance(model, ModelAdapter):
        return model
    if isinstance(model, nn.Module):
        return ModelAdapter(model, bounds=spec.bounds, mean=spec.mean, std=spec.std, batch_size=spec.batch_size,
                            name=type(model).__name__, device=spec.device, autocast=spec.autocast)
    if isinstance(model, (str, Path)):
        return load_model(spec.model_copy(update={"path": str(model)}) if not spec.factory else spec)
    if model is None and (spec.path or spec.factory):
        return load_model(spec)
    raise UsageError(f"The '{arg('model')}' argument must be an nn.Module, a ModelAdapter or a path; got "
                     f"{type(model).__name__}.")


def other_model_spec(like: ModelAdapter) -> AuditConfig:
    """A config whose [model] table gives another model the input domain of `like` (bounds, normalisation,
    batch size) and its device."""
    mean = None if like.mean is None else [float(v) for v in np.ravel(like.mean)]
    std = None if like.std is None else [float(v) for v in np.ravel(like.std)]
    return AuditConfig(model=ModelSpec(bounds=like.bounds, mean=mean, std=std, batch_size=like.batch_size,
                                       device=str(like.device), autocast=like.autocast))


def prepare_other_model(other, cfg: AuditConfig | None = None, *, like: ModelAdapter,
                        x_example: torch.Tensor) -> ModelAdapter:
    """Another model (a module, adapter or file) in the same input domain as `like`, checked to classify the same
    classes: the other members of an ensemble, the reference of a comparison."""
    cfg = cfg or other_model_spec(like)
    if isinstance(other, (str, Path)):
        other = load_model(cfg.model.model_copy(update={"path": str(other), "factory": None, "weights": None}))
    adapter = prepare_model(other, cfg)
    adapter.bind(x_example[:2], source=adapter.name)
    if adapter.num_classes != like.num_classes:
        raise UsageError(f"{adapter.name} has {adapter.num_classes} outputs and {like.name} {like.num_classes}: the "
                         "models must classify the same classes.")
    return adapter


def load_dataset(data, cfg: AuditConfig, *, role: str) -> Dataset:
    """A Dataset from what the API accepts (a Dataset, an (x, y) pair, inputs alone, a path), never sharing
    storage with the caller's objects. `role` is the argument's name, for messages."""
    if isinstance(data, Dataset):
        return Dataset(data.x.clone(), None if data.y is None else data.y.clone(), data.source, data.class_names,
                       data.indices, data.feature_names)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return Dataset.from_arrays(data[0], data[1])
    if isinstance(data, (np.ndarray, torch.Tensor)):
        return Dataset.from_arrays(data)  # inputs without labels
    if isinstance(data, (str, Path)):
        return load_data(data, label_column=cfg.data.label_column, role=role)
    raise UsageError(f"The '{arg(role)}' argument must be a Dataset, an (x, y) pair, an array of inputs or a path; "
                     f"got {type(data).__name__}.")


def prepare_data(data, adapter: ModelAdapter, cfg: AuditConfig, *, role: str, subsample: bool = False) -> Dataset:
    """Load `data`, bind the adapter to its input shape (first call) or check the shape against it, validate the
    values against the model's bounds and classes, and (with `subsample`) take the config's seeded subset."""
    ds = load_dataset(data, cfg, role=role)
    if adapter.num_classes is None:
        adapter.bind(ds.x, source=ds.source)
    elif tuple(ds.x.shape[1:]) != adapter.input_shape:
        raise InputError(ds.source, f"{arg(role)} samples have shape {tuple(ds.x.shape[1:])}, the model's inputs "
                         f"{adapter.input_shape}", "give every data set in the same layout")
    validate_for_model(ds, adapter, role=arg(role))
    if subsample and cfg.data.max_samples is not None and cfg.data.max_samples < len(ds):
        ds = ds.subset(seeded_subset(len(ds), cfg.data.max_samples, cfg.seed, "data"))
    return ds
