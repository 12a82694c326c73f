"""Backdoor / poisoning: does the training set carry a planted trigger, for which class, in which examples?

Three kinds of evidence, each cheap, combined (no single method is trusted):

1. Trigger persistence (model behaviour, after STRIP, Gao et al. 2019). A poisoned example is classified
   by its trigger, so it keeps its label when overlaid with held-out inputs of other classes; a clean
   example's label is carried by its content, which the overlay scrambles. Each training example's
   persistence is compared with the same score on the held-out (audit) examples of its class, which
   the model never fitted.
2. Content disagreement (data). A k-nearest-neighbour classifier on raw inputs, fitted on the held-out
   data only (so poisons cannot vouch for each other), says what the example looks like. A poison looks
   like its source class, not its label.
3. Confirmation (model behaviour). The trigger is reconstructed as the mean difference between the
   flagged examples and held-out inputs of other classes, stamped on held-out inputs of other classes,
   and must flip them to the target class far more often than the same construction from unflagged
   examples of the classes the flagged ones look like (their content without the trigger).

Examples that persist and disagree are counted per class; the decision is made across classes with a
robust statistic (median and MAD of the counts), not by flagging a fixed share of every class. A class
that is an outlier is reported; it is `high` when the confirmation holds and `medium` otherwise.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..result import CheckResult, Finding
from .base import AuditContext, Check, CheckOptions, Needs, status_from_findings

MIN_REFERENCE_PER_CLASS = 10  # held-out examples a class needs for its own persistence null


class BackdoorOptions(CheckOptions):
    overlays: int = Field(16, ge=2, le=256, description="held-out inputs overlaid on each example")
    overlay: Literal["max", "mean"] = Field("max", description="how two inputs are overlaid: pixel-wise max or mean")
    null_quantile: float = Field(0.99, gt=0.5, lt=1, description="persistence above this quantile of held-out "
                                 "examples of the class counts as persistent, for the class decision")
    flag_quantile: float = Field(0.8, gt=0.0, lt=1, description="the same, for flagging examples once the target "
                                 "class is established (content disagreement carries the precision)")
    content_neighbours: int = Field(5, ge=1, description="k of the content classifier on held-out inputs")
    min_poisons: int = Field(8, ge=1, description="fewest persistent, disagreeing examples that make a class suspect")
    outlier_z: float = Field(5.0, gt=0, description="robust z of a class's count against the other classes")
    confirm_gain: float = Field(0.25, ge=0, le=1, description="how much more often the reconstructed trigger must "
                                "flip held-out inputs than the control construction")
    examples_shown: int = Field(16, ge=0, le=64)


class Backdoor(Check):
    id = "backdoor"
    title = "Backdoors and poisoned training examples"
    needs = Needs(labels=True, train_data=True, train_labels=True)
    metrics = ("backdoor_detected", "flagged", "flagged_share", "target_class", "trigger_success_rate")
    Options = BackdoorOptions
    order = 35

    def unmet(self, ctx: AuditContext) -> str | None:
        if len(ctx.data) < 50:
            return f"needs at least 50 held-out (audit) examples as the clean reference; got {len(ctx.data)}"
        return None

    def run(self, ctx: AuditContext) -> CheckResult:
        o = self.options
        model, train, ref = ctx.model, ctx.train_data, ctx.data
        x_tr, y_tr = train.x, train.y.numpy()
        x_ref, y_ref = ref.x, ref.y.numpy()
        classes = int(max(y_tr.max(), y_ref.max()) + 1)
        g = np.random.default_rng(ctx.seed)
        ctx.progress.message(f"backdoor: overlay persistence of {len(y_tr)} training examples ({o.overlays} overlays each)")
        s_tr = self._persistence(model, x_tr, y_tr, x_ref, y_ref, g)
        s_ref = self._persistence(model, x_ref, y_ref, x_ref, y_ref, g)
        content = _content_probabilities(x_ref, y_ref, x_tr, classes, o.content_neighbours)
        label_support = content[np.arange(len(y_tr)), y_tr]  # how much the example looks like its label
        looks_like = content.argmax(1)
        disagree = label_support < 0.5

        thresholds = np.array([self._threshold(s_ref, y_ref, c, o.null_quantile) for c in range(classes)])
        suspicious = disagree & (s_tr > thresholds[y_tr])
        counts = np.bincount(y_tr[suspicious], minlength=classes)
        med = float(np.median(counts))
        spread = 1.4826 * float(np.median(np.abs(counts - med)))
        z = (counts - med) / (spread + 1.0)  # +1: counts are small integers, a MAD of 0 is common
        candidates = [c for c in np.argsort(-counts) if counts[c] >= o.min_poisons and z[c] >= o.outlier_z]

        score = s_tr * (1.0 - label_support)  # persistent and looking like another class
        flagged = np.zeros(len(y_tr), dtype=bool)
        findings, per_target, triggers = [], [], []
        names = train.class_names or ref.class_names or [str(i) for i in range(classes)]
        for t in candidates:
            t = int(t)
            members = (y_tr == t) & disagree & (s_tr > self._threshold(s_ref, y_ref, t, o.flag_quantile))
            confirm = self._confirm(model, x_tr, y_tr, x_ref, y_ref, t, members, looks_like, g)
            triggers.append(confirm.pop("trigger"))
            flagged |= members
            per_target.append({"target": t, "flagged": int(members.sum()), "count_z": float(z[t]), **confirm})
            confirmed = confirm["gain"] >= o.confirm_gain
            source = np.bincount(looks_like[members], minlength=classes)
            findings.append(Finding(
                "backdoor.found" if confirmed else "backdoor.suspected", "high" if confirmed else "medium",
                f"Class {names[t]} {'carries' if confirmed else 'may carry'} a planted trigger: {int(members.sum())} "
                f"training examples labelled {names[t]} keep that label under overlays and look like other classes "
                f"(mostly {names[int(source.argmax())]}); stamping the trigger reconstructed from them flips "
                f"{confirm['success_rate']:.0%} of held-out inputs of other classes to {names[t]} "
                f"(control: {confirm['control_rate']:.0%}).",
                {"target_class": names[t], "flagged": int(members.sum()), "success_rate": confirm["success_rate"],
                 "control_rate": confirm["control_rate"], "count_z": float(z[t])}))
        first = per_target[0] if per_target else None
        order = np.flatnonzero(flagged)[np.argsort(-score[flagged], kind="stable")][: o.examples_shown]
        details = {"class_names": names, "suspicious_per_class": counts.tolist(), "count_z": z.round(3).tolist(),
                   "targets": per_target, "overlays": o.overlays, "overlay": o.overlay,
                   "reference": "the audit data (assumed clean)"}
        arrays = {"train_index": train.positions(np.arange(len(y_tr))), "score": score.astype(np.float32),
                  "persistence": s_tr.astype(np.float32), "flagged": flagged,
                  "example_index": train.positions(order), "example_image": x_tr[torch.as_tensor(order)].numpy(),
                  "example_label": y_tr[order], "example_looks_like": looks_like[order]}
        if triggers:
            arrays["trigger"] = triggers[0].astype(np.float32)  # the strongest candidate's
        metrics = {"backdoor_detected": int(any(f.id == "backdoor.found" for f in findings)),
                   "flagged": int(flagged.sum()), "flagged_share": float(flagged.mean()),
                   "target_class": int(first["target"]) if first else -1,
                   "trigger_success_rate": float(first["success_rate"]) if first else 0.0}
        return CheckResult(self.id, status_from_findings(findings), metrics, findings, details, arrays)

    # ------------------------------------------------------------------------------------------------------
    def _persistence(self, model, x: torch.Tensor, y: np.ndarray, pool: torch.Tensor, pool_y: np.ndarray,
                     g: np.random.Generator) -> np.ndarray:
        """Mean probability of each example's own label when overlaid with held-out inputs of other classes."""
        o = self.options
        total = np.zeros(len(x))
        for _ in range(o.overlays):
            partner = _other_class_partners(y, pool_y, g)
            other = pool[torch.as_tensor(partner)]
            mixed = torch.maximum(x, other) if o.overlay == "max" else 0.5 * (x + other)
            probs = torch.softmax(model.logits(mixed, batch_size=512), 1).numpy()
            total += probs[np.arange(len(x)), y]
        return total / o.overlays

    @staticmethod
    def _threshold(s_ref: np.ndarray, y_ref: np.ndarray, c: int, q: float) -> float:
        own = s_ref[y_ref == c]
        return float(np.quantile(own if len(own) >= MIN_REFERENCE_PER_CLASS else s_ref, q))

    def _confirm(self, model, x_tr, y_tr, x_ref, y_ref, t: int, members: np.ndarray, looks_like: np.ndarray,
                 g: np.random.Generator) -> dict:
        """Stamp the trigger reconstructed from the flagged examples on held-out inputs of other classes.

        The control is the same construction from unflagged training examples of the classes the flagged
        ones look like (their content without the trigger): only a shared trigger makes the first flip more.
        """
        pool = x_ref[torch.as_tensor(y_ref != t)]
        idx = np.flatnonzero(members)
        if len(pool) == 0 or len(idx) == 0:
            return {"success_rate": 0.0, "control_rate": 0.0, "gain": 0.0, "trigger": np.zeros(tuple(x_tr.shape[1:]))}
        base = pool.mean(0)
        lo, hi = model.bounds
        trigger = x_tr[torch.as_tensor(idx)].mean(0) - base
        control_idx = []
        for i in idx:
            same_content = np.flatnonzero((y_tr == looks_like[i]) & ~members)
            if len(same_content):
                control_idx.append(int(g.choice(same_content)))
        control = x_tr[torch.as_tensor(control_idx)].mean(0) - base if control_idx else torch.zeros_like(trigger)

        def flips(delta: torch.Tensor) -> float:
            return float((model.logits((pool + delta).clamp(lo, hi), batch_size=512).argmax(1) == t).double().mean())

        rate, control_rate = flips(trigger), flips(control)
        return {"success_rate": rate, "control_rate": control_rate, "gain": rate - control_rate,
                "trigger": trigger.numpy()}


def _other_class_partners(y: np.ndarray, pool_y: np.ndarray, g: np.random.Generator) -> np.ndarray:
    """For each label in y, the index of a random pool example of another class."""
    partner = g.integers(0, len(pool_y), len(y))
    for _ in range(100):
        same = pool_y[partner] == y
        if not same.any():
            break
        partner[same] = g.integers(0, len(pool_y), int(same.sum()))
    return partner


def _content_probabilities(x_ref: torch.Tensor, y_ref: np.ndarray, x: torch.Tensor, classes: int, k: int) -> np.ndarray:
    """What each input looks like, by its nearest held-out inputs (raw input space: a small trigger barely moves it)."""
    ref = x_ref.reshape(len(x_ref), -1)
    votes = np.zeros((len(x), classes))
    k = min(k, len(ref))
    ref_sq = (ref * ref).sum(1)
    for s in range(0, len(x), 1024):
        q = x[s:s + 1024].reshape(min(1024, len(x) - s), -1)
        d2 = (q * q).sum(1, keepdim=True) - 2 * q @ ref.T + ref_sq[None]
        nearest = d2.topk(k, dim=1, largest=False).indices.numpy()
        np.add.at(votes, (np.repeat(np.arange(s, s + len(q)), k), y_ref[nearest].ravel()), 1.0)
    return votes / k
