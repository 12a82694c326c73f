"""The audit pipeline: load and validate -> model adapter -> checks -> one result -> reports.

Resume: `<out>/state/` holds a fingerprint of (model, data, config, versions), every finished check's
result, and each check's partial state. A resumed run reuses them only when the fingerprint matches.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._atomic import write_npz, write_text
from ._progress import Progress
from ._version import __version__
from .backends import Backend, make_backend
from .checks import REGISTRY, AuditContext, CheckState
from .config import AuditConfig, load_config
from .errors import BrittleError, ResumeMismatchError, UsageError
from .gates import evaluate_gates
from .loading.data import Dataset, load_data, validate_for_model
from .loading.models import load_model
from .model import ModelAdapter
from .result import AuditResult, CheckResult, Cost

__all__ = ["audit", "prepare_model", "prepare_data"]


def audit(
    model: ModelAdapter | nn.Module | str,
    data: Dataset | tuple | str,
    *,
    train_data: Dataset | tuple | str | None = None,
    config: AuditConfig | dict | str | Path | None = None,
    checks: list[str] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    backend: str | Backend | None = None,
    workers: int | None = None,
    address: str | None = None,
) -> AuditResult:
    """Audit a classifier on data and return the result the CLI writes as report.json.

    `model` is an in-memory `nn.Module`, a `ModelAdapter`, or a path/factory string (see `load_model`).
    `data` is a `Dataset`, an `(x, y)` pair of arrays/tensors, or a path (see `load_data`). With `out`,
    report.json, report.html and junit.xml are written there and the run can be resumed.
    `backend` ("local" by default, "process" or "ray", with `workers` and Ray's `address`) decides where
    sharded work runs; the numbers are the same on every backend.
    """
    started = time.time()
    cfg = _as_config(config)
    if checks is not None:
        cfg = cfg.model_copy(update={"checks": list(checks)})
    cfg.validate_all()
    progress = progress or Progress()
    adapter = prepare_model(model, cfg)
    ds = prepare_data(data, adapter, cfg, role="data")
    train = prepare_data(train_data, adapter, cfg, role="train-data", subsample=False) if train_data is not None else None
    fingerprint = _fingerprint(adapter, ds, train, cfg)
    state_root = _open_state(Path(out), fingerprint, resume, overwrite) if out is not None else None

    results: list[CheckResult] = []
    runner = make_backend(backend, workers=workers, address=address)
    try:
        for cid in cfg.selected_checks():
            results.append(_run_one(cid, cfg, adapter, ds, train, state_root, progress, runner))
    finally:
        if runner is not backend:  # a backend the caller passed in is the caller's to close
            runner.close()

    gate_results = evaluate_gates(cfg.parsed_gates(), results)
    if any(g.passed is False for g in gate_results):
        verdict = "fail"
    elif any(r.status == "error" for r in results) or any(g.passed is None for g in gate_results):
        verdict = "error"
    else:
        verdict = "pass"
    run = {
        "model": adapter.name, "data": ds.source, "train_data": train.source if train else None,
        "samples": len(ds), "num_classes": adapter.num_classes, "input_shape": list(adapter.input_shape or ()),
        "bounds": list(adapter.bounds), "differentiable": adapter.differentiable,
        "config": json.loads(cfg.model_dump_json()), "fingerprint": fingerprint,
        "versions": _versions(), "seed": cfg.seed, "backend": getattr(backend, "name", backend) or "local",
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 3),
    }
    result = AuditResult(verdict, results, gate_results, run)
    if out is not None:
        from .report import write_reports

        write_reports(result, Path(out))
    return result


def _as_config(config) -> AuditConfig:
    if config is None or isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, AuditConfig):
        return config
    if isinstance(config, dict):
        return AuditConfig.from_dict(config)
    raise UsageError(f"config must be an AuditConfig, a dict or a path to a TOML file; got {type(config).__name__}.")


def prepare_model(model, cfg: AuditConfig) -> ModelAdapter:
    spec = cfg.model
    if isinstance(model, ModelAdapter):
        return model
    if isinstance(model, nn.Module):
        return ModelAdapter(model, bounds=spec.bounds, mean=spec.mean, std=spec.std, batch_size=spec.batch_size,
                            name=type(model).__name__)
    if isinstance(model, (str, Path)):
        return load_model(spec.model_copy(update={"path": str(model)}) if not spec.factory else spec)
    if model is None and (spec.path or spec.factory):
        return load_model(spec)
    raise UsageError(f"model must be an nn.Module, a ModelAdapter or a path; got {type(model).__name__}.")


def prepare_other_model(other, cfg: AuditConfig, *, like: ModelAdapter, x_example: torch.Tensor) -> ModelAdapter:
    """Another model (a module, adapter or file) in the same input domain as `like`, checked to classify the same
    classes: the other members of an ensemble, the reference of a comparison."""
    if isinstance(other, (str, Path)):
        spec = cfg.model.model_copy(update={"path": str(other), "factory": None, "weights": None})
        other = load_model(spec)
    adapter = prepare_model(other, cfg)
    adapter.bind(x_example[:2], source=adapter.name)
    if adapter.num_classes != like.num_classes:
        raise UsageError(f"{adapter.name} has {adapter.num_classes} outputs and {like.name} {like.num_classes}: the "
                         "models must classify the same classes.")
    return adapter


def prepare_data(data, adapter: ModelAdapter, cfg: AuditConfig, *, role: str, subsample: bool = True) -> Dataset:
    if isinstance(data, Dataset):
        ds = Dataset(data.x, data.y, data.source, data.class_names, data.indices)  # never mutate the caller's
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        ds = Dataset.from_arrays(data[0], data[1])
    elif isinstance(data, (np.ndarray, torch.Tensor)):
        ds = Dataset.from_arrays(data)  # inputs without labels
    elif isinstance(data, (str, Path)):
        ds = load_data(data, label_column=cfg.data.label_column)
    else:
        raise UsageError(f"{role} must be a Dataset, an (x, y) pair, an array of inputs or a path; got "
                         f"{type(data).__name__}.")
    if adapter.num_classes is None:
        adapter.bind(ds.x, source=ds.source)
    elif tuple(ds.x.shape[1:]) != adapter.input_shape:
        from .errors import InputError

        raise InputError(ds.source, f"{role} samples have shape {tuple(ds.x.shape[1:])}, the evaluation data "
                         f"{adapter.input_shape}", "give training and evaluation data in the same layout")
    validate_for_model(ds, adapter, role=role)
    if subsample and cfg.data.max_samples is not None and cfg.data.max_samples < len(ds):
        rng = np.random.default_rng(cfg.seed)
        ds = ds.subset(np.sort(rng.choice(len(ds), size=cfg.data.max_samples, replace=False)))
    return ds


def _fingerprint(adapter: ModelAdapter, ds: Dataset, train: Dataset | None, cfg: AuditConfig) -> str:
    h = hashlib.sha256()
    for part in (adapter.fingerprint, ds.fingerprint(), train.fingerprint() if train else "-",
                 cfg.fingerprint_payload(), __version__, torch.__version__):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _open_state(out: Path, fingerprint: str, resume: bool, overwrite: bool) -> Path:
    state = out / "state"
    marker = state / "fingerprint.json"
    if marker.is_file():
        previous = json.loads(marker.read_text()).get("fingerprint")
        if overwrite:
            shutil.rmtree(state)
        elif not resume:
            raise UsageError(f"{out} already holds an audit. Pass --resume to continue it, --overwrite to start "
                             "over, or choose another --out.")
        elif previous != fingerprint:
            raise ResumeMismatchError(
                f"{out} holds an audit of a different model, data, config or brittle version (fingerprint "
                f"{previous[:12]} vs {fingerprint[:12]}); it cannot be resumed. Use --overwrite or another --out.")
    elif out.exists() and any(out.iterdir()) and not (resume or overwrite):
        if (out / "report.json").exists():
            raise UsageError(f"{out} already holds a report. Pass --overwrite to replace it or choose another --out.")
    state.mkdir(parents=True, exist_ok=True)
    write_text(marker, json.dumps({"fingerprint": fingerprint, "brittle_version": __version__}))
    return state


def _run_one(cid: str, cfg: AuditConfig, adapter: ModelAdapter, ds: Dataset, train: Dataset | None,
             state_root: Path | None, progress: Progress, backend: Backend) -> CheckResult:
    finished = state_root / "results" / f"{cid}.json" if state_root else None
    if finished is not None and finished.is_file():
        saved = json.loads(finished.read_text())
        arrays_path = finished.with_suffix(".npz")
        arrays = {}
        if arrays_path.is_file():
            with np.load(arrays_path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        return CheckResult.from_json(saved, arrays)

    check = REGISTRY[cid](cfg.options_for(cid))
    ctx = AuditContext(model=adapter, data=ds, train_data=train, seed=cfg.seed,
                       state=CheckState(state_root / cid if state_root else None), progress=progress,
                       backend=backend)
    reason = check.skip_reason(ctx)
    t0 = time.perf_counter()
    f0, b0 = adapter.counter.snapshot()
    if reason:
        result = CheckResult(cid, "skipped", reason=reason)
    else:
        try:
            result = check.run(ctx)
        except (BrittleError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a failing check never loses the others' results
            tb = traceback.format_exc()
            if state_root:
                write_text(state_root / f"{cid}.traceback.txt", tb)
            result = CheckResult(cid, "error", reason=f"{type(exc).__name__}: {exc}")
    f1, b1 = adapter.counter.snapshot()
    result.cost = Cost(round(time.perf_counter() - t0, 4), f1 - f0 + ctx.credited[0], b1 - b0 + ctx.credited[1])
    if finished is not None and result.status != "error":
        if result.arrays:
            write_npz(finished.with_suffix(".npz"), result.arrays)
        write_text(finished, json.dumps(result.to_json(), allow_nan=False))
    return result


def _versions() -> dict[str, Any]:
    return {"brittle": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}
