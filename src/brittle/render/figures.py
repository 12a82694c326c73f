"""HTML pieces a check's section is built from: images of inputs, rows of figures, class labels."""

from __future__ import annotations

from html import escape

import numpy as np

from .png import png_data_uri, to_display_image

__all__ = ["image", "gallery", "figure_row", "class_label", "count_axis", "check_ran", "MIN_SIDE"]

MIN_SIDE = 56  # pixels on screen: an 8x8 digit drawn at 24 px cannot be read


def image(arr: np.ndarray | None, caption: str, scale: int = 3) -> str:
    """A figure for a (H, W) or (H, W, 3) uint8 image, enlarged to at least MIN_SIDE on screen."""
    if arr is None:
        return ""
    h, w = arr.shape[:2]
    scale = max(scale, -(-MIN_SIDE // min(h, w)))
    if min(h, w) < 32:  # small inputs are enlarged in the PNG itself (nearest neighbour), not left to the browser
        arr = np.repeat(np.repeat(arr, scale, 0), scale, 1)
        h, w, scale = h * scale, w * scale, 1
    return (f'<figure><img src="{png_data_uri(arr)}" width="{w * scale}" height="{h * scale}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def gallery(heading: str, images, captions, audit) -> list[str]:
    """A heading and a row of input images with captions; nothing when the inputs are not images."""
    low, high = audit.run.get("bounds", [0.0, 1.0])
    figs = []
    for img, caption in zip(images, captions):
        shown = to_display_image(img, low, high)
        if shown is None:
            return []
        figs.append(image(shown, caption))
    return figure_row(heading, figs)


def figure_row(heading: str, figs: list[str]) -> list[str]:
    """A heading over a row of rendered figures; nothing when there are none."""
    return [f"<h4>{escape(heading)}</h4>", '<div class="examples">' + "".join(figs) + "</div>"] if figs else []


def class_label(names: list[str]):
    return lambda k: names[k] if 0 <= k < len(names) else str(k)


def count_axis(counts) -> float:
    """A y-axis top for counts: the largest, rounded up to an even number (so the mid tick is whole)."""
    top = max([int(c) for c in counts] + [1])
    return float(top + top % 2)


def check_ran(audit, check_id: str) -> bool:
    return any(c.id == check_id and c.status not in ("error", "skipped") for c in audit.checks)
