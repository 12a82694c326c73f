"""The short summary the CLI prints when an audit ends."""

from __future__ import annotations

from ..result import AuditResult

__all__ = ["render_summary"]


def render_summary(audit: AuditResult, out_dir: str | None = None) -> str:
    lines = [f"brittle audit: {audit.verdict.upper()}"]
    for c in audit.checks:
        keys = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(c.metrics.items())[:3])
        if c.details.get("norm") and c.details.get("eps") is not None:  # a robustness number means nothing without it
            keys += f" at {c.details['norm']} eps {c.details['eps']:g}"
        extra = f" ({c.reason})" if c.reason else ""
        lines.append(f"  {c.id:<14} {c.status:<8} {keys}{extra}")
    for g in audit.gates:
        state = "pass" if g.passed else ("FAIL" if g.passed is False else "not evaluated")
        value = f"{g.value:.4g}" if g.value is not None else "-"
        lines.append(f"  gate {g.expression}: {state} (value {value})")
    for note in audit.run.get("notes") or []:
        lines.append(f"  note: {note}")
    worst = [f for _, f in audit.findings() if f.severity == "high"][:3]
    for f in worst:
        lines.append(f"  ! {f.id}: {f.message}")
    if out_dir:
        lines.append(f"report: {out_dir}/report.html (json: {out_dir}/report.json, junit: {out_dir}/junit.xml)")
    return "\n".join(lines)
