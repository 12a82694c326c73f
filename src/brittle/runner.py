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
from .config import AuditConfig, as_config
from .errors import BrittleError, ResumeMismatchError, UsageError, arg
from .gates import evaluate_gates
from .loading.data import Dataset
from .model import ModelAdapter
from .plan import preflight, resolve
from .prepare import prepare_data, prepare_model
from .result import AuditResult, CheckResult, Cost

__all__ = ["audit"]


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
    progress: Progress | bool | None = None,
    backend: str | Backend | None = None,
    workers: int | None = None,
    address: str | None = None,
) -> AuditResult:
    """Audit a classifier on data and return the result the CLI writes as report.json.

    `model` is an in-memory `nn.Module`, a `ModelAdapter`, or a path/factory string (see `load_model`).
    `data` is a `Dataset`, an `(x, y)` pair of arrays/tensors, or a path (see `load_data`). With `out`,
    report.json, report.html and junit.xml are written there and the run can be resumed.
    `progress=True` prints progress to stderr (a bar on a terminal, one line per step otherwise).
    `backend` ("local" by default, "process" or "ray", with `workers` and Ray's `address`) decides where
    sharded work runs; the numbers are the same on every backend.
    A configuration that cannot run as asked (a requested check that would be skipped, a gate on a check that
    does not run, an option that does not apply to the data) raises UsageError before any work.
    """
    started = time.time()
    cfg = as_config(config)
    if checks is not None:
        cfg = cfg.model_copy(update={"checks": list(checks)})
    plan = resolve(cfg)
    progress = Progress.from_argument(progress)
    adapter = prepare_model(model, cfg)
    ds = prepare_data(data, adapter, cfg, role="data", subsample=True)
    train = prepare_data(train_data, adapter, cfg, role="train_data") if train_data is not None else None
    skipped = preflight(plan, AuditContext(model=adapter, data=ds, train_data=train, seed=cfg.seed))
    parts = _fingerprint_parts(adapter, ds, train, plan.fingerprint_payload(cfg))
    state_root = _open_state(Path(out), parts, resume, overwrite) if out is not None else None

    results: list[CheckResult] = []
    runner = make_backend(backend, workers=workers, address=address)
    try:
        for cid in plan.checks:
            results.append(_run_one(cid, plan.options[cid], cfg.seed, adapter, ds, train, state_root, progress,
                                    runner, skipped.get(cid)))
    finally:
        if runner is not backend:  # a backend the caller passed in is the caller's to close
            runner.close()

    gate_results = evaluate_gates(plan.gates, results)
    if any(g.passed is False for g in gate_results):
        verdict = "fail"
    elif any(r.status == "error" for r in results) or any(g.passed is None for g in gate_results):
        verdict = "error"
    else:
        verdict = "pass"
    run = {
        "model": adapter.name, "data": ds.source, "train_data": train.source if train else None,
        "samples": len(ds), "num_classes": adapter.num_classes, "input_shape": list(adapter.input_shape or ()),
        "bounds": list(adapter.bounds), "differentiable": adapter.differentiable, "device": str(adapter.device),
        "autocast": adapter.autocast, "notes": list(dict.fromkeys(adapter.notes)),
        "threat": plan.threat.model_dump(mode="json") | {"eps": plan.threat.radius},
        "config": json.loads(cfg.model_dump_json()), "fingerprint": _combine(parts),
        "fingerprints": {k: parts[k] for k in ("model", "data", "train_data")},  # what `brittle compare` lines up
        "versions": _versions(), "seed": cfg.seed, "backend": getattr(backend, "name", backend) or "local",
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 3),
    }
    result = AuditResult(verdict, results, gate_results, run)
    if out is not None:
        from .report import write_reports

        write_reports(result, Path(out))
    return result


def _fingerprint_parts(adapter: ModelAdapter, ds: Dataset, train: Dataset | None, config_payload: str) -> dict:
    """What decides the numbers, part by part, so that a refused resume can say which part changed."""
    return {"model": adapter.fingerprint, "device": f"{adapter.device.type} {adapter.autocast}",
            "data": ds.fingerprint(), "train_data": train.fingerprint() if train else "-",
            "config": hashlib.sha256(config_payload.encode()).hexdigest(),
            "versions": f"brittle {__version__}, torch {torch.__version__}"}


def _combine(parts: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(parts):
        h.update(f"{key}={parts[key]}".encode())
        h.update(b"\0")
    return h.hexdigest()


_CHANGED = {"model": "the model (its weights or file)", "device": "the device or autocast setting (numbers computed "
            "elsewhere would not match bit for bit)", "data": "the data", "train_data": "the training data",
            "config": "the configuration (checks, their options, seed, bounds or normalisation; gates may change)",
            "versions": "the brittle or torch version"}


def _open_state(out: Path, parts: dict, resume: bool, overwrite: bool) -> Path:
    state = out / "state"
    marker = state / "fingerprint.json"
    fingerprint = _combine(parts)
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if overwrite:
            shutil.rmtree(state)
        elif not resume:
            raise UsageError(f"{out} already holds an audit. Pass {arg('resume', 'True')} to continue it, "
                             f"{arg('overwrite', 'True')} to start over, or choose another {arg('out')}.")
        elif saved.get("fingerprint") != fingerprint:
            before = saved.get("parts") or {}
            changed = [_CHANGED[k] for k in parts if before.get(k) != parts[k]] if before else []
            what = "; ".join(changed) if changed else "the model, data, config or versions"
            raise ResumeMismatchError(
                f"{out} holds an audit that cannot be resumed with these inputs: changed since it was started: "
                f"{what}. Use {arg('overwrite', 'True')} to start over, or another {arg('out')}.")
    elif out.exists() and any(out.iterdir()) and not (resume or overwrite):
        if (out / "report.json").exists():
            raise UsageError(f"{out} already holds a report. Pass {arg('overwrite', 'True')} to replace it or choose "
                             f"another {arg('out')}.")
    state.mkdir(parents=True, exist_ok=True)
    write_text(marker, json.dumps({"fingerprint": fingerprint, "parts": parts, "brittle_version": __version__}))
    return state


def _run_one(cid: str, options, seed: int, adapter: ModelAdapter, ds: Dataset, train: Dataset | None,
             state_root: Path | None, progress: Progress, backend: Backend, skip: str | None) -> CheckResult:
    finished = state_root / "results" / f"{cid}.json" if state_root else None
    if finished is not None and finished.is_file():
        saved = json.loads(finished.read_text())
        arrays_path = finished.with_suffix(".npz")
        arrays = {}
        if arrays_path.is_file():
            with np.load(arrays_path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        progress.message(f"{cid}: {saved['status']} (finished in an earlier run, reused)")
        return CheckResult.from_json(saved, arrays)

    check = REGISTRY[cid](options)
    ctx = AuditContext(model=adapter, data=ds, train_data=train, seed=seed,
                       state=CheckState(state_root / cid if state_root else None), progress=progress,
                       backend=backend, check_id=cid)
    reason = skip
    t0 = time.perf_counter()
    f0, b0 = adapter.counter.snapshot()
    if reason:
        result = CheckResult(cid, "skipped", reason=reason)
        progress.message(f"{cid}: skipped ({reason})")
    else:
        progress.message(f"{cid}: running")
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
    if not reason:
        progress.message(f"{cid}: {result.status} in {result.cost.seconds:.1f} s")
    if finished is not None and result.status != "error":
        if result.arrays:
            write_npz(finished.with_suffix(".npz"), result.arrays)
        write_text(finished, json.dumps(result.to_json(), allow_nan=False))
    return result


def _versions() -> dict[str, Any]:
    return {"brittle": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}
