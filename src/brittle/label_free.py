"""Accuracy without labels: estimate a model's accuracy on an unlabelled target set, and say when not to trust it.

Fit on labelled source data (the data the model was validated on), then estimate on the target:
- `confidence`: mean top-class probability after temperature scaling (fitted on the source);
- `doc`: source accuracy + (target - source) mean confidence (Guillory et al. 2021);
- `atc`: share of target examples whose negative entropy is above the source threshold that reproduces the
  source accuracy (Garg et al. 2022);
- `cot`: 1 - the optimal-transport cost from the target's predicted probabilities to the source's label
  distribution, cost ||p - onehot||_inf (Lu et al. 2023): it notices when predictions pile up on a few
  classes, which every confidence method misses;
- with other models: `gde`, agreement of the audited model with the others on the target (Jiang et al. 2022),
  and `agreement_line`, accuracy moved in probit space by as much as agreement moved (Baek et al. 2022;
  the slope is fitted on the pairs when there are three models or more, and 1 otherwise).
The reported `estimate` is the mean of `cot` and, when other models are given, `agreement_line`: on the
benchmark the two fail in opposite directions (docs/benchmarks.md). The interval spans the methods, and
warnings say when the estimate is known to fail: methods disagree, agreement collapses while confidence stays
high, the predicted classes pile up on a few labels (label shift or a collapsed model), or predictions are
unstable: a far larger share of them change under tiny perturbations of the inputs (a shift by 3% of the
side and a little noise for images, a little noise for tables) than on the source data. Any excess of such
unstable predictions over the source's also lowers the interval's low end by as much. Geometric shifts (translations,
rotations) leave every model confident and in agreement while accuracy collapses; instability is what shows
them (`instability`, computed by `estimate` from the model; docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np

from .calibration import fit_temperature, softmax

__all__ = ["SourceFit", "AccuracyEstimate", "estimate", "fit_source", "estimate_accuracy", "prediction_instability",
           "transport_costs"]

_PROBIT = NormalDist()
DISAGREEMENT = 0.15  # methods further apart than this: the estimate is not to be trusted
COLLAPSE = 0.25  # predicted-class distribution this far (total variation) from the source labels
UNSTABLE = 0.1  # this much more of the predictions change under tiny perturbations than on the source data


def _probit(p: float) -> float:
    return _PROBIT.inv_cdf(min(max(p, 1e-4), 1 - 1e-4))


def _unprobit(z: float) -> float:
    return _PROBIT.cdf(z)


def _neg_entropy(probs: np.ndarray) -> np.ndarray:
    return (probs * np.log(np.clip(probs, 1e-12, None))).sum(1)


def transport_costs(probs: np.ndarray, prior: np.ndarray, *, eps: float = 0.002, iterations: int = 300) -> np.ndarray:
    """Per-example cost of the optimal transport from predicted probabilities (uniform weights) to one-hot labels
    with class masses `prior`, cost ||p - onehot_k||_inf; entropic (eps) Sinkhorn in the K dual variables.
    The mean of the result is the transport cost."""
    n, k = probs.shape
    top = probs.max(1, keepdims=True)
    # ||p - e_k||_inf = max(1 - p_k, max_{j != k} p_j)
    others = np.where(probs == top, np.partition(probs, -2, axis=1)[:, -2:-1], top)
    cost = np.maximum(1.0 - probs, others)
    log_prior = np.log(np.clip(prior, 1e-12, None))
    g = np.zeros(k)
    for _ in range(iterations):
        z = (g[None] - cost) / eps
        z -= z.max(1, keepdims=True)
        plan = np.exp(z)
        plan /= plan.sum(1, keepdims=True)
        g += eps * (log_prior - np.log(np.clip(plan.mean(0), 1e-300, None)))
    return (plan * cost).sum(1)


@dataclass
class SourceFit:
    """What the estimators learn from labelled source data (model 0 is the audited model)."""

    temperature: float
    accuracy: float
    confidence: float
    atc_threshold: float
    prior: list[float]
    accuracies: list[float] = field(default_factory=list)  # every model's source accuracy
    agreements: dict[str, float] = field(default_factory=dict)  # "i,j" -> source agreement
    n: int = 0


@dataclass
class AccuracyEstimate:
    estimate: float
    interval: tuple[float, float]
    methods: dict[str, float]
    warnings: list[str]
    n: int
    predicted_class_shift: float  # total variation between target predictions and source labels
    true_accuracy: float | None = None  # when the target happens to have labels: what the estimate is judged by
    instability: tuple[float, float] | None = None  # share of predictions a tiny perturbation changes: source, target

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """What `brittle estimate` prints: the estimate on one line, then each method and every warning."""
        low, high = self.interval
        lines = [f"estimated accuracy {self.estimate:.1%} (interval {low:.1%} to {high:.1%}) on {self.n} inputs"
                 + (f"; true accuracy {self.true_accuracy:.1%} (the target has labels)"
                    if self.true_accuracy is not None else "")]
        for name, value in self.methods.items():
            lines.append(f"  {name:<15}{value:7.1%}  {METHOD_NAMES.get(name, '')}")
        if self.instability is not None:
            lines.append(f"  instability    {self.instability[1]:7.1%}  predictions changed by tiny perturbations "
                         f"(source data: {self.instability[0]:.1%})")
        lines += [f"  warning: {w}" for w in self.warnings] or ["  no warning fired"]
        return "\n".join(lines)


METHOD_NAMES = {
    "confidence": "mean top-class probability after temperature scaling",
    "doc": "source accuracy moved by the change in mean confidence (DoC)",
    "atc": "share of inputs above the source's confidence threshold (ATC)",
    "cot": "1 - optimal-transport cost from predictions to the source's label mix (COT; half the estimate)",
    "gde": "agreement with the other models (GDE)",
    "agreement_line": "accuracy moved as far as agreement moved, in probit space (half the estimate)",
}


def fit_source(logits: list[np.ndarray] | np.ndarray, y: np.ndarray, *, num_classes: int | None = None) -> SourceFit:
    """Fit on labelled source data. `logits`: the audited model's (N, K) logits, or a list, audited model first."""
    logits = [np.asarray(logits, np.float64)] if isinstance(logits, np.ndarray) else [np.asarray(z, np.float64) for z in logits]
    y = np.asarray(y)
    k = num_classes or logits[0].shape[1]
    t = fit_temperature(logits[0], y)
    probs = softmax(logits[0], t)
    acc = float((probs.argmax(1) == y).mean())
    score = _neg_entropy(probs)
    # The threshold above which the share of source examples equals the source accuracy.
    threshold = float(np.quantile(score, 1.0 - acc)) if acc < 1 else float(score.min()) - 1e-9
    preds = [z.argmax(1) for z in logits]
    agreements = {f"{i},{j}": float((preds[i] == preds[j]).mean())
                  for i in range(len(preds)) for j in range(i + 1, len(preds))}
    return SourceFit(t, acc, float(probs.max(1).mean()), threshold, np.bincount(y, minlength=k).astype(float).tolist(),
                     [float((p == y).mean()) for p in preds], agreements, len(y))


def _agreement_line(fit: SourceFit, preds: list[np.ndarray]) -> float:
    pairs = list(fit.agreements)
    ood = {p: float((preds[int(p.split(",")[0])] == preds[int(p.split(",")[1])]).mean()) for p in pairs}
    x = np.array([_probit(fit.agreements[p]) for p in pairs])
    z = np.array([_probit(ood[p]) for p in pairs])
    if len(pairs) >= 3 and np.ptp(x) > 1e-3:
        slope, bias = np.polyfit(x, z, 1)
    else:
        slope = 1.0
        bias = float(np.mean(z - x))
    return _unprobit(slope * _probit(fit.accuracies[0]) + bias)


def estimate_accuracy(fit: SourceFit, logits: list[np.ndarray] | np.ndarray, *,
                      instability: tuple[float, float] | None = None) -> AccuracyEstimate:
    """Estimate the audited model's accuracy on unlabelled target data (same model order as in `fit_source`).
    `instability`: (source, target) shares of predictions that tiny perturbations change (`prediction_instability`)."""
    logits = [np.asarray(logits, np.float64)] if isinstance(logits, np.ndarray) else [np.asarray(z, np.float64) for z in logits]
    probs = softmax(logits[0], fit.temperature)
    n, k = probs.shape
    prior = np.asarray(fit.prior, float)
    prior = prior / prior.sum()
    conf = float(probs.max(1).mean())
    methods = {
        "confidence": conf,
        "doc": float(np.clip(fit.accuracy + conf - fit.confidence, 0, 1)),
        "atc": float((_neg_entropy(probs) > fit.atc_threshold).mean()),
        "cot": float(1.0 - transport_costs(probs, prior).mean()),
    }
    preds = [z.argmax(1) for z in logits]
    if len(preds) > 1:
        methods["gde"] = float(np.mean([(preds[0] == p).mean() for p in preds[1:]]))
        methods["agreement_line"] = float(_agreement_line(fit, preds))
    chosen = [methods["cot"]] + ([methods["agreement_line"]] if "agreement_line" in methods else [])
    estimate = float(np.mean(chosen))
    warnings = []
    shift = 0.5 * float(np.abs(np.bincount(preds[0], minlength=k)[:k] / n - prior).sum())
    spread = max(methods.values()) - min(methods.values())
    if spread > DISAGREEMENT:
        warnings.append(f"the estimators disagree by {spread:.0%} (from {min(methods.values()):.0%} to "
                        f"{max(methods.values()):.0%}): the shift is one where some of them are known to fail")
    if "gde" in methods and conf - methods["gde"] > DISAGREEMENT:
        warnings.append(f"confidence stays high ({conf:.0%}) while the models agree on only {methods['gde']:.0%} "
                        "of the inputs: confidence-based estimates are too high here")
    if shift > COLLAPSE:
        warnings.append(f"predictions pile up on a few classes (total variation {shift:.2f} from the source labels): "
                        "either the model collapsed on this data or the class mix changed, which the estimators "
                        "assume it did not")
    if instability is not None and _more_unstable(instability, n, fit.n):
        warnings.append(f"predictions are unstable: {instability[1]:.0%} of them change under tiny perturbations of "
                        f"the inputs, against {instability[0]:.0%} on the source data; the model is near its decision "
                        "boundaries on many of these inputs. Under such shifts (translated or rotated images) every "
                        "estimator here has been seen to be far too high while the models stay confident and agree")
    se = float(np.sqrt(max(estimate * (1 - estimate), 1e-4) / n))
    # Predictions that tiny perturbations flip sit at a decision boundary, where no estimator here can tell right
    # from wrong: as many more of them as on the source data are as many points the estimate may be too high.
    excess = max(0.0, instability[1] - instability[0]) if instability is not None else 0.0
    low = max(0.0, min(min(methods.values()), estimate - 2 * se, estimate - excess))
    high = min(1.0, max(max(methods.values()), estimate + 2 * se))
    return AccuracyEstimate(estimate, (low, high), methods, warnings, n, shift, instability=instability)


def _more_unstable(instability: tuple[float, float], n_target: int, n_source: int) -> bool:
    """The target's flip share exceeds the source's by UNSTABLE, significantly (two-proportion z > 3)."""
    a, b = instability
    pooled = (a * n_source + b * n_target) / max(n_source + n_target, 1)
    se = np.sqrt(max(pooled * (1 - pooled), 1e-6) * (1 / max(n_source, 1) + 1 / max(n_target, 1)))
    return b - a > UNSTABLE and (b - a) / se > 3


def prediction_instability(model, x, *, seed: int = 0, draws: int = 4, scale=None) -> float:
    """The share of predictions (over `draws` perturbed copies of x) that change under a tiny perturbation: images
    move by 3% of their side along each axis, in a random direction (bilinear, so the same at any resolution: under
    a pixel at 28x28) and get noise of 5% of the input range; tables get noise of 5% of each feature's scale
    (`scale`, default the features' standard deviation in x)."""
    import torch

    low, high = model.bounds
    before = model.logits(x).argmax(1)
    g = torch.Generator().manual_seed(seed)
    changed = 0.0
    for _ in range(draws):
        if x.dim() == 4:
            shift = (torch.randint(0, 2, (2,), generator=g).float() * 2 - 1) * 0.06  # grid units: the side spans 2
            theta = torch.tensor([[1.0, 0.0, float(shift[0])], [0.0, 1.0, float(shift[1])]]).expand(len(x), 2, 3)
            grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
            moved = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                                    align_corners=False)
            noise = 0.05 * (high - low) * torch.randn(x.shape, generator=g)
        else:
            moved = x
            sd = (x.std(0) if scale is None else torch.as_tensor(scale)).clamp_min(1e-12)
            noise = 0.05 * sd * torch.randn(x.shape, generator=g)
        changed += float((model.logits((moved + noise).clamp(low, high)).argmax(1) != before).float().mean())
    return changed / draws


def estimate(model, source, target, *, other_models=(), config=None) -> AccuracyEstimate:
    """Estimate `model`'s accuracy on unlabelled `target`, fitted on labelled `source` (validation data).

    `model`, `source`, `target`: what `brittle.audit` takes (paths, modules, arrays). `other_models`: more
    models of the same classes and input domain (paths or modules); with them, agreement-based estimates join.
    """
    from .errors import UsageError
    from .config import as_config
    from .prepare import prepare_data, prepare_model, prepare_other_model

    cfg = as_config(config)
    first = prepare_model(model, cfg)
    src = prepare_data(source, first, cfg, role="source")
    tgt = prepare_data(target, first, cfg, role="target")
    if src.y is None:
        raise UsageError(f"The source data {src.source} has no labels: the estimators are fitted on labelled "
                         "validation data.")
    adapters = [first] + [prepare_other_model(o, cfg, like=first, x_example=src.x) for o in other_models]
    fit = fit_source([a.logits(src.x).numpy() for a in adapters], src.y.numpy(), num_classes=adapters[0].num_classes)
    target_logits = [a.logits(tgt.x).numpy() for a in adapters]
    scale = src.x.std(0) if src.x.dim() == 2 else None
    instability = (prediction_instability(first, src.x, scale=scale), prediction_instability(first, tgt.x, scale=scale))
    result = estimate_accuracy(fit, target_logits, instability=instability)
    if tgt.y is not None:
        result.true_accuracy = float((target_logits[0].argmax(1) == tgt.y.numpy()).mean())
    return result
