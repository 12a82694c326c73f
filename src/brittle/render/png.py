"""A minimal PNG encoder (zlib only), so the HTML report can inline images with no extra dependency."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np

__all__ = ["encode_png", "png_data_uri", "to_display_image"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(img: np.ndarray) -> bytes:
    """Encode an (H, W) grayscale or (H, W, 3) RGB uint8 array."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if img.ndim == 2:
        color = 0
    elif img.ndim == 3 and img.shape[2] == 3:
        color = 2
    else:
        raise ValueError(f"encode_png needs (H, W) or (H, W, 3); got {img.shape}")
    h, w = img.shape[:2]
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")


def png_data_uri(img: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(img)).decode("ascii")


def to_display_image(x: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray | None:
    """A (C, H, W) sample in [low, high] as uint8 for display; None for inputs that are not images."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or min(x.shape[1:]) < 4:
        return None
    scaled = np.clip((x - low) / max(high - low, 1e-12), 0, 1)
    img = (scaled * 255 + 0.5).astype(np.uint8)
    return img[0] if img.shape[0] != 3 else img.transpose(1, 2, 0)


def perturbation_image(delta: np.ndarray) -> np.ndarray | None:
    """A perturbation scaled so its largest entry spans the range, mid-grey at zero."""
    d = np.asarray(delta, dtype=np.float32)
    m = float(np.abs(d).max()) or 1.0
    return to_display_image(0.5 + 0.5 * d / m)
