"""A model's computation as a torch.fx GraphModule of eager modules, whatever form the model came in.

Python modules are traced with torch.fx (torch.nn leaf modules stay modules). TorchScript modules are read
from their graphs: a call of a torch.nn leaf module becomes an eager copy of that module with the same
weights, a call of any other submodule or method is inlined, a TorchScript builtin becomes the torch function
it names. Control flow (prim::If, prim::Loop) and anything else without a meaning here is refused by name.
The result is checked against the original on probe inputs before anyone uses it.

Attribution reads TorchScript through this (its factored per-example gradients need real Linear and Conv2d
modules), and certification reads every model through it (a bound rule per operation).
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["GraphUnavailable", "eager_graph"]


class GraphUnavailable(Exception):
    """The model's computation cannot be read as a graph of known operations; the message says why."""


def eager_graph(module: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """`module` as an eager fx GraphModule computing the same function (checked on `example` and a perturbed
    copy). Raises GraphUnavailable with the reason otherwise."""
    if isinstance(module, torch.jit.ScriptModule):
        gm = _from_torchscript(module)
    else:
        try:
            gm = fx.symbolic_trace(module)
        except Exception as exc:  # noqa: BLE001 - any tracing failure means the graph cannot be read
            raise GraphUnavailable(f"torch.fx cannot trace {type(module).__name__}: {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    gm.eval()
    _check_same(module, gm, example)
    return gm


def _check_same(module: nn.Module, gm: fx.GraphModule, example: torch.Tensor) -> None:
    probes = [example, example + 0.01 * torch.randn(example.shape, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        for probe in probes:
            want, got = module(probe), gm(probe)
            want = want[0] if isinstance(want, (tuple, list)) else want
            got = got[0] if isinstance(got, (tuple, list)) else got
            if not isinstance(got, torch.Tensor) or got.shape != want.shape or not torch.allclose(
                    got.float(), want.float(), rtol=1e-4, atol=1e-5 * (1 + float(want.abs().max()))):
                raise GraphUnavailable("the graph read from the model does not compute what the model computes")


# ----- TorchScript ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Module:
    """A scripted (sub)module met in a graph, with its qualified name."""

    script: torch.jit.ScriptModule
    path: str


@dataclass(frozen=True)
class _Function:
    name: str


# TorchScript builtins (aten::<name>) and the torch functions that compute them with the same positional arguments.
_BUILTINS = {
    "relu": torch.relu, "relu_": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "flatten": torch.flatten,
    "reshape": torch.reshape, "view": torch.reshape, "cat": torch.cat, "linear": F.linear, "conv1d": F.conv1d,
    "conv2d": F.conv2d, "max_pool2d": F.max_pool2d, "avg_pool2d": F.avg_pool2d,
    "adaptive_avg_pool2d": F.adaptive_avg_pool2d, "batch_norm": torch.batch_norm, "leaky_relu": F.leaky_relu,
    "leaky_relu_": F.leaky_relu, "softmax": torch.softmax, "log_softmax": torch.log_softmax, "mean": torch.mean,
    "matmul": torch.matmul, "transpose": torch.transpose, "permute": torch.permute, "squeeze": torch.squeeze,
    "unsqueeze": torch.unsqueeze, "dropout": torch.dropout, "clamp": torch.clamp, "pad": F.pad,
    "contiguous": lambda x, memory_format=None: x.contiguous(),
}
# Builtins that work on tensors or on plain numbers (sizes): a tensor op when a tensor is involved.
_ARITHMETIC = {"add": (torch.add, operator.add), "sub": (torch.sub, operator.sub), "mul": (torch.mul, operator.mul),
               "div": (torch.div, operator.truediv), "floordiv": (None, operator.floordiv),
               "neg": (torch.neg, operator.neg)}
_SCALAR_KINDS = ("IntType", "FloatType", "BoolType", "NumberType")


def _from_torchscript(script: torch.jit.ScriptModule) -> fx.GraphModule:
    reader = _Reader(script)
    graph = reader.graph
    x = graph.placeholder("x")
    out = reader.inline(script.graph, [_Module(script, ""), x])
    graph.output(out[0] if len(out) == 1 else tuple(out))
    return fx.GraphModule(reader.root, graph)


class _Reader:
    def __init__(self, script: torch.jit.ScriptModule):
        self.graph = fx.Graph()
        self.root: dict[str, object] = {}
        self.leaves: dict[str, nn.Module] = {}

    def inline(self, ts_graph, inputs: list) -> list:
        env = {v.unique(): val for v, val in zip(ts_graph.inputs(), inputs)}
        for node in ts_graph.nodes():
            outs = list(node.outputs())
            values = self.node(node, [env[v.unique()] for v in node.inputs()])
            if len(outs) == 1:
                env[outs[0].unique()] = values
            elif outs:
                for k, out in enumerate(outs):
                    env[out.unique()] = values[k]
        return [env[v.unique()] for v in ts_graph.outputs()]

    def node(self, node, args: list):
        kind = node.kind()
        if kind == "prim::Constant":
            out = node.output()
            if out.type().kind() == "FunctionType":
                return _Function(node.s("name"))
            return out.toIValue()
        if kind == "prim::GetAttr":
            return self.attribute(args[0], node.s("name"))
        if kind == "prim::CallMethod":
            return self.call_method(args[0], node.s("name"), args[1:], node)
        if kind == "prim::CallFunction":
            return self.call_function(args[0], args[1:])
        if kind in ("prim::ListConstruct", "prim::TupleConstruct"):
            return list(args) if kind == "prim::ListConstruct" else tuple(args)
        if kind in ("prim::ListUnpack", "prim::TupleUnpack"):
            seq = args[0]
            n = len(list(node.outputs()))
            return list(seq) if isinstance(seq, (list, tuple)) else [
                self.graph.call_function(operator.getitem, (seq, k)) for k in range(n)]
        if kind == "prim::TupleIndex" or kind == "aten::__getitem__":
            return args[0][args[1]] if isinstance(args[0], (list, tuple)) and isinstance(args[1], int) else \
                self.graph.call_function(operator.getitem, (args[0], args[1]))
        if kind in ("prim::NumToTensor", "aten::Int", "aten::Float", "aten::ScalarImplicit"):
            return args[0]  # sizes stay numbers: what follows (view, reshape) takes them as numbers
        if kind == "aten::size":
            return self.graph.call_method("size", tuple(args))
        if kind == "aten::dim":
            return self.graph.call_method("dim", tuple(args))
        if kind.startswith("aten::"):
            return self.builtin(kind[6:], args, node)
        raise GraphUnavailable(f"the TorchScript graph uses {kind}, which brittle cannot read "
                               "(control flow or an unsupported construct)")

    def attribute(self, owner, name: str):
        if not isinstance(owner, _Module):
            raise GraphUnavailable(f"the TorchScript graph reads attribute {name!r} of a value that is not a module")
        value = getattr(owner.script, name)
        path = f"{owner.path}.{name}" if owner.path else name
        if isinstance(value, torch.jit.ScriptModule):
            return _Module(value, path)
        if isinstance(value, torch.Tensor):
            key = path.replace(".", "_")
            if key not in self.root:
                self.root[key] = nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad) \
                    if isinstance(value, nn.Parameter) else value.detach().clone()
            return self.graph.get_attr(key)
        return value  # a number, flag or list: a constant of the graph

    def call_method(self, owner, name: str, args: list, node):
        if not isinstance(owner, _Module):
            raise GraphUnavailable(f"the TorchScript graph calls method {name!r} on something that is not a module")
        if name == "forward":
            leaf = self.leaf(owner)
            if leaf is not None:
                return self.graph.call_module(leaf, tuple(args))
        method = getattr(owner.script, name)
        out = self.inline(method.graph, [owner, *args])
        return out[0] if len(out) == 1 else tuple(out)

    def leaf(self, owner: _Module) -> str | None:
        """The qualified name of an eager copy of a torch.nn module without children, or None."""
        script = owner.script
        name = getattr(script, "original_name", "")
        qualified = script._c._type().qualified_name()
        if not qualified.startswith("__torch__.torch.nn.modules.") or any(True for _ in script.children()):
            return None
        cls = getattr(nn, name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            return None
        key = owner.path.replace(".", "_") or "root"
        if key not in self.leaves:
            kwargs = {}
            for param in list(inspect.signature(cls.__init__).parameters)[1:]:
                if param in ("device", "dtype"):
                    continue
                if param == "bias":
                    kwargs["bias"] = getattr(script, "bias", None) is not None
                elif param == "affine":
                    kwargs["affine"] = getattr(script, "weight", None) is not None
                elif hasattr(script, param):
                    kwargs[param] = getattr(script, param)
            try:
                module = cls(**kwargs)
                module.load_state_dict(script.state_dict())
            except Exception as exc:  # noqa: BLE001 - a module we cannot rebuild exactly is not read at all
                raise GraphUnavailable(f"cannot rebuild {name} ({owner.path}) from TorchScript: {exc}") from None
            self.leaves[key] = module.eval()
            self.root[key] = self.leaves[key]
        return key

    def call_function(self, fn, args: list):
        if not isinstance(fn, _Function):
            raise GraphUnavailable("the TorchScript graph calls a function value brittle cannot resolve")
        target = getattr(F, fn.name, None)
        if fn.name == "_max_pool2d":
            target = F.max_pool2d
        if target is None:
            raise GraphUnavailable(f"the TorchScript graph calls the function {fn.name!r}, which brittle cannot read")
        return self.graph.call_function(target, tuple(args))

    def builtin(self, name: str, args: list, node):
        scalar = node.output().type().kind() in _SCALAR_KINDS if node.outputsSize() == 1 else False
        if name in _ARITHMETIC:
            tensor_fn, number_fn = _ARITHMETIC[name]
            if scalar or tensor_fn is None:
                return self.graph.call_function(number_fn, tuple(args[:2] if name != "neg" else args[:1]))
            if name in ("add", "sub") and len(args) == 3:
                return self.graph.call_function(tensor_fn, (args[0], args[1]), {"alpha": args[2]})
            return self.graph.call_function(tensor_fn, tuple(args[:2] if name != "neg" else args[:1]))
        target = _BUILTINS.get(name)
        if target is None:
            target = getattr(torch, name, None)
        if target is None or not callable(target):
            raise GraphUnavailable(f"the TorchScript graph uses aten::{name}, which brittle cannot read")
        return self.graph.call_function(target, tuple(args))
