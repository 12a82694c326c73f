"""diff.html: `brittle diff`'s page, the model_diff check's section as one self-contained file."""

from __future__ import annotations

from types import SimpleNamespace

from ..checks.model_diff import diff_arrays, render_diff
from .html import CSS

__all__ = ["render_diff_page"]


def render_diff_page(result) -> str:
    """The page for a `brittle.model_diff.ModelDiff`."""
    body = render_diff(result.to_json(), diff_arrays(result, images=result.images),
                       SimpleNamespace(run={"bounds": list(result.bounds)}))
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>brittle diff</title><style>{CSS}"
            f"</style></head><body><main><h1>brittle diff</h1>{body}</main></body></html>\n")
