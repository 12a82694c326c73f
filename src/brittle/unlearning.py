"""Did an unlearning request work? Compare the unlearned model with models retrained without the forget set.

The gold standard of unlearning is the model retrained from scratch on the retain set. `unlearn_check` trains
K such models through the user's train function (on the retain set, K seeds) and asks whether the unlearned
model treats the forget set as they do:
- **distribution**: a two-sample KS test of the unlearned model's logit-scaled confidence phi on the forget set
  against the retrained models' phi on the same examples (all K pooled; a per-example KS would need many more
  models);
- **membership**: each forget and each test example gets the LiRA offline score of the unlearned model's phi
  against the retrained models (for every example they are "out" models); a forgotten set scores like unseen
  test examples, a remembered one higher. One-sided Mann-Whitney test (normal approximation) of forget vs test
  scores, with its AUC;
- **utility**: accuracy on retain and test of the unlearned model beside the retrained models' mean.
Verdict: "not forgotten" when either test rejects at `alpha` with the unlearned model more confident on the
forget set than the retrained models; "forgotten" when neither does and the forget set is large enough for
the tests to have power (`min_forget`); otherwise "inconclusive". The evidence (p-values, AUC, accuracies)
always comes with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np
import torch

from .drift import ks_2samp
from .errors import UsageError
from .privacy import lira_offline, logit_confidence
from .reference_models import reference_model_logits

__all__ = ["UnlearnResult", "unlearn_check", "compare_with_retrained"]

MIN_FORGET = 30


@dataclass
class UnlearnResult:
    verdict: str  # "forgotten", "not forgotten" or "inconclusive"
    reasons: list[str]
    ks_statistic: float
    ks_p_value: float
    membership_auc: float  # forget vs test, LiRA offline scores of the unlearned model (0.5: alike)
    membership_p_value: float
    forget_confidence: float  # mean phi on the forget set: unlearned model
    retrained_forget_confidence: float  # ... and the retrained models
    accuracy: dict[str, float] = field(default_factory=dict)  # unlearned/retrained on forget, retain and test
    reference_models: int = 0
    n_forget: int = 0
    n_test: int = 0
    alpha: float = 0.05

    def to_json(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        acc = self.accuracy
        lines = [f"unlearning verdict: {self.verdict.upper()}",
                 f"  forget set ({self.n_forget}): confidence (logit-scaled) {self.forget_confidence:.2f} vs "
                 f"{self.retrained_forget_confidence:.2f} for {self.reference_models} models retrained without it",
                 f"  KS test of the forget set's confidence vs the retrained models': D {self.ks_statistic:.3f}, "
                 f"p {self.ks_p_value:.3g}",
                 f"  membership (LiRA offline) forget vs {self.n_test} test examples: AUC {self.membership_auc:.3f}, "
                 f"p {self.membership_p_value:.3g}",
                 "  accuracy (unlearned / retrained): " + ", ".join(
                     f"{k} {acc.get(k, float('nan')):.3f} / {acc.get('retrained_' + k, float('nan')):.3f}"
                     for k in ("forget", "retain", "test"))]
        return "\n".join(lines + [f"  {r}" for r in self.reasons])


def _mann_whitney_greater(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """AUC of a over b and the one-sided p-value that a tends to be larger (normal approximation, tie-corrected)."""
    from .attribution import ranks

    both = np.concatenate([a, b])
    n1, n2 = len(a), len(b)
    u = (ranks(both)[:n1] + 1).sum() - n1 * (n1 + 1) / 2  # ranks from 1, ties sharing their mean rank
    _, counts = np.unique(both, return_counts=True)
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - (counts ** 3 - counts).sum() / (n * (n - 1)))
    z = (u - n1 * n2 / 2) / np.sqrt(max(var, 1e-12))
    return float(u / (n1 * n2)), float(1 - NormalDist().cdf(z))


def compare_with_retrained(unlearned_logits: dict[str, np.ndarray], retrained_logits: dict[str, np.ndarray],
                           labels: dict[str, np.ndarray], *, alpha: float = 0.05,
                           min_forget: int = MIN_FORGET) -> UnlearnResult:
    """The verdict from logits: `unlearned_logits[s]` (n_s, classes) and `retrained_logits[s]` (K, n_s, classes)
    for s in forget, retain, test; `labels[s]` (n_s,)."""
    phi_u = {s: logit_confidence(unlearned_logits[s], labels[s]) for s in ("forget", "test")}
    phi_r = {s: logit_confidence(retrained_logits[s], labels[s]) for s in ("forget", "test")}
    k = retrained_logits["forget"].shape[0]
    # The K models' values on one example are correlated: the pooled sample counts as n independent ones.
    ks_d, ks_p = ks_2samp(phi_u["forget"], phi_r["forget"].ravel(), effective_b=phi_r["forget"].shape[1])
    out = {s: np.zeros_like(phi_r[s], dtype=bool) for s in phi_r}  # every retrained model is an "out" model
    score = {s: lira_offline(phi_u[s], phi_r[s], out[s]) for s in phi_r}
    auc, mw_p = _mann_whitney_greater(score["forget"], score["test"])
    conf_u, conf_r = float(phi_u["forget"].mean()), float(phi_r["forget"].mean())
    accuracy = {}
    for s in ("forget", "retain", "test"):
        accuracy[s] = float((unlearned_logits[s].argmax(1) == labels[s]).mean())
        accuracy["retrained_" + s] = float((retrained_logits[s].argmax(2) == labels[s][None]).mean())
    reasons = []
    higher = conf_u > conf_r
    if ks_p < alpha and higher:
        reasons.append(f"The unlearned model is more confident on the forget set than the retrained models "
                       f"(KS p = {ks_p:.3g} < {alpha:g}): it still fits those examples.")
    if mw_p < alpha:
        reasons.append(f"A membership attack tells forget examples from unseen test examples (AUC {auc:.2f}, "
                       f"p = {mw_p:.3g} < {alpha:g}).")
    n_forget = len(labels["forget"])
    if reasons:
        verdict = "not forgotten"
    elif n_forget < min_forget:
        verdict = "inconclusive"
        reasons.append(f"No test rejects, but {n_forget} forget examples are too few for the tests to have power "
                       f"(at least {min_forget}).")
    else:
        verdict = "forgotten"
        reasons.append(f"Neither test rejects at {alpha:g}: on the forget set the unlearned model behaves as the "
                       f"models retrained without it do.")
        if ks_p < alpha:
            reasons.append(f"(Its confidence distribution on the forget set differs (KS p = {ks_p:.3g}) but is lower "
                           "than the retrained models': the forget set was pushed below never-seen, which a "
                           "membership attack may also exploit.)")
    if accuracy["test"] < accuracy["retrained_test"] - 0.05:
        reasons.append(f"Utility: test accuracy {accuracy['test']:.3f} against {accuracy['retrained_test']:.3f} for "
                       "the retrained models: the unlearning cost accuracy.")
    return UnlearnResult(verdict, reasons, ks_d, ks_p, auc, mw_p, conf_u, conf_r, accuracy, k, n_forget,
                         len(labels["test"]), alpha)


def unlearn_check(model, forget, retain, data, *, train_fn: str, reference_models: int = 4, seed: int = 0,
                  alpha: float = 0.05, config=None, progress=None, reference_cache: str | None = None) -> UnlearnResult:
    """Whether `model` (the unlearned model) has forgotten `forget`: against `reference_models` models trained
    through `train_fn` ('package.module:function', called as fn(x, y, seed=...)) on `retain`, judged on the forget
    set and on held-out `data`. Inputs as `brittle.audit` takes them (paths, modules, arrays). With
    `reference_cache` (a folder), retrained models are kept there and reused by the next check of the same request
    (another unlearning method's model, say)."""
    from ._progress import Progress
    from .config import as_config
    from .loading.models import import_callable
    from .prepare import prepare_data, prepare_model
    from .seeds import derive_seed

    if reference_models < 2:
        raise UsageError(f"The 'reference_models' option must be >= 2; got {reference_models}.")
    if not 0 < alpha < 1:
        raise UsageError(f"The 'alpha' option must lie in (0, 1); got {alpha}.")
    progress = progress or Progress()
    cfg = as_config(config)
    adapter = prepare_model(model, cfg)
    sets = {"forget": prepare_data(forget, adapter, cfg, role="forget set"),
            "retain": prepare_data(retain, adapter, cfg, role="retain set"),
            "test": prepare_data(data, adapter, cfg, role="test data")}
    for name, ds in sets.items():
        if ds.y is None:
            raise UsageError(f"The {name} ({ds.source}) has no labels: unlearning is judged on labelled examples.")
    import_callable(train_fn, "train function", "it must train and return an nn.Module")
    x = torch.cat([sets[s].x for s in ("forget", "retain", "test")])
    y = torch.cat([sets[s].y for s in ("forget", "retain", "test")])
    bounds = np.cumsum([0] + [len(sets[s]) for s in ("forget", "retain", "test")])
    parts = {s: slice(int(bounds[i]), int(bounds[i + 1])) for i, s in enumerate(("forget", "retain", "test"))}
    retain_rows = np.arange(parts["retain"].start, parts["retain"].stop)
    progress.start(f"unlearn-check: {reference_models} models retrained without the forget set", reference_models)
    retrained = []
    for m in range(reference_models):
        retrained.append(reference_model_logits(None, x, y, train_fn, retain_rows,
                                                derive_seed(seed, "unlearn-check", "model", m),
                                                reference_cache)["logits"])
        progress.advance()
    progress.finish()
    retrained = np.stack(retrained)
    unlearned = adapter.logits(x).numpy()
    labels = {s: y[p].numpy() for s, p in parts.items()}
    return compare_with_retrained({s: unlearned[p] for s, p in parts.items()},
                                  {s: retrained[:, p] for s, p in parts.items()}, labels, alpha=alpha)
