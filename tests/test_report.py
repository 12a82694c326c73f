"""The HTML report reads well: readable images of small inputs, distinct colours, honest reliability diagrams,
files as readable as any the user writes, and generated docs that match the code."""

import os
import re

import numpy as np

from brittle import _docgen
from brittle._atomic import _umask, write_text
from brittle.report.html import _evidence_value, _no_negative_zero
from brittle.render import image as _img
from brittle.render import line_chart, reliability_chart


def test_small_images_are_enlarged_with_nearest_neighbour():
    digit = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    html = _img(digit, "8x8 digit")
    width, height = map(int, re.search(r'width="(\d+)" height="(\d+)"', html).groups())
    assert width >= 56 and height >= 56


def test_every_series_of_a_chart_has_its_own_colour():
    svg = line_chart([1, 2, 3], {name: [0.1, 0.5, 0.9] for name in ("fog", "snow", "frost", "contrast", "mean")})
    colours = re.findall(r'<polyline fill="none" stroke="(#[0-9a-f]{6})"', svg)
    assert len(colours) == 5 and len(set(colours)) == 5


def test_reliability_diagram_shows_counts_on_a_fixed_axis():
    rel = {"confidence": [0.35, 0.97], "accuracy": [1.0, 0.96], "count": [2, 400], "lower": [0.3, 0.9667],
           "upper": [0.3667, 1.0]}
    svg = reliability_chart(rel)
    assert ">2</text>" in svg and ">400</text>" in svg
    assert 'fill-opacity="0.35"' in svg  # the bin of two inputs is drawn pale
    assert re.search(r'text-anchor="end" font-size="10">1</text>', svg)  # the last tick stays inside the drawing


def test_evidence_reads_as_text_and_negative_zero_is_zero():
    text = _evidence_value({"fog": 0.22922, "snow_storm": 0.6068})
    assert text == "fog 0.229, snow storm 0.607"
    assert _evidence_value([{"name": "a", "size": 3}] * 6).endswith("(+2 more)")
    assert _no_negative_zero("drop -0% and -0.0 but not -0.5% or x-0%") == "drop 0% and 0.0 but not -0.5% or x-0%"


def test_written_files_follow_the_umask(tmp_path):
    write_text(tmp_path / "r.html", "x")
    assert (tmp_path / "r.html").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert os.access(tmp_path / "r.html", os.R_OK)


def test_generated_docs_are_current():
    assert _docgen.main(["--check"]) == 0, "run `python -m brittle._docgen` and commit docs/"
