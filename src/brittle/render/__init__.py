"""Rendering primitives (inline SVG charts, PNG images, figure rows) that checks build their report sections
from. Nothing here knows a check or the report's layout."""

from .figures import MIN_SIDE, check_ran, class_label, count_axis, figure_row, gallery, image
from .png import encode_png, perturbation_image, png_data_uri, to_display_image
from .svg import PALETTE, bar_chart, heatmap, line_chart, reliability_chart

__all__ = ["MIN_SIDE", "PALETTE", "bar_chart", "check_ran", "class_label", "count_axis", "encode_png", "figure_row",
           "gallery", "heatmap", "image", "line_chart", "perturbation_image", "png_data_uri", "reliability_chart",
           "to_display_image"]
