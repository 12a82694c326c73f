"""One result schema for every check, and the audit result that holds them.

report.json is the source of truth; HTML, JUnit and the terminal summary are renderings of it.
Per-sample arrays live beside the report in `arrays/<check id>.npz` and are named in the JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._version import SCHEMA_VERSION, __version__

__all__ = ["Finding", "Cost", "CheckResult", "GateResult", "AuditResult", "SEVERITIES", "STATUSES"]

Status = Literal["pass", "warn", "fail", "error", "skipped"]
Severity = Literal["info", "low", "medium", "high"]
STATUSES = ("pass", "warn", "fail", "error", "skipped")
SEVERITIES = ("info", "low", "medium", "high")
DOCS_FINDINGS = "docs/findings.md"


@dataclass
class Finding:
    """One thing a check found, with a stable id that links to its section in docs/findings.md."""

    id: str
    severity: Severity
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    doc: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        if not self.doc:
            self.doc = f"{DOCS_FINDINGS}#{self.id.replace('.', '-')}"


@dataclass
class Cost:
    seconds: float = 0.0
    forward_passes: int = 0
    backward_passes: int = 0


@dataclass
class CheckResult:
    id: str
    status: Status
    metrics: dict[str, Any] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    cost: Cost = field(default_factory=Cost)
    reason: str = ""  # why a check was skipped or errored

    def to_json(self, arrays_file: str | None = None) -> dict[str, Any]:
        out = {
            "id": self.id,
            "status": self.status,
            "metrics": _jsonable(self.metrics),
            "findings": [_jsonable(asdict(f)) for f in self.findings],
            "details": _jsonable(self.details),
            "cost": asdict(self.cost),
            "arrays": {"file": arrays_file, "names": sorted(self.arrays)} if self.arrays else None,
        }
        if self.reason:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> "CheckResult":
        return cls(
            id=d["id"],
            status=d["status"],
            metrics=d.get("metrics", {}),
            findings=[Finding(**f) for f in d.get("findings", [])],
            details=d.get("details", {}),
            arrays=arrays or {},
            cost=Cost(**d.get("cost", {})),
            reason=d.get("reason", ""),
        )


@dataclass
class GateResult:
    expression: str
    check: str
    metric: str
    op: str
    threshold: float
    value: float | None
    passed: bool | None  # None: could not be evaluated (check skipped/errored or metric missing)
    reason: str = ""


@dataclass
class AuditResult:
    verdict: Literal["pass", "fail", "error"]
    checks: list[CheckResult]
    gates: list[GateResult] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)  # model, data, config, fingerprint, versions, timing

    def check(self, check_id: str) -> CheckResult:
        for c in self.checks:
            if c.id == check_id:
                return c
        raise KeyError(f"no check {check_id!r} in this result; checks: {[c.id for c in self.checks]}")

    def __getitem__(self, check_id: str) -> CheckResult:
        return self.check(check_id)

    @property
    def exit_code(self) -> int:
        """0 pass, 1 a gate failed, 3 an internal error (a check errored or a gate could not be evaluated)."""
        if any(g.passed is False for g in self.gates):
            return 1
        if self.verdict == "error":
            return 3
        return 0

    def findings(self) -> list[tuple[str, Finding]]:
        """Every finding with its check id, worst first."""
        rank = {s: i for i, s in enumerate(SEVERITIES)}
        items = [(c.id, f) for c in self.checks for f in c.findings]
        return sorted(items, key=lambda t: -rank[t[1].severity])

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "brittle_version": __version__,
            "verdict": self.verdict,
            "gates": [_jsonable(asdict(g)) for g in self.gates],
            "checks": [c.to_json(f"arrays/{c.id}.npz" if c.arrays else None) for c in self.checks],
            "run": _jsonable(self.run),
        }

    def save(self, out_dir: str | Path) -> Path:
        """Write report.json and the per-sample arrays (atomically, file by file)."""
        from ._atomic import write_npz, write_text

        out = Path(out_dir)
        (out / "arrays").mkdir(parents=True, exist_ok=True)
        for c in self.checks:
            if c.arrays:
                write_npz(out / "arrays" / f"{c.id}.npz", c.arrays)
        path = out / "report.json"
        write_text(path, json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def load(cls, out_dir: str | Path) -> "AuditResult":
        out = Path(out_dir)
        path = out / "report.json" if out.is_dir() else out
        from .errors import InputError

        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(path, f"cannot read the report ({exc})", "run brittle audit to create it") from None
        major = str(d.get("schema_version", "0")).split(".")[0]
        if major != SCHEMA_VERSION.split(".")[0]:
            raise InputError(path, f"report schema {d.get('schema_version')} is not readable by this brittle "
                             f"(schema {SCHEMA_VERSION})", "re-run the audit with this version")
        checks = []
        for c in d["checks"]:
            arrays = {}
            if c.get("arrays") and c["arrays"].get("file"):
                f = path.parent / c["arrays"]["file"]
                if f.is_file():
                    with np.load(f, allow_pickle=False) as z:
                        arrays = {k: z[k] for k in z.files}
            checks.append(CheckResult.from_json(c, arrays))
        gates = [GateResult(**g) for g in d.get("gates", [])]
        return cls(verdict=d["verdict"], checks=checks, gates=gates, run=d.get("run", {}))


def _jsonable(obj: Any) -> Any:
    """Plain JSON types only: numpy scalars become numbers, non-finite floats become None."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    return obj
