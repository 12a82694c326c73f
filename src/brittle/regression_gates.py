"""Regression gates of `brittle compare`: `check.metric OP baseline - 0.01` or `check.metric OP 0.9`."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from .errors import UsageError

__all__ = ["OPS", "RegressionGate", "parse_regression_gate"]

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
_GATE = re.compile(r"^\s*([a-z][a-z0-9_]*)\.([a-z][a-z0-9_]*)\s*(>=|<=|==|>|<)\s*"
                   r"(?:(baseline)\s*(?:([-+])\s*([0-9.eE+-]+))?|([-+]?[0-9.eE+-]+))\s*$")


@dataclass(frozen=True)
class RegressionGate:
    """`check.metric OP baseline [+- number]` (relative to the baseline's value) or `check.metric OP number`."""

    expression: str
    check: str
    metric: str
    op: str
    relative: bool
    offset: float

    def threshold(self, baseline: float) -> float:
        return baseline + self.offset if self.relative else self.offset


def parse_regression_gate(text: str) -> RegressionGate:
    m = _GATE.match(text)
    if not m:
        raise UsageError(f"The gate {text!r} is not of the form 'check.metric OP baseline - number' or 'check.metric "
                         f"OP number' (OP one of {list(OPS)}); e.g. 'adversarial.robust_accuracy >= baseline - 0.01'.")
    check, metric, op, base, sign, delta, absolute = m.groups()
    try:
        offset = float(absolute) if base is None else (float(delta) * (-1 if sign == "-" else 1) if delta else 0.0)
    except ValueError:
        raise UsageError(f"The gate {text!r} has a number that is not a number.") from None
    return RegressionGate(text.strip(), check, metric, op, base is not None, offset)
