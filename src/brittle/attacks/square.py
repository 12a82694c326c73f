"""Square attack (Andriushchenko et al. 2020): score-based black-box random search, no gradients.

Linf: start from vertical stripes of +-eps, then repeatedly resample a random square window to +-eps per
channel and keep the change when the margin drops. L2: start from a grid of centred "bump" patterns with
random signs on the eps-sphere; each proposal moves the perturbation's mass in two random windows into
the first one, as a fresh bump with a random sign, so the norm stays eps. The window side shrinks on the
paper's schedule, rescaled to the query budget. Points stop being queried once broken.
"""

from __future__ import annotations

import math

import torch

from ..model import ModelAdapter
from .base import Attack
from .geometry import project
from .losses import margin

__all__ = ["Square"]

_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # out of 10,000 queries


class Square(Attack):
    name = "square"
    needs_gradients = False

    def __init__(self, *, norm: str = "Linf", eps: float, queries: int = 1000, p_init: float = 0.8):
        super().__init__(norm=norm, eps=eps)
        if queries < 1 or not 0 < p_init <= 1:
            raise ValueError(f"Square needs queries >= 1 and 0 < p_init <= 1; got {queries}, {p_init}.")
        self.queries, self.p_init = int(queries), float(p_init)

    def _p(self, i: int) -> float:
        scaled = int(i / self.queries * 10_000)
        return self.p_init / 2 ** sum(scaled > t for t in _SCHEDULE)

    def perturb(self, model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, *, generator: torch.Generator,
                trace: dict | None = None) -> torch.Tensor:
        shaped = x if x.dim() == 4 else x.reshape(len(x), 1, 1, -1)  # tables: windows over features
        n, c, h, w = shaped.shape
        bounds = model.bounds

        def run(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(len(z), *x.shape[1:])

        if self.norm == "Linf":
            stripes = self.eps * (torch.randint(0, 2, (n, c, 1, w), generator=generator, device="cpu") * 2 - 1
                                  ).float().to(x.device)
            cur = project(shaped + stripes, shaped, self.eps, "Linf", bounds)
        else:
            cur = project(shaped + self._bump_grid(n, c, h, w, generator).to(x.device), shaped, self.eps, "L2", bounds)
        cur_margin = margin(model.logits(run(cur)), y)
        last_gain_at = torch.zeros(n, device=x.device)
        for i in range(self.queries - 1):
            a = (cur_margin >= 0).nonzero().squeeze(1)
            if len(a) == 0:
                break
            s = max(min(int(round(math.sqrt(self._p(i) * h * w))), h, w), 1)
            r = int(torch.randint(0, h - s + 1, (1,), generator=generator, device="cpu"))
            col = int(torch.randint(0, w - s + 1, (1,), generator=generator, device="cpu"))
            signs = (torch.randint(0, 2, (len(a), c, 1, 1), generator=generator, device="cpu") * 2 - 1
                     ).float().to(x.device)
            delta = cur[a] - shaped[a]
            if self.norm == "Linf":
                delta[:, :, r:r + s, col:col + s] = self.eps * signs
            else:
                r2 = int(torch.randint(0, h - s + 1, (1,), generator=generator, device="cpu"))
                c2 = int(torch.randint(0, w - s + 1, (1,), generator=generator, device="cpu"))
                w1 = (slice(None), slice(None), slice(r, r + s), slice(col, col + s))
                w2 = (slice(None), slice(None), slice(r2, r2 + s), slice(c2, c2 + s))
                mass = (delta[w1].pow(2).sum((1, 2, 3)) + delta[w2].pow(2).sum((1, 2, 3))).sqrt()
                delta[w2] = 0
                bump = _bump(s).to(x.device)
                delta[w1] = signs * bump / bump.norm() / math.sqrt(c) * mass.view(-1, 1, 1, 1)
            cand = project(shaped[a] + delta, shaped[a], self.eps, self.norm, bounds)
            m = margin(model.logits(run(cand)), y[a])
            better = m < cur_margin[a]
            cur[a[better]] = cand[better]
            cur_margin[a[better]] = m[better]
            last_gain_at[a[better]] = i + 1
        if trace is not None:
            trace["late_gain"] = (last_gain_at > 0.8 * self.queries).float()
        return run(cur)

    def _bump_grid(self, n: int, c: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
        s = max(min(h, w) // 5, 1)
        grid = torch.zeros(n, c, h, w, device="cpu")  # drawn on the CPU, like every random draw; moved by the caller
        for r in range(0, h - s + 1, s):
            for col in range(0, w - s + 1, s):
                signs = (torch.randint(0, 2, (n, c, 1, 1), generator=generator, device="cpu") * 2 - 1).float()
                grid[:, :, r:r + s, col:col + s] = signs * _bump(s)
        norms = grid.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return grid / norms * self.eps

    def __repr__(self) -> str:
        return f"Square(norm={self.norm!r}, eps={self.eps:g}, queries={self.queries})"


def _bump(s: int) -> torch.Tensor:
    """A centred pattern of nested squares, heaviest in the middle (the paper's L2 meta-pattern)."""
    i = torch.arange(s, dtype=torch.float32, device="cpu")
    ring = torch.minimum(torch.minimum(i[:, None], i[None, :]), torch.minimum(s - 1 - i[:, None], s - 1 - i[None, :]))
    return 1.0 / (s // 2 + 1 - ring).clamp_min(1) ** 2
