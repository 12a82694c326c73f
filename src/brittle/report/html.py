"""report.html: one self-contained file (inline CSS, inline SVG and PNG, no scripts, no network)."""

from __future__ import annotations

import json
import re
from html import escape

from .._docgen import anchor
from ..checks import REGISTRY
from ..result import AuditResult, CheckResult

__all__ = ["render_html"]

CSS = """
:root{--ok:#2e7d32;--warn:#b26a00;--bad:#c62828;--muted:#666;--line:#e3e3e3}
*{box-sizing:border-box}body{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:980px;margin:0 auto;padding:24px}h1{margin:0 0 4px;font-size:26px}h2{margin-top:36px;border-bottom:2px solid var(--line);padding-bottom:4px}
h4{margin:18px 0 6px}.meta{color:var(--muted);font-size:13px}
.verdict{display:inline-block;padding:6px 16px;border-radius:6px;color:#fff;font-weight:700;font-size:20px;letter-spacing:.05em}
.v-pass{background:var(--ok)}.v-fail{background:var(--bad)}.v-error{background:var(--warn)}
.status{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff}
.s-pass{background:var(--ok)}.s-warn{background:var(--warn)}.s-fail{background:var(--bad)}.s-error{background:#6a1b9a}.s-skipped{background:#888}
.sev{font-size:11px;font-weight:700;text-transform:uppercase;padding:1px 6px;border-radius:4px;border:1px solid}
.sev-high{color:var(--bad)}.sev-medium{color:var(--warn)}.sev-low{color:#555}.sev-info{color:#888}
table{border-collapse:collapse;margin:8px 0;background:#fff}td,th{border:1px solid var(--line);padding:4px 10px;text-align:left;font-size:14px}
th{background:#f3f3f3}.kv th{width:220px}section.check{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px 18px 18px;margin:18px 0}
ul.findings{padding-left:18px}ul.findings li{margin:6px 0}.evidence{color:var(--muted);font-size:12px}
section.doc{margin:6px 0 14px}section.doc h4{margin:4px 0}code{background:#f1f1f1;padding:0 3px;border-radius:3px}
.examples{display:flex;flex-wrap:wrap;gap:14px}.triple{display:flex;gap:4px;border:1px solid var(--line);padding:4px;border-radius:6px}
figure{margin:0;text-align:center}figcaption{font-size:11px;color:var(--muted)}img{image-rendering:pixelated}
svg.chart{max-width:100%;height:auto;font-family:inherit}pre{white-space:pre-wrap;font-size:12px;background:#f4f4f4;padding:8px}
@media print{body{background:#fff}main{max-width:none;padding:0}section.check{break-inside:avoid;border:none}details{display:none}}
"""


def _metric(v) -> str:
    """A metric value as text (not yet escaped)."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _evidence_value(v, depth: int = 0) -> str:
    """Evidence as a person reads it: numbers to 3 digits, mappings as 'key value', lists shortened."""
    if isinstance(v, dict):
        if depth > 1:
            return "..."
        return ", ".join(f"{k.replace('_', ' ')} {_evidence_value(x, depth + 1)}" for k, x in list(v.items())[:6])
    if isinstance(v, (list, tuple)):
        shown = [_evidence_value(x, depth + 1) for x in v[:4]]
        return ("; " if any(isinstance(x, dict) for x in v[:4]) else ", ").join(shown) + (
            f" (+{len(v) - 4} more)" if len(v) > 4 else "")
    if isinstance(v, float):
        return f"{v:.3g}"
    return _metric(v)


def _findings(items) -> str:
    if not items:
        return '<p class="meta">No findings.</p>'
    lis = []
    for cid, f in items:
        ev = "; ".join(f"{k.replace('_', ' ')}: {_evidence_value(v)}" for k, v in list(f.evidence.items())[:6])
        lis.append(f'<li><span class="sev sev-{f.severity}">{f.severity}</span> <b>{escape(f.id)}</b> '
                   f'{escape(f.message)} <a href="#doc-{anchor(f.id)}">what this means</a>'
                   + (f'<div class="evidence">{escape(ev)}</div>' if ev else "") + "</li>")
    return '<ul class="findings">' + "".join(lis) + "</ul>"


def _inline_markdown(text: str) -> str:
    """The markup of the checks' finding docs: `code` and [text](file.md); links to other docs become plain text
    (the report is one self-contained file)."""
    out = escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"\1 (docs/\2)", out)


def _finding_docs(audit: AuditResult) -> str:
    """The meaning of every finding id the report shows, as the targets of its 'what this means' links."""
    seen = list(dict.fromkeys(f.id for c in audit.checks for f in c.findings))
    if not seen:
        return ""
    parts = ['<h2 id="finding-docs">What the findings mean</h2>']
    for fid in seen:
        doc = REGISTRY[fid.split(".")[0]].findings.get(fid) if fid.split(".")[0] in REGISTRY else None
        text = (f"{escape(doc.severity)}. {_inline_markdown(doc.text)}" if doc else
                "No description is registered for this finding (a check from a plugin?).")
        parts.append(f'<section class="doc" id="doc-{anchor(fid)}"><h4><code>{escape(fid)}</code></h4><p>{text}</p>'
                     "</section>")
    return "".join(parts)


def _notes(run: dict) -> str:
    """What the model adapter had to do that changes how to read the numbers (a retry, a conversion)."""
    notes = run.get("notes") or []
    return ('<p class="meta">Notes: ' + "; ".join(escape(n) for n in notes) + ".</p>") if notes else ""


def _no_negative_zero(html: str) -> str:
    """'-0%' and '-0.0' from values that round to zero read as a sign error."""
    return re.sub(r"(?<![\w.])-(0(?:\.0+)?)(?=%|[^\w.]|$)", r"\1", html)


def _check_section(c: CheckResult, audit: AuditResult) -> str:
    metrics = "".join(f"<tr><th>{escape(k)}</th><td>{escape(_metric(v))}</td></tr>" for k, v in c.metrics.items()
                      if not isinstance(v, (list, dict)))
    cost = (f"{c.cost.seconds:.2f} s, {c.cost.forward_passes:,} forward and {c.cost.backward_passes:,} backward "
            "passes (in samples)")
    body = [f'<section class="check" id="check-{escape(c.id)}"><h2>{escape(c.id)} '
            f'<span class="status s-{c.status}">{c.status}</span></h2>']
    if c.reason:
        body.append(f"<p><b>{'Skipped' if c.status == 'skipped' else 'Error'}:</b> {escape(c.reason)}</p>")
    if metrics:
        body.append(f'<table class="kv">{metrics}</table>')
    if c.status not in ("skipped", "error"):
        body.append(_findings([(c.id, f) for f in c.findings]))
        check = REGISTRY.get(c.id)
        body.append(check.render(c, audit) if check is not None else "")
    body.append(f'<p class="meta">Cost: {cost}</p></section>')
    return "".join(body)


def render_html(audit: AuditResult) -> str:
    run = audit.run
    gates = "".join(
        f"<tr><td><code>{escape(g.expression)}</code></td><td>{escape(_metric(g.value)) if g.value is not None else '-'}</td>"
        f"<td><span class=\"status s-{'pass' if g.passed else ('fail' if g.passed is False else 'error')}\">"
        f"{'pass' if g.passed else ('fail' if g.passed is False else 'not evaluated')}</span>"
        f"{(' ' + escape(g.reason)) if g.reason else ''}</td></tr>" for g in audit.gates)
    gates_html = (f"<table><tr><th>gate</th><th>value</th><th>result</th></tr>{gates}</table>" if gates
                  else '<p class="meta">No gates configured: the verdict passes unless a check errors. Add gates '
                       "to audit.toml, e.g. <code>gates = [\"adversarial.robust_accuracy &gt;= 0.5\"]</code>.</p>")
    summary = "".join(
        f'<tr><td><a href="#check-{escape(c.id)}">{escape(c.id)}</a></td><td><span class="status s-{c.status}">'
        f"{c.status}</span></td><td>{escape(', '.join(f'{k}={_metric(v)}' for k, v in list(c.metrics.items())[:4]))}</td>"
        f"<td>{c.cost.seconds:.1f} s</td></tr>" for c in audit.checks)
    worst = [(cid, f) for cid, f in audit.findings() if f.severity != "info"][:6]
    config = escape(json.dumps(run.get("config", {}), indent=2))
    return _no_negative_zero(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>brittle audit: {escape(str(run.get('model', '')))}</title><style>{CSS}</style></head>
<body><main>
<h1>brittle audit <span class="verdict v-{audit.verdict}">{audit.verdict.upper()}</span></h1>
<p class="meta">Model <b>{escape(str(run.get('model', '')))}</b> on <b>{escape(str(run.get('data', '')))}</b>
({run.get('samples', '?')} samples, {run.get('num_classes', '?')} classes, input {escape(str(run.get('input_shape', '')))},
bounds {escape(str(run.get('bounds', '')))}) &middot; {escape(str(run.get('started', '')))} &middot; {run.get('seconds', 0):.1f} s
&middot; device {escape(str(run.get('device', 'cpu')))}</p>{_notes(run)}
<h2>Gates</h2>{gates_html}
<h2>Worst findings</h2>{_findings(worst)}
<h2>Checks</h2><table><tr><th>check</th><th>status</th><th>key metrics</th><th>time</th></tr>{summary}</table>
{''.join(_check_section(c, audit) for c in audit.checks)}
{_finding_docs(audit)}
<details><summary>Run details (fingerprint, versions, configuration)</summary>
<p class="meta">fingerprint {escape(str(run.get('fingerprint', '')))}<br>versions {escape(json.dumps(run.get('versions', {})))}</p>
<pre>{config}</pre></details>
</main></body></html>
""")
