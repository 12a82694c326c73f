"""Reference models (models retrained through the user's train function) kept on disk by what determines them.

A reference model does not depend on the audited model: LiRA's shadow models, the models retrained without a
forget set, are the same for every version of a model trained with the same recipe on the same data. Training
them is the expensive part of the privacy checks, so with a cache folder each one is trained once: its logits
are stored under a key made of the train function's name, the content of the file that defines it, the inputs
and labels it sees, the rows it trains on and its seed. Change any of them and the model is retrained; change
code the train function imports from another file and the cache cannot tell (clear the folder).
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import numpy as np
import torch

from ._atomic import write_npz

__all__ = ["reference_model_logits", "reference_key"]

KEY_VERSION = b"brittle reference model v1"


def reference_key(train_fn: str, x: torch.Tensor, y: torch.Tensor, fit: np.ndarray, seed: int) -> str:
    from .loading.models import import_callable

    fn = import_callable(train_fn, "train function", "it must train and return an nn.Module")
    h = hashlib.sha256(KEY_VERSION)
    h.update(train_fn.encode())
    try:
        h.update(Path(inspect.getsourcefile(fn) or "").read_bytes())
    except (OSError, TypeError):
        h.update(b"<no source file>")
    for t in (x, y):
        arr = np.ascontiguousarray(t.detach().cpu().numpy())
        h.update(str((arr.dtype.str, arr.shape)).encode())
        h.update(arr.tobytes())
    h.update(np.ascontiguousarray(np.asarray(fit, dtype=np.int64)).tobytes())
    h.update(str(int(seed)).encode())
    return h.hexdigest()[:32]


def reference_model_logits(model, x: torch.Tensor, y: torch.Tensor, train_fn: str, fit: np.ndarray, seed: int,
                           cache: str | None = None) -> dict[str, np.ndarray]:
    """One reference model (a shard task): the user's train function on the rows `fit`, its logits on every row;
    read from `cache` (a folder) when this very model was trained before, and stored there when not."""
    from .loading.models import train_and_predict

    path = Path(cache) / f"{reference_key(train_fn, x, y, fit, seed)}.npz" if cache else None
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as stored:
            if stored["logits"].shape[0] == len(x):
                return {"logits": stored["logits"], "passes": np.array([0, 0]), "cached": np.array(True)}
    logits = train_and_predict(train_fn, x, y, fit, np.arange(len(x)), seed).float().numpy()
    if path is not None:
        write_npz(path, {"logits": logits})
    return {"logits": logits, "passes": np.array([0, 0]), "cached": np.array(False)}
