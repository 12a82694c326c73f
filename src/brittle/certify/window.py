"""CROWN back-substitution for convolution neurons on windows (auto_LiRPA's idea of "patches").

A convolution neuron depends on a small window of its layer's input, and the window grows by one kernel per layer
on the way back to the input. Carried densely, a neuron's coefficients are a full image at every layer they
cross, mostly zeros: that was most of CROWN's time on convolutional networks. Here each (input, neuron) row's
coefficients are a window (rows, specs, C, h, w) placed at a per-row offset (top, left) in the layer's own
coordinates: transposed convolutions run on the window only, relaxations are read at the window's positions, and
positions outside the layer (its zero padding) are masked to zero, so that every later step may read them
without changing the bound. The result equals the dense path's up to float rounding.

The way back from the neuron to the input may hold: 2-d convolutions with zero padding (any stride, dilation,
groups), per-channel affine maps (BatchNorm, the input normalisation), ReLU, LeakyReLU, Sigmoid, Tanh, MaxPool2d
and residual additions (average pooling is read as a convolution where it is one). Anything else (a Linear
layer, a reshape, a pooling option that is not a convolution) takes the dense path. alpha-CROWN's optimised slopes
are read at the window like the relaxations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .network import Network, Node

__all__ = ["windowable", "window_bounds", "window_size"]

# Relaxations are read at the windows by unfolding every window of the layer once when that is at most this many
# windows per row read (small images), else by indexing (large images, where unfolding would not fit).
UNFOLD_RATIO = 4


@dataclass
class Window:
    t: torch.Tensor  # (P, S, C, h, w) coefficients
    top: torch.Tensor  # (P,) row of the window's first line in the layer
    left: torch.Tensor  # (P,) its first column


def _supported(node: Node) -> bool:
    if node.op == "input":
        return len(node.shape) == 3
    if len(node.shape) != 3:
        return False
    if node.op in ("relu", "leaky_relu", "sigmoid", "tanh", "maxpool"):
        return True
    kind = node.params.get("kind")
    if kind == "conv":
        c = node.params
        return c["padding_mode"] == "zeros" and not isinstance(c["padding"], str) and c["weight"].dim() == 4
    return kind in ("channel_affine", "add")


def windowable(net: Network, p: int) -> bool:
    """Every node that node p's value depends on is one the window path models."""
    todo, seen = [p], set()
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        if not _supported(net.nodes[i]):
            return False
        todo.extend(net.nodes[i].inputs)
    return True


def window_size(problem, p: int) -> int:
    """The largest window (floats per row and spec) on node p's way back, from a one-row dry run (for the chunk
    size: windows cut at the layer's edge can differ a little from row to row)."""
    sizes: list[int] = []
    one = torch.zeros(1, dtype=torch.long, device=problem.x.device)
    window_bounds(problem, p, one, one, sizes=sizes)
    return max(sizes)


def window_bounds(problem, p: int, rows: torch.Tensor, cols: torch.Tensor, *, alphas: dict | None = None,
                  sizes: list | None = None) -> torch.Tensor:
    """CROWN's lower bounds of z and of -z for node p's neurons at flat positions `cols` (P,), each for the input
    `rows` (P,): (P, 2), as Problem.backward + concretise give them. `alphas[node]`: alpha-CROWN's lower slopes of a
    ReLU-like node, (positions (U,), slopes (P, 2, U)), as for Problem.backward."""
    net, shapes = problem.net, problem.shapes
    c, h, w = shapes[p]
    n = len(cols)
    dev, dtype = problem.x.device, problem.x.dtype
    channel, rest = torch.div(cols, h * w, rounding_mode="floor"), cols % (h * w)
    t = torch.zeros((n, 2, c, 1, 1), dtype=dtype, device=dev)
    t[torch.arange(n, device=dev), 0, channel] = 1.0
    t[torch.arange(n, device=dev), 1, channel] = -1.0
    acc = {p: Window(t, torch.div(rest, w, rounding_mode="floor"), rest % w)}
    bias = torch.zeros((n, 2), dtype=dtype, device=dev)
    for node in reversed(net.nodes[: p + 1]):
        win = acc.pop(node.index, None)
        if win is None:
            continue
        if sizes is not None:
            sizes.append(math.prod(win.t.shape[2:]))
        if node.op == "input":
            return bias + _concretise(problem, win, rows)
        kind = node.params.get("kind")
        if kind == "conv":
            if node.params["bias"] is not None:
                bias = bias + win.t.sum((3, 4)) @ node.params["bias"].to(dtype)
            _accumulate(acc, node.inputs[0], _conv_back(node.params, win, shapes[node.inputs[0]]))
        elif kind == "channel_affine":
            scale, shift = (node.params[k].to(dtype).view(1, 1, -1, 1, 1) for k in ("scale", "shift"))
            bias = bias + (win.t * shift).sum((2, 3, 4))
            _accumulate(acc, node.inputs[0], Window(win.t * scale, win.top, win.left))
        elif kind == "add":
            _accumulate(acc, node.inputs[0], win)
            _accumulate(acc, node.inputs[1], Window(win.t * node.params.get("sign", 1.0), win.top, win.left))
        elif node.op == "maxpool":
            back, b = _maxpool_back(node, win, problem._relaxed[node.index], rows, shapes[node.inputs[0]])
            bias = bias + b
            _accumulate(acc, node.inputs[0], back)
        else:  # an elementwise activation: its relaxation read at the window
            relaxed = problem._relaxed[node.index]
            if node.op in ("relu", "leaky_relu"):  # (unstable, lower slope, upper slope, upper intercept)
                low_slope, up_slope, up_icpt = (_gather(part, rows, win)[:, None] for part in relaxed[1:])
                low_icpt = None
                if alphas is not None and node.index in alphas:
                    low_slope = _optimised_slopes(node, alphas[node.index], _gather(relaxed[0], rows, win), win,
                                                  low_slope)
            else:
                low_slope, low_icpt, up_slope, up_icpt = (_gather(part, rows, win)[:, None] for part in relaxed)
            positive = win.t >= 0  # a positive coefficient takes the lower bound, a negative one the upper
            # (a ReLU's lower bound has no intercept)
            intercept = torch.where(positive, 0.0 if low_icpt is None else low_icpt, up_icpt)
            bias = bias + (win.t * intercept).sum((2, 3, 4))
            _accumulate(acc, node.inputs[0], Window(win.t * torch.where(positive, low_slope, up_slope), win.top,
                                                    win.left))
    raise AssertionError("the window path did not reach the input")  # windowable() guarantees it does


def _grid(win: Window, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's window positions in a height x width layer: its line and column indices clamped to the layer,
    (P, h) and (P, w), and which of its positions lie inside the layer, (P, h, w)."""
    h, w = win.t.shape[3:]
    lines = win.top[:, None] + torch.arange(h, device=win.top.device)
    columns = win.left[:, None] + torch.arange(w, device=win.top.device)
    ih, iw = lines.clamp(0, height - 1), columns.clamp(0, width - 1)
    return ih, iw, (lines == ih)[:, :, None] & (columns == iw)[:, None, :]


def _optimised_slopes(node: Node, alpha, unstable: torch.Tensor, win: Window, crown: torch.Tensor) -> torch.Tensor:
    """The lower slopes at the window: alpha-CROWN's where the neuron is unstable and has one (positions (U,),
    slopes (P, S, U)), else CROWN's (as the dense path)."""
    positions, values = alpha
    c, height, width = node.shape
    p, s = values.shape[:2]
    h, w = win.t.shape[3:]
    slot = torch.full((c * height * width,), -1, dtype=torch.long, device=values.device)
    slot[positions] = torch.arange(len(positions), device=values.device)
    ih, iw, _ = _grid(win, height, width)
    flat = (torch.arange(c, device=values.device)[None, :, None, None] * (height * width)
            + ih[:, None, :, None] * width + iw[:, None, None, :])  # (P, C, h, w)
    where = slot[flat]
    chosen = values.gather(2, where.clamp_min(0).reshape(p, 1, -1).expand(p, s, -1)).view(p, s, c, h, w)
    return torch.where((unstable & (where >= 0))[:, None], chosen, crown)


def _accumulate(acc: dict, i: int, win: Window) -> None:
    if i not in acc:
        acc[i] = win
        return
    old = acc[i]
    if old.t.shape == win.t.shape and torch.equal(old.top, win.top) and torch.equal(old.left, win.left):
        acc[i] = Window(old.t + win.t, old.top, old.left)
        return
    # a residual addition: both branches on the union of their windows
    top, left = torch.minimum(old.top, win.top), torch.minimum(old.left, win.left)
    h = int((torch.maximum(old.top + old.t.shape[3], win.top + win.t.shape[3]) - top).max())
    w = int((torch.maximum(old.left + old.t.shape[4], win.left + win.t.shape[4]) - left).max())
    acc[i] = Window(_recrop(old, top, left, h, w).t + _recrop(win, top, left, h, w).t, top, left)


def _recrop(win: Window, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> Window:
    """The same coefficients on another window (zeros where the old one did not reach)."""
    p, s, c, h0, w0 = win.t.shape
    dt, dl = win.top - top, win.left - left
    if bool((dt == dt[0]).all() & (dl == dl[0]).all()) and int(dt[0]) >= 0 and int(dl[0]) >= 0:
        # the usual case (the two branches of a residual block): one shift for every row, a padding
        before_h, before_w = int(dt[0]), int(dl[0])
        t = F.pad(win.t, (before_w, w - w0 - before_w, before_h, h - h0 - before_h))
        return Window(t, top, left)
    ih = (top - win.top)[:, None] + torch.arange(h, device=top.device)
    iw = (left - win.left)[:, None] + torch.arange(w, device=top.device)
    valid = ((ih >= 0) & (ih < h0))[:, :, None] & ((iw >= 0) & (iw < w0))[:, None, :]
    t = win.t.gather(3, ih.clamp(0, h0 - 1).view(p, 1, 1, h, 1).expand(p, s, c, h, w0))
    t = t.gather(4, iw.clamp(0, w0 - 1).view(p, 1, 1, 1, w).expand(p, s, c, h, w))
    return Window(t * valid[:, None, None].to(t.dtype), top, left)


def _fit(win: Window, shape: tuple[int, ...]) -> Window:
    """Positions outside the layer zeroed; a window larger than the layer cut down to the layer."""
    _, height, width = shape
    h, w = win.t.shape[3:]
    _, _, inside = _grid(win, height, width)
    if not bool(inside.all()):
        win = Window(win.t * inside[:, None, None].to(win.t.dtype), win.top, win.left)
    if h > height or w > width:
        zero = torch.zeros_like(win.top)
        win = _recrop(win, zero if h > height else win.top, zero if w > width else win.left, min(h, height),
                      min(w, width))
    return win


def _conv_back(c: dict, win: Window, in_shape: tuple[int, ...]) -> Window:
    """a . conv(z) as coefficients on z's window: the transposed convolution of the window alone."""
    p, s, ch, h, w = win.t.shape
    weight = c["weight"].to(win.t.dtype)
    flat = win.t.reshape(p * s, ch, h, w)
    if weight.shape[1] == 1 and c["groups"] == 1:
        # back to one channel (a grayscale input): a matrix product and a fold, about twice as fast on CPU as
        # the transposed convolution for this shape
        k = weight.shape[2:]
        size = tuple((n - 1) * st + d * (kk - 1) + 1 for n, st, d, kk in zip((h, w), c["stride"], c["dilation"], k))
        taps = weight.reshape(ch, -1).T @ flat.reshape(p * s, ch, h * w)  # (P*S, k*k, h*w)
        back = F.fold(taps, size, k, dilation=c["dilation"], stride=c["stride"])
    else:
        back = F.conv_transpose2d(flat, weight, None, c["stride"], 0, 0, c["groups"], c["dilation"])
    back = back.view(p, s, *back.shape[1:])
    top = win.top * c["stride"][0] - c["padding"][0]
    left = win.left * c["stride"][1] - c["padding"][1]
    return _fit(Window(back, top, left), in_shape)


def _gather(t: torch.Tensor, rows: torch.Tensor, win: Window) -> torch.Tensor:
    """A per-input tensor (B or 1, C, H, W) read at each row's window: (P, C, h, w), zero outside the layer (where
    the coefficients are zero). Every window of the padded tensor is unfolded once, then each row copies its own:
    one contiguous row per (input, neuron), far cheaper than indexing four ways."""
    b, c, height, width = t.shape
    p, h, w = len(rows), *win.t.shape[3:]
    pt, pl = max(0, -int(win.top.min())), max(0, -int(win.left.min()))
    pb, pr = max(0, int(win.top.max()) + h - height), max(0, int(win.left.max()) + w - width)
    dtype = t.dtype
    if b > 1:  # only the inputs this chunk of rows belongs to (rows come sorted by input: one or two)
        inputs, which = torch.unique_consecutive(rows, return_inverse=True)
        t = t[inputs]
    else:
        which = torch.zeros_like(rows)
    windows = (height + pt + pb - h + 1) * (width + pl + pr - w + 1)
    if len(t) * windows > UNFOLD_RATIO * p:  # unfolding every window would cost more than the rows need
        ih, iw, inside = _grid(win, height, width)
        out = t[which[:, None, None, None], torch.arange(c, device=t.device)[None, :, None, None],
                ih[:, None, :, None], iw[:, None, None, :]]
        return torch.where(inside[:, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    padded = F.pad(t.to(win.t.dtype) if not t.is_floating_point() else t, (pl, pr, pt, pb))
    unfolded = F.unfold(padded, (h, w))  # (inputs, C*h*w, L)
    per_row = (width + pl + pr) - w + 1
    location = (win.top + pt) * per_row + (win.left + pl)
    flat = unfolded.transpose(1, 2).reshape(-1, c * h * w)
    out = flat.index_select(0, which * unfolded.shape[2] + location).view(p, c, h, w)
    return out if out.dtype == dtype else out.round().to(dtype)


def _maxpool_back(node: Node, win: Window, choice, rows: torch.Tensor, in_shape) -> tuple[Window, torch.Tensor]:
    """linear.py's MaxPool rule on a window: the coefficient goes to each window's chosen input."""
    target, dominant, top_value = choice  # (B, C, L) each, L the pooled positions
    _, c, ho, wo = (len(target), *node.shape)
    p, s, _, h, w = win.t.shape
    target, dominant, top_value = (_gather(v.reshape(-1, c, ho, wo), rows, win) for v in (target, dominant, top_value))
    dominant, top_value = dominant[:, None], top_value[:, None]
    pos, neg = win.t.clamp_min(0), win.t.clamp_max(0)
    weight = pos + neg * dominant
    bias = (neg * (1 - dominant) * top_value).sum((2, 3, 4))
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (node.params[k] for k in ("kernel", "stride", "padding", "dilation"))
    in_h, in_w = (h - 1) * sh + dh * (kh - 1) + 1, (w - 1) * sw + dw * (kw - 1) + 1
    top, left = win.top * sh - ph, win.left * sw - pw
    width = in_shape[2]
    li = (torch.div(target, width, rounding_mode="floor") - top.view(-1, 1, 1, 1)).clamp(0, in_h - 1)
    lj = (target % width - left.view(-1, 1, 1, 1)).clamp(0, in_w - 1)  # clamped only where the weight is 0
    index = (li * in_w + lj).reshape(p, 1, c, h * w).expand(p, s, c, h * w)
    out = torch.zeros((p, s, c, in_h * in_w), dtype=win.t.dtype, device=win.t.device)
    out = out.scatter_add(3, index, weight.reshape(p, s, c, h * w))
    return _fit(Window(out.view(p, s, c, in_h, in_w), top, left), in_shape), bias


def _concretise(problem, win: Window, rows: torch.Tensor) -> torch.Tensor:
    """min over the input set of a . x per (P, S) row, as Problem.concretise."""
    a = win.t
    x_lo, x_hi, x = (_gather(t, rows, win)[:, None] for t in (problem.x_lo, problem.x_hi, problem.x))
    box = (a.clamp_min(0) * x_lo + a.clamp_max(0) * x_hi).sum((2, 3, 4))
    if problem.l2 is None:
        return box
    ball = (a * x).sum((2, 3, 4)) - problem.l2 * a.flatten(2).norm(dim=2)
    return torch.maximum(box, ball)
