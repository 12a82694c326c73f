"""The audit configuration (audit.toml), validated strictly at the boundary.

Top-level keys: `seed`, `checks` (ids to run; default all), `gates` (list of 'check.metric OP number'),
`[model]` (bounds, mean, std, ...), `[data]`, `[threat]` (norm, eps: the threat model every robustness check
shares), and one table per check id with that check's options.
Unknown keys and impossible values are rejected with the key, the value and a hint.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .attacks.geometry import normalise_norm
from .errors import UsageError, arg
from .loading.models import ModelSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["AuditConfig", "DataOptions", "ThreatModel", "DEFAULT_EPS", "load_config", "as_config"]


class DataOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label_column: str | None = Field(None, description="the label column of CSV data")
    max_samples: int | None = Field(None, ge=1, description="audit a seeded random subset of this size")


DEFAULT_EPS = {"Linf": 8 / 255, "L2": 0.5}


class ThreatModel(BaseModel):
    """The perturbations the robustness checks (adversarial, certified) measure against, shared unless a
    check's own table overrides `norm` or `eps`."""

    model_config = ConfigDict(extra="forbid")

    norm: str = Field("Linf", description="Linf or L2 (any case)")
    eps: float | None = Field(None, gt=0, description="radius in input units (default 8/255 for Linf, 0.5 for L2)")
    eps_curve: list[float] = Field(default_factory=lambda: [0.25, 0.5, 1.0],
                                   description="fractions of eps at which the certified check also reports")

    @field_validator("norm", mode="before")
    @classmethod
    def _norm(cls, v: str) -> str:
        return normalise_norm(v)

    @field_validator("eps_curve")
    @classmethod
    def _curve(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f <= 4 for f in v):
            raise ValueError(f"eps_curve must list fractions of eps in (0, 4]; got {v}")
        return v

    @property
    def radius(self) -> float:
        return self.eps if self.eps is not None else DEFAULT_EPS[self.norm]

    def describe(self) -> str:
        return f"{self.norm} eps {self.radius:g}"


class AuditConfig(BaseModel):
    """The configuration of one audit. Check tables are kept as given here; `brittle.plan.resolve` validates them
    against the registered checks (this module knows no checks, so that checks may read configuration)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="every random choice derives its own seed from this one and its purpose")
    checks: list[str] | None = Field(None, description="check ids to run, in this order (default: every check "
                                     "that can run on the inputs given)")
    gates: list[str] = Field(default_factory=list, description="'check.metric OP number' (OP: >= <= > < ==); a "
                             "failed gate makes the verdict fail and the exit code 1")
    compare_gates: list[str] = Field(default_factory=list, description="regression gates `brittle compare` applies "
                                     "with this audit as the candidate, e.g. 'adversarial.robust_accuracy >= "
                                     "baseline - 0.01'")
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataOptions = Field(default_factory=DataOptions)
    threat: ThreatModel | None = None
    check_options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @classmethod
    def top_level_keys(cls) -> list[str]:
        return sorted(set(cls.model_fields) - {"check_options"})

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "AuditConfig":
        """Top-level keys are fields; every other table holds one check's options (checked by `plan.resolve`)."""
        raw = dict(raw)
        fields = set(cls.top_level_keys())
        check_options = {}
        for key in list(raw):
            if key in fields:
                continue
            value = raw.pop(key)
            if isinstance(value, dict):
                check_options[key] = value
            else:
                raise UsageError(f"{source}: unknown key {key!r}{did_you_mean(key, fields)}; top-level keys are "
                                 f"{sorted(fields)} and one table per check (see `brittle checks`).")
        try:
            cfg = cls(**raw, check_options=check_options)
        except ValidationError as exc:
            raise UsageError(f"{source}: " + explain(exc, "", cls)) from None
        from .regression_gates import parse_regression_gate

        for gate in cfg.compare_gates:  # a typo is caught now, not when the comparison runs
            try:
                parse_regression_gate(gate)
            except UsageError as exc:
                raise UsageError(f"{source}: compare_gates: {exc}") from None
        return cfg


def load_config(path: str | Path | None) -> AuditConfig:
    if path is None:
        return AuditConfig()
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"No config file at {p}: check the path given as {arg('config')}.")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{p} is not valid TOML: {exc}") from None
    return AuditConfig.from_dict(raw, source=str(p))


def did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def explain(exc: ValidationError, where: str, model_cls: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            known = list(model_cls.model_fields) if len(err["loc"]) == 1 else []
            lines.append(f"unknown key {where + ' ' if where else ''}{loc!r}{did_you_mean(key, known)}"
                         + (f"; known keys: {known}" if known else ""))
        else:
            value = err.get("input")
            lines.append(f"{where + ' ' if where else ''}{loc}: {err['msg']} (got {value!r})")
    return "; ".join(lines)


def as_config(config) -> AuditConfig:
    """An AuditConfig from what the Python API accepts: None, a path to a TOML file, a dict or a config."""
    if config is None or isinstance(config, (str, Path)):
        return load_config(config)
    if isinstance(config, AuditConfig):
        return config
    if isinstance(config, dict):
        return AuditConfig.from_dict(config)
    raise UsageError(f"config must be an AuditConfig, a dict or a path to a TOML file; got {type(config).__name__}.")
