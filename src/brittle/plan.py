"""What an audit will run: the checks, their options with the shared threat model applied, and the gates.

Resolved from the configuration before any model or data is touched, and checked against the model and data
before any work (`preflight`), so that every mistake is a usage error that names the check and the reason:
a typo in the table of a check that is not selected, a gate on a check that will not run, a requested check
that cannot run on this data, an option that does not apply to these inputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import ValidationError

from .checks import REGISTRY, AuditContext, CheckOptions, available_checks
from .config import AuditConfig, ThreatModel, did_you_mean, explain
from .errors import UsageError
from .gates import Gate, parse_gate

__all__ = ["AuditPlan", "resolve", "options_for"]


@dataclass(frozen=True)
class AuditPlan:
    checks: list[str]  # to run, in this order (as asked for, else the registry's cheap-first order)
    options: dict[str, CheckOptions]  # resolved options of every check the config names or selects
    gates: list[Gate]
    requested: bool  # the checks were chosen explicitly (config `checks`, --checks, checks=)
    threat: ThreatModel

    def fingerprint_payload(self, cfg: AuditConfig) -> str:
        """What of the config decides the numbers, as canonical JSON (gates decide the verdict only: changing
        one reuses the work)."""
        payload = {"seed": cfg.seed, "checks": self.checks, "data": cfg.data.model_dump(mode="json"),
                   "model": {k: getattr(cfg.model, k) for k in ("bounds", "mean", "std")},
                   "resolved_options": {c: self.options[c].model_dump(mode="json") for c in self.checks},
                   "model_file_digests": {c: self.options[c].file_digests() for c in self.checks}}
        return json.dumps(payload, sort_keys=True, default=list)


def threat_model(cfg: AuditConfig) -> ThreatModel:
    """The `[threat]` table; without one, the norm and eps of `[adversarial]` when it sets them, so that a
    config written for the adversarial check gives the certified check the same radius."""
    if cfg.threat is not None:
        return cfg.threat
    adversarial = cfg.check_options.get("adversarial", {})
    try:
        return ThreatModel(**{k: adversarial[k] for k in ("norm", "eps") if adversarial.get(k) is not None})
    except ValidationError:
        return ThreatModel()  # the [adversarial] table's own validation names the bad value


def options_for(check_id: str, cfg: AuditConfig, threat: ThreatModel | None = None) -> CheckOptions:
    """The validated options of one check, the threat model filled in where the check's table leaves it open."""
    cls = REGISTRY[check_id].Options
    try:
        options = cls(**cfg.check_options.get(check_id, {}))
    except ValidationError as exc:
        raise UsageError(explain(exc, f"[{check_id}]", cls)) from None
    options = options.with_threat(threat or threat_model(cfg))
    options.validate_against(cfg.model.bounds)
    return options


def resolve(cfg: AuditConfig) -> AuditPlan:
    known = set(REGISTRY)
    for cid in cfg.checks or []:
        if cid not in known:
            raise UsageError(f"Unknown check {cid!r}{did_you_mean(cid, known)}; available: {available_checks()}.")
    for cid in cfg.check_options:
        if cid not in known:
            raise UsageError(f"Unknown config table [{cid}]{did_you_mean(cid, known | set(cfg.top_level_keys()))}; "
                             f"tables are {cfg.top_level_keys()} and one per check {sorted(known)}.")
    threat = threat_model(cfg)
    requested = cfg.checks is not None
    checks = list(dict.fromkeys(cfg.checks)) if requested else available_checks()
    # Every table is validated, selected or not: a typo must not wait for the day its check is switched on.
    options = {cid: options_for(cid, cfg, threat) for cid in sorted(set(checks) | set(cfg.check_options))}
    gates = [parse_gate(g) for g in cfg.gates]
    for g in gates:
        if g.check not in checks:
            raise UsageError(f"The gate {g.expression!r} is on the check {g.check!r}, which this audit does not run "
                             f"(checks: {', '.join(checks)}); add it to the checks or remove the gate.")
    return AuditPlan(checks, options, gates, requested, threat)


def preflight(plan: AuditPlan, ctx: AuditContext) -> dict[str, str]:
    """Why each check of the plan would be skipped on this model and data ({id: reason} for those that would).
    A check the user asked for, or one a gate depends on, that cannot run is a usage error; so is an option that
    does not apply to these inputs."""
    skipped = {}
    gated = {g.check: g.expression for g in plan.gates}
    for cid in plan.checks:
        check = REGISTRY[cid](plan.options[cid])
        reason = check.skip_reason(ctx)
        if reason is None:
            problem = check.unusable_options(ctx)
            if problem:
                raise UsageError(f"[{cid}] {problem}")
            continue
        if cid in gated:
            raise UsageError(f"The gate {gated[cid]!r} needs the check {cid!r}, which cannot run here: {reason}.")
        if plan.requested:
            raise UsageError(f"The check {cid!r} was asked for but cannot run here: {reason}.")
        skipped[cid] = reason
    return skipped
