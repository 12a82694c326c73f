"""Drift monitoring: has a new batch of inputs moved away from the reference data, as the model sees it?

Three two-sample tests, each at level alpha/3 so that the alert's false-alarm rate stays at most alpha:
- per-class Kolmogorov-Smirnov on the model's output probabilities, Bonferroni-corrected over classes;
- kernel MMD on the model's penultimate features (its logits where features cannot be found), RBF kernel
  with the median-distance bandwidth of the reference, p-value by permutation;
- the same MMD on the inputs themselves (images area-pooled to at most 32x32): a camera or pipeline change
  the model does not react to yet is still drift, and the result says which test saw it.
No labels are needed. The reference should be data the model was validated on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

__all__ = ["DriftResult", "monitor", "drift_test", "input_view", "ks_2samp", "mmd_permutation_test"]


@dataclass
class DriftResult:
    drift: bool
    alpha: float
    ks_min_p: float  # smallest per-class p-value, before the Bonferroni correction
    ks_class: int  # the class whose probability distribution moved most
    ks_p_values: list[float] = field(default_factory=list)
    mmd: float = 0.0
    mmd_p: float = 1.0
    input_mmd: float = 0.0
    input_mmd_p: float = 1.0
    embedding: str = ""
    n_reference: int = 0
    n_batch: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """What `brittle monitor` prints: the verdict on one line, then each test with what it looked at."""
        tests = 3 if self.input_mmd or self.input_mmd_p < 1 else 2
        level = self.alpha / tests
        k = max(len(self.ks_p_values), 1)
        verdict = "DRIFT" if self.drift else "no drift"
        lines = [f"{verdict}: {self.n_batch} new inputs against {self.n_reference} reference inputs (false-alarm rate "
                 f"at most {self.alpha:g}; each of the {tests} tests at {level:.3g})",
                 f"  outputs   per-class KS on the predicted probabilities: smallest p {self.ks_min_p:.3g}, for class "
                 f"{self.ks_class} (the class whose probability distribution moved most); fires below "
                 f"{level / k:.3g} (Bonferroni over {k} classes)",
                 f"  features  MMD on the model's {self.embedding or 'embedding'}: p {self.mmd_p:.3g}",
                 f"  inputs    MMD on the inputs themselves: p {self.input_mmd_p:.3g} (sees changes the model ignores)"]
        return "\n".join(lines)


def ks_2samp(a: np.ndarray, b: np.ndarray, *, effective_b: int | None = None) -> tuple[float, float]:
    """Two-sample KS statistic and its asymptotic p-value (Stephens' small-sample correction). `effective_b`: the
    number of independent samples in b when b pools correlated draws (e.g. several models on the same examples)."""
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    grid = np.concatenate([a, b])
    d = float(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                     - np.searchsorted(b, grid, side="right") / len(b)).max())
    nb = len(b) if effective_b is None else min(int(effective_b), len(b))
    en = np.sqrt(len(a) * nb / (len(a) + nb))
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
    g = np.random.default_rng(seed)
    # Column 0 is the observed split, the others permutations; every statistic from one matrix product.
    sides = np.zeros((n + m, permutations + 1))
    sides[:n, 0] = 1.0
    for p in range(1, permutations + 1):
        sides[g.permutation(n + m)[:n], p] = 1.0
    k_sides = kern @ sides
    total = kern.sum()
    xx = (sides * k_sides).sum(0)
    xy = ((1.0 - sides) * k_sides).sum(0)
    yy = total - xx - 2.0 * xy
    stats = xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (n * m)
    observed = float(stats[0])
    exceed = int((stats[1:] >= observed - 1e-12 * abs(observed)).sum())
    return float(observed), float((1 + exceed) / (1 + permutations))


def monitor(model, reference, batch, *, alpha: float = 0.05, permutations: int = 200, max_reference: int = 1000,
            seed: int = 0, config=None) -> DriftResult:
    """Compare `batch` with `reference` (each: what `brittle.audit` takes as data; labels are not used)."""
    from .errors import UsageError
    from .config import as_config
    from .prepare import prepare_data, prepare_model

    if not 0 < alpha < 1:
        raise UsageError(f"The 'alpha' parameter must be in (0, 1); got {alpha!r}.")
    cfg = as_config(config)
    adapter = prepare_model(model, cfg)
    ref = prepare_data(reference, adapter, cfg, role="reference")
    new = prepare_data(batch, adapter, cfg, role="batch")
    if len(new) < 10 or len(ref) < 10:
        raise UsageError(f"Drift tests need at least 10 inputs on each side; got reference {len(ref)}, batch {len(new)}.")
    g = np.random.default_rng(seed)
    ref_idx = np.sort(g.choice(len(ref), size=min(max_reference, len(ref)), replace=False))
    x_ref = ref.x[torch.as_tensor(ref_idx)]
    logits_ref, e_ref, space = adapter.logits_and_embedding(x_ref)
    logits_new, e_new, _ = adapter.logits_and_embedding(new.x)
    p_ref, p_new = torch.softmax(logits_ref, 1).numpy(), torch.softmax(logits_new, 1).numpy()
    result = drift_test(p_ref, e_ref.numpy(), p_new, e_new.numpy(), input_view(x_ref), input_view(new.x),
                        alpha=alpha, permutations=permutations, seed=seed)
    result.embedding = space
    return result


def input_view(x: torch.Tensor) -> np.ndarray:
    """Inputs as rows for the input-space MMD; images area-pooled to at most 32x32 to bound its cost."""
    if x.ndim == 4 and max(x.shape[2:]) > 32:
        x = torch.nn.functional.adaptive_avg_pool2d(x, (min(32, x.shape[2]), min(32, x.shape[3])))
    return x.reshape(len(x), -1).numpy()


def drift_test(p_ref: np.ndarray, e_ref: np.ndarray, p_new: np.ndarray, e_new: np.ndarray,
               x_ref: np.ndarray | None = None, x_new: np.ndarray | None = None, *, alpha: float = 0.05,
               permutations: int = 200, seed: int = 0) -> DriftResult:
    """The monitor's decision from output probabilities `p_*` (N, K), embeddings `e_*` (N, D) and, optionally,
    input rows `x_*` (see `input_view`) of each side. Each test runs at alpha / (number of tests)."""
    tests = 3 if x_ref is not None else 2
    level = alpha / tests
    ks = [ks_2samp(p_ref[:, c], p_new[:, c])[1] for c in range(p_ref.shape[1])]
    mmd, mmd_p = mmd_permutation_test(e_ref, e_new, permutations=permutations, seed=seed)
    in_mmd, in_p = (mmd_permutation_test(x_ref, x_new, permutations=permutations, seed=seed + 1)
                    if x_ref is not None else (0.0, 1.0))
    drift = min(ks) < level / len(ks) or mmd_p < level or in_p < level
    return DriftResult(bool(drift), alpha, float(min(ks)), int(np.argmin(ks)), [float(p) for p in ks], mmd, mmd_p,
                       in_mmd, in_p, "", len(p_ref), len(p_new))
