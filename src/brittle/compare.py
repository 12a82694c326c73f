"""Compare two audits: what changed between a baseline and a candidate, and regression gates on the change.

Two audits are comparable when they measured the same thing: the same report schema (major), the same audit
data (by content fingerprint), and the same threat model (norm and eps) for every robustness check both ran.
Everything else may differ (the model, check options, the training data) and is reported as a change.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import UsageError
from .regression_gates import OPS, RegressionGate, parse_regression_gate
from .result import SEVERITIES, AuditResult

__all__ = ["Comparison", "RegressionGate", "compare", "parse_regression_gate"]

# Per-sample results that can be lined up point by point: check -> (index array or None for the audit order,
# the array and how to read a "good" flag from it, what losing it and gaining it mean, the data it indexes).
_PER_SAMPLE: dict[str, tuple[str | None, str, Callable[[np.ndarray], np.ndarray], str, str, str]] = {
    "accuracy": (None, "correct", lambda a: a.astype(bool), "became wrong", "became right", "data"),
    "adversarial": ("sample_index", "robust", lambda a: a.astype(bool), "became non-robust", "became robust",
                    "data"),
    "certified": ("index", "status", lambda a: a == 2, "lost their certificate", "became certified", "data"),
    "backdoor": ("train_index", "flagged", lambda a: ~a.astype(bool), "newly flagged as poisoned",
                 "no longer flagged", "train_data"),
    "label_errors": ("train_index", "flagged", lambda a: ~a.astype(bool), "newly flagged as mislabelled",
                     "no longer flagged", "train_data"),
}
# Options that define what a robustness number means: two audits that differ here measured different things.
_THREAT_KEYS = ("norm", "eps")


@dataclass
class Comparison:
    baseline: str
    candidate: str
    metrics: list[dict[str, Any]] = field(default_factory=list)  # check, metric, baseline, candidate, change
    findings: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # appeared, disappeared, severity
    per_sample: list[dict[str, Any]] = field(default_factory=list)
    config_changes: list[dict[str, Any]] = field(default_factory=list)
    status_changes: list[dict[str, Any]] = field(default_factory=list)
    gates: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0: every gate holds; 1: a gate failed (as `brittle audit`)."""
        return 1 if any(not g["passed"] for g in self.gates) else 0

    def to_json(self) -> dict[str, Any]:
        return {"verdict": "fail" if self.exit_code else "pass", **asdict(self)}

    def summary(self) -> str:
        lines = [f"brittle compare: {'FAIL' if self.exit_code else 'PASS'}  ({self.baseline} -> {self.candidate})"]
        for g in self.gates:
            lines.append(f"  gate {'ok  ' if g['passed'] else 'FAIL'} {g['expression']}: {_num(g['candidate'])} "
                         f"(baseline {_num(g['baseline'])}, threshold {_num(g['threshold'])})")
        for c in self.config_changes:
            lines.append(f"  config {c['key']}: {_num(c['baseline'])} -> {_num(c['candidate'])}")
        for s in self.status_changes:
            lines.append(f"  {s['check']}: {s['baseline']} -> {s['candidate']}")
        changed = [m for m in self.metrics if m["change"] not in (None, 0)]
        for m in changed:
            lines.append(f"  {m['check']}.{m['metric']}: {_num(m['baseline'])} -> {_num(m['candidate'])} "
                         f"({m['change']:+.4g})" if isinstance(m["change"], float) else
                         f"  {m['check']}.{m['metric']}: {_num(m['baseline'])} -> {_num(m['candidate'])}")
        if not changed:
            lines.append("  no metric changed")
        for kind in ("appeared", "disappeared", "severity_changed"):
            for f in self.findings.get(kind, []):
                sev = f.get("severity") or f"{f['baseline_severity']} -> {f['candidate_severity']}"
                lines.append(f"  finding {kind.replace('_', ' ')}: {f['id']} ({sev})")
        for p in self.per_sample:
            if p["lost"] or p["gained"]:
                lines.append(f"  {p['check']}: {len(p['lost'])} {p['lost_means']}, {len(p['gained'])} "
                             f"{p['gained_means']} (of {p['compared']})")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def save(self, out: str | Path) -> Path:
        from ._atomic import write_text

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "compare.json", json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")
        write_text(out / "compare.html", render_comparison(self))
        return out / "compare.json"


def compare(baseline: str | Path | AuditResult, candidate: str | Path | AuditResult,
            gates: list[str] | None = None) -> Comparison:
    """Compare two audits (folders, report.json files or AuditResults), applying `gates` and the candidate's own
    compare_gates. Raises UsageError when they are not comparable or a gate names a metric one of them lacks."""
    base, cand = (_load(r) for r in (baseline, candidate))
    own = list((cand.run.get("config") or {}).get("compare_gates") or [])
    parsed = [parse_regression_gate(g) for g in dict.fromkeys(own + list(gates or []))]
    _check_comparable(base, cand)
    out = Comparison(_name(baseline), _name(candidate))
    b_checks, c_checks = {c.id: c for c in base.checks}, {c.id: c for c in cand.checks}
    ran = [cid for cid in b_checks if cid in c_checks]
    for cid in ran:
        b, c = b_checks[cid], c_checks[cid]
        if b.status != c.status:
            out.status_changes.append({"check": cid, "baseline": b.status, "candidate": c.status})
        for name in [k for k in b.metrics if k in c.metrics]:
            bv, cv = b.metrics[name], c.metrics[name]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (bv, cv))
            change = float(cv) - float(bv) if numeric else (None if bv == cv else "changed")
            out.metrics.append({"check": cid, "metric": name, "baseline": bv, "candidate": cv, "change": change})
    for cid in sorted(set(b_checks) ^ set(c_checks)):
        out.notes.append(f"the check {cid} ran only in the {'baseline' if cid in b_checks else 'candidate'}")
    out.findings = _finding_changes(base, cand, ran)
    out.config_changes = _config_changes(base.run.get("config") or {}, cand.run.get("config") or {})
    same_train = _same(base, cand, "train_data")
    for cid in ran:
        spec = _PER_SAMPLE.get(cid)
        if spec is None:
            continue
        if spec[5] == "train_data" and not same_train:
            out.notes.append(f"{cid}: the training data differ, so its per-example flags are not lined up")
            continue
        row = _per_sample(cid, spec, b_checks[cid].arrays, c_checks[cid].arrays)
        if row is not None:
            out.per_sample.append(row)
    for g in parsed:
        out.gates.append(_evaluate(g, b_checks, c_checks))
    return out


def _load(r) -> AuditResult:
    if isinstance(r, AuditResult):
        return r
    path = Path(r)
    if not path.exists():
        raise UsageError(f"{path} does not exist: give an audit folder (brittle audit --out DIR) or its report.json.")
    return AuditResult.load(path)


def _name(r) -> str:
    return "(in memory)" if isinstance(r, AuditResult) else str(r)


def _same(base: AuditResult, cand: AuditResult, part: str) -> bool:
    b, c = (r.run.get("fingerprints") or {} for r in (base, cand))
    if part in b and part in c:
        return b[part] == c[part]
    return base.run.get(part) == cand.run.get(part)  # older reports: the same source path


def _check_comparable(base: AuditResult, cand: AuditResult) -> None:
    b, c = base.run, cand.run
    if not _same(base, cand, "data"):
        raise UsageError(
            f"The two audits used different data (baseline {b.get('data')!r}, {b.get('samples')} samples; candidate "
            f"{c.get('data')!r}, {c.get('samples')} samples; their contents differ): their metrics do not compare. "
            "Audit both models on the same --data (and the same [data] max_samples and seed).")
    for key in ("samples", "num_classes"):
        if b.get(key) != c.get(key):
            raise UsageError(f"The two audits differ in {key.replace('_', ' ')} ({b.get(key)} vs {c.get(key)}): "
                             "their metrics do not compare.")
    b_threat, c_threat = (r.get("threat") or {} for r in (b, c))
    if any(b_threat.get(k) != c_threat.get(k) for k in _THREAT_KEYS):
        raise UsageError(f"The two audits measured robustness under different threat models (baseline "
                         f"{_threat(b_threat)}, candidate {_threat(c_threat)}): their robustness numbers do not "
                         "compare. Set the same [threat] norm and eps in both configurations.")
    c_checks = {r.id: r for r in cand.checks}
    for r in base.checks:
        other = c_checks.get(r.id)
        if other is None or r.status in ("skipped", "error") or other.status in ("skipped", "error"):
            continue
        for key in _THREAT_KEYS:
            if key in r.details and key in other.details and r.details[key] != other.details[key]:
                raise UsageError(f"The check {r.id} ran at {key} {r.details[key]} in the baseline and {other.details[key]} "
                                 f"in the candidate: its numbers do not compare. Use the same [{r.id}] {key}.")


def _threat(t: dict) -> str:
    return f"{t.get('norm')} eps {t.get('eps')}"


def _finding_changes(base: AuditResult, cand: AuditResult, ran: list[str]) -> dict[str, list[dict]]:
    def index(audit):
        out: dict[str, Any] = {}
        for c in audit.checks:
            if c.id in ran:
                for f in c.findings:  # the worst finding of each kind stands for it
                    if f.id not in out or SEVERITIES.index(f.severity) > SEVERITIES.index(out[f.id].severity):
                        out[f.id] = f
        return out

    b, c = index(base), index(cand)
    return {
        "appeared": [{"id": k, "severity": c[k].severity, "message": c[k].message} for k in c if k not in b],
        "disappeared": [{"id": k, "severity": b[k].severity, "message": b[k].message} for k in b if k not in c],
        "severity_changed": [{"id": k, "baseline_severity": b[k].severity, "candidate_severity": c[k].severity}
                             for k in b if k in c and b[k].severity != c[k].severity],
    }


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _config_changes(b: dict, c: dict) -> list[dict[str, Any]]:
    fb, fc = _flatten(b), _flatten(c)
    keys = sorted(set(fb) | set(fc))
    return [{"key": k, "baseline": fb.get(k), "candidate": fc.get(k)} for k in keys if fb.get(k) != fc.get(k)]


def _per_sample(cid: str, spec, b_arrays: dict, c_arrays: dict) -> dict[str, Any] | None:
    index_name, value_name, good, lost_means, gained_means, _ = spec
    if value_name not in b_arrays or value_name not in c_arrays:
        return None
    bv, cv = good(np.asarray(b_arrays[value_name])), good(np.asarray(c_arrays[value_name]))
    if index_name is None:
        if len(bv) != len(cv):
            return None
        b_map, c_map = dict(enumerate(bv)), dict(enumerate(cv))
    else:
        if index_name not in b_arrays or index_name not in c_arrays:
            return None
        b_map = dict(zip(np.asarray(b_arrays[index_name]).tolist(), bv.tolist()))
        c_map = dict(zip(np.asarray(c_arrays[index_name]).tolist(), cv.tolist()))
    shared = sorted(set(b_map) & set(c_map))
    lost = [int(i) for i in shared if b_map[i] and not c_map[i]]
    gained = [int(i) for i in shared if c_map[i] and not b_map[i]]
    return {"check": cid, "compared": len(shared), "lost": lost, "gained": gained, "lost_means": lost_means,
            "gained_means": gained_means, "positions": "training-file" if spec[5] == "train_data" else "audit"}


def _evaluate(g: RegressionGate, b_checks: dict, c_checks: dict) -> dict[str, Any]:
    values = []
    for side, checks in (("baseline", b_checks), ("candidate", c_checks)):
        r = checks.get(g.check)
        if r is None or r.status in ("skipped", "error"):
            why = "did not run" if r is None else f"was {r.status}" + (f" ({r.reason})" if r.reason else "")
            raise UsageError(f"The gate {g.expression!r} cannot be evaluated: the check {g.check} {why} in the {side}.")
        v = r.metrics.get(g.metric)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise UsageError(f"The gate {g.expression!r} cannot be evaluated: the {side}'s {g.check} has no numeric "
                             f"metric {g.metric!r}; its metrics: {sorted(r.metrics)}.")
        values.append(float(v))
    threshold = g.threshold(values[0])
    return {"expression": g.expression, "baseline": values[0], "candidate": values[1], "threshold": threshold,
            "passed": bool(OPS[g.op](values[1], threshold))}


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_comparison(cmp: Comparison) -> str:
    """compare.html: one self-contained page."""
    from .report.html import CSS

    def table(head: list[str], rows: list[list[str]]) -> str:
        if not rows:
            return '<p class="meta">none</p>'
        return ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows) + "</table>")

    verdict = "fail" if cmp.exit_code else "pass"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>brittle compare</title>"
             f"<style>{CSS}</style></head><body><main><h1>brittle compare</h1>",
             f'<p class="meta">baseline {escape(cmp.baseline)} &rarr; candidate {escape(cmp.candidate)}</p>',
             f'<span class="verdict v-{verdict}">{verdict.upper()}</span>']
    parts += ["<h2>Gates</h2>", table(["gate", "baseline", "candidate", "threshold", "holds"], [
        [g["expression"], _num(g["baseline"]), _num(g["candidate"]), _num(g["threshold"]),
         "yes" if g["passed"] else "no"] for g in cmp.gates])]
    parts += ["<h2>Configuration changes</h2>", table(["key", "baseline", "candidate"], [
        [c["key"], _num(c["baseline"]), _num(c["candidate"])] for c in cmp.config_changes])]
    parts += ["<h2>Metrics</h2>", table(["check", "metric", "baseline", "candidate", "change"], [
        [m["check"], m["metric"], _num(m["baseline"]), _num(m["candidate"]),
         "" if m["change"] in (None, 0) else (f"{m['change']:+.4g}" if isinstance(m["change"], float)
                                             else str(m["change"]))] for m in cmp.metrics])]
    rows = [[k.replace("_", " "), f["id"], f.get("severity") or f"{f['baseline_severity']} -> {f['candidate_severity']}",
             f.get("message", "")] for k, items in cmp.findings.items() for f in items]
    parts += ["<h2>Findings that changed</h2>", table(["change", "finding", "severity", "message"], rows)]
    parts += ["<h2>Per-sample changes</h2>", table(["check", "compared", "lost", "gained", "positions lost (first 20)"], [
        [p["check"], str(p["compared"]), f"{len(p['lost'])} {p['lost_means']}",
         f"{len(p['gained'])} {p['gained_means']}", ", ".join(map(str, p["lost"][:20]))] for p in cmp.per_sample])]
    if cmp.status_changes or cmp.notes:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{escape(s['check'])}: {escape(s['baseline'])} &rarr; "
                                          f"{escape(s['candidate'])}</li>" for s in cmp.status_changes] + [
            f"<li>{escape(n)}</li>" for n in cmp.notes] + ["</ul>"]
    return "".join(parts) + "</main></body></html>\n"
