"""Lp balls clipped to the input bounds: norms, projections and random starts."""

from __future__ import annotations

import torch

__all__ = ["NORMS", "normalise_norm", "lp_norm", "project", "random_start", "dual_norm_order"]

NORMS = ("Linf", "L2")
_ALIASES = {"linf": "Linf", "inf": "Linf", "l_inf": "Linf", "l2": "L2", "2": "L2"}


def normalise_norm(norm: str) -> str:
    key = str(norm).strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"The 'norm' option must be one of {list(NORMS)}; got {norm!r}.")
    return _ALIASES[key]


def dual_norm_order(norm: str) -> float:
    """q with 1/p + 1/q = 1: the worst-case change of a linear score w.x under ||d||_p <= eps is eps*||w||_q."""
    return 1.0 if norm == "Linf" else 2.0


def lp_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().amax(1) if norm == "Linf" else flat.norm(p=2, dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: torch.Tensor | float, norm: str,
            bounds: tuple[float, float]) -> torch.Tensor:
    """Project into the eps-ball around x, then into the bounds.

    For Linf both sets are boxes, so clipping to one then the other lands in their intersection. For L2,
    scaling then clipping can only shrink the perturbation, so the result stays inside the ball too.
    """
    delta = x_adv - x
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if eps_t.dim() == 1:  # one radius per sample
        eps_t = eps_t.view(-1, *([1] * (x.dim() - 1)))
    if norm == "Linf":
        delta = torch.maximum(torch.minimum(delta, eps_t), -eps_t)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        delta = delta * torch.clamp(eps_t / n, max=1.0)
    return (x + delta).clamp(bounds[0], bounds[1])


def random_start(x: torch.Tensor, eps: float, norm: str, bounds: tuple[float, float],
                 generator: torch.Generator) -> torch.Tensor:
    """A uniform point in the Linf ball, or a point in the L2 ball with a uniform direction. Drawn on the CPU from
    the CPU generator, then moved: the same seed gives the same start on every device."""
    if norm == "Linf":
        noise = (torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu") * 2 - 1) * eps
    else:
        d = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu")
        d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        r = torch.rand(len(x), generator=generator, dtype=x.dtype, device="cpu").view(-1, *([1] * (x.dim() - 1)))
        noise = d * r * eps
    return (x + noise.to(x.device)).clamp(bounds[0], bounds[1])
