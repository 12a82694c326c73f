"""Gates: thresholds on check metrics that decide the verdict, e.g. `adversarial.robust_accuracy >= 0.5`."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from .errors import UsageError
from .result import CheckResult, GateResult

__all__ = ["Gate", "parse_gate", "evaluate_gates"]

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_PATTERN = re.compile(r"^\s*([a-z][a-z0-9_]*)\.([a-z][a-z0-9_]*)\s*(>=|<=|==|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Gate:
    expression: str
    check: str
    metric: str
    op: str
    threshold: float


def parse_gate(text: str) -> Gate:
    m = _PATTERN.match(text)
    if not m:
        raise UsageError(f"The gate {text!r} is not of the form 'check.metric OP number' with OP one of "
                         f"{list(_OPS)}; e.g. 'adversarial.robust_accuracy >= 0.5'.")
    check, metric, op, num = m.groups()
    try:
        threshold = float(num)
    except ValueError:
        raise UsageError(f"The gate {text!r} has a threshold {num!r} that is not a number.") from None
    from .checks import REGISTRY, available_checks

    if check not in REGISTRY:
        raise UsageError(f"The gate {text!r} names an unknown check {check!r}; checks: {available_checks()}.")
    known = REGISTRY[check].metrics
    if metric not in known:
        raise UsageError(f"The gate {text!r} names metric {metric!r}, which check {check!r} does not report; "
                         f"its metrics: {list(known)}.")
    return Gate(text.strip(), check, metric, op, threshold)


def evaluate_gates(gates: list[Gate], results: list[CheckResult]) -> list[GateResult]:
    by_id = {r.id: r for r in results}
    out = []
    for g in gates:
        r = by_id.get(g.check)
        value = None if r is None else r.metrics.get(g.metric)
        if r is None or r.status in ("error", "skipped") or not isinstance(value, (int, float)):
            why = "the check did not run" if r is None else (
                f"the check {r.status}: {r.reason}" if r.status in ("error", "skipped") else "the metric is missing")
            out.append(GateResult(g.expression, g.check, g.metric, g.op, g.threshold, None, None, why))
            continue
        passed = bool(_OPS[g.op](float(value), g.threshold))
        out.append(GateResult(g.expression, g.check, g.metric, g.op, g.threshold, float(value), passed))
    return out
