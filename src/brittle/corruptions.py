"""Common corruptions (Hendrycks & Dietterich 2019) for any image size and channel count, and tabular ones.

Images are (N, C, H, W) floats in [0, 1]; every corruption returns a new tensor of the same shape in
[0, 1] and never modifies its input. Severities 1-5 take the paper's ImageNet-C intensities (noise levels,
contrast, brightness, JPEG quality, pixelation, fog, frost, snow, zoom); lengths in pixels (blur radii,
displacements, splashes) take CIFAR-10-C's, made for small images, scaled by the image side / 32 above
32 px, so a 32x32 and a 224x224 photograph are corrupted alike. Everything is seeded (`seed`), vectorised over
the batch, in torch.

Where the original needs files that cannot ship or a library we do not take (ImageMagick's motion blur,
photographs of frost), the corruption is built from the same idea: frost is a procedural ice texture,
snow is a thresholded noise layer smeared by a line kernel, fog is a 1/f noise field. `saturate` needs
colour (3 channels); `corruption_names(channels)` leaves it out for other images.

Tabular corruptions (`corrupt_tabular`, inputs (N, D)): feature noise in units of each feature's standard
deviation, missing values filled with the column mean (what a pipeline's imputer would do), and rescaled
features (a unit or sensor change).
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["COMMON", "EXTRA", "TABULAR", "corrupt", "corrupt_tabular", "corruption_names"]

COMMON = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
          "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
TABULAR = ("feature_noise", "missing_values", "feature_scaling")
_COLOUR_ONLY = {"saturate"}

_IMAGE: dict[str, Callable[[torch.Tensor, int, torch.Generator, float], torch.Tensor]] = {}


def corruption_names(channels: int | None = None) -> tuple[str, ...]:
    """The image corruptions that apply to images with this many channels (all 19 when None or 3)."""
    names = COMMON + EXTRA
    return names if channels in (None, 3) else tuple(n for n in names if n not in _COLOUR_ONLY)


def _generator(seed: int, name: str, severity: int) -> torch.Generator:
    # One stream per (seed, corruption, severity): a set does not depend on which others were made first.
    digest = hashlib.sha256(f"{seed}:{name}:{severity}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF)


def _check_severity(severity: int) -> None:
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be 1, 2, 3, 4 or 5; got {severity!r}")


def corrupt(x: torch.Tensor, name: str, severity: int, *, seed: int = 0) -> torch.Tensor:
    """Corrupt images `x` (N, C, H, W) in [0, 1] with corruption `name` at `severity` (1-5)."""
    if name not in _IMAGE:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(COMMON + EXTRA)}")
    _check_severity(severity)
    if x.ndim != 4:
        raise ValueError(f"image corruptions take (N, C, H, W) tensors; got shape {tuple(x.shape)}")
    if name in _COLOUR_ONLY and x.shape[1] != 3:
        raise ValueError(f"{name} needs 3-channel (RGB) images; these have {x.shape[1]} channel(s)")
    # Lengths grow with the image; below 32 px they stay CIFAR's (a blur shrunk under a pixel vanishes).
    scale = max(1.0, min(x.shape[2], x.shape[3]) / 32.0)
    out = _IMAGE[name](x.detach().float().clone(), severity - 1, _generator(seed, name, severity), scale)
    return out.clamp(0.0, 1.0)


def _register(fn):
    _IMAGE[fn.__name__.lstrip("_")] = fn
    return fn


# --- helpers ---------------------------------------------------------------------------------------

def _normal(shape, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=g)


def _uniform(shape, g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g)


def _depthwise(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve every channel of every image with `kernel` (k, k), or one kernel per image (N, k, k)."""
    n, c, h, w = x.shape
    k = kernel.shape[-1]
    pad = k // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode)
    if kernel.ndim == 2:
        weight = kernel.to(x.dtype).expand(c, 1, k, k)
        return F.conv2d(xp, weight, groups=c)
    weight = kernel.to(x.dtype).repeat_interleave(c, 0).unsqueeze(1)  # (N*C, 1, k, k)
    return F.conv2d(xp.reshape(1, n * c, *xp.shape[2:]), weight, groups=n * c).reshape(n, c, h, w)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return torch.ones(1, 1)
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k1 = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k1[:, None] * k1[None]
    return k / k.sum()


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return _depthwise(x, _gaussian_kernel(sigma)) if sigma > 0 else x


def _line_kernels(n: int, length: float, sigma: float, g: torch.Generator) -> torch.Tensor:
    """One motion kernel per image: a line of `length` px at a random angle in [-45, 45] degrees, with a
    Gaussian falloff along it (like ImageMagick's -motion-blur radius x sigma), normalised to sum 1."""
    radius = max(1, int(math.ceil(length)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    angle = (_uniform(n, g) * 90 - 45) * math.pi / 180
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    along = xx * cos + yy * sin  # signed distance along the line
    across = -xx * sin + yy * cos
    on_line = torch.clamp(1 - across.abs(), min=0) * (along >= 0) * (along <= length)  # motion goes one way
    k = on_line * torch.exp(-along ** 2 / (2 * max(sigma, 1e-3) ** 2))
    return k / k.sum(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def _fractal(n: int, h: int, w: int, decay: float, g: torch.Generator) -> torch.Tensor:
    """Noise with a 1/f^decay spectrum (the role of the diamond-square plasma fractal), each map in [0, 1]."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None]
    f = torch.sqrt(fx ** 2 + fy ** 2)
    f[0, 0] = 1.0
    amplitude = f ** (-decay)
    amplitude[0, 0] = 0.0
    spectrum = torch.complex(_normal((n, h, w // 2 + 1), g), _normal((n, h, w // 2 + 1), g)) * amplitude
    field = torch.fft.irfft2(spectrum, s=(h, w))
    low = field.amin(dim=(1, 2), keepdim=True)
    high = field.amax(dim=(1, 2), keepdim=True)
    return ((field - low) / (high - low).clamp_min(1e-12)).unsqueeze(1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    return x.mean(dim=1, keepdim=True)


def _warp(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Sample x at (pixel + displacement); dx, dy in pixels, shape (N, H, W)."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    gx = (xs + dx) / max(w - 1, 1) * 2 - 1
    gy = (ys + dy) / max(h - 1, 1) * 2 - 1
    return F.grid_sample(x, torch.stack([gx, gy], dim=-1), mode="bilinear", padding_mode="reflection",
                         align_corners=True)


# --- noise -----------------------------------------------------------------------------------------

@_register
def _gaussian_noise(x, s, g, scale):
    return x + _normal(x.shape, g) * [0.08, 0.12, 0.18, 0.26, 0.38][s]


@_register
def _shot_noise(x, s, g, scale):
    c = [60, 25, 12, 5, 3][s]
    return torch.poisson(x.clamp(0, 1) * c, generator=g) / c


@_register
def _impulse_noise(x, s, g, scale):
    amount = [0.03, 0.06, 0.09, 0.17, 0.27][s]
    u = _uniform(x.shape, g)
    x = torch.where(u < amount / 2, torch.zeros_like(x), x)
    return torch.where((u >= amount / 2) & (u < amount), torch.ones_like(x), x)


@_register
def _speckle_noise(x, s, g, scale):
    return x + x * _normal(x.shape, g) * [0.15, 0.2, 0.35, 0.45, 0.6][s]


# --- blur ------------------------------------------------------------------------------------------

@_register
def _gaussian_blur(x, s, g, scale):
    return _blur(x, [0.4, 0.6, 0.7, 0.8, 1.0][s] * scale)


@_register
def _defocus_blur(x, s, g, scale):
    radius, alias = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1)][s]
    radius *= scale
    r = max(1, int(math.ceil(radius)) + 1)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    dist = torch.sqrt(t[:, None] ** 2 + t[None] ** 2)
    disk = (radius + 0.5 - dist).clamp(0, 1)  # an anti-aliased disk
    disk = disk / disk.sum()
    if alias * scale > 0:
        disk = F.conv2d(disk[None, None], _gaussian_kernel(alias * scale)[None, None],
                        padding=_gaussian_kernel(alias * scale).shape[-1] // 2)[0, 0]
        disk = disk / disk.sum()
    return _depthwise(x, disk)


@_register
def _glass_blur(x, s, g, scale):
    sigma, max_delta, iterations = [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)][s]
    x = _blur(x, sigma * scale)
    delta = max(1, int(round(max_delta * scale)))
    n, c, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for _ in range(iterations):
        # Every pixel takes the value of a random neighbour within delta: the frosted-glass scattering,
        # done for all pixels at once instead of the original's sequential swaps.
        oy = torch.randint(-delta, delta + 1, (n, h, w), generator=g)
        ox = torch.randint(-delta, delta + 1, (n, h, w), generator=g)
        src = ((ys + oy).clamp(0, h - 1) * w + (xs + ox).clamp(0, w - 1)).reshape(n, 1, h * w).expand(n, c, h * w)
        x = x.reshape(n, c, h * w).gather(2, src).reshape(n, c, h, w)
    return _blur(x, sigma * scale)


@_register
def _motion_blur(x, s, g, scale):
    length, sigma = [(10, 1.0), (10, 1.5), (10, 2.0), (10, 2.5), (12, 3.0)][s]
    # ImageMagick's radius caps the kernel and sigma sets its effective length; the visible smear is ~2 sigma.
    return _depthwise(x, _line_kernels(len(x), min(length, 3 * sigma) * scale, sigma * scale, g))


@_register
def _zoom_blur(x, s, g, scale):
    top, step = [(1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)][s]
    zooms = np.arange(1.0, top, step)[1:]
    n, c, h, w = x.shape
    out = x.clone()
    base = F.affine_grid(torch.eye(2, 3, dtype=x.dtype).expand(n, 2, 3), list(x.shape), align_corners=False)
    for z in zooms:
        out += F.grid_sample(x, base / float(z), mode="bilinear", padding_mode="border", align_corners=False)
    return out / (len(zooms) + 1)


# --- weather ---------------------------------------------------------------------------------------

@_register
def _fog(x, s, g, scale):
    strength, decay = [(1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)][s]
    n, c, h, w = x.shape
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    # A smoother field for a larger decay, as the plasma fractal's wibble decay does.
    fog = _fractal(n, h, w, decay / 1.25, g)
    return (x + strength * fog) * peak / (peak + strength)


@_register
def _frost(x, s, g, scale):
    keep, frost_weight = [(1.0, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)][s]
    n, c, h, w = x.shape
    # Ice: bright, fine-grained crystals (high-frequency noise, sharpened) with a few streaks of frost.
    grain = _fractal(n, h, w, 0.6, g) ** 2
    streaks = _depthwise(((_uniform((n, 1, h, w), g) > 0.985).float()), _line_kernels(n, 4 * scale + 1, 3 * scale, g))
    ice = (0.75 * grain + 2.0 * streaks).clamp(0, 1)
    return keep * x + frost_weight * ice.expand(n, c, h, w)


@_register
def _snow(x, s, g, scale):
    loc, spread, zoom, threshold, radius, sigma, blend = [
        (0.1, 0.3, 3.0, 0.5, 10, 4, 0.8), (0.2, 0.3, 2.0, 0.5, 12, 4, 0.7), (0.55, 0.3, 4.0, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)][s]
    n, c, h, w = x.shape
    sh, sw = max(1, int(round(h / zoom))), max(1, int(round(w / zoom)))
    flakes = loc + spread * _normal((n, 1, sh, sw), g)
    flakes = F.interpolate(flakes, size=(h, w), mode="bilinear", align_corners=False)
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes)
    flakes = _depthwise(flakes, _line_kernels(n, min(radius, 3 * sigma) * scale / 2, sigma * scale / 2, g))
    x = blend * x + (1 - blend) * torch.maximum(x, _grey(x) * 1.5 + 0.5)
    return x + flakes + torch.flip(flakes, dims=(2, 3))


@_register
def _spatter(x, s, g, scale):
    loc, spread, sigma, threshold, intensity, mud = [
        (0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1.0, 0.69, 0.5, 0),
        (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)][s]
    n, c, h, w = x.shape
    liquid = _blur(loc + spread * _normal((n, 1, h, w), g), sigma * scale * 2)
    liquid = liquid.clamp(0, 1)
    # Drops where the smoothed field is high; rescale so the coverage does not depend on smoothing.
    liquid = (liquid - liquid.mean(dim=(2, 3), keepdim=True)) / liquid.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    mask = ((liquid * spread + loc) > threshold).float()
    mask = _blur(mask, 0.5 * scale)
    colour = (torch.tensor([63, 42, 20]) / 255.0 if mud else torch.tensor([175, 195, 220]) / 255.0)
    colour = colour.reshape(1, 3, 1, 1) if c == 3 else colour.mean().reshape(1, 1, 1, 1).expand(1, c, 1, 1)
    return x * (1 - intensity * mask) + intensity * mask * colour


# --- digital ---------------------------------------------------------------------------------------

@_register
def _brightness(x, s, g, scale):
    c = [0.1, 0.2, 0.3, 0.4, 0.5][s]
    if x.shape[1] != 3:
        return x + c
    v = x.amax(dim=1, keepdim=True)
    # Raise HSV value and keep hue and saturation: scale each pixel's colour by v'/v.
    return torch.where(v > 0, x * ((v + c).clamp(max=1) / v.clamp_min(1e-12)), x + c)


@_register
def _contrast(x, s, g, scale):
    c = [0.4, 0.3, 0.2, 0.1, 0.05][s]
    means = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - means) * c + means


@_register
def _saturate(x, s, g, scale):
    factor, shift = [(0.3, 0.0), (0.1, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.2)][s]
    v = x.amax(dim=1, keepdim=True)
    low = x.amin(dim=1, keepdim=True)
    sat = torch.where(v > 0, (v - low) / v.clamp_min(1e-12), torch.zeros_like(v))
    new_sat = (sat * factor + shift).clamp(0, 1)
    ratio = torch.where(sat > 0, new_sat / sat.clamp_min(1e-12), torch.zeros_like(sat))
    out = v - (v - x) * ratio
    # A grey pixel has no hue to saturate; a shift only adds saturation where there is colour.
    return torch.where(sat > 0, out, x)


@_register
def _pixelate(x, s, g, scale):
    c = [0.6, 0.5, 0.4, 0.3, 0.25][s]
    h, w = x.shape[2:]
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


@_register
def _elastic_transform(x, s, g, scale):
    alpha, sigma, affine = [(0.0, 0.0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                            (0.1, 0.03, 0.03)][s]
    n, c, h, w = x.shape
    side = min(h, w)
    alpha, sigma, affine = alpha * side, sigma * side, affine * side
    # A random affine map (the corners of a centred triangle moved by up to `affine` px) ...
    src = torch.tensor([[side / 2 - side / 3, side / 2 - side / 3], [side / 2 + side / 3, side / 2 - side / 3],
                        [side / 2 - side / 3, side / 2 + side / 3]])
    dst = src + (_uniform((n, 3, 2), g) * 2 - 1) * affine
    ones = torch.ones(n, 3, 1)
    # Solve for the map taking dst to src (we sample backwards): [x y 1] @ m = src.
    m = torch.linalg.solve(torch.cat([dst, ones], 2), src.expand(n, 3, 2))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    grid = torch.stack([xs.flatten(), ys.flatten(), torch.ones(h * w)], 1)  # (HW, 3)
    mapped = grid @ m  # (N, HW, 2)
    dx = mapped[..., 0].reshape(n, h, w) - xs
    dy = mapped[..., 1].reshape(n, h, w) - ys
    # ... and a smooth random displacement field.
    if alpha > 0:
        field = _uniform((n, 2, h, w), g) * 2 - 1
        field = _blur(field, sigma) * alpha
        dx, dy = dx + field[:, 0], dy + field[:, 1]
    return _warp(x, dx, dy)


_LUMA = torch.tensor([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55], [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62], [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)
_CHROMA = torch.full((8, 8), 99.0)
_CHROMA[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]])


def _dct_matrix() -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float32)
    m = torch.cos((2 * k[None] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m


@_register
def _jpeg_compression(x, s, g, scale):
    quality = [25, 18, 15, 10, 7][s]
    # The IJG quality scaling of the standard tables, baseline DCT quantisation, no chroma subsampling.
    q = 5000 / quality if quality < 50 else 200 - 2 * quality
    tables = [((t * q + 50) // 100).clamp(1, 255) for t in (_LUMA, _CHROMA)]
    n, c, h, w = x.shape
    pix = x * 255
    if c == 3:
        r, gg, b = pix[:, 0], pix[:, 1], pix[:, 2]
        ycc = torch.stack([0.299 * r + 0.587 * gg + 0.114 * b, -0.168736 * r - 0.331264 * gg + 0.5 * b + 128,
                           0.5 * r - 0.418688 * gg - 0.081312 * b + 128], 1)
        quant = torch.stack([tables[0], tables[1], tables[1]])
    else:
        ycc, quant = pix, tables[0].expand(c, 8, 8)
    ph, pw = (-h) % 8, (-w) % 8
    ycc = F.pad(ycc, (0, pw, 0, ph), mode="replicate") - 128
    hh, ww = ycc.shape[2] // 8, ycc.shape[3] // 8
    blocks = ycc.reshape(n, c, hh, 8, ww, 8).permute(0, 1, 2, 4, 3, 5)  # (N, C, bh, bw, 8, 8)
    d = _dct_matrix()
    coef = d @ blocks @ d.T
    qt = quant.reshape(1, c, 1, 1, 8, 8)
    blocks = d.T @ (torch.round(coef / qt) * qt) @ d
    ycc = blocks.permute(0, 1, 2, 4, 3, 5).reshape(n, c, hh * 8, ww * 8)[:, :, :h, :w] + 128
    if c == 3:
        yy, cb, cr = ycc[:, 0], ycc[:, 1] - 128, ycc[:, 2] - 128
        ycc = torch.stack([yy + 1.402 * cr, yy - 0.344136 * cb - 0.714136 * cr, yy + 1.772 * cb], 1)
    return torch.round(ycc.clamp(0, 255)) / 255


# --- tabular ---------------------------------------------------------------------------------------

def corrupt_tabular(x: torch.Tensor, name: str, severity: int, *, seed: int = 0, mean: torch.Tensor | None = None,
                    std: torch.Tensor | None = None) -> torch.Tensor:
    """Corrupt tabular inputs `x` (N, D). `mean`/`std` per feature come from reference data (default: `x`)."""
    if name not in TABULAR:
        raise ValueError(f"unknown tabular corruption {name!r}; choose from {', '.join(TABULAR)}")
    _check_severity(severity)
    if x.ndim != 2:
        raise ValueError(f"tabular corruptions take (N, D) tensors; got shape {tuple(x.shape)}")
    x = x.detach().float().clone()
    g = _generator(seed, name, severity)
    mean = x.mean(0) if mean is None else mean.float()
    std = x.std(0) if std is None else std.float()
    s = severity - 1
    if name == "feature_noise":
        return x + _normal(x.shape, g) * std * [0.1, 0.2, 0.35, 0.5, 0.8][s]
    if name == "missing_values":
        missing = _uniform(x.shape, g) < [0.05, 0.1, 0.2, 0.3, 0.5][s]
        return torch.where(missing, mean.expand_as(x), x)
    # feature_scaling: a share of the features change unit (a sensor or pipeline change): log-normal factors.
    share, spread = [(0.1, 0.2), (0.2, 0.3), (0.3, 0.5), (0.4, 0.7), (0.5, 1.0)][s]
    chosen = _uniform(x.shape[1], g) < share
    factor = torch.exp(_normal(x.shape[1], g) * spread)
    factor = torch.where(chosen, factor, torch.ones_like(factor))
    return x * factor
