"""The audit configuration (audit.toml), validated strictly at the boundary.

Top-level keys: `seed`, `checks` (ids to run; default all), `gates` (list of 'check.metric OP number'),
`[model]` (bounds, mean, std, ...), `[data]`, and one table per check id with that check's options.
Unknown keys and impossible values are rejected with the key, the value and a hint.
"""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import UsageError
from .gates import Gate, parse_gate
from .loading.models import ModelSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["AuditConfig", "DataOptions", "load_config"]


class DataOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label_column: str | None = None
    max_samples: int | None = Field(None, ge=1)  # evaluate a seeded random subset of this size


class AuditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    checks: list[str] | None = None
    gates: list[str] = Field(default_factory=list)
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: DataOptions = Field(default_factory=DataOptions)
    check_options: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def parsed_gates(self) -> list[Gate]:
        return [parse_gate(g) for g in self.gates]

    def selected_checks(self) -> list[str]:
        from .checks import available_checks

        return list(self.checks) if self.checks is not None else available_checks()

    def options_for(self, check_id: str):
        """The validated options object for one check."""
        from .checks import REGISTRY

        cls = REGISTRY[check_id].Options
        try:
            return cls(**self.check_options.get(check_id, {}))
        except ValidationError as exc:
            raise UsageError(_explain(exc, f"[{check_id}]", cls)) from None

    def validate_all(self) -> "AuditConfig":
        """Check ids, gate expressions, and every check's options against the model's bounds."""
        from .checks import REGISTRY, available_checks

        for cid in (self.checks or []):
            if cid not in REGISTRY:
                raise UsageError(f"Unknown check {cid!r}{_did_you_mean(cid, REGISTRY)}; available: {available_checks()}.")
        for cid in self.check_options:
            if cid not in REGISTRY:
                raise UsageError(f"Unknown config table [{cid}]{_did_you_mean(cid, REGISTRY)}.")
        self.parsed_gates()
        for cid in self.selected_checks():
            self.options_for(cid).validate_against(self.model.bounds)
        return self

    def fingerprint_payload(self) -> str:
        """What of the config decides the numbers, as canonical JSON."""
        payload = self.model_dump(mode="json")
        payload.pop("gates")  # gates decide the verdict, not the numbers; changing one reuses the work
        options = {c: self.options_for(c) for c in self.selected_checks()}
        payload["resolved_options"] = {c: o.model_dump(mode="json") for c, o in options.items()}
        payload["model_file_digests"] = {c: o.file_digests() for c, o in options.items()}
        payload["model"] = {k: payload["model"][k] for k in ("bounds", "mean", "std")}
        return json.dumps(payload, sort_keys=True)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "AuditConfig":
        from .checks import REGISTRY

        raw = dict(raw)
        fields = set(cls.model_fields) - {"check_options"}
        check_options = {}
        for key in list(raw):
            if key in fields:
                continue
            value = raw.pop(key)
            if key in REGISTRY and isinstance(value, dict):
                check_options[key] = value
            else:
                known = sorted(fields | set(REGISTRY))
                raise UsageError(f"{source}: unknown key {key!r}{_did_you_mean(key, known)}; top-level keys are "
                                 f"{sorted(fields)} and one table per check {sorted(REGISTRY)}.")
        try:
            cfg = cls(**raw, check_options=check_options)
        except ValidationError as exc:
            raise UsageError(f"{source}: " + _explain(exc, "", cls)) from None
        return cfg


def load_config(path: str | Path | None) -> AuditConfig:
    if path is None:
        return AuditConfig()
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"No config file at {p}: check the path given to --config.")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{p} is not valid TOML: {exc}") from None
    return AuditConfig.from_dict(raw, source=str(p))


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _explain(exc: ValidationError, where: str, model_cls: type[BaseModel]) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            key = str(err["loc"][-1])
            known = list(model_cls.model_fields) if len(err["loc"]) == 1 else []
            lines.append(f"unknown key {where + ' ' if where else ''}{loc!r}{_did_you_mean(key, known)}"
                         + (f"; known keys: {known}" if known else ""))
        else:
            value = err.get("input")
            lines.append(f"{where + ' ' if where else ''}{loc}: {err['msg']} (got {value!r})")
    return "; ".join(lines)
