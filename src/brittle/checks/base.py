"""The check contract: a class with a stable id, declared needs, an options model and one `run`.

Subclasses are validated when they are defined (not when first used) and register themselves, so a
typo in a new check fails at import, in the check author's test run, not in a user's audit.
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .._atomic import write_npz
from .._progress import Progress
from ..backends import Backend, LocalBackend, Task
from ..config import ThreatModel
from ..errors import UsageError, arg
from ..loading.data import Dataset
from ..loading.models import file_sha256
from ..model import ModelAdapter
from ..result import CheckResult, Finding

__all__ = ["Check", "CheckDetails", "FindingDoc", "Needs", "make_details", "AuditContext", "CheckState", "CheckOptions", "REGISTRY", "status_from_findings",
           "robust_z", "missing_packages", "DATA_EXTRA", "load_other_model", "validate_eps"]

REGISTRY: dict[str, type["Check"]] = {}
_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


class CheckOptions(BaseModel):
    """Base for every check's options: unknown keys are errors, so `stepz = 10` never passes silently."""

    model_config = ConfigDict(extra="forbid")
    model_files: ClassVar[tuple[str, ...]] = ()  # fields naming model files: their content joins the fingerprint

    def with_threat(self, threat: ThreatModel) -> "CheckOptions":
        """These options with the audit's threat model filled in where they leave it open (robustness checks
        override this; it must leave values the user set alone, so applying it twice changes nothing)."""
        return self

    def validate_against(self, bounds: tuple[float, float]) -> None:
        """Checks that need the model's input domain (e.g. eps against the bounds). Override when needed."""

    def file_digests(self) -> dict[str, str]:
        """SHA-256 of every existing file the `model_files` fields name, so that replacing one between an
        interrupted run and --resume is a fingerprint mismatch, not a silent mix of two models' results."""
        out = {}
        for name in self.model_files:
            value = getattr(self, name)
            for path in [value] if isinstance(value, str) else list(value or []):
                if Path(path).is_file():
                    out[path] = file_sha256(Path(path))
        return out


class CheckDetails(BaseModel):
    """A check's `details` (report.json): every key documented and typed; a key a check writes but does not declare
    fails the common contract test."""

    model_config = ConfigDict(extra="forbid")


def make_details(name: str, fields: dict[str, tuple[Any, str]]) -> type[CheckDetails]:
    """A CheckDetails model from {key: (type, meaning)}; every key may be absent (None) where it does not apply."""
    return create_model(name, __base__=CheckDetails,
                        **{k: (t | None, Field(None, description=doc)) for k, (t, doc) in fields.items()})


@dataclass(frozen=True)
class FindingDoc:
    """What a finding means and what to do about it. docs/findings.md is generated from these, and the HTML report
    carries the text of every finding it shows."""

    severity: str  # the severity the check gives it, in words ("high", "medium or high", ...)
    text: str  # markdown: `code` and [links](file.md) are the only markup


@dataclass(frozen=True)
class Needs:
    gradients: bool = False
    labels: bool = True
    train_data: bool = False
    train_labels: bool = False  # labels in the training set


class CheckState:
    """Resumable per-check storage under `<out>/state/<check id>/`. Each key is one atomic .npz file."""

    def __init__(self, root: Path | None):
        self.root = root

    def load(self, key: str) -> dict[str, np.ndarray] | None:
        if self.root is None:
            return None
        path = self.root / f"{key}.npz"
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def save(self, key: str, arrays: dict[str, Any]) -> None:
        if self.root is None:
            return
        write_npz(self.root / f"{key}.npz", {k: _to_numpy(v) for k, v in arrays.items()})


def _to_numpy(v: Any) -> np.ndarray:
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


@dataclass
class AuditContext:
    model: ModelAdapter
    data: Dataset
    train_data: Dataset | None = None
    seed: int = 0
    state: CheckState = field(default_factory=lambda: CheckState(None))
    progress: Progress = field(default_factory=Progress)
    backend: Backend = field(default_factory=LocalBackend)
    credited: list[int] = field(default_factory=lambda: [0, 0])
    check_id: str = ""

    def credit_passes(self, forward: int, backward: int) -> None:
        """Count passes of work reused from a saved state, or made on another worker's copy of the model, so that
        the check reports its full cost."""
        self.credited[0] += forward
        self.credited[1] += backward

    def map_shards(self, name: str, fn, tasks: list[tuple[str, tuple]], shared: tuple = (), *,
                   label: str | None = None) -> list[dict[str, np.ndarray]]:
        """Run `fn(model, *shared, *args)` for every `(key, args)` task on the audit's backend and return the
        results (dicts of arrays) in task order.

        This is the unit of resumable, distributable work: each result is saved the moment it arrives (as
        `<name>-<key>` in the check's state), a resumed run on any backend reuses every saved one, and the passes
        a task made are counted wherever it ran. `fn` must be a module-level function and a pure function of
        its inputs (seeds come in `args`), so that the numbers do not depend on the backend or on the order."""
        results: dict[str, dict] = {}
        todo = []
        self.progress.start(label or f"{self.check_id} {name}".strip(), len(tasks))
        for key, args in tasks:
            saved = self.state.load(f"{name}-{key}")
            if saved is not None:
                self.credit_passes(*(int(v) for v in saved["passes"]))
                results[key] = saved
                self.progress.advance()
            else:
                todo.append(Task(f"{name}-{key}", tuple(args)))
        keys = {f"{name}-{key}": key for key, _ in tasks}

        def done(task: Task, result: dict) -> None:
            result = {k: _to_numpy(v) for k, v in result.items()}
            self.state.save(task.key, result)
            if not self.backend.in_process:  # made on a worker's copy of the model: the driver's counter missed it
                self.credit_passes(*(int(v) for v in result["passes"]))
            results[keys[task.key]] = result
            self.progress.advance()

        if todo:
            self.backend.run(fn, self.model, tuple(shared), todo, done)
        self.progress.finish()
        return [results[key] for key, _ in tasks]


def robust_z(values: np.ndarray, reference: np.ndarray | None = None, *, pad: float = 1e-6) -> np.ndarray:
    """How far each value lies from the reference (default: the values themselves) in robust units: median and
    MAD scaled to a normal's sigma. `pad` is added to that sigma: a MAD of 0 must not divide by zero, and small
    integer counts need a whole unit. An empty reference counts as median 0, sigma 1."""
    ref = values if reference is None else reference
    if len(ref) == 0:
        return (values - 0.0) / (1.0 + pad)
    med = float(np.median(ref))
    return (values - med) / (1.4826 * float(np.median(np.abs(ref - med))) + pad)


def validate_eps(check_id: str, norm: str, eps: float, bounds: tuple[float, float]) -> None:
    """An Linf radius larger than the input range is a unit mistake (8 meant as 8/255), not a threat model."""
    span = bounds[1] - bounds[0]
    if norm == "Linf" and eps > span:
        hint = f" Did you mean {eps:g}/255 = {eps / 255:.4g}?" if eps >= 1 and span <= 1 else ""
        raise UsageError(f"The 'eps' option of [{check_id}] must be at most the input range {span:g} for norm Linf "
                         f"(inputs lie in [{bounds[0]:g}, {bounds[1]:g}]); got {eps:g}.{hint}")


DATA_EXTRA = "pip install 'brittle[data]' (with -c constraints.txt in this environment)"


def missing_packages(packages: dict[str, str], install: str = DATA_EXTRA) -> str | None:
    """A skip reason naming the optional packages ({import name: package name}) that are not installed, or None."""
    from importlib.util import find_spec

    absent = [name for module, name in packages.items() if find_spec(module) is None]
    return f"needs {' and '.join(absent)}: {install}" if absent else None


def load_other_model(path: str, ctx: AuditContext):
    """Another model file in the audited model's input domain (bounds, normalisation, batch size)."""
    from ..prepare import prepare_other_model

    return prepare_other_model(path, like=ctx.model, x_example=ctx.data.x)


def status_from_findings(findings: list[Finding]) -> str:
    severities = {f.severity for f in findings}
    if "high" in severities:
        return "fail"
    if severities & {"medium", "low"}:
        return "warn"
    return "pass"


class Check(ABC):
    """Subclass with class attributes `id`, `title`, `needs`, `metrics` (gateable scalars), `Options`, and `run`;
    override `unmet` for requirements that `needs` cannot declare."""

    id: ClassVar[str]
    title: ClassVar[str]
    needs: ClassVar[Needs] = Needs()
    metrics: ClassVar[dict[str, str]] = {}  # gateable scalars: name -> what it measures
    Options: ClassVar[type[CheckOptions]] = CheckOptions
    Details: ClassVar[type[CheckDetails]] = CheckDetails  # the `details` it writes
    arrays: ClassVar[dict[str, str]] = {}  # per-sample arrays it writes: name (<k>: a number) -> what each holds
    order: ClassVar[int] = 100  # cheap checks first; a check's result never depends on order
    findings: ClassVar[dict[str, FindingDoc]] = {}  # every finding id the check may report, explained
    findings_intro: ClassVar[str] = ""  # what the check's findings share, for the top of its docs section
    quick_options: ClassVar[dict[str, Any]] = {}  # options for a quick run on small data (the contract test)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if inspect.isabstract(cls):
            return
        cid = getattr(cls, "id", None)
        if not isinstance(cid, str) or not _ID_PATTERN.match(cid):
            raise TypeError(f"{cls.__name__}.id must be a lowercase identifier like 'accuracy'; got {cid!r}")
        if cid in REGISTRY and REGISTRY[cid].__qualname__ != cls.__qualname__:
            raise TypeError(f"check id {cid!r} is already taken by {REGISTRY[cid].__qualname__}")
        if not isinstance(getattr(cls, "title", None), str):
            raise TypeError(f"{cls.__name__} must define a title")
        if not isinstance(cls.needs, Needs):
            raise TypeError(f"{cls.__name__}.needs must be a Needs(...)")
        if not (isinstance(cls.Options, type) and issubclass(cls.Options, CheckOptions)):
            raise TypeError(f"{cls.__name__}.Options must subclass CheckOptions")
        if not isinstance(cls.metrics, dict) or not all(isinstance(v, str) and v for v in cls.metrics.values()):
            raise TypeError(f"{cls.__name__}.metrics must map each metric name to what it measures")
        if not (isinstance(cls.Details, type) and issubclass(cls.Details, CheckDetails)):
            raise TypeError(f"{cls.__name__}.Details must subclass CheckDetails (see make_details)")
        try:
            cls.Options(**cls.quick_options)
        except ValidationError as exc:
            raise TypeError(f"{cls.__name__}.quick_options are not valid options: {exc}") from None
        for fid, doc in cls.findings.items():
            if not fid.startswith(f"{cid}.") or not isinstance(doc, FindingDoc):
                raise TypeError(f"{cls.__name__}.findings must map ids '{cid}.<name>' to FindingDoc(...); got {fid!r}")
        REGISTRY[cid] = cls

    def __init__(self, options: CheckOptions | dict[str, Any] | None = None):
        if options is None:
            options = self.Options()
        elif isinstance(options, dict):
            options = self.Options(**options)
        self.options = options.with_threat(ThreatModel())  # a no-op on options the audit plan resolved

    def skip_reason(self, ctx: AuditContext) -> str | None:
        """Why this check cannot run on this audit, or None. Declared needs are checked here."""
        if self.needs.labels and ctx.data.y is None:
            return "needs labels, and the data has none"
        if self.needs.train_data and ctx.train_data is None:
            return f"needs the training set: pass {arg('train_data')}"
        if self.needs.train_labels and (ctx.train_data is None or ctx.train_data.y is None):
            return "needs labels in the training set"
        if self.needs.gradients and not ctx.model.differentiable:
            return f"needs input gradients, and {ctx.model.name} is a black-box model"
        return self.unmet(ctx)

    def unmet(self, ctx: AuditContext) -> str | None:
        """Why this check cannot run beyond its declared needs (an input layout, an optional package), or None.
        Called only when the declared needs are met. Override when needed."""
        return None

    def unusable_options(self, ctx: AuditContext) -> str | None:
        """Why these options do not apply to this model or data (e.g. an image corruption on tabular inputs), or
        None. The audit refuses such a configuration before any work. Override when needed."""
        return None

    @staticmethod
    def render(result: CheckResult, audit) -> str:
        """This check's section of report.html (HTML; the metrics table and findings are drawn for every check).
        Override to show more; build it from brittle.render."""
        return ""

    @abstractmethod
    def run(self, ctx: AuditContext) -> CheckResult:
        """Do the work. Costs are measured by the runner; return metrics, findings, details and arrays."""
