"""The one model adapter. Every check touches the user's model only through `ModelAdapter`.

The adapter owns the input domain (bounds) and the preprocessing (mean/std), so attacks and
certificates perturb inputs in input space and never see normalised tensors. It owns the device and dtype
too: the model runs there, every input is moved there, and every output comes back to the device of the
input it answers (CPU data in, CPU results out; an attack that moved its shard to the device stays there).
It counts every forward and backward pass (in samples: a batch of 32 is 32 passes) so that each check can
report its cost, and halves its batch size when the device runs out of memory (saying so in `notes`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ._torch_compat import AUTOCAST, autocast_dtype, is_out_of_memory, resolve_device
from .errors import InputError, UsageError

__all__ = ["ModelAdapter", "PassCounter", "GradientsUnavailable"]


class GradientsUnavailable(RuntimeError):
    """Raised when a check asks a black-box model (e.g. ONNX) for input gradients."""


@dataclass
class PassCounter:
    forward: int = 0
    backward: int = 0

    def snapshot(self) -> tuple[int, int]:
        return self.forward, self.backward


@dataclass
class _Domain:
    low: float
    high: float
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None


def _as_channel_tensor(values: Sequence[float] | None, name: str) -> torch.Tensor | None:
    if values is None:
        return None
    t = torch.as_tensor(list(values), dtype=torch.float32).flatten()
    if t.numel() == 0:
        raise UsageError(f"The '{name}' option must list one value per channel; got an empty list.")
    if name == "std" and bool((t <= 0).any()):
        raise UsageError(f"The 'std' option must be positive per channel; got {t.tolist()}.")
    return t


@dataclass
class ModelAdapter:
    """Wraps a classifier that maps a batch in input space to logits of shape (N, C).

    Parameters are keyword-only where they are options. `forward` is an `nn.Module` (kept as a private
    eval-mode copy, so the caller's module is never modified) or a callable on float32 tensors for
    black-box models (`differentiable=False`).
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    bounds: tuple[float, float] = (0.0, 1.0)
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    differentiable: bool = True
    name: str = "model"
    batch_size: int = 256
    source_fingerprint: str | None = None
    counter: PassCounter = field(default_factory=PassCounter)
    given_in_training_mode: bool = False
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    eot_samples: int = 1  # > 1: expectation over transformation, for random forwards
    straight_through: bool = False  # BPDA: identity gradients through round/floor/sign
    log_outputs: bool = False  # the model returns probabilities: attack their logarithm (same predictions)
    device: str | torch.device = "auto"  # auto, cpu, cuda, cuda:N, mps
    autocast: str = "off"  # off, bf16 or fp16: forward-only bulk work may use it; never verification or bounds

    def __post_init__(self) -> None:
        low, high = (float(b) for b in self.bounds)
        if not low < high:
            raise UsageError(f"The 'bounds' option must be [low, high] with low < high; got {list(self.bounds)}.")
        self.bounds = (low, high)
        mean = _as_channel_tensor(self.mean, "mean")
        std = _as_channel_tensor(self.std, "std")
        if (mean is None) != (std is None):
            raise UsageError("Give both 'mean' and 'std' for normalisation, or neither.")
        self._domain = _Domain(low, high, mean, std)
        if isinstance(self.forward, nn.Module):
            self.device = resolve_device(self.device)
            self._module = self._private_copy(self.forward).to(self.device)
        else:
            self.device = torch.device("cpu")  # a black box runs where it runs; brittle hands it CPU tensors
            self._module = None
        if self.autocast not in AUTOCAST:
            raise UsageError(f"The 'autocast' option must be one of {', '.join(AUTOCAST)}; got {self.autocast!r}.")
        self._autocast = autocast_dtype(self.autocast, self.device)
        self._feature_layer = self._find_feature_layer()
        self._eager = None
        self.notes: list[str] = []  # what the adapter had to do that a report should say (a conversion, a retry)

    # ----- construction helpers -------------------------------------------------------------
    def _private_copy(self, module: nn.Module) -> nn.Module:
        self.given_in_training_mode = any(m.training for m in module.modules()) and _has_mode_dependent_layers(module)
        own = _copy_module(module)
        try:
            own.eval()
        except NotImplementedError:  # torch.export modules have their mode baked in
            pass
        for p in own.parameters():
            p.requires_grad_(False)
        return own

    def _find_feature_layer(self) -> nn.Module | None:
        """The input of the last Linear layer is the penultimate representation."""
        if self._module is None or isinstance(self._module, torch.jit.ScriptModule):
            return None
        last = None
        for m in self._module.modules():
            if isinstance(m, nn.Linear):
                last = m
        return last

    # ----- shipping to workers -----------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """Only the private copy travels: the caller's module stays behind, TorchScript goes as bytes."""
        state = dict(self.__dict__)
        state["forward"] = None if self._module is not None else self.forward
        state["_feature_layer"] = None
        state["_eager"] = None  # rebuilt where needed, from the module that travels
        state["counter"] = PassCounter()
        if isinstance(self._module, torch.jit.ScriptModule):
            buf = io.BytesIO()
            torch.jit.save(self._module, buf)
            state["_module"] = ("torchscript", buf.getvalue())
        return state

    def __setstate__(self, state: dict) -> None:
        module = state.get("_module")
        if isinstance(module, tuple) and module[0] == "torchscript":
            state["_module"] = torch.jit.load(io.BytesIO(module[1]), map_location=state["device"])
        self.__dict__.update(state)
        self._feature_layer = self._find_feature_layer()

    @property
    def module(self) -> nn.Module | None:
        """The adapter's private eval-mode copy (None for black-box models)."""
        return self._module

    @property
    def has_features(self) -> bool:
        return self._feature_layer is not None

    def eager_module(self) -> nn.Module | None:
        """The module as eager Python modules: the module itself, or for TorchScript its graph read back as eager
        modules (checked to compute the same function; see brittle.graph), so that code needing real layers
        (factored per-example gradients, bound propagation) can use it. Falls back to the TorchScript module, with
        a note, when the graph cannot be read. None for black-box models."""
        if self._module is None or not isinstance(self._module, torch.jit.ScriptModule):
            return self._module
        if self._eager is None:
            from .graph import GraphUnavailable, eager_graph

            try:
                self._eager = eager_graph(self._module, self.normalise(self.probe_inputs()))
            except GraphUnavailable as exc:
                self._eager = self._module
                self.notes.append(f"the TorchScript graph could not be read as eager modules ({exc}); gradient "
                                  "work that needs real layers runs slower on the TorchScript module")
            for p in self._eager.parameters():
                p.requires_grad_(False)
        return self._eager

    def probe_inputs(self, n: int = 2) -> torch.Tensor:
        """A few fixed inputs inside the bounds, of the shape the model was bound to."""
        if self.input_shape is None:
            raise RuntimeError("bind the adapter to data first (adapter.bind(x))")
        low, high = self.bounds
        generator = torch.Generator().manual_seed(0)
        return low + (high - low) * torch.rand((n, *self.input_shape), generator=generator, device="cpu")

    def record_passes(self, forward: int, backward: int = 0) -> None:
        """Count passes made on the module outside this adapter's methods (e.g. per-example weight gradients)."""
        self.counter.forward += int(forward)
        self.counter.backward += int(backward)

    # ----- the forward paths ----------------------------------------------------------------
    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs as the wrapped module sees them (after the adapter's mean/std, if any)."""
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        d = self._domain
        if d.mean is None:
            return x
        shape = [1, -1] + [1] * (x.dim() - 2)
        if d.mean.numel() not in (1, x.shape[1]):
            raise UsageError(
                f"Normalisation has {d.mean.numel()} values but inputs have {x.shape[1]} channels; "
                "give one mean/std per channel."
            )
        return (x - d.mean.to(x.device).view(shape)) / d.std.to(x.device).view(shape)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype inputs are given to the module in: its parameters' (float32 for a black box)."""
        if self._module is not None:
            for p in self._module.parameters():
                if p.is_floating_point():
                    return p.dtype
        return torch.float32

    def _raw(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output on the model's device (x is moved there first)."""
        fn = self._module if self._module is not None else self.forward
        out = fn(self._normalise(x.to(self.device, self.dtype)))
        if isinstance(out, (tuple, list)):
            out = out[0]
        if self.log_outputs:
            out = torch.log(out.float().clamp_min(1e-30))
        return out

    def _batched(self, x: torch.Tensor, batch_size: int | None, run: Callable[[torch.Tensor], object]) -> list:
        """run(chunk) over chunks of x; on an out-of-memory error the adapter's batch size is halved (for the rest
        of the audit, with a note) and the chunk is tried again."""
        bs = batch_size or self.batch_size
        outs, i = [], 0
        while i < len(x):
            chunk = x[i: i + bs]
            try:
                outs.append(run(chunk))
            except Exception as exc:
                if not is_out_of_memory(exc) or bs == 1:
                    raise
                bs = self._shrink_batch(min(bs, len(chunk)))
                continue
            i += len(chunk)
        return outs

    def _shrink_batch(self, failed: int) -> int:
        """After an out-of-memory error on `failed` inputs at once: halve the batch size until it is below that, for
        the rest of the audit."""
        if not hasattr(self, "_batch_size_given"):
            self._batch_size_given = self.batch_size
        size = max(1, self.batch_size // 2)
        while size >= failed and size > 1:
            size //= 2
        self.batch_size = size
        self.notes[:] = [n for n in self.notes if not n.startswith("the device ran out of memory")]
        self.notes.append(f"the device ran out of memory: batch size halved from {self._batch_size_given} to "
                          f"{self.batch_size} (gradients then come from chunks recomputed in the backward pass)")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return self.batch_size

    def logits(self, x: torch.Tensor, *, batch_size: int | None = None, fast: bool = False) -> torch.Tensor:
        """Logits for a batch in input space, without gradients, batched to bound memory, on the device of `x`.
        `fast`: forward-only bulk work that may run under the configured autocast (never for a verification)."""
        autocast = self._autocast if fast else None

        def run(chunk: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), (torch.autocast(self.device.type, dtype=autocast) if autocast is not None
                                   else contextlib.nullcontext()):
                out = self._raw(chunk).detach().float().to(x.device)
            self.counter.forward += len(chunk)
            return out

        outs = self._batched(x, batch_size, run)
        if not outs:
            return torch.empty(0, self.num_classes or 0, device=x.device)
        return torch.cat(outs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(1)

    def logits_and_grad(
        self, x: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the gradient of `loss_fn(logits).sum()` with respect to the input batch.

        `loss_fn` maps logits (N, C) to per-sample losses (N,). One forward and one backward pass per sample,
        times `eot_samples` when expectation over randomness is on (then logits and gradients are means).
        A loss that does not depend on the input (e.g. behind a thresholding step) gives zero gradients.
        """
        if not self.differentiable:
            raise GradientsUnavailable(f"{self.name} is a black-box model: input gradients are unavailable.")
        while True:
            try:
                return self._gradient_pass(x, loss_fn)
            except Exception as exc:
                if not is_out_of_memory(exc) or min(self.batch_size, len(x)) == 1:
                    raise
                self._shrink_batch(min(self.batch_size, len(x)))

    def _gradient_pass(self, x: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
        # loss_fn sees the whole batch (it may close over its rows), so a batch larger than the batch size runs its
        # forward in checkpointed chunks: the backward pass recomputes one chunk at a time (one more forward each).
        chunk = self.batch_size if len(x) > self.batch_size else None
        logits_sum, grad_sum = None, None
        for _ in range(self.eot_samples):
            xg = x.detach().to(self.device, self.dtype).requires_grad_(True)
            with torch.enable_grad(), self._gradient_context():
                if chunk is None:
                    logits = self._raw(xg).float().to(x.device)
                else:
                    from torch.utils.checkpoint import checkpoint

                    logits = torch.cat([checkpoint(self._raw, xg[i: i + chunk], use_reentrant=False)
                                        for i in range(0, len(xg), chunk)]).float().to(x.device)
                    self.counter.forward += len(x)  # the recomputation
                loss = loss_fn(logits).sum()
                if loss.requires_grad:
                    (grad,) = torch.autograd.grad(loss, xg, allow_unused=True)
                else:
                    grad = None
            grad = torch.zeros_like(x) if grad is None else grad.detach().to(x.device, x.dtype)
            logits_sum = logits.detach() if logits_sum is None else logits_sum + logits.detach()
            grad_sum = grad if grad_sum is None else grad_sum + grad
            self.counter.forward += len(x)
            self.counter.backward += len(x)
        return logits_sum / self.eot_samples, grad_sum / self.eot_samples

    def _gradient_context(self):
        if self.straight_through:
            from .straight_through import straight_through

            return straight_through()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def escalated(self, *, eot_samples: int | None = None, straight_through: bool | None = None,
                  log_outputs: bool | None = None):
        """Temporarily average gradients over `eot_samples` forwards, use straight-through gradients, or
        attack log-probabilities; each None leaves that setting as it is."""
        saved = (self.eot_samples, self.straight_through, self.log_outputs)
        if eot_samples is not None:
            self.eot_samples = int(eot_samples)
        if straight_through is not None:
            self.straight_through = bool(straight_through)
        if log_outputs is not None:
            self.log_outputs = bool(log_outputs)
        try:
            yield self
        finally:
            self.eot_samples, self.straight_through, self.log_outputs = saved

    def features(self, x: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor | None:
        """Penultimate features (the input of the last Linear layer), or None when they cannot be found."""
        _, embedding, kind = self.logits_and_embedding(x, batch_size=batch_size)
        return embedding if kind == "penultimate features" else None

    def logits_and_embedding(self, x: torch.Tensor, *, batch_size: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Logits and, from the same forward pass, the penultimate features where they can be found, else the
        logits again (a black box or a TorchScript file has only those); the string says which, for reports."""
        layer = self._feature_layer
        captured: list[torch.Tensor] = []
        handle = None if layer is None else layer.register_forward_pre_hook(
            lambda _m, inp: captured.append(inp[0].detach().flatten(1)))
        try:
            logits = self.logits(x, batch_size=batch_size)
        finally:
            if handle is not None:
                handle.remove()
        if captured:
            return logits, torch.cat(captured), "penultimate features"
        return logits, logits, "logits"

    # ----- binding to data -------------------------------------------------------------------
    def bind(self, x_example: torch.Tensor, source: str = "data") -> None:
        """Run a two-sample forward to learn the output width and check the model accepts this input shape."""
        probe = x_example[:2].float()
        try:
            with torch.no_grad():
                out = self._raw(probe).cpu()
        except Exception as exc:  # the user's forward rejected the input: say so, not a torch traceback
            raise InputError(
                source,
                f"the model failed on inputs of shape {tuple(probe.shape[1:])} (per sample): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                "check that the data has the layout the model expects (N, C, H, W for images; N, D for tables)",
            ) from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != probe.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(
                self.name,
                f"the model must return logits of shape (N, C); for {probe.shape[0]} inputs it returned {shape}",
                "wrap the model so that forward returns one row of class scores per input",
            )
        if out.shape[1] < 2:
            raise InputError(self.name, f"the model returns {out.shape[1]} output column(s); a classifier needs >= 2")
        self.input_shape = tuple(probe.shape[1:])
        self.num_classes = int(out.shape[1])
        self.counter.forward += len(probe)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(repr((self.bounds, self.mean, self.std, self.differentiable)).encode())
        if self.source_fingerprint:
            h.update(self.source_fingerprint.encode())
        elif self._module is not None:
            h.update(type(self._module).__name__.encode())
            for name, t in self._module.state_dict().items():
                h.update(name.encode())
                h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
        else:
            raise UsageError("A black-box model needs a source fingerprint to be resumable.")
        return h.hexdigest()


def _copy_module(module: nn.Module) -> nn.Module:
    if isinstance(module, torch.jit.ScriptModule):
        # deepcopy of a ScriptModule yields non-leaf parameters; a save/load round trip is a clean copy.
        buf = io.BytesIO()
        torch.jit.save(module, buf)
        buf.seek(0)
        return torch.jit.load(buf, map_location="cpu")
    return copy.deepcopy(module)


def _has_mode_dependent_layers(module: nn.Module) -> bool:
    mode_dependent = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.AlphaDropout)
    names = ("Dropout", "BatchNorm", "AlphaDropout", "InstanceNorm")
    for m in module.modules():
        if isinstance(m, mode_dependent):
            return True
        # A scripted module hides its Python class; it keeps the original name.
        if isinstance(m, torch.jit.ScriptModule) and any(n in getattr(m, "original_name", "") for n in names):
            return True
    return False
