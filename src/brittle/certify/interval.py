"""Interval bound propagation (IBP): textbook interval arithmetic, node by node.

Affine nodes map centres exactly and radii through their coefficients' absolute values; monotone nonlinear
nodes map the endpoints. The margins' bounds fold the specification into the trailing affine part of the
network (the last Linear layer, usually): the margins z_y - z_j are one affine map of the last nonlinear node's
output, bounded by one interval step, as auto_LiRPA's IBP with a specification matrix does. That is far
tighter than bounding the logits first and subtracting intervals.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .network import Network

__all__ = ["interval_pass", "ibp_margins", "input_box", "specification", "fold_and_concretise"]


def input_box(x: torch.Tensor, eps: float, bounds: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = bounds
    return (x - eps).clamp(low, high), (x + eps).clamp(low, high)


def specification(y: torch.Tensor, k: int) -> torch.Tensor:
    """(B, K-1, K): rows e_y - e_j for every j != y."""
    eye = torch.eye(k, dtype=torch.float32, device=y.device)
    others = torch.arange(k, device=y.device)[None].expand(len(y), k)
    others = others[others != y[:, None]].view(len(y), k - 1)
    return eye[y][:, None, :] - eye[others]


def monotone(op: str, node, z: torch.Tensor) -> torch.Tensor:
    """The value of a monotone nonlinear node (all of them are non-decreasing in each input)."""
    if op == "relu":
        return z.clamp_min(0)
    if op == "leaky_relu":
        return F.leaky_relu(z, node.params["slope"])
    if op == "sigmoid":
        return torch.sigmoid(z)
    if op == "tanh":
        return torch.tanh(z)
    return node.apply(z)  # maxpool: max is non-decreasing in every element


def interval_pass(net: Network, lo: torch.Tensor, hi: torch.Tensor, *, upto: int | None = None,
                  tightened: dict | None = None, l2: tuple[torch.Tensor, float] | None = None
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lower, upper) of every node up to `upto` (exclusive); `tightened` maps node indices to tighter sound
    bounds (CROWN's), which replace the interval ones and carry on downstream. `l2` = (x, eps): the input set is
    also the L2 ball around x, and the nodes one mixing affine map away from the input (elementwise scalings
    aside) are bounded exactly over the ball by their rows' L2 norms, as auto_LiRPA's IBP does for Lp balls."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    ball: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}  # node -> (image of x, squared row norms, mixing)
    for node in net.nodes[:upto]:
        if node.op == "input":
            bound = (lo, hi)
            if l2 is not None:
                ball[node.index] = (l2[0], torch.ones_like(l2[0][:1]), 0)
        elif node.op == "affine":
            ins = [out[i] for i in node.inputs]
            centre = node.apply(*[(a + b) / 2 for a, b in ins])
            radius = node.abs_apply(*[(b - a) / 2 for a, b in ins])
            bound = (centre - radius, centre + radius)
            if len(node.inputs) == 1 and node.inputs[0] in ball:
                image, sq, mixing = ball[node.inputs[0]]
                mixing += node.params.get("kind") not in ("reshape", "channel_affine")
                sq = node.squared(sq) if mixing <= 1 else None
                if sq is not None:
                    image = node.apply(image)
                    ball[node.index] = (image, sq, mixing)
                    r = l2[1] * sq.clamp_min(0).sqrt()
                    bound = (torch.maximum(bound[0], image - r), torch.minimum(bound[1], image + r))
        else:
            a, b = out[node.inputs[0]]
            bound = (monotone(node.op, node, a), monotone(node.op, node, b))
        if tightened is not None and node.index in tightened:
            t_lo, t_hi = tightened[node.index]
            bound = (torch.maximum(bound[0], t_lo), torch.minimum(bound[1], t_hi))
        out.append(bound)
    return out


def fold_and_concretise(net: Network, spec: torch.Tensor, known: dict[int, tuple[torch.Tensor, torch.Tensor]],
                        stop: set[int], l2: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """A lower bound on spec . output (spec (B, S, *output shape)): the spec is carried back through affine nodes
    (exact), and each node in `stop` (or a non-affine node) it reaches is bounded by its interval in `known`
    (the input, under `l2` = (x, eps), by the better of its box and the ball)."""
    shapes = [n.shape for n in net.nodes]
    acc = {net.output: spec}
    total = torch.zeros(spec.shape[:2], dtype=spec.dtype, device=spec.device)
    for node in reversed(net.nodes[: net.output + 1]):
        a = acc.pop(node.index, None)
        if a is None:
            continue
        if node.op == "affine" and node.index not in stop:
            in_shapes = [shapes[i] for i in node.inputs]
            total = total + node.offset(a, in_shapes)
            for i, coeff in zip(node.inputs, node.transpose(a, in_shapes)):
                acc[i] = coeff if i not in acc else acc[i] + coeff
            continue
        lo, hi = known[node.index]
        box = (a.clamp_min(0) * lo[:, None] + a.clamp_max(0) * hi[:, None]).flatten(2).sum(2)
        if node.op == "input" and l2 is not None:
            x, eps = l2
            box = torch.maximum(box, (a * x[:, None]).flatten(2).sum(2) - eps * a.flatten(2).norm(dim=2))
        total = total + box
    return total


def ibp_margins(net: Network, x: torch.Tensor, y: torch.Tensor, eps: float, bounds, *, norm: str = "Linf",
                differentiable: bool = False) -> torch.Tensor:
    """Lower bounds (B, K-1) on the margins z_y - z_j over the ball (interval arithmetic, the specification
    folded into the trailing affine part; for L2, the first mixing layer bounded over the ball itself).
    `differentiable`: keep the graph, for IBP training."""
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        lo, hi = input_box(x, eps, bounds)
        l2 = (x, eps) if norm == "L2" else None
        known = dict(enumerate(interval_pass(net, lo, hi, l2=l2)))
        spec = specification(y, net.nodes[net.output].shape[0]).to(x.dtype)
        return fold_and_concretise(net, spec, known, stop=set(), l2=l2)
