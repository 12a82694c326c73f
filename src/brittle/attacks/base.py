"""The attack contract: one method, declared capabilities, validated when the class is defined."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ..model import ModelAdapter
from .geometry import NORMS, normalise_norm

__all__ = ["Attack", "ATTACKS"]

ATTACKS: dict[str, type["Attack"]] = {}


class Attack(ABC):
    """An attack proposes perturbed inputs; it never decides what counts as broken (the verifier does).

    Capabilities are class attributes: `norms` it supports, whether it `needs_gradients`, whether it is
    `targeted`. Calling an attack returns candidates `x_adv` of the same shape as `x`.
    """

    name: ClassVar[str]
    norms: ClassVar[tuple[str, ...]] = NORMS
    needs_gradients: ClassVar[bool] = True
    targeted: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if inspect.isabstract(cls):
            return
        if not isinstance(getattr(cls, "name", None), str):
            raise TypeError(f"{cls.__name__} must define a string `name`")
        bad = [n for n in cls.norms if n not in NORMS]
        if bad:
            raise TypeError(f"{cls.__name__}.norms has unknown norms {bad}; known: {list(NORMS)}")
        if cls.name in ATTACKS and ATTACKS[cls.name].__qualname__ != cls.__qualname__:
            raise TypeError(f"{cls.__name__}.name {cls.name!r} is taken by {ATTACKS[cls.name].__name__}")
        ATTACKS[cls.name] = cls

    def __init__(self, *, norm: str = "Linf", eps: float):
        norm = normalise_norm(norm)
        if norm not in self.norms:
            raise ValueError(f"{type(self).__name__} supports norms {list(self.norms)}; got {norm!r}.")
        if not eps > 0:
            raise ValueError(f"The 'eps' parameter of {type(self).__name__} must be > 0; got {eps!r}.")
        self.norm = norm
        self.eps = float(eps)

    minimum_norm: ClassVar[bool] = False  # finds the smallest perturbation rather than any within eps

    @abstractmethod
    def perturb(self, model: ModelAdapter, x: torch.Tensor, y: torch.Tensor, *,
                generator: torch.Generator, trace: dict | None = None) -> torch.Tensor:
        """Candidate adversarial examples for (x, y), inside the ball and the bounds by construction.

        When `trace` is a dict, the attack may record per-sample diagnostics in it (e.g. `late_gain`:
        how much the loss still improved over the last fifth of the run).
        """

    def __call__(self, model: ModelAdapter | torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 seed: int = 0, trace: dict | None = None) -> torch.Tensor:
        if isinstance(model, torch.nn.Module):
            model = ModelAdapter(model)  # input bounds [0, 1], no normalisation
        if self.needs_gradients and not model.differentiable:
            raise ValueError(f"{type(self).__name__} needs input gradients; {model.name} is a black-box model.")
        if len(x) == 0:
            return x.clone()
        return self.perturb(model, x, y, generator=torch.Generator().manual_seed(seed), trace=trace)

    @property
    def label(self) -> str:
        """How reports name this configured attack (e.g. 'apgd-dlr')."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(norm={self.norm!r}, eps={self.eps:g})"
