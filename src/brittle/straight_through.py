"""Straight-through (BPDA) gradients for piecewise-constant input transforms.

A quantiser such as `torch.round(x * 7) / 7` has zero gradient almost everywhere, so every gradient
attack stalls and the model looks robust (Athalye et al. 2018). Under `straight_through()`, the forward
pass is unchanged but round/floor/ceil/trunc/sign pass gradients through as the identity. This works on
Python modules (including torch.export programs); TorchScript code is compiled and cannot be intercepted.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["straight_through", "PIECEWISE_CONSTANT"]

PIECEWISE_CONSTANT = {
    torch.round, torch.Tensor.round, torch.floor, torch.Tensor.floor, torch.ceil, torch.Tensor.ceil,
    torch.trunc, torch.Tensor.trunc, torch.sign, torch.Tensor.sign, torch.fix, torch.Tensor.fix,
    torch.ops.aten.round.default, torch.ops.aten.floor.default, torch.ops.aten.ceil.default,
}


class straight_through(TorchFunctionMode):  # noqa: N801 - used as a context manager, like torch.no_grad
    """Identity gradients through piecewise-constant ops, forward values untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.hits = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in PIECEWISE_CONSTANT and args and isinstance(args[0], torch.Tensor) and args[0].requires_grad \
                and isinstance(out, torch.Tensor) and out.shape == args[0].shape:
            self.hits += 1
            x = args[0]
            return x + (out - x).detach()
        return out
