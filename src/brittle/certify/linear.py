"""Linear bound propagation: CROWN (Zhang et al. 2018) and alpha-CROWN (Xu et al. 2021) over a graph.

A lower bound on a . z_start is propagated backwards through the graph: affine nodes pass coefficients to their
inputs exactly (a vector-Jacobian product), nonlinear nodes replace themselves by linear bounds valid on their
input's interval, and at the input the linear function is minimised over the input set (the Linf or L2 ball
clipped to the input bounds). Upper bounds are lower bounds of -a.

Intermediate bounds: every nonlinear node needs bounds on its input. They are computed in topological order,
each by CROWN from that node back to the input (so affine layers before the first nonlinearity compose exactly
rather than being bounded layer by layer) and intersected with interval bounds. Only neurons that could change
the relaxation are bounded by CROWN (a ReLU neuron whose interval is on one side of zero is exact already);
they are batched as (input, neuron) pairs across the whole batch. A convolution neuron's coefficients are carried
on its receptive field only (window.py) when every operation on its way back to the input allows it.

alpha-CROWN optimises the lower slopes of ReLU and LeakyReLU relaxations (any slope in the valid range is
sound, so every iterate's bound is a certificate): one slope set per margin for the final bound, and, in full
mode, one per intermediate bound too (per input, per neuron bounded, per direction), the intermediate bounds
being recomputed each step from their own slopes and the best seen kept (Adam, as auto_LiRPA does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .interval import input_box, interval_pass, monotone, specification
from .network import NONLINEAR, Network, Node
from .window import window_bounds, window_size, windowable

__all__ = ["crown_margins", "alpha_crown_margins", "Problem"]

PAIR_BUDGET = 6_000_000  # floats per coefficient tensor in a batch of (input, neuron) pairs


# ----- relaxations ------------------------------------------------------------------------------------------

def _relaxation(node: Node, lo: torch.Tensor, hi: torch.Tensor):
    """Linear bounds valid on [lo, hi] for an elementwise node. ReLU-like: (unstable, CROWN's lower slope,
    upper slope, upper intercept), the lower intercept being 0 and alpha-CROWN's slopes replacing the lower slope
    where unstable. Sigmoid-like: (lower slope, lower intercept, upper slope, upper intercept)."""
    if node.op in ("relu", "leaky_relu"):
        s = node.params.get("slope", 0.0)
        unstable = (lo < 0) & (hi > 0)
        stable_slope = torch.where(lo >= 0, 1.0, s).to(lo)
        width = (hi - lo).clamp_min(1e-12)
        up_slope = torch.where(unstable, (hi - s * lo) / width, stable_slope)
        up_icpt = torch.where(unstable, (s - 1) * hi * lo / width, torch.zeros_like(lo))
        adaptive = torch.where(hi > -lo, 1.0, s).to(lo)  # CROWN's choice, the area-minimising one
        low_slope = torch.where(unstable, adaptive, stable_slope)
        return unstable, low_slope, up_slope, up_icpt
    f, df = (torch.sigmoid, lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z))) if node.op == "sigmoid" else \
        (torch.tanh, lambda z: 1 - torch.tanh(z) ** 2)
    return _s_shaped(lo, hi, f, df)


def _s_shaped(lo, hi, f, df):
    """Sound linear bounds of a sigmoid-like function (convex below 0, concave above) on [lo, hi]: chords where the
    function is convex (above) or concave (below), tangents at the midpoint on the other side, and for intervals
    across 0 the tangent lines through an endpoint (CROWN's construction), the chord when that tangent would touch
    outside the interval."""
    lo, hi = lo.clamp(-30, 30), hi.clamp(-30, 30)
    hi = torch.maximum(hi, lo + 1e-6)
    flo, fhi = f(lo), f(hi)
    chord = (fhi - flo) / (hi - lo)
    mid = (lo + hi) / 2
    tan_slope, tan_icpt = df(mid), f(mid) - df(mid) * mid
    chord_icpt_lo = flo - chord * lo
    # upper bound: chord where convex (hi <= 0); tangent where concave (lo >= 0); across 0, the tangent at d >= 0
    # through (lo, f(lo))
    d_up = _tangent_through(lo, f, df, positive=True, limit=hi)
    up_t_slope = df(d_up)
    up_t_icpt = f(lo) - up_t_slope * lo
    up_cross_ok = d_up <= hi
    up_slope = torch.where(hi <= 0, chord, torch.where(lo >= 0, tan_slope, torch.where(up_cross_ok, up_t_slope, chord)))
    up_icpt = torch.where(hi <= 0, chord_icpt_lo, torch.where(lo >= 0, tan_icpt,
                                                              torch.where(up_cross_ok, up_t_icpt, chord_icpt_lo)))
    # lower bound: tangent where convex, chord where concave; across 0, the tangent at d <= 0 through (hi, f(hi))
    d_low = _tangent_through(hi, f, df, positive=False, limit=lo)
    low_t_slope = df(d_low)
    low_t_icpt = f(hi) - low_t_slope * hi
    low_cross_ok = d_low >= lo
    low_slope = torch.where(hi <= 0, tan_slope, torch.where(lo >= 0, chord, torch.where(low_cross_ok, low_t_slope, chord)))
    low_icpt = torch.where(hi <= 0, tan_icpt, torch.where(lo >= 0, chord_icpt_lo,
                                                           torch.where(low_cross_ok, low_t_icpt, chord_icpt_lo)))
    # A hair of slack for the float error of the bisection and the tangent arithmetic.
    return low_slope, low_icpt - 1e-6, up_slope, up_icpt + 1e-6


def _tangent_through(p, f, df, *, positive: bool, limit):
    """The point d (>= 0 if positive, else <= 0) whose tangent passes through (p, f(p)), by bisection, on the side
    where the tangent line is an upper bound at p (positive) or a lower bound at p (negative)."""
    lo_d = torch.zeros_like(p) if positive else torch.full_like(p, -30.0)
    hi_d = torch.full_like(p, 30.0) if positive else torch.zeros_like(p)
    for _ in range(40):
        d = (lo_d + hi_d) / 2
        gap = f(d) + df(d) * (p - d) - f(p)  # the tangent at d, evaluated at p, minus f(p)
        move_up = gap < 0 if positive else gap <= 0
        lo_d, hi_d = torch.where(move_up, d, lo_d), torch.where(move_up, hi_d, d)
    return hi_d if positive else lo_d


# ----- the problem: an input set, intermediate bounds, backward passes ----------------------------------------

class Problem:
    """Bounds of one batch: the input set and the bounds of every nonlinear node's input.

    Rows of a backward pass are (input, neuron) pairs; `rows` says which input each row belongs to: None (row i is
    input i), an int (every row is that input: relaxations broadcast, nothing is gathered) or an index tensor."""

    def __init__(self, net: Network, x: torch.Tensor, eps: float, bounds, norm: str):
        if norm not in ("Linf", "L2"):
            raise UsageError(f"The 'norm' parameter must be 'Linf' or 'L2'; got {norm!r}.")
        self.net, self.x, self.eps, self.norm = net, x, eps, norm
        self.x_lo, self.x_hi = input_box(x, eps, bounds)  # the L2 ball lies inside this box too
        self.l2 = eps if norm == "L2" else None
        self.shapes = [n.shape for n in net.nodes]
        self.pre: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # node index -> bounds of its output
        self.needs = sorted({n.inputs[0] for n in net.nodes if n.op in NONLINEAR})
        self.exact = _interval_exact(net)
        self._relaxed: dict[int, tuple] = {}  # node index -> its relaxation on the whole batch

    def subset(self, keep: torch.Tensor) -> "Problem":
        """The same problem for the inputs `keep` (indices), its intermediate bounds kept: a later, tighter method
        on the points an earlier one left unproven starts from here."""
        sub = Problem.__new__(Problem)
        sub.__dict__.update(self.__dict__)
        sub.x, sub.x_lo, sub.x_hi = self.x[keep], self.x_lo[keep], self.x_hi[keep]
        sub.pre = {p: (lo[keep], hi[keep]) for p, (lo, hi) in self.pre.items()}
        sub._relaxed = {n: tuple(t[keep] for t in parts) for n, parts in self._relaxed.items()}
        if hasattr(self, "candidates"):
            sub.candidates = {p: c[keep] for p, c in self.candidates.items()}
        return sub

    # ----- relaxations, once per node and batch ---------------------------------------------------------------
    def set_bounds(self, p: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.pre[p] = (lo, hi)
        for node in self.net.nodes:
            if node.op in NONLINEAR and node.inputs[0] == p:
                self._relaxed[node.index] = (_maxpool_choice(node, lo, hi) if node.op == "maxpool"
                                             else _relaxation(node, lo, hi))

    def _relaxation_rows(self, node: Node, rows, alpha: torch.Tensor | None):
        parts = [_take(t, rows) for t in self._relaxed[node.index]]
        if node.op in ("relu", "leaky_relu"):
            unstable, low_slope, up_slope, up_icpt = parts
            if alpha is not None:  # (positions, slopes (P, S, U)): optimised slopes where unstable
                positions, values = alpha
                p, k = values.shape[:2]
                # CROWN's slope where a neuron has no optimised one (unstable only after the slopes were set up,
                # by float noise): always a valid slope, where 0 would not be for a LeakyReLU
                crown = low_slope[:, None].expand(len(low_slope), k, *node.shape).reshape(-1, k, math.prod(node.shape))
                dense = crown.expand(p, -1, -1).index_copy(2, positions, values).view(p, k, *node.shape)
                low_slope = torch.where(unstable[:, None], dense, low_slope[:, None])
            else:
                low_slope = low_slope[:, None]
            return low_slope, None, up_slope[:, None], up_icpt[:, None]
        return tuple(t[:, None] for t in parts)

    # ----- backward ------------------------------------------------------------------------------------------
    def backward(self, start: int, a: torch.Tensor, rows=None,
                 alphas: dict[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Coefficients a (P, S, *shape of start) carried back to the input: (A, bias) with a lower bound on
        a . z_start equal to min over the input set of A . x + bias. `alphas[node]` are optimised lower
        slopes of a ReLU-like node: (positions (U,), slopes (P, S, U)) at the flat positions where it may be
        unstable."""
        acc = {start: a}
        bias = torch.zeros(a.shape[:2], dtype=a.dtype, device=a.device)
        result = None
        for node in reversed(self.net.nodes[: start + 1]):
            coeff = acc.pop(node.index, None)
            if coeff is None:
                continue
            if node.op == "input":
                result = coeff
                continue
            in_shapes = [self.shapes[i] for i in node.inputs]
            if node.op == "affine":
                bias = bias + node.offset(coeff, in_shapes)
                for i, c in zip(node.inputs, node.transpose(coeff, in_shapes)):
                    acc[i] = c if i not in acc else acc[i] + c
                continue
            if node.op == "maxpool":
                c, b = _maxpool_backward(node, coeff, [_take(t, rows) for t in self._relaxed[node.index]])
            else:
                alpha = None if alphas is None else alphas.get(node.index)
                low_slope, low_icpt, up_slope, up_icpt = self._relaxation_rows(node, rows, alpha)
                pos, neg = coeff.clamp_min(0), coeff.clamp_max(0)
                c = pos * low_slope + neg * up_slope
                b = (neg * up_icpt).flatten(2).sum(2)
                if low_icpt is not None:
                    b = b + (pos * low_icpt).flatten(2).sum(2)
            bias = bias + b
            i = node.inputs[0]
            acc[i] = c if i not in acc else acc[i] + c
        if result is None:  # the start does not depend on the input
            result = torch.zeros((*a.shape[:2], *self.shapes[0]), dtype=a.dtype, device=a.device)
        return result, bias

    def concretise(self, a: torch.Tensor, bias: torch.Tensor, rows=None) -> torch.Tensor:
        """min over the input set of a . x + bias, per (P, S) row."""
        x_lo, x_hi, x = (_take(t, rows)[:, None] for t in (self.x_lo, self.x_hi, self.x))
        box = (a.clamp_min(0) * x_lo + a.clamp_max(0) * x_hi).flatten(2).sum(2) + bias
        if self.l2 is None:
            return box
        # the L2 ball clipped to the box lies in both: the larger of the two lower bounds is sound
        ball = (a * x).flatten(2).sum(2) + bias - self.l2 * a.flatten(2).norm(dim=2)
        return torch.maximum(box, ball)

    # ----- intermediate bounds -------------------------------------------------------------------------------
    def intermediate(self, *, alphas: dict | None = None, keep: dict | None = None) -> None:
        """Bounds of every nonlinear node's input, in topological order, by CROWN on the neurons that need it,
        intersected with interval bounds (and with `keep`, the best bounds seen earlier). With `alphas`
        ({start node: {relu node: (pairs, 2, *shape)}}), the neurons bounded are the ones chosen the first time
        (`self.candidates`), so that each pair keeps its own slopes."""
        self.pre, self._relaxed = {}, {}
        interval = interval_pass(self.net, self.x_lo, self.x_hi, upto=(self.needs[-1] + 1) if self.needs else 0,
                                 l2=None if self.l2 is None else (self.x, self.l2))
        first = not hasattr(self, "candidates")
        if first:
            self.candidates = {}
        for p in self.needs:
            lo, hi = _interval_at(self.net, p, interval, self.pre, self.x, self.l2)
            if first:
                consumers = [n for n in self.net.nodes if n.op in NONLINEAR and n.inputs[0] == p]
                if p in self.exact or _follows_bounds(self.net, p):
                    # exact intervals, or an activation's output: its input's bounds mapped through it (as
                    # auto_LiRPA's ibp_intermediate), CROWN would not be tighter
                    self.candidates[p] = torch.zeros_like(lo, dtype=torch.bool)
                elif all(n.op in ("relu", "leaky_relu") and not _feeds_relaxation(self.net, n.index)
                         for n in consumers):
                    self.candidates[p] = (lo < 0) & (hi > 0)  # a neuron on one side of 0 is exact already
                else:
                    self.candidates[p] = torch.ones_like(lo, dtype=torch.bool)
            if keep is not None and p in keep:
                lo, hi = torch.maximum(lo, keep[p][0]), torch.minimum(hi, keep[p][1])
            candidates = self.candidates[p]
            if bool(candidates.any()):
                c_lo, c_hi = self.crown_of(p, candidates, None if alphas is None else alphas.get(p))
                lo = torch.where(candidates, torch.maximum(lo, c_lo), lo)
                hi = torch.where(candidates, torch.minimum(hi, c_hi), hi)
            self.set_bounds(p, lo, hi)

    def crown_of(self, p: int, candidates: torch.Tensor, alpha_sets=None) -> tuple[torch.Tensor, torch.Tensor]:
        """CROWN lower and upper bounds of node p's output at the `candidates` (B, *shape) neurons (elsewhere
        -inf and +inf), computed in chunks of (input, neuron) pairs."""
        b = len(candidates)
        flat = candidates.reshape(b, -1)
        rows, cols = torch.nonzero(flat, as_tuple=True)  # sorted by input
        lo = torch.full(flat.shape, -math.inf, dtype=self.x.dtype, device=self.x.device)
        hi = torch.full(flat.shape, math.inf, dtype=self.x.dtype, device=self.x.device)
        windows = windowable(self.net, p)  # a convolution neuron: its window only
        widest = window_size(self, p) if windows and len(rows) else max(math.prod(s) for s in self.shapes[: p + 1])
        chunk = max(1, PAIR_BUDGET // (2 * widest))
        values = []
        for s in range(0, len(rows), chunk):
            r, c = rows[s: s + chunk], cols[s: s + chunk]
            alphas = None
            if alpha_sets is not None:
                alphas = {node: (where, slopes[s: s + chunk]) for node, (where, slopes) in alpha_sets.items()}
            if windows:
                values.append(window_bounds(self, p, r, c, alphas=alphas))
                continue
            which = int(r[0]) if bool(r[0] == r[-1]) else r  # one input: its relaxations broadcast
            start, first = self._rows_of(p, c)
            if first is not None:  # the neuron's own row of weights, then back from the layer's input
                w, const = first
                coeff, bias = self.backward(start, torch.stack([w, -w], 1), rows=which, alphas=alphas)
                bias = bias + torch.stack([const, -const], 1)
            else:
                a = torch.zeros((len(r), 2, flat.shape[1]), dtype=self.x.dtype, device=self.x.device)
                a[torch.arange(len(r)), 0, c] = 1.0
                a[torch.arange(len(r)), 1, c] = -1.0
                coeff, bias = self.backward(p, a.reshape(len(r), 2, *self.shapes[p]), rows=which, alphas=alphas)
            values.append(self.concretise(coeff, bias, rows=which))
        if values:
            v = torch.cat(values)
            lo = lo.index_put((rows, cols), v[:, 0])
            hi = hi.index_put((rows, cols), -v[:, 1])
        return lo.reshape(candidates.shape), hi.reshape(candidates.shape)

    def _rows_of(self, p: int, cols: torch.Tensor):
        """(input node, (rows, constants)) of node p's map at the flat positions `cols` when p is a Linear or a
        convolution, optionally followed by a per-channel affine map (BatchNorm); else (p, None)."""
        node = self.net.nodes[p]
        if node.op != "affine" or len(node.inputs) != 1:
            return p, None
        if node.params.get("kind") != "channel_affine":
            return node.inputs[0], node.rows_at(cols, self.shapes[node.inputs[0]])
        inner = self.net.nodes[node.inputs[0]]  # p depends on inner's input through inner alone
        if inner.op != "affine" or len(inner.inputs) != 1:
            return p, None
        first = inner.rows_at(cols, self.shapes[inner.inputs[0]])
        if first is None:
            return p, None
        channel = torch.div(cols, math.prod(node.shape[1:]), rounding_mode="floor")
        scale, shift = node.params["scale"][channel], node.params["shift"][channel]
        w, const = first
        return inner.inputs[0], (w * scale.view(-1, *[1] * (w.dim() - 1)), const * scale + shift)

    # ----- the margins ---------------------------------------------------------------------------------------
    def margins(self, y: torch.Tensor, alphas: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        spec = specification(y, self.shapes[self.net.output][0]).to(self.x.dtype)
        coeff, bias = self.backward(self.net.output, spec, alphas=alphas)
        return self.concretise(coeff, bias)


def _take(t: torch.Tensor, rows):
    """The rows' slice of a per-input tensor (B, ...): all of it, one input (kept as a batch of 1), or a gather."""
    if rows is None:
        return t
    if isinstance(rows, int):
        return t[rows: rows + 1]
    return t[rows]


def _feeds_relaxation(net: Network, p: int) -> bool:
    """Node p's output bounds themselves shape a later relaxation: it reaches a nonlinear node (a MaxPool's window
    choice and its constant upper bound use every input's bounds) through reshapes only. Then a stable ReLU's bounds
    matter too, not only whether it is stable."""
    for node in net.nodes:
        if p in node.inputs:
            if node.op in NONLINEAR:
                return True
            if node.op == "affine" and node.params.get("kind") == "reshape" and _feeds_relaxation(net, node.index):
                return True
    return False


def _follows_bounds(net: Network, p: int) -> bool:
    """Node p is an elementwise activation (or a reshape of one): its bounds are its input's bounds mapped through
    it, and its input's bounds are known by then."""
    node = net.nodes[p]
    if node.op in ("relu", "leaky_relu", "sigmoid", "tanh"):
        return True
    return node.op == "affine" and node.params.get("kind") == "reshape" and _follows_bounds(net, node.inputs[0])


def _interval_exact(net: Network) -> set[int]:
    """Nodes whose interval bounds are as tight as CROWN's: at most one mixing affine map between them and the
    input (elementwise scalings and reshapes do not count), each a Linear or zero-padded convolution (a padding mode
    that copies inputs makes a row use one input twice, and interval arithmetic then counts it twice). Over a box
    each neuron's bound is then attained; over an L2 ball, interval_pass bounds them by their rows' norms, which is
    CROWN's concretisation too."""
    mixing: dict[int, int] = {}
    for node in net.nodes:
        if node.op == "input":
            mixing[node.index] = 0
        elif node.op == "affine" and len(node.inputs) == 1 and node.inputs[0] in mixing:
            if not node.has_squared:
                continue
            elementwise = node.params.get("kind") in ("reshape", "channel_affine")
            mixing[node.index] = mixing[node.inputs[0]] + (0 if elementwise else 1)
    return {i for i, m in mixing.items() if m <= 1}


def _interval_at(net: Network, p: int, interval: list, known: dict, x: torch.Tensor, l2: float | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval bounds of node p, recomputed from the tightened bounds in `known` where they are tighter."""
    if not known:
        return interval[p]
    tightened = interval_pass(net, interval[0][0], interval[0][1], upto=p + 1, tightened=known,
                              l2=None if l2 is None else (x, l2))
    return tightened[p]


def _maxpool_choice(node: Node, lo: torch.Tensor, hi: torch.Tensor):
    """auto_LiRPA's relaxation of max over each window, from the bounds of its inputs: below, the window's input
    with the largest lower bound (max >= it); above, that input when its lower bound is at least every other
    input's upper bound (the max is that input), otherwise the constant largest upper bound. Returns, per
    window, the chosen input's flat position, whether it dominates, and the largest upper bound."""
    kernel, stride, padding, dilation = (node.params[k] for k in ("kernel", "stride", "padding", "dilation"))
    b, c, h, w = lo.shape
    pad = (padding[1], padding[1], padding[0], padding[0])
    k = kernel[0] * kernel[1]
    lo_u = F.unfold(F.pad(lo, pad, value=-math.inf), kernel, dilation, 0, stride).view(b, c, k, -1)
    hi_u = F.unfold(F.pad(hi, pad, value=-math.inf), kernel, dilation, 0, stride).view(b, c, k, -1)
    index = torch.arange(h * w, dtype=lo.dtype, device=lo.device).view(1, 1, h, w)
    src = F.unfold(F.pad(index, pad, value=-1.0), kernel, dilation, 0, stride).view(k, -1).long()  # (K, L)
    best, arg = lo_u.max(2)  # (B, C, L)
    others = hi_u.scatter(2, arg[:, :, None], -math.inf).amax(2)
    dominant = (best >= others).to(lo.dtype)
    target = src[arg, torch.arange(src.shape[1], device=lo.device)]  # (B, C, L) input position of the chosen one
    return target, dominant, hi_u.amax(2)


def _maxpool_backward(node: Node, coeff: torch.Tensor, choice) -> tuple[torch.Tensor, torch.Tensor]:
    target, dominant, top = choice
    p, s = coeff.shape[:2]
    c, h, w = node.params["in_shape"]
    a = coeff.reshape(p, s, c, -1)
    pos, neg = a.clamp_min(0), a.clamp_max(0)
    weight = pos + neg * dominant[:, None]  # coefficient on the chosen input
    out = torch.zeros((p, s, c, h * w), dtype=a.dtype, device=a.device)
    out = out.scatter_add(3, target[:, None].expand(p, s, c, -1), weight)
    bias = (neg * (1 - dominant[:, None]) * top[:, None]).flatten(2).sum(2)
    return out.view(p, s, c, h, w), bias


# ----- entry points -----------------------------------------------------------------------------------------

def crown_margins(net: Network, x: torch.Tensor, y: torch.Tensor, eps: float, bounds, *, norm: str = "Linf",
                  return_state: bool = False):
    """Lower bounds (B, K-1) on the margins z_y - z_j over the ball (CROWN)."""
    with torch.no_grad():
        problem = Problem(net, x, eps, bounds, norm)
        problem.intermediate()
        bound = problem.margins(y)
    return (bound, problem) if return_state else bound


def alpha_crown_margins(net: Network, x: torch.Tensor, y: torch.Tensor, eps: float, bounds, *, norm: str = "Linf",
                        steps: int = 20, lr: float = 0.5, intermediate: bool = True,
                        start: tuple[torch.Tensor, "Problem"] | None = None) -> torch.Tensor:
    """Lower bounds (B, K-1) on the margins with optimised lower ReLU slopes (alpha-CROWN). Every iterate's bound
    is sound; the best per margin is returned. `intermediate=False` optimises only the final bound's slopes (one
    set per margin) on CROWN's intermediate bounds: the cheaper variant. Intermediate slopes are kept only at
    neurons that are unstable somewhere in the batch, and only while they fit ALPHA_BUDGET floats; the
    intermediate bounds beyond the budget keep CROWN's slopes (still sound, looser). `start`: a CROWN result and
    its state for the same points, to skip recomputing it."""
    bound, problem = start if start is not None else crown_margins(net, x, y, eps, bounds, norm=norm,
                                                                   return_state=True)
    relus = [n for n in net.nodes if n.op in ("relu", "leaky_relu")]
    if not relus or steps < 1:
        return bound
    k = bound.shape[1]
    final = {n.index: _init_alpha(n, problem, None, k) for n in relus}
    params = [v[1] for v in final.values()]
    inner: dict | None = None
    if intermediate:
        inner, used = {}, 0
        for p in problem.needs:
            earlier = [n for n in relus if n.index < p]
            rows, _ = torch.nonzero(problem.candidates[p].reshape(len(x), -1), as_tuple=True)
            if not earlier or not len(rows):
                continue
            sets = {n.index: _init_alpha(n, problem, rows, 2) for n in earlier}
            size = sum(v[1].numel() for v in sets.values())
            if used + size > ALPHA_BUDGET:
                continue
            used += size
            inner[p] = sets
            params += [v[1] for v in sets.values()]
    best = bound.clone()
    if inner:
        # The kept intermediate bounds start from the optimisation's own computation at its initial slopes (CROWN's):
        # the first step's bounds then equal them exactly, as in auto_LiRPA. Started from CROWN's computation (other
        # code, other float rounding), they differed by noise, which sent the slopes' first gradients one way or the
        # other of each tie of the intersection with the kept bounds (its gradient halves on a tie).
        with torch.no_grad():
            problem.intermediate(alphas=inner)
    keep = {p: tuple(t.clone() for t in b) for p, b in problem.pre.items()}
    opt = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, 0.98)
    for _ in range(steps):
        if inner:
            problem.intermediate(alphas=inner, keep=keep)
            for p, (lo, hi) in problem.pre.items():  # the best intermediate bounds seen are kept (all sound)
                keep[p] = (torch.maximum(keep[p][0], lo.detach()), torch.minimum(keep[p][1], hi.detach()))
        current = problem.margins(y, alphas=final)
        best = torch.maximum(best, current.detach())
        # gradients for the slopes only: .backward() would also accumulate into the model's own weights
        for param, grad in zip(params, torch.autograd.grad(-current.sum(), params, allow_unused=True)):
            param.grad = grad
        opt.step()
        schedule.step()
        with torch.no_grad():
            for n in relus:
                slope = n.params.get("slope", 0.0)
                final[n.index][1].clamp_(slope, 1.0)
                for sets in (inner or {}).values():
                    if n.index in sets:
                        sets[n.index][1].clamp_(slope, 1.0)
    return best


ALPHA_BUDGET = 30_000_000  # optimised intermediate slopes kept (floats)


def _init_alpha(node: Node, problem: Problem, rows: torch.Tensor | None, specs: int):
    """CROWN's adaptive slopes at the neurons unstable for some input of the batch, one copy per row and spec:
    (positions (U,), slopes (P, specs, U)) to optimise."""
    lo, hi = problem.pre[node.inputs[0]]
    lo, hi = lo.flatten(1), hi.flatten(1)
    positions = torch.nonzero(((lo < 0) & (hi > 0)).any(0)).flatten()
    if rows is not None:
        lo, hi = lo[rows], hi[rows]
    slope = node.params.get("slope", 0.0)
    init = torch.where(hi[:, positions] > -lo[:, positions], 1.0, slope).to(lo)
    return positions, init[:, None].expand(len(init), specs, len(positions)).clone().requires_grad_(True)
