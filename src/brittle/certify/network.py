"""A model read as a graph of operations that bounds can be propagated through.

The model's computation comes from brittle.graph (torch.fx for Python modules, TorchScript read back as eager
modules). Each fx node becomes one of:
- `input`: the (normalised) input;
- `affine`: exactly affine in its tensor inputs (Linear, Conv1d/2d with any padding mode, dilation and groups,
  BatchNorm in eval mode, AvgPool2d, AdaptiveAvgPool2d, flatten/view/reshape, addition and subtraction of
  tensors or constants, multiplication by a constant, concatenation, mean, the adapter's normalisation);
- `relu`, `leaky_relu`, `sigmoid`, `tanh`, `maxpool`: the nonlinear operations with relaxation rules.
Shape arithmetic (`x.size(0)`, `x.view(x.size(0), -1)`) is evaluated on an example input. Anything else, and
every layer option the rules do not model (MaxPool2d's ceil_mode, BatchNorm in training mode or without running
statistics, string padding with a non-zero padding mode), is refused with the operation named: a bound for an
operation we do not understand would be a guess, and a certificate must never be one.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair  # int or pair -> pair, as torch reads kernel, stride, padding

from ..errors import UsageError, arg
from ..graph import GraphUnavailable, eager_graph

__all__ = ["Network", "Node", "network_from", "network_from_module", "SUPPORTED", "NONLINEAR"]

SUPPORTED = ("Linear, Conv1d/Conv2d (any padding mode, dilation, groups), ReLU, LeakyReLU, Sigmoid, Tanh, "
             "BatchNorm1d/2d (eval), MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Flatten/view/reshape, addition, "
             "subtraction, multiplication by a constant, concatenation, mean, Identity, Dropout (eval)")
NONLINEAR = ("relu", "leaky_relu", "sigmoid", "tanh", "maxpool")


@dataclass(eq=False)
class Node:
    """One operation. For `affine` nodes `apply` is the map itself on tensors (batch first) and `abs_apply` the
    map with its coefficients' absolute values applied to non-negative radii (no bias): interval arithmetic is
    `apply(centres) +- abs_apply(radii)`. `linear` (optional) maps coefficients back: for an output coefficient
    tensor `a` it returns the coefficient tensor of each tensor input (a vector-Jacobian product); without it,
    autograd computes one."""

    index: int
    name: str
    op: str
    inputs: list[int]
    shape: tuple[int, ...]  # per-sample output shape
    apply: Callable[..., torch.Tensor]
    abs_apply: Callable[..., torch.Tensor] | None = None
    params: dict[str, Any] = field(default_factory=dict)

    # ----- an affine node's linear part, backwards -----------------------------------------------------------
    def transpose(self, a: torch.Tensor, in_shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """For output coefficients a (P, S, *shape): the coefficients of each tensor input, (P, S, *in_shape), so
        that a . f(z) = sum_k a_k . z_k + offset(a)."""
        p, s = a.shape[:2]
        kind = self.params.get("kind")
        if kind == "linear":
            return [a @ self.params["weight"]]
        if kind == "reshape":
            return [a.reshape(p, s, *in_shapes[0])]
        if kind == "add":
            return [a, a * self.params.get("sign", 1.0)]
        if kind == "cat":
            sizes = [shape[self.params["dim"] - 1 if self.params["dim"] > 0 else self.params["dim"]]
                     for shape in in_shapes]
            dim = self.params["dim"] + 1 if self.params["dim"] > 0 else self.params["dim"]
            return list(torch.split(a, sizes, dim=dim))
        if kind == "channel_affine":
            return [a * self.params["scale"].view([1, 1, -1] + [1] * (a.dim() - 3))]
        if kind == "conv" and self.params["padding_mode"] == "zeros" and not isinstance(self.params["padding"], str):
            return [_conv_transpose(self.params, a, in_shapes[0])]
        return self._autograd_transpose(a, in_shapes)

    def offset(self, a: torch.Tensor, in_shapes: list[tuple[int, ...]]) -> torch.Tensor:
        """a . f(0, ..., 0) per (P, S) row: the constant part's contribution."""
        kind = self.params.get("kind")
        if kind in ("reshape", "add", "cat"):
            return torch.zeros(a.shape[:2], dtype=a.dtype, device=a.device)
        if kind == "linear":
            bias = self.params["bias"]
            return a @ bias if bias is not None else torch.zeros(a.shape[:2], dtype=a.dtype, device=a.device)
        if kind == "channel_affine":
            shift = self.params["shift"].view([1, 1, -1] + [1] * (a.dim() - 3))
            return (a * shift).flatten(2).sum(2)
        zeros = [torch.zeros((1, *shape), dtype=a.dtype, device=a.device) for shape in in_shapes]
        with torch.no_grad() if not a.requires_grad else _nullcontext():
            constant = self.apply(*zeros)
        return (a * constant).flatten(2).sum(2)

    @property
    def has_squared(self) -> bool:
        kind = self.params.get("kind")
        return kind in ("linear", "reshape", "channel_affine") or (
            kind == "conv" and self.params["padding_mode"] == "zeros" and not isinstance(self.params["padding"], str))

    def squared(self, r2: torch.Tensor) -> torch.Tensor | None:
        """The map with squared coefficients applied to r2 (squared row norms carried forward), for the kinds
        where that is one cheap operation; None otherwise."""
        kind = self.params.get("kind")
        if kind == "linear":
            return r2 @ (self.params["weight"] ** 2).T
        if kind == "reshape":
            return self.abs_apply(r2)
        if kind == "channel_affine":
            return r2 * (self.params["scale"] ** 2).view([1, -1] + [1] * (r2.dim() - 2))
        if kind == "conv" and self.params["padding_mode"] == "zeros" and not isinstance(self.params["padding"], str):
            c = self.params
            conv = F.conv2d if r2.dim() == 4 else F.conv1d
            return conv(r2, c["weight"] ** 2, None, c["stride"], c["padding"], c["dilation"], c["groups"])
        return None

    def rows_at(self, cols: torch.Tensor, in_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The map's rows at the flat output positions `cols` (N,): coefficients on the input (N, *in_shape) and
        the constant, as transpose and offset give them for a one-hot `a`, without the dense transposed
        convolution of a one-hot (most of its work multiplies zeros). None where not implemented."""
        kind = self.params.get("kind")
        if kind == "linear":
            bias = self.params["bias"]
            w = self.params["weight"]
            return w[cols], (bias[cols] if bias is not None else torch.zeros(len(cols), dtype=w.dtype, device=w.device))
        if not (kind == "conv" and self.params["padding_mode"] == "zeros" and not isinstance(self.params["padding"], str)):
            return None
        c = self.params
        w = c["weight"]  # (C_out, C_in / groups, *kernel)
        spatial = w.dim() - 2
        out_sizes = self.shape[1:]
        per_channel = math.prod(out_sizes)
        channel = torch.div(cols, per_channel, rounding_mode="floor")
        rest = cols - channel * per_channel
        n, group_in = len(cols), w.shape[1]
        group = torch.div(channel, w.shape[0] // c["groups"], rounding_mode="floor")
        # flat input index of every kernel tap, and whether it falls inside the input (else it reads padding)
        index = ((group * group_in)[:, None] + torch.arange(group_in, device=w.device)).view(n, group_in,
                                                                                            *[1] * spatial)
        valid = torch.ones((n, 1, *[1] * spatial), dtype=torch.bool, device=w.device)
        for d in range(spatial):
            stride_after = math.prod(out_sizes[d + 1:])
            o = torch.div(rest, stride_after, rounding_mode="floor") % out_sizes[d]
            taps = o[:, None] * c["stride"][d] - c["padding"][d] + c["dilation"][d] * torch.arange(
                w.shape[2 + d], device=w.device)
            view = [n, 1] + [1] * spatial
            view[2 + d] = w.shape[2 + d]
            taps = taps.view(view)
            valid = valid & (taps >= 0) & (taps < in_shape[1 + d])
            index = index * in_shape[1 + d] + taps
        size = math.prod(in_shape)
        index = torch.where(valid, index, size).reshape(n, -1)  # padding taps go to a spare slot, dropped below
        out = torch.zeros((n, size + 1), dtype=w.dtype, device=w.device)
        out.scatter_(1, index, w[channel].reshape(n, -1))
        bias = c["bias"][channel] if c["bias"] is not None else torch.zeros(n, dtype=w.dtype, device=w.device)
        return out[:, :size].reshape(n, *in_shape), bias

    def _autograd_transpose(self, a: torch.Tensor, in_shapes) -> list[torch.Tensor]:
        p, s = a.shape[:2]
        with torch.enable_grad():
            zs = [torch.zeros((p * s, *shape), dtype=a.dtype, device=a.device, requires_grad=True)
                  for shape in in_shapes]
            out = self.apply(*zs)
            grads = torch.autograd.grad(out, zs, grad_outputs=a.reshape(p * s, *out.shape[1:]),
                                        create_graph=a.requires_grad, allow_unused=True)
        return [torch.zeros((p, s, *shape), dtype=a.dtype, device=a.device) if g is None else g.reshape(p, s, *shape)
                for g, shape in zip(grads, in_shapes)]


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _conv_transpose(c: dict, a: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """a . conv(z) as coefficients on z, by the transposed convolution (zero padding)."""
    p, s = a.shape[:2]
    flat = a.reshape(p * s, *a.shape[2:])
    spatial = len(in_shape) - 1
    out_sizes = a.shape[-spatial:]
    kernel = c["weight"].shape[2:]
    extra = tuple(in_shape[1 + d] - ((o - 1) * c["stride"][d] - 2 * c["padding"][d]
                                     + c["dilation"][d] * (kernel[d] - 1) + 1) for d, o in enumerate(out_sizes))
    transpose = F.conv_transpose2d if spatial == 2 else F.conv_transpose1d
    back = transpose(flat, c["weight"], None, c["stride"], c["padding"], extra, c["groups"], c["dilation"])
    return back.reshape(p, s, *in_shape)

@dataclass
class Network:
    nodes: list[Node]
    output: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[0].shape

    def describe(self) -> list[str]:
        return [f"{n.name}: {n.op}" for n in self.nodes[1:]]


def network_from(adapter) -> Network:
    """The adapter's module as a bound-propagation graph, its normalisation first."""
    if adapter.module is None:
        raise UsageError(f"{adapter.name} is a black-box model: certification needs its layers.")
    if adapter.input_shape is None:
        raise RuntimeError("bind the adapter to data first")
    d = adapter._domain
    example = adapter.normalise(adapter.probe_inputs())
    module = adapter.eager_module()
    if isinstance(module, torch.jit.ScriptModule):
        raise UsageError(f"Certification cannot read {adapter.name}: its TorchScript graph could not be read as "
                         f"operations ({'; '.join(adapter.notes) or 'unsupported'}). Give the model as a factory with "
                         f"weights ({arg('model')} pkg.mod:fn with {arg('weights')} w.pt). Supported: {SUPPORTED}.")
    return network_from_module(module, d.mean, d.std, example=example)


def network_from_module(module: nn.Module, mean: torch.Tensor | None = None, std: torch.Tensor | None = None, *,
                        example: torch.Tensor | None = None, input_shape: tuple[int, ...] | None = None) -> Network:
    """A module (after an optional per-channel normalisation) as a bound-propagation graph. The module's own
    parameters are used (not copies), so bounds are differentiable in them (IBP training)."""
    if isinstance(module, torch.jit.ScriptModule):
        if example is None:
            raise UsageError("Reading TorchScript for certification needs an example input.")
        try:
            module = eager_graph(module, example)
        except GraphUnavailable as exc:
            raise UsageError(f"Certification cannot read this TorchScript model: {exc}. Supported: {SUPPORTED}.") from None
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training:
                raise UsageError(f"BatchNorm must be in eval mode for certification ({type(m).__name__}); its batch "
                                 "statistics would make the bounds depend on the batch.")
            if m.running_mean is None:
                raise UsageError(f"{type(m).__name__} without running statistics (track_running_stats=False) "
                                 "normalises with the batch's statistics: certification does not support it.")
    try:
        gm = module if isinstance(module, fx.GraphModule) else fx.symbolic_trace(module)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means we cannot read the graph
        raise UsageError(f"Cannot read the layers of {type(module).__name__} for certification: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}. Supported: {SUPPORTED}.") from None
    if example is None:
        if input_shape is None:
            raise UsageError("Reading a module for certification needs an example input or its input shape.")
        example = torch.zeros((2, *input_shape))
    return _Reader(gm, mean, std).read(example)


# ----- reading an fx graph ----------------------------------------------------------------------------------

class _Reader:
    def __init__(self, gm: fx.GraphModule, mean, std):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.mean, self.std = mean, std
        self.nodes: list[Node] = []

    def read(self, example: torch.Tensor) -> Network:
        values: dict[fx.Node, Any] = {}  # concrete values on the example (shapes, constants)
        index: dict[fx.Node, int] = {}  # fx node -> our node, for tensors that depend on the input
        shapes: set[fx.Node] = set()  # sizes read off input-dependent tensors
        self.index = index
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                values[node] = example
                index[node] = self._add("input", node.name, [], tuple(example.shape[1:]), lambda: None)
                if self.mean is not None:
                    shape = [1, -1] + [1] * (example.dim() - 2)
                    scale, shift = 1 / self.std.flatten(), -self.mean.flatten() / self.std.flatten()
                    index[node] = self._add(
                        "affine", "normalisation", [index[node]], tuple(example.shape[1:]),
                        lambda z: z * scale.to(z).view(shape) + shift.to(z).view(shape),
                        lambda r: r * scale.abs().to(r).view(shape), kind="channel_affine", scale=scale, shift=shift)
                continue
            if node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node) or out not in index:
                    raise UsageError("The model's output must be one tensor of class scores for certification.")
                if values[out].dim() != 2:
                    raise UsageError(f"The network must end in class scores (N, K); it ends with shape "
                                     f"{tuple(values[out].shape)}.")
                return Network(self.nodes, index[out])
            args = fx.node.map_arg(node.args, lambda a: values[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: values[a])
            values[node] = self._evaluate(node, args, kwargs)
            tensor_inputs = [a for a in node.all_input_nodes if a in index]
            if not tensor_inputs:
                continue  # a constant or shape computation: a value, not part of the bound graph
            if self._reads_shape(node, shapes):
                shapes.add(node)  # x.size(0), x.shape[1], x.dim(): depends on the shape, never on the values
                continue
            index[node] = self._classify(node, tensor_inputs, index, values)
        raise UsageError("The model's graph has no output.")

    def _reads_shape(self, node: fx.Node, shapes: set) -> bool:
        if node.op == "call_method" and node.target in ("size", "dim"):
            return True
        if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
            return True
        return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
                and node.args[0] in shapes)

    def _evaluate(self, node: fx.Node, args, kwargs):
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            value = self.gm
            for part in node.target.split("."):
                value = getattr(value, part)
            return value
        raise UsageError(f"Certification cannot read fx node {node.op} {node.target}.")

    def _add(self, op, name, inputs, shape, apply, abs_apply=None, **params) -> int:
        self.nodes.append(Node(len(self.nodes), name, op, inputs, tuple(shape), apply, abs_apply, params))
        return len(self.nodes) - 1

    def _unsupported(self, node: fx.Node, what: str) -> UsageError:
        return UsageError(f"Certification does not support {what} (at {node.name}). Supported: {SUPPORTED}.")

    def _classify(self, node: fx.Node, tensor_inputs: list[fx.Node], index: dict, values: dict) -> int:
        shape = tuple(values[node].shape[1:]) if isinstance(values[node], torch.Tensor) else None
        if shape is None:
            raise self._unsupported(node, f"{node.target!s} producing a {type(values[node]).__name__} from the input")
        ins = [index[a] for a in tensor_inputs]
        name = node.name
        if node.op == "call_module":
            return self._module(node, self.modules[node.target], ins, shape)
        target = node.target
        if node.op == "call_method":
            target = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "flatten": torch.flatten,
                      "view": "reshape", "reshape": "reshape", "contiguous": "identity", "mean": torch.mean,
                      "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
                      "clone": "identity", "squeeze": "reshape", "unsqueeze": "reshape"}.get(node.target, node.target)
            if target == node.target:
                raise self._unsupported(node, f"the tensor method .{node.target}()")
        if target in (torch.relu, F.relu):
            return self._add("relu", name, ins, shape, torch.relu)
        if target in (torch.sigmoid, F.sigmoid):
            return self._add("sigmoid", name, ins, shape, torch.sigmoid)
        if target in (torch.tanh, F.tanh):
            return self._add("tanh", name, ins, shape, torch.tanh)
        if target is F.leaky_relu:
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
            return self._leaky(ins, name, shape, float(slope))
        if target in ("reshape", "identity", torch.flatten, torch.reshape) or target is nn.functional.dropout:
            return self._reshape(ins, name, shape)
        if target is torch.dropout:
            return self._reshape(ins, name, shape)
        if target in (operator.add, torch.add, operator.sub, torch.sub):
            return self._add_sub(node, ins, name, shape, values, negate=target in (operator.sub, torch.sub))
        if target in (operator.mul, torch.mul, operator.truediv, torch.div):
            return self._scale(node, ins, name, shape, values, divide=target in (operator.truediv, torch.div))
        if target is torch.cat:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            return self._cat(node, ins, name, shape, values, dim)
        if target is torch.mean:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            dims = [dims] if isinstance(dims, int) else list(dims)
            if dims is None or any(d % values[node.args[0]].dim() == 0 for d in dims):
                raise self._unsupported(node, "a mean over the batch dimension")
            return self._add("affine", name, ins, shape, lambda z: z.mean(dims, keepdim=keep),
                             lambda r: r.mean(dims, keepdim=keep))
        if target is F.max_pool2d:
            module = nn.MaxPool2d(*node.args[1:], **node.kwargs)
            return self._module(node, module, ins, shape)
        if target in (F.avg_pool2d, F.adaptive_avg_pool2d, F.avg_pool1d, F.adaptive_avg_pool1d):
            fn, extra_args, extra_kwargs = target, node.args[1:], node.kwargs
            return self._add("affine", name, ins, shape, lambda z: fn(z, *extra_args, **extra_kwargs),
                             lambda r: fn(r, *extra_args, **extra_kwargs))  # non-negative coefficients
        if target in (F.linear, F.conv1d, F.conv2d):
            if len(ins) != 1 or not self._varies(node.args[0]):
                raise self._unsupported(node, f"{target.__name__} whose weights depend on the input")
            args = fx.node.map_arg(node.args, lambda a: values[a])
            kwargs = fx.node.map_arg(node.kwargs, lambda a: values[a])
            if target is F.linear:
                weight, bias = args[1], (args[2] if len(args) > 2 else kwargs.get("bias"))
                return self._linear(name, ins, shape, weight, bias)
            names = ("weight", "bias", "stride", "padding", "dilation", "groups")
            conv = dict(zip(names, args[1:]), **kwargs)
            return self._conv(node, ins, shape, two_d=target is F.conv2d, padding_mode="zeros", **conv)
        raise self._unsupported(node, f"{getattr(target, '__name__', target)!s} ({node.op})")

    # ----- one rule per kind of layer ---------------------------------------------------------------------
    def _module(self, node: fx.Node, m: nn.Module, ins: list[int], shape) -> int:
        name = node.name
        if isinstance(m, (nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten)):
            return self._reshape(ins, name, shape) if not isinstance(m, (nn.Flatten, nn.Unflatten)) else \
                self._add("affine", name, ins, shape, m, m, kind="reshape")
        if isinstance(m, nn.ReLU):
            return self._add("relu", name, ins, shape, torch.relu)
        if isinstance(m, nn.LeakyReLU):
            return self._leaky(ins, name, shape, float(m.negative_slope))
        if isinstance(m, nn.Sigmoid):
            return self._add("sigmoid", name, ins, shape, torch.sigmoid)
        if isinstance(m, nn.Tanh):
            return self._add("tanh", name, ins, shape, torch.tanh)
        if isinstance(m, nn.Linear):
            return self._linear(name, ins, shape, m.weight, m.bias)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            return self._conv(node, ins, shape, two_d=isinstance(m, nn.Conv2d), weight=m.weight, bias=m.bias,
                              stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                              padding_mode=m.padding_mode)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            # eval mode: y = x * scale + shift per channel (computed from the live parameters: IBP training)
            gamma = m.weight if m.weight is not None else torch.ones_like(m.running_var)
            beta = m.bias if m.bias is not None else torch.zeros_like(m.running_mean)
            scale = gamma / torch.sqrt(m.running_var + m.eps)
            shift = beta - m.running_mean * scale

            def view(t, z):
                return t.view([1, -1] + [1] * (z.dim() - 2))
            return self._add("affine", name, ins, shape, lambda z: z * view(scale, z) + view(shift, z),
                             lambda r: r * view(scale.abs(), r), kind="channel_affine", scale=scale, shift=shift)
        if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)) and (pool := self._as_conv(m, ins)) is not None:
            return self._conv(node, ins, shape, two_d=True, **pool)
        if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AdaptiveAvgPool1d)):
            return self._add("affine", name, ins, shape, m, m)  # non-negative coefficients: radii pool as values
        if isinstance(m, nn.MaxPool2d):
            if m.ceil_mode or m.return_indices:
                raise self._unsupported(node, "MaxPool2d with ceil_mode=True or return_indices=True")
            return self._add("maxpool", name, ins, shape, m, in_shape=self.nodes[ins[0]].shape,
                             kernel=_pair(m.kernel_size),
                             stride=_pair(m.stride if m.stride is not None else m.kernel_size),
                             padding=_pair(m.padding), dilation=_pair(m.dilation))
        raise self._unsupported(node, type(m).__name__)

    def _as_conv(self, m: nn.Module, ins: list[int]) -> dict | None:
        """An average pooling as the depthwise convolution it is (weights 1/k^2), when it is one exactly: zero
        padding counted in the mean, no ceil_mode, no divisor override; an adaptive pooling whose input divides
        evenly. Bounds then take the convolution's fast paths. Other options stay a generic affine map."""
        in_shape = self.nodes[ins[0]].shape
        if len(in_shape) != 3:
            return None
        if isinstance(m, nn.AvgPool2d):
            if m.ceil_mode or not m.count_include_pad or m.divisor_override is not None:
                return None
            kernel, stride, padding = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
        else:
            out = _pair(m.output_size)
            out = tuple(o if o is not None else i for o, i in zip(out, in_shape[1:]))
            if any(i % o for i, o in zip(in_shape[1:], out)):
                return None
            kernel = stride = tuple(i // o for i, o in zip(in_shape[1:], out))
            padding = (0, 0)
        parameter = next(self.gm.parameters(), None)
        where = {"device": parameter.device, "dtype": parameter.dtype} if parameter is not None else {}
        weight = torch.full((in_shape[0], 1, *kernel), 1.0 / (kernel[0] * kernel[1]), **where)
        return dict(weight=weight, bias=None, stride=stride, padding=padding, dilation=1, groups=in_shape[0],
                    padding_mode="zeros")

    def _linear(self, name, ins, shape, weight, bias) -> int:
        return self._add("affine", name, ins, shape, lambda z: F.linear(z, weight, bias),
                         lambda r: r @ weight.abs().T, kind="linear", weight=weight, bias=bias)

    def _conv(self, node: fx.Node, ins: list[int], shape, *, two_d: bool, weight, bias=None, stride=1, padding=0,
              dilation=1, groups=1, padding_mode="zeros") -> int:
        spatial = 2 if two_d else 1
        conv = F.conv2d if two_d else F.conv1d
        as_tuple = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * spatial)
        stride, dilation = as_tuple(stride), as_tuple(dilation)
        padding = padding if isinstance(padding, str) else as_tuple(padding)
        if padding_mode == "zeros":
            def apply(z):
                return conv(z, weight, bias, stride, padding, dilation, groups)

            def abs_apply(r):
                return conv(r, weight.abs(), None, stride, padding, dilation, groups)
        else:
            if isinstance(padding, str):
                raise self._unsupported(node, f"a convolution with padding={padding!r} and padding_mode={padding_mode!r}")
            pad = [p for p in reversed(padding) for _ in range(2)]

            def apply(z):
                return conv(F.pad(z, pad, mode=padding_mode), weight, bias, stride, 0, dilation, groups)

            def abs_apply(r):
                # textbook interval arithmetic of pad-then-convolve: each padded entry is a copy of its source
                return conv(F.pad(r, pad, mode=padding_mode), weight.abs(), None, stride, 0, dilation, groups)
        return self._add("affine", node.name, ins, shape, apply, abs_apply, kind="conv", weight=weight, bias=bias,
                         stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=padding_mode)

    def _leaky(self, ins, name, shape, slope: float) -> int:
        if not 0 <= slope <= 1:
            raise UsageError(f"LeakyReLU with negative_slope {slope} (at {name}): certification supports slopes in "
                             "[0, 1].")
        return self._add("leaky_relu", name, ins, shape, lambda z: F.leaky_relu(z, slope), slope=slope)

    def _reshape(self, ins, name, shape) -> int:
        target = tuple(shape)
        return self._add("affine", name, ins, shape, lambda z: z.reshape(len(z), *target),
                         lambda r: r.reshape(len(r), *target), kind="reshape")

    def _varies(self, arg) -> bool:
        """The argument is a tensor that depends on the input."""
        return isinstance(arg, fx.Node) and arg in self.index

    def _add_sub(self, node, ins, name, shape, values, negate: bool) -> int:
        a, b = node.args[0], node.args[1]
        sign = -node.kwargs.get("alpha", 1) if negate else node.kwargs.get("alpha", 1)
        if len(ins) == 2:
            return self._add("affine", name, ins, shape, lambda p, q: p + sign * q,
                             lambda p, q: p + abs(sign) * q, kind="add", sign=float(sign))
        # one input-dependent tensor and a constant (a number, or a tensor that does not depend on the input)
        if self._varies(a):
            const = values[b].detach() if isinstance(values[b], torch.Tensor) else values[b]
            return self._add("affine", name, ins, shape, lambda p: p + sign * const, lambda r: r)
        const = values[a].detach() if isinstance(values[a], torch.Tensor) else values[a]
        return self._add("affine", name, ins, shape, lambda q: const + sign * q, lambda r: abs(sign) * r)

    def _scale(self, node, ins, name, shape, values, divide: bool) -> int:
        a, b = node.args[0], node.args[1]
        if len(ins) != 1:
            raise self._unsupported(node, "a product (or quotient) of two tensors that depend on the input")
        if divide and not self._varies(a):
            raise self._unsupported(node, "division by a tensor that depends on the input")
        const = values[b] if self._varies(a) else values[a]
        const = const.detach() if isinstance(const, torch.Tensor) else const
        factor = (1.0 / const) if divide else const
        magnitude = factor.abs() if isinstance(factor, torch.Tensor) else abs(factor)
        return self._add("affine", name, ins, shape, lambda p: p * factor, lambda r: r * magnitude)

    def _cat(self, node, ins, name, shape, values, dim: int) -> int:
        tensors = node.args[0]
        if len(ins) != len(tensors):
            raise self._unsupported(node, "concatenating input-dependent tensors with constants")
        if dim == 0 or (dim < 0 and dim == -values[node].dim()):
            raise self._unsupported(node, "concatenation along the batch dimension")
        return self._add("affine", name, ins, shape, lambda *zs: torch.cat(zs, dim), lambda *rs: torch.cat(rs, dim),
                         kind="cat", dim=dim)
