"""Everything that depends on the torch version or on the machine's devices, in one place."""

from __future__ import annotations

import torch

from .errors import UsageError, arg

__all__ = ["resolve_device", "is_out_of_memory", "autocast_dtype", "AUTOCAST"]

AUTOCAST = ("off", "bf16", "fp16")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """'auto' (CUDA, else MPS, else the CPU), 'cpu', 'cuda', 'cuda:N' or 'mps', checked against this machine."""
    if spec is None or str(spec) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(f"The '{arg('device')}' option must be auto, cpu, cuda, cuda:N or mps; got {spec!r}.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"The '{arg('device')}' option asks for {spec}, but this torch sees no CUDA device "
                             f"(torch {torch.__version__}); use cpu or auto.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"The '{arg('device')}' option asks for {spec}, but there are "
                             f"{torch.cuda.device_count()} CUDA devices (cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
    elif device.type == "mps" and not _mps_available():
        raise UsageError(f"The '{arg('device')}' option asks for mps, which this machine does not have; use cpu or auto.")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"The '{arg('device')}' option must be auto, cpu, cuda, cuda:N or mps; got {spec!r}.")
    return device


def is_out_of_memory(exc: BaseException) -> bool:
    """A device ran out of memory (CUDA raises OutOfMemoryError; MPS and others a RuntimeError saying so)."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (isinstance(exc, RuntimeError)
                                                        and "out of memory" in str(exc).lower())


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off":
        return None
    if mode == "fp16" and device.type == "cpu":
        raise UsageError(f"The '{arg('autocast')}' option fp16 needs a GPU; on the CPU use bf16 or off.")
    return torch.bfloat16 if mode == "bf16" else torch.float16
