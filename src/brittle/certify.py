"""Certified robustness by bound propagation: IBP, CROWN and alpha-CROWN for feed-forward networks.

A network is read as a chain of layers: Linear, Conv2d, ReLU, BatchNorm (eval mode), Flatten, average
pooling, Identity/Dropout (no-ops in eval), after the adapter's normalisation. Anything else (max pooling,
residual additions, attention) is refused with the layer named: a bound for a graph we do not understand
would be a guess, and a certificate must never be one.

For each point, the specification is the margins z_y - z_j (j != y) over the input set: the Linf or L2 ball
of radius eps around x, clipped to the input bounds. A point is certified when a sound lower bound on every
margin is > 0.
- IBP: interval arithmetic, layer by layer (cheap, loose unless the network was trained for it).
- CROWN (Zhang et al. 2018): linear bounds propagated backwards, with pre-activation bounds of every ReLU
  computed the same way (from that layer back to the input), the adaptive lower relaxation.
- alpha-CROWN (Xu et al. 2021): the slopes of the lower ReLU relaxations optimised by projected gradient
  ascent on the margins' lower bounds; any slope in [0, 1] is sound, so every step's bound is a certificate.
The transposed linear maps are vector-Jacobian products of the layers themselves, so every layer torch can
differentiate is handled by the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UsageError, arg

__all__ = ["Network", "network_from", "network_from_module", "ibp_margins", "crown_margins", "alpha_crown_margins", "input_box"]

_LINEAR = (nn.Linear, nn.Conv2d, nn.Conv1d, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
           nn.Flatten)
_NOOP = (nn.Identity, nn.Dropout)
SUPPORTED = "Linear, Conv1d/Conv2d, ReLU, BatchNorm1d/2d (eval), AvgPool2d, AdaptiveAvgPool2d, Flatten, Identity, Dropout"


@dataclass
class Network:
    """A chain of layers: each is ('affine', module) or ('relu', None)."""

    layers: list[tuple[str, nn.Module | None]]


class _Normalise(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        shape = [1, -1] + [1] * (x.dim() - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)


def _flatten_chain(module: nn.Module, path: str = "model") -> list[nn.Module]:
    if isinstance(module, nn.Sequential) or getattr(module, "original_name", None) == "Sequential":
        out = []
        for name, child in module.named_children():
            out += _flatten_chain(child, f"{path}.{name}")
        return out
    kind = getattr(module, "original_name", type(module).__name__)
    if isinstance(module, (*_LINEAR, nn.ReLU, *_NOOP)):
        return [module]
    if isinstance(module, torch.jit.ScriptModule):
        raise UsageError(f"Certification reads TorchScript only when it is an nn.Sequential; {path} is a "
                         f"{kind}. Give the model as a factory with weights ({arg('model')} pkg.mod:fn with "
                         f"{arg('weights')} w.pt).")
    if not any(True for _ in module.children()):
        raise UsageError(f"Certification does not support {kind} ({path}). Supported: {SUPPORTED}.")
    return _traced_chain(module, path)


def _traced_chain(module: nn.Module, path: str) -> list[nn.Module]:
    """A custom module whose forward is a straight chain of supported layers (read with torch.fx)."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure means we cannot read the graph
        raise UsageError(f"Cannot read the layers of {path} ({type(module).__name__}) for certification: "
                         f"{type(exc).__name__}. Supported: chains of {SUPPORTED}.") from None
    modules = dict(module.named_modules())
    chain = []
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if len(node.all_input_nodes) != 1:
            raise UsageError(f"{path} is not a chain of layers (node {node.name} takes {len(node.all_input_nodes)} "
                             f"inputs; residual additions are not supported yet). Supported: {SUPPORTED}.")
        if node.op == "call_module":
            chain += _flatten_chain(modules[node.target], f"{path}.{node.target}")
        elif node.op == "call_function" and node.target in (torch.relu, nn.functional.relu):
            chain.append(nn.ReLU())
        elif node.op == "call_function" and node.target is torch.flatten and node.args[1:] in ((1,), ()):
            chain.append(nn.Flatten())
        elif node.op == "call_method" and node.target == "flatten" and node.args[1:] in ((1,), ()):
            chain.append(nn.Flatten())
        else:
            raise UsageError(f"{path} uses {node.target!s} ({node.op}), which certification does not support. "
                             f"Supported: {SUPPORTED}.")
    return chain


def network_from(adapter) -> Network:
    """The adapter's module as a chain of layers, its normalisation first."""
    module = adapter.module
    if module is None:
        raise UsageError(f"{adapter.name} is a black-box model: certification needs its layers.")
    d = adapter._domain
    return network_from_module(module, d.mean, d.std)


def network_from_module(module: nn.Module, mean: torch.Tensor | None = None, std: torch.Tensor | None = None
                        ) -> Network:
    """A module as a chain of layers (after an optional per-channel normalisation)."""
    layers: list[tuple[str, nn.Module | None]] = []
    if mean is not None:
        layers.append(("affine", _Normalise(mean, std)))
    for m in _flatten_chain(module):
        if isinstance(m, _NOOP):
            continue
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.training:
            raise UsageError("BatchNorm must be in eval mode for certification.")
        layers.append(("relu", None) if isinstance(m, nn.ReLU) else ("affine", m))
    return Network(layers)


def input_box(x: torch.Tensor, eps: float, bounds: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = bounds
    return (x - eps).clamp(low, high), (x + eps).clamp(low, high)


def _spec(y: torch.Tensor, k: int) -> torch.Tensor:
    """(B, K-1, K) rows e_y - e_j for every j != y."""
    eye = torch.eye(k)
    rows = [torch.stack([eye[yi] - eye[j] for j in range(k) if j != yi]) for yi in y.tolist()]
    return torch.stack(rows)


# ----- IBP ---------------------------------------------------------------------------------------------

def _affine_interval(m: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    centre, radius = (hi + lo) / 2, (hi - lo) / 2
    c = m(centre)
    r = _abs_linear(m)(radius)  # |L| r: the layer's linear part with absolute weights, on the radius
    return c - r, c + r


def _abs_linear(m: nn.Module):
    """The map r -> |L| r of an affine layer's linear part L."""
    if isinstance(m, nn.Linear):
        return lambda r: r @ m.weight.abs().T
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        conv = nn.functional.conv1d if isinstance(m, nn.Conv1d) else nn.functional.conv2d
        return lambda r: conv(r, m.weight.abs(), None, m.stride, m.padding, m.dilation, m.groups)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale = (m.weight if m.weight is not None else torch.ones_like(m.running_var)) / torch.sqrt(m.running_var + m.eps)
        return lambda r: r * scale.abs().view([1, -1] + [1] * (r.dim() - 2))
    if isinstance(m, _Normalise):
        return lambda r: r / m.std.abs().view([1, -1] + [1] * (r.dim() - 2))
    return m  # pooling and flatten: positive linear maps without bias


def _interval_through(net: Network, lo: torch.Tensor, hi: torch.Tensor, upto: int | None = None):
    """Interval bounds after each layer (a list), up to layer index `upto` (exclusive)."""
    out = []
    for kind, m in net.layers[:upto]:
        if kind == "relu":
            lo, hi = lo.clamp_min(0), hi.clamp_min(0)
        else:
            lo, hi = _affine_interval(m, lo, hi)
        out.append((lo, hi))
    return out


def ibp_margins(net: Network, x: torch.Tensor, y: torch.Tensor, eps: float, bounds, *,
                differentiable: bool = False) -> torch.Tensor:
    """Lower bounds (B, K-1) on the margins z_y - z_j over the Linf ball (interval arithmetic).
    `differentiable`: keep the graph, for IBP training."""
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        lo, hi = input_box(x, eps, bounds)
        lo, hi = _interval_through(net, lo, hi)[-1]
        c = _spec(y, lo.shape[1])
        return (c.clamp_min(0) @ lo[..., None] + c.clamp_max(0) @ hi[..., None])[..., 0]


# ----- CROWN -------------------------------------------------------------------------------------------

def _transpose(m: nn.Module, a: torch.Tensor, in_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """For an affine layer f(z) = L z + f(0) and coefficients a (B, S, *out): (a L, a . f(0)) as (B, S, *in), (B, S)."""
    b, s = a.shape[:2]
    if isinstance(m, nn.Linear):
        bias = a @ m.bias if m.bias is not None else torch.zeros(b, s)
        return a @ m.weight, bias
    if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and isinstance(m.padding, tuple):
        flat = a.reshape(b * s, *a.shape[2:])
        out_h, out_w = a.shape[-2:]
        extra = [in_shape[1 + d] - ((o - 1) * m.stride[d] - 2 * m.padding[d] + m.dilation[d] * (m.kernel_size[d] - 1) + 1)
                 for d, o in enumerate((out_h, out_w))]
        back = nn.functional.conv_transpose2d(flat, m.weight, None, m.stride, m.padding, tuple(extra), m.groups,
                                              m.dilation)
        bias = (a.sum((3, 4)) @ m.bias) if m.bias is not None else torch.zeros(b, s)
        return back.reshape(b, s, *in_shape), bias
    keep = a.requires_grad  # alpha-CROWN differentiates through this map (it is linear in a)
    with torch.enable_grad():
        z = torch.zeros((b * s, *in_shape), requires_grad=True)
        out = m(z)
        (grad,) = torch.autograd.grad(out, z, grad_outputs=a.reshape(b * s, *out.shape[1:]), create_graph=keep)
    with torch.no_grad():
        offset = m(torch.zeros((1, *in_shape)))
    return grad.reshape(b, s, *in_shape), (a * offset).flatten(2).sum(2)


def _relu_relaxation(lo: torch.Tensor, hi: torch.Tensor, alpha: torch.Tensor | None):
    """Slopes and intercepts of the linear lower and upper bounds of ReLU on [lo, hi]."""
    unstable = (lo < 0) & (hi > 0)
    active = lo >= 0
    up_slope = torch.where(unstable, hi / (hi - lo).clamp_min(1e-12), active.to(lo.dtype))
    up_icpt = torch.where(unstable, -hi * lo / (hi - lo).clamp_min(1e-12), torch.zeros_like(lo))
    if alpha is None:
        alpha = (hi > -lo).to(lo.dtype)  # CROWN's adaptive choice: the area-minimising one of 0 and 1
    low_slope = torch.where(unstable, alpha, active.to(lo.dtype))
    return low_slope, up_slope, up_icpt


def _backward(net: Network, start: int, a: torch.Tensor, shapes: list[tuple[int, ...]], pre: dict, lower: bool,
              alphas: dict | None = None):
    """Propagate coefficients a (B, S, *shape after layer start-1) back to the input. Returns (A, bias) with the
    bound on a . z_{start} as A . x + bias (a lower bound if `lower`, else an upper one)."""
    bias = torch.zeros(a.shape[:2])
    for i in range(start - 1, -1, -1):
        kind, m = net.layers[i]
        if kind == "relu":
            lo, hi = pre[i]
            low_slope, up_slope, up_icpt = _relu_relaxation(lo, hi, None if alphas is None else alphas.get(i))
            pos, neg = a.clamp_min(0), a.clamp_max(0)
            if lower:
                bias = bias + (neg * up_icpt[:, None]).flatten(2).sum(2)
                a = pos * low_slope[:, None] + neg * up_slope[:, None]
            else:
                bias = bias + (pos * up_icpt[:, None]).flatten(2).sum(2)
                a = pos * up_slope[:, None] + neg * low_slope[:, None]
        else:
            a, extra = _transpose(m, a, shapes[i])
            bias = bias + extra
    return a, bias


def _concretise(a: torch.Tensor, bias: torch.Tensor, x_lo: torch.Tensor, x_hi: torch.Tensor, lower: bool,
                x: torch.Tensor | None = None, l2_eps: float | None = None) -> torch.Tensor:
    pos, neg = a.clamp_min(0), a.clamp_max(0)
    lo_b, hi_b = x_lo[:, None], x_hi[:, None]
    box = ((pos * lo_b + neg * hi_b) if lower else (pos * hi_b + neg * lo_b)).flatten(2).sum(2) + bias
    if l2_eps is None:
        return box
    # The L2 ball clipped to the box lies in both sets: the tighter of the two bounds is sound.
    centre = (a * x[:, None]).flatten(2).sum(2) + bias
    norm = a.flatten(2).norm(dim=2)
    ball = centre - l2_eps * norm if lower else centre + l2_eps * norm
    return torch.maximum(box, ball) if lower else torch.minimum(box, ball)


def _shapes(net: Network, x: torch.Tensor) -> tuple[list[tuple[int, ...]], int]:
    """Input shape (per sample) of every layer, and the number of outputs."""
    shapes, z = [], x[:1]
    with torch.no_grad():
        for kind, m in net.layers:
            shapes.append(tuple(z.shape[1:]))
            z = z.clamp_min(0) if kind == "relu" else m(z)
    if z.dim() != 2:
        raise UsageError(f"The network must end in class scores (N, K); its chain ends with shape {tuple(z.shape)}.")
    return shapes, int(z.shape[1])


def _pre_activation_bounds(net: Network, x, x_lo, x_hi, shapes, l2_eps, *, chunk: int = 256) -> dict:
    """CROWN bounds on the input of every ReLU, from that layer back to the input, intersected with interval
    bounds. Only neurons whose interval bounds straddle 0 need CROWN (a stable neuron stays stable), and which
    those are differs per input, so each input is bounded on its own unstable neurons: upper bounds first,
    lower bounds only where the upper bound left the neuron possibly active."""
    pre: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    lo, hi = x_lo, x_hi  # interval bounds of the current layer's input, restarted from every tightened ReLU
    b = len(x)
    for i, (kind, m) in enumerate(net.layers):
        if kind != "relu":
            lo, hi = _affine_interval(m, lo, hi)
            continue
        if pre or l2_eps is not None:
            shape = shapes[i]
            flat_lo, flat_hi = lo.reshape(b, -1).clone(), hi.reshape(b, -1).clone()
            for j in range(b):
                one = {k: (v[0][j: j + 1], v[1][j: j + 1]) for k, v in pre.items()}
                xj, lo_j, hi_j = x[j: j + 1], x_lo[j: j + 1], x_hi[j: j + 1]
                for lower in (False, True):
                    todo = torch.nonzero((flat_lo[j] < 0) & (flat_hi[j] > 0)).flatten()
                    for s in range(0, len(todo), chunk):
                        cols = todo[s: s + chunk]
                        a0 = torch.zeros(len(cols), flat_lo.shape[1])
                        a0[torch.arange(len(cols)), cols] = 1.0
                        a, bias = _backward(net, i, a0.reshape(1, len(cols), *shape), shapes, one, lower=lower)
                        bound = _concretise(a, bias, lo_j, hi_j, lower, xj, l2_eps)[0]
                        if lower:
                            flat_lo[j, cols] = torch.maximum(flat_lo[j, cols], bound)
                        else:
                            flat_hi[j, cols] = torch.minimum(flat_hi[j, cols], bound)
            lo, hi = flat_lo.reshape(b, *shape), flat_hi.reshape(b, *shape)
        # else: before the first ReLU the network is affine and interval bounds over the box are exact.
        pre[i] = (lo, hi)
        lo, hi = lo.clamp_min(0), hi.clamp_min(0)
    return pre


def crown_margins(net: Network, x: torch.Tensor, y: torch.Tensor, eps: float, bounds, *, norm: str = "Linf",
                  return_state: bool = False):
    """Lower bounds (B, K-1) on the margins z_y - z_j over the ball (CROWN)."""
    with torch.no_grad():
        x_lo, x_hi, l2 = _input_set(x, eps, bounds, norm)
        shapes, k = _shapes(net, x)
        pre = _pre_activation_bounds(net, x, x_lo, x_hi, shapes, l2)
        a, bias = _backward(net, len(net.layers), _spec(y, k), shapes, pre, lower=True)
        bound = _concretise(a, bias, x_lo, x_hi, True, x, l2)
    return (bound, (shapes, pre)) if return_state else bound


def _input_set(x, eps, bounds, norm):
    if norm == "Linf":
        lo, hi = input_box(x, eps, bounds)
        return lo, hi, None
    if norm == "L2":
        lo, hi = input_box(x, eps, bounds)  # the L2 ball lies inside this box
        return lo, hi, eps
    raise UsageError(f"The 'norm' parameter must be 'Linf' or 'L2'; got {norm!r}.")


def alpha_crown_margins(net: Network, x: torch.Tensor, y: torch.Tensor, eps: float, bounds, *, norm: str = "Linf",
                        steps: int = 20, lr: float = 0.1) -> torch.Tensor:
    """Lower bounds (B, K-1) on the margins with the lower ReLU slopes optimised (alpha-CROWN). Every step's
    bound is sound; the best one per margin is returned. Intermediate bounds are CROWN's."""
    bound, (shapes, pre) = crown_margins(net, x, y, eps, bounds, norm=norm, return_state=True)
    x_lo, x_hi, l2 = _input_set(x, eps, bounds, norm)
    k = bound.shape[1] + 1
    spec = _spec(y, k)
    alphas = {i: (hi > -lo).float().requires_grad_(True) for i, (lo, hi) in pre.items()}
    opt = torch.optim.Adam(list(alphas.values()), lr=lr)
    best = bound.clone()
    for _ in range(steps):
        a, b = _backward(net, len(net.layers), spec, shapes, pre, lower=True, alphas=alphas)
        current = _concretise(a, b, x_lo, x_hi, True, x, l2)
        best = torch.maximum(best, current.detach())
        opt.zero_grad()
        (-current.sum()).backward()
        opt.step()
        with torch.no_grad():
            for v in alphas.values():
                v.clamp_(0.0, 1.0)
    return best
