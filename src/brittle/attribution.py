"""Data attribution with TRAK (Park et al. 2023): which training examples drive a prediction.

For each model (an ensemble of independently trained models or checkpoints, or one model), every training
example gets a feature: the gradient phi of its margin f = z_y - logsumexp_{k != y} z_k with respect to the
weights. A target's score on training example i is phi_t (Phi^T W Phi + lambda I)^-1 phi_i, averaged over
models, times the mean (1 - p_i) of example i (W: the logistic Gauss-Newton weights p_i (1 - p_i)).

What differs from the reference library (traker 0.3.2), for CPU:
- **Exact gradients when the weight layers are Linear.** The gradient of a Linear layer is d a^T (the margin's
  gradient at the output times the input), so gradient inner products are sums over layers of
  (a_i . a_j)(d_i . d_j): the kernel is exact, with no projection error, from one batched backward, and the
  scores are solved in the n x n form. On the benchmark this is what lifts LDS (docs/benchmarks.md).
- **Factored projection otherwise** (convolutions, or `proj_dim` given). A weight's per-example gradient is a
  matrix G (out x in, the bias as one more column), projected as P_out^T G P_in with two small seeded Gaussian
  matrices: inner products are preserved in expectation as by a dense Gaussian projection, with nothing
  regenerated per batch (LoGra, Choe et al. 2024, makes the same choice); small layers are kept exactly. For
  Linear and plain Conv2d layers G = sum_l d_l a_l^T over the layer's positions, so the projection is computed
  from those factors after one batched backward, without forming G; other models (TorchScript, other weight
  layers) get per-example gradients from torch.func (or an autograd loop for TorchScript). float32.
- **lambda is never 0.** lambda = ridge * the mean eigenvalue of the weighted kernel: scale-free, so the same
  `ridge` suits any model; traker's default 0 returns noise when p reaches the number of training examples.
- **Memory-mapped, resumable featurisation**: features go to .npy memmaps in a folder with a fingerprint
  of the model, data and settings; an interrupted run continues from the last finished batch.
Parameters of layers without a weight matrix (BatchNorm, LayerNorm scales) are left out of the gradient.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._atomic import write_text
from ._progress import Progress
from .errors import UsageError

__all__ = ["Attribution", "Features", "Featurizer", "Projector", "Trak", "attribute", "evaluate_lds", "featurize",
           "featurize_rows", "lds_from", "margins"]

FORMAT = 1
SHARD_ROWS = 512  # training examples per featurisation shard


@dataclass
class _Group:
    """One weight matrix (and its bias) of the model, seen as out x in (bias = last column)."""

    weight: str
    bias: str | None
    out: int
    inp: int  # columns, the bias column included
    k_out: int = 0
    k_in: int = 0
    p_out: torch.Tensor | None = None  # None: kept exactly
    p_in: torch.Tensor | None = None


def _weight_groups(module: nn.Module) -> list[_Group]:
    params = dict(module.named_parameters())
    groups = []
    for name, p in params.items():
        if not name.endswith("weight") or p.ndim < 2:
            continue
        bias = name[: -len("weight")] + "bias"
        bias = bias if bias in params and params[bias].ndim == 1 and params[bias].shape[0] == p.shape[0] else None
        groups.append(_Group(name, bias, p.shape[0], int(np.prod(p.shape[1:])) + (1 if bias else 0)))
    if not groups:
        raise UsageError("The model has no weight matrices (Linear, Conv) to attribute through.")
    return groups


class Projector:
    """Factored Gaussian projection of per-example weight gradients to about `proj_dim` numbers."""

    def __init__(self, module: nn.Module, proj_dim: int, *, seed: int = 0):
        if proj_dim < 1:
            raise UsageError(f"The 'proj_dim' parameter must be >= 1; got {proj_dim}.")
        self.groups = _weight_groups(module)
        remaining, left = proj_dim, len(self.groups)
        # Smallest layers first: they are kept exactly when they fit, the rest is shared by the big ones.
        for gr in sorted(self.groups, key=lambda gr: gr.out * gr.inp):
            share = max(1, remaining // left)
            if gr.out * gr.inp <= share:
                gr.k_out, gr.k_in = gr.out, gr.inp
            else:
                gr.k_out = min(gr.out, max(1, math.isqrt(share)))
                gr.k_in = min(gr.inp, max(1, share // gr.k_out))
                gr.k_out = min(gr.out, max(1, share // gr.k_in))
            remaining -= gr.k_out * gr.k_in
            left -= 1
        g = torch.Generator().manual_seed(seed)
        for gr in self.groups:
            if gr.k_out < gr.out:
                gr.p_out = torch.randn(gr.out, gr.k_out, generator=g) / math.sqrt(gr.k_out)
            if gr.k_in < gr.inp:
                gr.p_in = torch.randn(gr.inp, gr.k_in, generator=g) / math.sqrt(gr.k_in)
        self.dim = sum(gr.k_out * gr.k_in for gr in self.groups)

    def project_factors(self, factors: list[torch.Tensor]) -> torch.Tensor:
        """The same projection from factors [a_1, d_1, ...] (a (B, in, L), d (B, out, L); gradient sum_l d_l a_l^T),
        in layer order: P_out^T (sum_l d_l a_l^T) P_in = sum_l (P_out^T d_l)(P_in^T a_l)^T, no gradient formed."""
        parts = []
        for gr, a, d in zip(self.groups, factors[0::2], factors[1::2]):
            left = torch.einsum("ok,bol->bkl", gr.p_out, d) if gr.p_out is not None else d
            right = torch.einsum("ik,bil->bkl", gr.p_in, a) if gr.p_in is not None else a
            parts.append(torch.einsum("bkl,bjl->bkj", left, right).reshape(len(a), -1))
        return torch.cat(parts, 1)

    def project_layers(self, layers: list[nn.Module], inputs: list[torch.Tensor], grads: list[torch.Tensor]
                       ) -> torch.Tensor:
        """The same projection from each layer's input and output gradient, never unfolding what is projected:
        for a Conv2d, P_in^T applied to the unfolded input is a convolution of the input with P_in as its kernel
        (and P_in's bias row as its bias), so the patches are never materialised."""
        parts = []
        for gr, layer, inp, d in zip(self.groups, layers, inputs, grads):
            d = _positions(layer, d)
            left = torch.einsum("ok,bol->bkl", gr.p_out, d) if gr.p_out is not None else d
            if gr.p_in is None:
                right = _unfolded(layer, inp)
            elif isinstance(layer, nn.Conv2d):
                kernel = gr.p_in[: gr.inp - (1 if gr.bias else 0)].T.reshape(gr.k_in, *layer.weight.shape[1:])
                bias = gr.p_in[-1] if gr.bias else None
                right = nn.functional.conv2d(inp, kernel, bias, layer.stride, layer.padding, layer.dilation,
                                             layer.groups).flatten(2)
            else:
                a = inp.reshape(len(inp), -1, layer.in_features)
                right = a @ gr.p_in[: layer.in_features] + (gr.p_in[-1] if gr.bias else 0)
                right = right.transpose(1, 2)
            parts.append(torch.bmm(left, right.transpose(1, 2)).reshape(len(inp), -1))
        return torch.cat(parts, 1)

    def __call__(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-example gradients {name: (B, *shape)} -> (B, dim)."""
        parts = []
        for gr in self.groups:
            w = grads[gr.weight]
            m = w.reshape(w.shape[0], gr.out, -1)
            if gr.bias:
                m = torch.cat([m, grads[gr.bias].reshape(w.shape[0], gr.out, 1)], 2)
            if gr.p_out is not None:
                m = gr.p_out.T @ m
            if gr.p_in is not None:
                m = m @ gr.p_in
            parts.append(m.reshape(w.shape[0], -1))
        return torch.cat(parts, 1)


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TRAK's model output for classification: log(p_y / (1 - p_y)), computed stably."""
    correct = logits.gather(-1, y[..., None])[..., 0]
    others = logits.masked_fill(torch.arange(logits.shape[-1]) == y[..., None], float("-inf"))
    return correct - torch.logsumexp(others, -1)


def margins(module: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> np.ndarray:
    """The margin of each example under `module` (what LDS compares against)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            out.append(_margin(module(x[i: i + batch_size]).float(), y[i: i + batch_size]))
    return torch.cat(out).numpy()


def _per_example_grads(module: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example gradients of the margin for parameters `names`, and each example's probability of its label."""
    params = dict(module.named_parameters())
    if not isinstance(module, torch.jit.ScriptModule):
        from torch.func import functional_call, grad, vmap

        chosen = {n: params[n].detach() for n in names}
        rest = {n: p.detach() for n, p in params.items() if n not in chosen}
        buffers = dict(module.named_buffers())

        def f(weights, xi, yi):
            logits = functional_call(module, ({**rest, **weights}, buffers), (xi[None],))
            return _margin(logits, yi[None]).sum()

        grads = vmap(grad(f), in_dims=(None, 0, 0))(chosen, x, y)
        with torch.no_grad():
            probs = torch.softmax(module(x).float(), 1).gather(1, y[:, None])[:, 0]
        return grads, probs
    # TorchScript cannot be traced by torch.func: one example at a time through autograd.
    wanted = [params[n] for n in names]
    flags = [p.requires_grad for p in wanted]
    try:
        for p in wanted:
            p.requires_grad_(True)
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        probs = []
        for xi, yi in zip(x, y):
            logits = module(xi[None]).float()
            gs = torch.autograd.grad(_margin(logits, yi[None]).sum(), wanted)
            for n, gi in zip(names, gs):
                rows[n].append(gi)
            probs.append(torch.softmax(logits.detach(), 1)[0, yi])
    finally:
        for p, flag in zip(wanted, flags):
            p.requires_grad_(flag)
    return {n: torch.stack(v) for n, v in rows.items()}, torch.stack(probs)


def _factor_layers(module: nn.Module) -> list[nn.Module] | None:
    """The weight layers, when every one is a Linear or a plain Conv2d: their per-example gradients can then be
    had in factored form from one batched backward, without torch.func."""
    if isinstance(module, torch.jit.ScriptModule):
        return None
    weighted = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
    plain = all(isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
                                             and isinstance(m.padding, tuple)) for m in weighted)
    return weighted if weighted and plain else None


def _layer_factors(module: nn.Module, layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor
                   ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-example weight gradients in factored form, [a_1, d_1, a_2, d_2, ...]: a (B, in + 1, L) the layer's
    inputs at each of its L positions (a Conv2d's unfolded patches; one position for a Linear on (N, D)) with a 1
    for the bias, d (B, out, L) the margin's gradient at the outputs, so that the weight gradient is
    sum_l d_l a_l^T. One batched backward: each example's margin depends on its own input only (eval mode)."""
    raw, grads, probs = _layer_inputs_and_grads(module, layers, x, y)
    return [f for layer, inp, d in zip(layers, raw, grads) for f in (_unfolded(layer, inp), _positions(layer, d))], probs


def _layer_inputs_and_grads(module: nn.Module, layers: list[nn.Module], x: torch.Tensor, y: torch.Tensor):
    """Each layer's input and the margin's gradient at its output, from one batched forward and backward; and
    each example's probability of its label."""
    inputs, outputs = {}, {}

    def hook(layer, args, out):
        inputs[layer] = args[0].detach()
        outputs[layer] = out

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)  # so that outputs are in a graph even with frozen weights
            logits = module(xg).float()
            # autograd.grad, not backward: nothing accumulates in the parameters' .grad
            grads = torch.autograd.grad(_margin(logits, y).sum(), [outputs[layer] for layer in layers])
    finally:
        for h in handles:
            h.remove()
    probs = torch.softmax(logits.detach(), 1).gather(1, y[:, None])[:, 0]
    return [inputs[layer] for layer in layers], [g.detach() for g in grads], probs


def _unfolded(layer: nn.Module, inp: torch.Tensor) -> torch.Tensor:
    """A layer's input at each of its positions, (B, in + 1, L), a 1 appended for the bias."""
    b = len(inp)
    if isinstance(layer, nn.Conv2d):
        a = nn.functional.unfold(inp, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    else:
        a = inp.reshape(b, -1, layer.in_features).transpose(1, 2)
    if layer.bias is not None:
        a = torch.cat([a, torch.ones(b, 1, a.shape[2])], 1)
    return a


def _positions(layer: nn.Module, d: torch.Tensor) -> torch.Tensor:
    """The margin's gradient at a layer's outputs, (B, out, L)."""
    if isinstance(layer, nn.Conv2d):
        return d.reshape(len(d), layer.out_channels, -1)
    return d.reshape(len(d), -1, layer.out_features).transpose(1, 2)


@dataclass
class Features:
    """Per-example gradient features of one model. `exact`: blocks are [a_1, d_1, a_2, d_2, ...] per Linear layer
    (gradient inner products are sums over layers of (a_i . a_j)(d_i . d_j), with no projection error);
    otherwise one block, the projected gradients. `weights`: 1 - p_y per example."""

    blocks: list[np.ndarray]
    weights: np.ndarray
    exact: bool

    def kernel(self, other: "Features | None" = None) -> np.ndarray:
        """Gradient inner products (len(other) x len(self)), float64."""
        other = other or self
        if not self.exact:
            return other.blocks[0].astype(np.float64) @ self.blocks[0].T.astype(np.float64)
        out = 0.0
        for i in range(0, len(self.blocks), 2):
            a = other.blocks[i].astype(np.float64) @ self.blocks[i].T.astype(np.float64)
            d = other.blocks[i + 1].astype(np.float64) @ self.blocks[i + 1].T.astype(np.float64)
            out = out + a * d
        return out

    @property
    def dim(self) -> int:
        return sum(b.shape[1] for b in self.blocks)


def _fingerprint(module: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: str) -> str:
    h = hashlib.sha256(f"{FORMAT}:{settings}".encode())
    for name, p in module.state_dict().items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(p.detach().cpu().float().numpy()).tobytes())
    h.update(np.ascontiguousarray(x.numpy()).tobytes())
    h.update(np.ascontiguousarray(y.numpy()).tobytes())
    return h.hexdigest()


class Featurizer:
    """How one model's examples become gradient features: exact Linear factors, factored projections, or projected
    per-example gradients (torch.func, or an autograd loop for TorchScript that could not be read as a graph).
    Built the same way from the same (module, proj_dim, seed) on every worker, so features do not depend on where
    they were computed. `counter` (a PassCounter) is charged one forward and one backward pass per example."""

    def __init__(self, module: nn.Module, *, proj_dim: int | None = None, seed: int = 0, counter=None):
        self.module = module.eval()
        self.counter = counter
        self.factorable = _factor_layers(self.module)  # per-example gradients need never be materialised
        exact = proj_dim is None and self.factorable is not None and all(isinstance(m, nn.Linear)
                                                                          for m in self.factorable)
        self.layers = self.factorable if exact else None
        if self.layers is not None:
            self.widths = []
            for layer in self.layers:
                self.widths += [layer.in_features + (1 if layer.bias is not None else 0), layer.out_features]
            self.settings = "exact"
        else:
            self.projector = Projector(self.module, proj_dim or 2048, seed=seed)
            self.names = [n for gr in self.projector.groups for n in (gr.weight, gr.bias) if n]
            self.widths = [self.projector.dim]
            self.settings = f"projected:{self.projector.dim}:{seed}"

    @property
    def exact(self) -> bool:
        return self.layers is not None

    def batch(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[list[np.ndarray], np.ndarray]:
        """Feature blocks and weights (1 - p_y) of one batch."""
        if self.layers is not None:
            factors, probs = _layer_factors(self.module, self.layers, xb, yb)
            if any(f.shape[2] != 1 for f in factors):
                raise UsageError("Exact attribution needs Linear layers on (N, D) inputs; give proj_dim to project.")
            parts = [f[:, :, 0] for f in factors]
        elif self.factorable is not None:
            inputs, grads, probs = _layer_inputs_and_grads(self.module, self.factorable, xb, yb)
            parts = [self.projector.project_layers(self.factorable, inputs, grads)]
        else:
            grads, probs = _per_example_grads(self.module, self.names, xb, yb)
            parts = [self.projector(grads)]
        if self.counter is not None:
            self.counter.forward += len(xb)
            self.counter.backward += len(xb)
        return [p.numpy() for p in parts], (1.0 - probs).numpy()

    def rows(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> tuple[list[np.ndarray], np.ndarray]:
        parts = [self.batch(x[s: s + batch_size], y[s: s + batch_size]) for s in range(0, len(x), batch_size)]
        if not parts:
            return [np.zeros((0, w), np.float32) for w in self.widths], np.zeros(0, np.float32)
        return ([np.concatenate([p[0][i] for p in parts]).astype(np.float32) for i in range(len(self.widths))],
                np.concatenate([p[1] for p in parts]).astype(np.float32))


def featurize(module: nn.Module, x: torch.Tensor, y: torch.Tensor, *, proj_dim: int | None = None, seed: int = 0,
              batch_size: int = 64, store: str | Path | None = None, progress: Progress | None = None,
              stop_after: int | None = None, counter=None) -> Features:
    """Gradient features of examples (x, y) under `module` (inputs as the module takes them, i.e. normalised).

    `proj_dim=None` (the default) keeps gradients exact when every weight layer is Linear, and projects to 2048
    otherwise; a number always projects. With `store`, features are written to .npy memmaps in that folder and
    a later call with the same model, data and settings continues where this one stopped. `stop_after`
    (batches) interrupts on purpose, for tests of resuming."""
    f = Featurizer(module, proj_dim=proj_dim, seed=seed, counter=counter)
    widths = f.widths
    n = len(x)
    progress = progress or Progress()
    done = 0
    if store is not None:
        store = Path(store)
        store.mkdir(parents=True, exist_ok=True)
        fp = _fingerprint(f.module, x, y, f.settings)
        meta_path = store / "metadata.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if meta is not None and meta.get("fingerprint") != fp:
            raise UsageError(f"{store} holds features of another model, data or settings; use another folder "
                             "or delete it.")
        mode = "r+" if meta is not None else "w+"
        blocks = [np.lib.format.open_memmap(store / f"block{i}.npy", mode=mode, dtype=np.float32, shape=(n, w))
                  for i, w in enumerate(widths)]
        q = np.lib.format.open_memmap(store / "weights.npy", mode=mode, dtype=np.float32, shape=(n,))
        done = int(meta["rows"]) if meta is not None else 0
        if meta is None:
            write_text(meta_path, json.dumps({"fingerprint": fp, "rows": 0, "n": n, "widths": widths}))
    else:
        blocks, q = [np.zeros((n, w), np.float32) for w in widths], np.zeros(n, np.float32)
    progress.start("featurising", math.ceil(n / batch_size))
    progress.advance(done // batch_size)
    batches = 0
    for start in range(done, n, batch_size):
        if stop_after is not None and batches >= stop_after:
            raise KeyboardInterrupt("stopped on request")
        xb, yb = x[start: start + batch_size], y[start: start + batch_size]
        parts, weights = f.batch(xb, yb)
        for block, part in zip(blocks, parts):
            block[start: start + len(xb)] = part
        q[start: start + len(xb)] = weights
        if store is not None:
            for block in (*blocks, q):
                block.flush()
            write_text(store / "metadata.json", json.dumps({"fingerprint": fp, "rows": start + len(xb), "n": n,
                                                            "widths": widths}))
        batches += 1
        progress.advance()
    progress.finish()
    return Features([np.asarray(b) for b in blocks], np.asarray(q), f.exact)


def featurize_rows(model, x: torch.Tensor, y: torch.Tensor, positions: np.ndarray, proj_dim: int | None,
                   seed: int) -> dict[str, np.ndarray]:
    """Features of the rows `positions` of (x, y) (normalised inputs) under a model adapter's module (a shard
    task: the attribution check spreads featurisation over the audit's backend)."""
    f = Featurizer(model.eager_module(), proj_dim=proj_dim, seed=seed, counter=model.counter)
    t = torch.as_tensor(positions)
    blocks, weights = f.rows(x[t], y[t])
    return {**{f"block{i}": b for i, b in enumerate(blocks)}, "weights": weights, "exact": np.array(f.exact)}


def _gram(b: torch.Tensor) -> torch.Tensor:
    """b^T b from three quarters of the products: the lower-left block is the transpose of the upper-right
    (there is no symmetric rank-k product in torch; this is the one-level version of it)."""
    d = b.shape[1]
    if d < 512:
        return b.T @ b
    h = d // 2
    top = b[:, :h].T @ b  # (h, d): the upper half, both blocks
    out = torch.empty(d, d, dtype=b.dtype)
    out[:h] = top
    out[h:, :h] = top[:, h:].T
    out[h:, h:] = b[:, h:].T @ b[:, h:]
    return out


class Trak:
    """TRAK scores from the training features of one or more models.

    score(target, i) = phi_t (Phi^T W Phi + lambda I)^-1 phi_i * mean(1 - p_i), with W = diag(p_i (1 - p_i)) the
    Gauss-Newton weights of the logistic margin; `ridge` sets lambda = ridge * trace(W Phi Phi^T) / n, never 0.
    Solved in whichever form is smaller: the d x d (primal) form when the features are projected to fewer
    dimensions than there are examples, as (L^-1 phi_t) . (L^-1 phi_i) with L the Cholesky factor of
    Phi^T W Phi + lambda I; otherwise the n x n (dual) form with the kernel K = Phi Phi^T, as
    (k_t - (k_t w) (w K w + lambda I)^-1 (w K)) / lambda (push-through identity; w = sqrt(W)), which is also the
    only form exact Linear-layer kernels have. Both are the same scores; float64 throughout."""

    def __init__(self, train: list[Features], *, ridge: float = 3.0):
        if ridge <= 0:
            raise UsageError(f"The 'ridge' parameter must be > 0 (lambda is never 0); got {ridge}.")
        self.train = train
        self.weight = np.mean([f.weights for f in train], 0).astype(np.float64)
        self.lambdas, self._state = [], []
        for f in train:
            q = torch.as_tensor(f.weights, dtype=torch.float64)
            w = (q * (1 - q)).clamp_min(0).sqrt()
            n = len(q)
            if not f.exact and f.dim < n:
                phi = torch.as_tensor(f.blocks[0], dtype=torch.float64)
                b = w[:, None] * phi
                lam = max(ridge * float((b ** 2).sum()) / n, 1e-12)
                a = _gram(b) + lam * torch.eye(f.dim, dtype=torch.float64)
                chol = torch.linalg.cholesky(a)
                z = torch.linalg.solve_triangular(chol, phi.T, upper=False)  # (d, n) = L^-1 Phi^T
                self._state.append(("primal", chol, z))
            else:
                k = torch.as_tensor(f.kernel(), dtype=torch.float64)
                m = w[:, None] * k * w[None]
                lam = max(ridge * float(torch.trace(m)) / n, 1e-12)
                chol = torch.linalg.cholesky(m + lam * torch.eye(n, dtype=torch.float64))
                self._state.append(("dual", k, w, chol))
            self.lambdas.append(lam)

    def _raw(self, m: int, f: Features, t: Features) -> np.ndarray:
        """Unweighted scores (targets, n) of model m for target features t."""
        state = self._state[m]
        if state[0] == "primal":
            _, chol, z = state
            zt = torch.linalg.solve_triangular(chol, torch.as_tensor(t.blocks[0], dtype=torch.float64).T, upper=False)
            return (zt.T @ z).numpy()
        _, k, w, chol = state
        cross = torch.as_tensor(f.kernel(t), dtype=torch.float64)
        z = torch.cholesky_solve((cross * w[None]).T, chol)  # (n, t) = (wKw + lambda I)^-1 (w k_t)
        return ((cross - (z.T * w[None]) @ k) / self.lambdas[m]).numpy()

    def scores(self, targets: list[Features], *, weighted: bool = True) -> np.ndarray:
        """(t, n): how much each training example supports each target's margin (positive: proponent)."""
        if len(targets) != len(self.train):
            raise UsageError(f"Give target features from each of the {len(self.train)} models; got {len(targets)}.")
        out = sum(self._raw(m, f, t) for m, (f, t) in enumerate(zip(self.train, targets))) / len(targets)
        return out * self.weight[None] if weighted else out

    def train_on_train(self, *, weighted: bool = False) -> np.ndarray:
        """(n, n) scores of training examples on each other. Unweighted by default: the (1 - p) weight shrinks
        confidently fitted examples, poisons included, and hides how they support each other."""
        return self.scores(self.train, weighted=weighted)

    def self_influence(self, *, weighted: bool = True) -> np.ndarray:
        """Each training example's score on itself: high for examples the model had to memorise."""
        total = torch.zeros(len(self.weight), dtype=torch.float64)
        for m, state in enumerate(self._state):
            if state[0] == "primal":
                total += (state[2] ** 2).sum(0)
            else:
                _, k, w, chol = state
                z = torch.linalg.solve_triangular(chol, w[:, None] * k, upper=False)  # L^-1 (w K)
                total += (torch.diagonal(k) - (z * z).sum(0)) / self.lambdas[m]
        out = (total / len(self._state)).numpy()
        return out * self.weight if weighted else out


def evaluate_lds(scores: np.ndarray, train_fn, x_train: torch.Tensor, y_train: torch.Tensor, x_targets: torch.Tensor,
                 y_targets: torch.Tensor, *, subsets: int = 50, fraction: float = 0.5, seeds: int = 2, seed: int = 0,
                 progress: Progress | None = None) -> dict:
    """Linear datamodeling score: retrain on random `fraction` subsets with `train_fn(x, y, seed=...)` (returns a
    module taking the inputs as given) and correlate (Spearman) the margins predicted by summing the scores over
    each subset with the measured ones, per target; the mean and its standard error over targets."""
    n = len(x_train)
    g = np.random.default_rng(seed)
    masks = np.zeros((subsets, n), bool)
    measured = np.zeros((subsets, len(x_targets)))
    progress = progress or Progress()
    progress.start("retraining for LDS", subsets * seeds)
    for s in range(subsets):
        masks[s, g.choice(n, size=int(round(fraction * n)), replace=False)] = True
        idx = torch.as_tensor(np.flatnonzero(masks[s]))
        for r in range(seeds):
            model = train_fn(x_train[idx], y_train[idx], seed=seed * 100_003 + s * 101 + r)
            measured[s] += margins(model.eval(), x_targets, y_targets) / seeds
            progress.advance()
    progress.finish()
    return lds_from(scores, masks, measured) | {"subsets": subsets, "seeds": seeds}


def lds_from(scores: np.ndarray, masks: np.ndarray, measured: np.ndarray) -> dict:
    """LDS of `scores` (targets, n) against margins `measured` (subsets, targets) of models trained on `masks`."""
    predicted = masks.astype(np.float64) @ scores.T
    rho = np.array([spearman(predicted[:, t], measured[:, t]) for t in range(scores.shape[0])])
    ok = np.isfinite(rho)
    return {"lds": float(rho[ok].mean()), "stderr": float(rho[ok].std() / np.sqrt(max(ok.sum(), 1))),
            "targets": int(len(rho)), "per_target": rho.tolist()}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def ranks(v: np.ndarray) -> np.ndarray:
    """Ranks with ties sharing their mean rank."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v))
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


@dataclass
class Attribution:
    """TRAK results for targets against a training set. Rows of `scores` are targets, columns training examples
    (positions in the training file in `train_positions`)."""

    scores: np.ndarray
    self_influence: np.ndarray
    target_positions: np.ndarray
    train_positions: np.ndarray
    lambdas: list[float]
    exact: bool
    dim: int
    trak: "Trak | None" = None

    def top(self, target: int, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Row indices of the k strongest proponents and the k strongest opponents of target row `target`."""
        order = np.argsort(self.scores[target])
        return order[::-1][:k], order[:k]

    def summary(self, k: int = 5, *, self_top: int = 20) -> dict:
        tops = []
        for t in range(len(self.scores)):
            pro, con = self.top(t, k)
            tops.append({"target": int(self.target_positions[t]),
                         "proponents": self.train_positions[pro].tolist(),
                         "proponent_scores": self.scores[t, pro].tolist(),
                         "opponents": self.train_positions[con].tolist(),
                         "opponent_scores": self.scores[t, con].tolist()})
        order = np.argsort(self.self_influence)[::-1][:self_top]
        return {"exact_gradients": self.exact, "dim": self.dim, "lambdas": self.lambdas, "targets": tops,
                "self_influence_top": self.train_positions[order].tolist(),
                "self_influence_top_scores": self.self_influence[order].tolist()}


def attribute(model, train_data, data, *, other_models=(), targets: int | list[int] | None = 100,
              proj_dim: int | None = None, ridge: float = 3.0, store: str | Path | None = None,
              batch_size: int = 64, progress: Progress | None = None, config=None) -> Attribution:
    """TRAK attribution of `data`'s predictions (the first `targets` examples, or those positions) to
    `train_data` (labelled). `model`, data: what `brittle.audit` takes; `other_models`: more models or checkpoints
    of the same classes and input domain for the ensemble. With `store`, features are kept in that folder and
    an interrupted run continues there."""
    from .config import as_config
    from .prepare import prepare_data, prepare_model, prepare_other_model

    cfg = as_config(config)
    first = prepare_model(model, cfg)
    train = prepare_data(train_data, first, cfg, role="train_data")
    test = prepare_data(data, first, cfg, role="data")
    adapters = [first] + [prepare_other_model(o, cfg, like=first, x_example=train.x) for o in other_models]
    if train.y is None or test.y is None:
        raise UsageError("Attribution needs labels in the training data and in the data to explain "
                         "(the margin of the labelled class is what is attributed).")
    if isinstance(targets, int) or targets is None:
        rows = np.arange(min(targets or len(test), len(test)))
    else:
        rows = np.asarray(targets, dtype=np.int64)
        if rows.size == 0 or rows.min() < 0 or rows.max() >= len(test):
            raise UsageError(f"Target positions must be in [0, {len(test)}); got {targets}.")
    return attribute_prepared(adapters, train, test.subset(rows), proj_dim=proj_dim, ridge=ridge, store=store,
                              batch_size=batch_size, progress=progress)


def attribute_prepared(adapters, train, targets, *, proj_dim=None, ridge=3.0, store=None, batch_size=64,
                       progress=None, seed: int = 0, map_shards=None, weighted: bool = True) -> Attribution:
    """The work of `attribute` on prepared adapters and datasets. The attribution check passes its context's
    `map_shards` (featurisation of the training set, the expensive part, then runs as resumable shards on the
    audit's backend); without it, `store` keeps features in a folder and an interrupted run continues there.
    `weighted=False` leaves out TRAK's (1 - p_i) factor, which shrinks the examples a model fits confidently."""
    for a in adapters:
        if a.module is None:
            raise UsageError(f"{a.name} is a black-box model: attribution needs its weights' gradients "
                             "(TorchScript, .pt2 or a factory with weights).")
    feats, tfeats = [], []
    for m, a in enumerate(adapters):
        x_train = a.normalise(train.x)
        if map_shards is not None and m == 0:
            chunks = [np.arange(s, min(s + SHARD_ROWS, len(x_train))) for s in range(0, len(x_train), SHARD_ROWS)]
            parts = map_shards("features", featurize_rows,
                               [(f"{k:05d}", (c, proj_dim, seed + m)) for k, c in enumerate(chunks)],
                               shared=(x_train, train.y), label="attribution featurising")
            widths = sorted(k for k in parts[0] if k.startswith("block"))
            feats.append(Features([np.concatenate([p[k] for p in parts]) for k in widths],
                                  np.concatenate([p["weights"] for p in parts]), bool(parts[0]["exact"])))
        else:
            sub = None if store is None else Path(store) / f"model_{m}"
            feats.append(featurize(a.eager_module(), x_train, train.y, proj_dim=proj_dim, seed=seed + m,
                                   batch_size=batch_size, store=sub, progress=progress, counter=a.counter))
        tfeats.append(featurize(a.eager_module(), a.normalise(targets.x), targets.y, proj_dim=proj_dim, seed=seed + m,
                                batch_size=batch_size, counter=a.counter))
    trak = Trak(feats, ridge=ridge)
    return Attribution(trak.scores(tfeats, weighted=weighted), trak.self_influence(), targets.positions(np.arange(len(targets))),
                       train.positions(np.arange(len(train))), trak.lambdas, feats[0].exact, feats[0].dim, trak)
