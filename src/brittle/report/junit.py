"""junit.xml: one test case per gate (and one per check that errored), for CI systems."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from ..result import AuditResult

__all__ = ["render_junit"]


def render_junit(audit: AuditResult) -> str:
    suite = ET.Element("testsuite", name="brittle.audit")
    failures = errors = tests = 0
    for g in audit.gates:
        tests += 1
        case = ET.SubElement(suite, "testcase", classname=f"brittle.gates.{g.check}", name=g.expression)
        if g.passed is False:
            failures += 1
            ET.SubElement(case, "failure", message=f"{g.check}.{g.metric} = {g.value:.6g}, required {g.op} {g.threshold:g}")
        elif g.passed is None:
            errors += 1
            ET.SubElement(case, "error", message=f"gate not evaluated: {g.reason}")
    for c in audit.checks:
        if c.status == "error":
            tests += 1
            errors += 1
            case = ET.SubElement(suite, "testcase", classname="brittle.checks", name=c.id)
            ET.SubElement(case, "error", message=c.reason)
    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    ET.indent(suite)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n"
