"""Drift monitoring: has a new batch of inputs moved away from the reference data, as the model sees it?

Two two-sample tests, each at level alpha/2 so that the alert's false-alarm rate stays at most alpha:
- per-class Kolmogorov-Smirnov on the model's output probabilities, Bonferroni-corrected over classes;
- kernel MMD on the model's penultimate features (its logits where features cannot be found), RBF kernel
  with the median-distance bandwidth of the reference, p-value by permutation.
No labels are needed. The reference should be data the model was validated on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

__all__ = ["DriftResult", "monitor", "ks_2samp", "mmd_permutation_test"]


@dataclass
class DriftResult:
    drift: bool
    alpha: float
    ks_min_p: float  # smallest per-class p-value, before the Bonferroni correction
    ks_class: int  # the class whose probability distribution moved most
    ks_p_values: list[float] = field(default_factory=list)
    mmd: float = 0.0
    mmd_p: float = 1.0
    embedding: str = ""
    n_reference: int = 0
    n_batch: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def ks_2samp(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Two-sample KS statistic and its asymptotic p-value (Stephens' small-sample correction)."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.concatenate([a, b])
    d = float(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                     - np.searchsorted(b, grid, side="right") / len(b)).max())
    en = np.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (en + 0.12 + 0.11 / en) * d
    k = np.arange(1, 101)
    p = float(np.clip(2.0 * np.sum((-1.0) ** (k - 1) * np.exp(-2.0 * (k * lam) ** 2)), 0.0, 1.0)) if lam > 0 else 1.0
    return d, p


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, *, permutations: int = 200, seed: int = 0,
                         bandwidth: float | None = None) -> tuple[float, float]:
    """Unbiased MMD^2 with an RBF kernel and its permutation p-value ((1 + #{perm >= obs}) / (1 + permutations))."""
    z = np.concatenate([x, y]).astype(np.float64)
    sq = (z * z).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None] - 2.0 * z @ z.T, 0.0)
    if bandwidth is None:
        ref = d2[: len(x), : len(x)]
        bandwidth = float(np.sqrt(np.median(ref[np.triu_indices(len(x), 1)]) / 2.0)) or 1.0
    kern = np.exp(-d2 / (2.0 * bandwidth ** 2))
    np.fill_diagonal(kern, 0.0)
    n, m = len(x), len(y)

    def stat(idx: np.ndarray) -> float:
        k = kern[np.ix_(idx, idx)]
        kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
        return kxx.sum() / (n * (n - 1)) + kyy.sum() / (m * (m - 1)) - 2.0 * kxy.mean()

    observed = stat(np.arange(n + m))
    g = np.random.default_rng(seed)
    exceed = sum(stat(g.permutation(n + m)) >= observed for _ in range(permutations))
    return float(observed), float((1 + exceed) / (1 + permutations))


def monitor(model, reference, batch, *, alpha: float = 0.05, permutations: int = 200, max_reference: int = 1000,
            seed: int = 0, config=None) -> DriftResult:
    """Compare `batch` with `reference` (each: what `brittle.audit` takes as data; labels are not used)."""
    from .errors import UsageError
    from .runner import _as_config, prepare_data, prepare_model

    if not 0 < alpha < 1:
        raise UsageError(f"The 'alpha' parameter must be in (0, 1); got {alpha!r}.")
    cfg = _as_config(config)
    adapter = prepare_model(model, cfg)
    ref = prepare_data(reference, adapter, cfg, role="reference", subsample=False)
    new = prepare_data(batch, adapter, cfg, role="batch", subsample=False)
    if len(new) < 10 or len(ref) < 10:
        raise UsageError(f"Drift tests need at least 10 inputs on each side; got reference {len(ref)}, batch {len(new)}.")
    g = np.random.default_rng(seed)
    ref_idx = np.sort(g.choice(len(ref), size=min(max_reference, len(ref)), replace=False))
    x_ref = ref.x[torch.as_tensor(ref_idx)]
    logits_ref, e_ref, space = adapter.logits_and_embedding(x_ref)
    logits_new, e_new, _ = adapter.logits_and_embedding(new.x)
    p_ref, p_new = torch.softmax(logits_ref, 1).numpy(), torch.softmax(logits_new, 1).numpy()
    ks = [ks_2samp(p_ref[:, c], p_new[:, c])[1] for c in range(p_ref.shape[1])]
    mmd, mmd_p = mmd_permutation_test(e_ref.numpy(), e_new.numpy(), permutations=permutations, seed=seed)
    half = alpha / 2.0
    drift = min(ks) < half / len(ks) or mmd_p < half
    return DriftResult(bool(drift), alpha, float(min(ks)), int(np.argmin(ks)), [float(p) for p in ks], mmd, mmd_p,
                       space, len(x_ref), len(new))
