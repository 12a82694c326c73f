"""What a model gives away about its training data: membership-inference scores, their ROC, memorisation.

Scores follow the likelihood-ratio attack (LiRA, Carlini et al. 2022). Every score is a function of the
logit-scaled confidence phi = log(p_y / (1 - p_y)) = z_y - logsumexp_{j != y} z_j (computed from the logits,
stable where p_y rounds to 1), which is close to Gaussian over a model's training randomness:
- `population`: phi of the audited model alone (a confidence/loss threshold: no reference models);
- `offline`: how far phi lies above the distribution of phi under reference models trained without the
  example (one-sided z; only "out" models are needed);
- `online`: the log-likelihood ratio of phi under reference models trained with and without the example.
With few reference models the Gaussians share one variance across examples (the paper's fixed variance);
per-example variances need many models on each side.

The metric that matters is the true-positive rate at a low false-positive rate, not the AUC: an attack that
is sure about a few members breaks their privacy even when it guesses about the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


__all__ = ["logit_confidence", "lira_offline", "lira_online", "roc", "Roc", "memorisation"]

FPRS = (0.001, 0.01)  # the false-positive rates TPR is reported at
PER_EXAMPLE_VARIANCE = 16  # models on each side before each example gets its own variance


def logit_confidence(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """phi = log(p_y / (1 - p_y)) per row: logits (n, classes) or (models, n, classes), labels (n,)."""
    z = np.asarray(logits, np.float64)
    label = np.broadcast_to(np.asarray(y)[:, None], z.shape[:-1] + (1,))
    own = np.take_along_axis(z, label, -1)[..., 0]
    others = z.copy()
    np.put_along_axis(others, label, -np.inf, -1)
    top = others.max(-1, keepdims=True)
    return own - (top[..., 0] + np.log(np.exp(others - top).sum(-1)))


def _log_gaussian(x: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mean) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)


def _moments(phi: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example mean and standard deviation of phi (models, n) over the models where `mask` is set; a global
    standard deviation (pooled over examples) unless every example has PER_EXAMPLE_VARIANCE models or more."""
    count = mask.sum(0)
    mean = np.where(count > 0, (phi * mask).sum(0) / np.maximum(count, 1), np.nan)
    resid = np.where(mask, phi - mean[None], 0.0)
    if count.min() >= PER_EXAMPLE_VARIANCE:
        sd = np.sqrt((resid ** 2).sum(0) / np.maximum(count - 1, 1))
    else:
        pooled = (resid ** 2).sum() / max(int(count.sum()) - int((count > 0).sum()), 1)
        sd = np.full(phi.shape[1], np.sqrt(pooled))
    return mean, np.maximum(sd, 1e-6)


def lira_offline(target_phi: np.ndarray, reference_phi: np.ndarray, included: np.ndarray) -> np.ndarray:
    """Membership score (higher: more likely a member): phi's one-sided z above the "out" distribution.
    `reference_phi` (models, n); `included` (models, n) says which reference model trained on which example."""
    mean, sd = _moments(reference_phi, ~included)
    return np.nan_to_num((target_phi - mean) / sd, nan=0.0)


def lira_online(target_phi: np.ndarray, reference_phi: np.ndarray, included: np.ndarray) -> np.ndarray:
    """Membership score: log N(phi; in) - log N(phi; out), from reference models with and without each example."""
    m_in, s_in = _moments(reference_phi, included)
    m_out, s_out = _moments(reference_phi, ~included)
    score = _log_gaussian(target_phi, m_in, s_in) - _log_gaussian(target_phi, m_out, s_out)
    return np.nan_to_num(score, nan=0.0)


@dataclass
class Roc:
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float
    balanced_accuracy: float
    tpr_at: dict[float, float]  # TPR at each of FPRS (the largest TPR with FPR at most that)

    def summary(self) -> dict:
        return {"auc": self.auc, "balanced_accuracy": self.balanced_accuracy,
                **{f"tpr_at_{100 * f:g}pct_fpr": t for f, t in self.tpr_at.items()}}


def roc(scores: np.ndarray, member: np.ndarray) -> Roc:
    """ROC of a membership score (higher: member) against the truth. Ties are broken conservatively: a threshold
    admits a whole group of tied scores or none of it."""
    scores, member = np.asarray(scores, np.float64), np.asarray(member, bool)
    pos, neg = int(member.sum()), int((~member).sum())
    if pos == 0 or neg == 0:
        raise ValueError("roc needs members and non-members")
    order = np.argsort(-scores, kind="stable")
    s, m = scores[order], member[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the end of each group of tied scores
    tpr = np.r_[0.0, np.cumsum(m)[last] / pos]
    fpr = np.r_[0.0, np.cumsum(~m)[last] / neg]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids: ties count half
    balanced = float(np.max((tpr + 1 - fpr) / 2))
    tpr_at = {f: float(tpr[fpr <= f + 1e-12].max()) for f in FPRS}
    return Roc(fpr, tpr, auc, balanced, tpr_at)


def memorisation(reference_phi: np.ndarray, included: np.ndarray) -> np.ndarray:
    """Per example: mean phi of the reference models that trained on it minus that of the ones that did not
    (Feldman's memorisation, with the logit-scaled confidence for the 0/1 correctness). NaN where a side is
    empty."""
    inc = included.astype(bool)
    n_in, n_out = inc.sum(0), (~inc).sum(0)
    m_in = np.where(n_in > 0, (reference_phi * inc).sum(0) / np.maximum(n_in, 1), np.nan)
    m_out = np.where(n_out > 0, (reference_phi * ~inc).sum(0) / np.maximum(n_out, 1), np.nan)
    return m_in - m_out
