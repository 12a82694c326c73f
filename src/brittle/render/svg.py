"""Inline SVG charts: no scripts, no external resources; they print like the rest of the page."""

from __future__ import annotations

import math
from html import escape
from typing import Sequence

__all__ = ["bar_chart", "heatmap", "line_chart", "reliability_chart"]

# Distinguishable colours, enough for every series a chart draws (the corruption curves draw five).
PALETTE = ("#3b6ea8", "#d9822b", "#4a9a5b", "#a34a8b", "#c44e52", "#1f1f1f", "#17a2b8", "#8c6d31")
FEW = 10  # a reliability bin with fewer inputs than this swings between 0 and 1 by chance


def bar_chart(labels: Sequence[str], series: dict[str, Sequence[float | None]], *, width: int = 560,
              height: int = 200, ymax: float = 1.0, title: str = "") -> str:
    n = max(len(labels), 1)
    k = max(len(series), 1)
    left, bottom, top = 36, 24, 18
    plot_w, plot_h = width - left - 8, height - bottom - top
    group = plot_w / n
    bar = max(group * 0.8 / k, 1)
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}">']
    for frac in (0, 0.5, 1.0):
        y = top + plot_h * (1 - frac)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 8}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{frac * ymax:g}</text>')
    for si, (name, values) in enumerate(series.items()):
        for i, v in enumerate(values):
            if v is None:
                continue
            h = plot_h * max(0.0, min(float(v) / ymax, 1.0))
            x = left + i * group + group * 0.1 + si * bar
            parts.append(f'<rect x="{x:.1f}" y="{top + plot_h - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                         f'fill="{PALETTE[si % len(PALETTE)]}"><title>{escape(str(name))} {escape(str(labels[i]))}: '
                         f'{float(v):.3f}</title></rect>')
    for i, lab in enumerate(labels):
        x = left + (i + 0.5) * group
        parts.append(f'<text x="{x:.1f}" y="{height - 8}" text-anchor="middle" font-size="10">'
                     f'{escape(_fit(str(lab), group))}</text>')
    for si, name in enumerate(series):
        parts.append(f'<rect x="{left + si * 110}" y="2" width="10" height="10" fill="{PALETTE[si % len(PALETTE)]}"/>'
                     f'<text x="{left + si * 110 + 14}" y="11" font-size="10">{escape(str(name))}</text>')
    parts.append("</svg>")
    return "".join(parts)


CHAR = 6.2  # width of a character at font-size 10, in SVG units


def _fit(text: str, width: float) -> str:
    """text shortened (with an ellipsis) to fit `width`."""
    room = max(int(width / CHAR), 2)
    return text if len(text) <= room else text[: room - 1] + "\u2026"


def heatmap(matrix: Sequence[Sequence[float]], labels: Sequence[str], *, title: str = "") -> str:
    """A confusion matrix: cells sized to the number of classes, row labels as long as they need to be (up to 18
    characters), column labels shortened to their cell."""
    n = len(matrix)
    cell = max(26, min(64, 480 // max(n, 1)))
    size = cell * n
    left = int(min(max((len(str(lab)) for lab in labels), default=1), 18) * CHAR) + 10
    top = 20
    peak = max((max(row) for row in matrix), default=1) or 1
    parts = [f'<svg class="chart" viewBox="0 0 {size + left + 4} {size + top + 4}" width="{size + left + 4}" '
             f'height="{size + top + 4}" role="img" aria-label="{escape(title)}">']
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            shade = 1 - (v / peak) ** 0.5
            r, g, b = int(59 + shade * 196), int(110 + shade * 145), int(168 + shade * 87)
            parts.append(f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" '
                         f'fill="rgb({r},{g},{b})"><title>true {escape(str(labels[i]))}, predicted '
                         f'{escape(str(labels[j]))}: {v}</title></rect>')
            if v:
                colour = "#fff" if shade < 0.5 else "#222"
                parts.append(f'<text x="{left + j * cell + cell / 2}" y="{top + i * cell + cell / 2 + 4}" '
                             f'text-anchor="middle" font-size="{10 if cell > 30 else 9}" fill="{colour}">{v}</text>')
    for i, lab in enumerate(labels):
        parts.append(f'<text x="{left - 4}" y="{top + i * cell + cell / 2 + 3}" text-anchor="end" font-size="10">'
                     f'{escape(_fit(str(lab), left - 8))}</text>'
                     f'<text x="{left + i * cell + cell / 2}" y="{top - 6}" text-anchor="middle" font-size="10">'
                     f'{escape(_fit(str(lab), cell))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def line_chart(xs: Sequence[float], series: dict[str, Sequence[float]], *, width: int = 560, height: int = 220,
               ymax: float = 1.0, xlabel: str = "", title: str = "", xlog: bool = False,
               ylog: float | None = None) -> str:
    """Lines over a shared x grid. `xlog`: a logarithmic x axis (positive xs), ticked at every x, for grids that
    grow geometrically (eps curves). `ylog`: a logarithmic y axis from this (positive) value to ymax, ticked at
    every decade; values below it sit on the axis (log-log ROC curves)."""
    left, bottom, top = 36, 30, 18
    plot_w, plot_h = width - left - 10, height - bottom - top
    xlog = xlog and bool(xs) and min(xs) > 0
    scale = (lambda v: math.log10(v)) if xlog else (lambda v: v)
    x0, x1 = (scale(min(xs)), scale(max(xs))) if xs else (0, 1)
    span = (x1 - x0) or 1

    def px(x: float) -> float:
        return left + plot_w * (scale(x) - x0) / span

    if ylog:
        lo, hi = math.log10(ylog), math.log10(ymax)

        def py(y: float) -> float:
            v = math.log10(min(max(y, ylog), ymax))
            return top + plot_h * (1 - (v - lo) / ((hi - lo) or 1))

        yticks = [10.0 ** k for k in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1)]
    else:
        def py(y: float) -> float:
            return top + plot_h * (1 - max(0.0, min(y / ymax, 1.0)))

        yticks = [frac * ymax for frac in (0, 0.5, 1.0)]

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}">']
    for yv in yticks:
        parts.append(f'<line x1="{left}" y1="{py(yv):.1f}" x2="{width - 10}" y2="{py(yv):.1f}" '
                     f'stroke="#ddd"/><text x="{left - 4}" y="{py(yv) + 4:.1f}" text-anchor="end" '
                     f'font-size="10">{yv:g}</text>')
    ticks = ([(x, "middle") for x in xs] if xlog else
             [(x0 + frac * span, align) for frac, align in ((0, "start"), (0.5, "middle"), (1.0, "end"))])
    for i, (xv, align) in enumerate(ticks):
        if xlog:  # end ticks stay inside the drawing
            align = "start" if i == 0 else "end" if i == len(ticks) - 1 else "middle"
        parts.append(f'<text x="{px(xv):.1f}" y="{height - 14}" text-anchor="{align}" font-size="10">{xv:.3g}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 2}" text-anchor="middle" font-size="10">{escape(xlabel)}</text>')
    at = left  # legend entries one after another, each as wide as its label (about 5.5 px per character)
    for si, (name, ys) in enumerate(series.items()):
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys) if y is not None)
        colour = PALETTE[si % len(PALETTE)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>'
                     f'<rect x="{at}" y="2" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{at + 14}" y="11" font-size="10">{escape(name)}</text>')
        at += 24 + int(5.5 * len(name))
    parts.append("</svg>")
    return "".join(parts)


def reliability_chart(rel: dict, *, width: int = 560, height: int = 240, title: str = "") -> str:
    """Accuracy per confidence bin as bars over the bin's range on a fixed [0, 1] axis, the diagonal, and each
    bin's count (bins with few inputs drawn pale: their accuracy is mostly chance)."""
    left, bottom, top, right = 36, 30, 22, 14
    plot_w, plot_h = width - left - right, height - bottom - top

    def px(x: float) -> float:
        return left + plot_w * x

    def py(y: float) -> float:
        return top + plot_h * (1 - max(0.0, min(y, 1.0)))

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}">']
    for frac in (0, 0.5, 1.0):
        parts.append(f'<line x1="{left}" y1="{py(frac):.1f}" x2="{width - right}" y2="{py(frac):.1f}" stroke="#ddd"/>'
                     f'<text x="{left - 4}" y="{py(frac) + 4:.1f}" text-anchor="end" font-size="10">{frac:g}</text>'
                     f'<text x="{px(frac):.1f}" y="{height - 14}" text-anchor="{("start", "middle", "end")[int(frac * 2)]}"'
                     f' font-size="10">{frac:g}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 2}" text-anchor="middle" font-size="10">confidence</text>')
    for lo, hi, acc, n in zip(rel.get("lower", []), rel.get("upper", []), rel["accuracy"], rel["count"]):
        opacity = 0.35 if n < FEW else 0.9
        parts.append(f'<rect x="{px(lo) + 1:.1f}" y="{py(acc):.1f}" width="{max(px(hi) - px(lo) - 2, 1):.1f}" '
                     f'height="{py(0) - py(acc):.1f}" fill="{PALETTE[0]}" fill-opacity="{opacity}"><title>confidence '
                     f'{lo:.2f}-{hi:.2f}: accuracy {acc:.3f} over {n} inputs</title></rect>'
                     f'<text x="{(px(lo) + px(hi)) / 2:.1f}" y="{py(acc) - 3:.1f}" text-anchor="middle" font-size="9" '
                     f'fill="#555">{n}</text>')
    parts.append(f'<line x1="{px(0):.1f}" y1="{py(0):.1f}" x2="{px(1):.1f}" y2="{py(1):.1f}" stroke="{PALETTE[1]}" '
                 f'stroke-dasharray="4 3" stroke-width="1.5"/>'
                 f'<rect x="{left}" y="4" width="10" height="10" fill="{PALETTE[0]}"/><text x="{left + 14}" y="13" '
                 f'font-size="10">accuracy (count above)</text><line x1="{left + 150}" y1="9" x2="{left + 166}" y2="9" '
                 f'stroke="{PALETTE[1]}" stroke-dasharray="4 3" stroke-width="1.5"/><text x="{left + 170}" y="13" '
                 'font-size="10">perfect calibration</text>')
    parts.append("</svg>")
    return "".join(parts)
