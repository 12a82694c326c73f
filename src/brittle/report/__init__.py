"""Renderings of the audit result: report.json is the truth, the rest are views of it."""

from __future__ import annotations

from pathlib import Path

from .._atomic import write_text
from ..result import AuditResult
from .html import render_html
from .junit import render_junit
from .terminal import render_summary

__all__ = ["write_reports", "render_html", "render_junit", "render_summary", "rerender"]


def write_reports(result: AuditResult, out: Path) -> None:
    result.save(out)
    write_text(out / "report.html", render_html(result))
    write_text(out / "junit.xml", render_junit(result))


def rerender(out: Path) -> Path:
    """Render report.html (and junit.xml) again from report.json and the saved arrays."""
    result = AuditResult.load(out)
    write_text(Path(out) / "report.html", render_html(result))
    write_text(Path(out) / "junit.xml", render_junit(result))
    return Path(out) / "report.html"
