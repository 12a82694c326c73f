"""Clean accuracy: overall, per class, and the confusion matrix."""

from __future__ import annotations

import numpy as np
import torch

from ..result import CheckResult, Finding
from .base import AuditContext, Check, CheckOptions, FindingDoc, Needs, status_from_findings


class AccuracyOptions(CheckOptions):
    weak_class_gap: float = 0.15  # a class this far below the overall accuracy is a finding


class Accuracy(Check):
    id = "accuracy"
    title = "Clean accuracy"
    needs = Needs(labels=True)
    metrics = ("accuracy", "balanced_accuracy", "worst_class_accuracy", "n")
    Options = AccuracyOptions
    order = 10
    findings = {
        "accuracy.weak-class": FindingDoc(
            "medium",
            "A class is more than `weak_class_gap` (default 0.15) below the overall accuracy. Evidence: the "
            "classes and their accuracies."),
    }

    def run(self, ctx: AuditContext) -> CheckResult:
        logits = ctx.model.logits(ctx.data.x)
        y = ctx.data.y
        pred = logits.argmax(1)
        probs = torch.softmax(logits, 1)
        c = ctx.model.num_classes or int(logits.shape[1])
        confusion = np.zeros((c, c), dtype=np.int64)
        np.add.at(confusion, (y.numpy(), pred.numpy()), 1)
        support = confusion.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)
        present = support > 0
        accuracy = float((pred == y).double().mean())
        worst = int(np.nanargmin(np.where(present, per_class, np.inf)))
        findings = []
        names = ctx.data.class_names or [str(i) for i in range(c)]
        gap = self.options.weak_class_gap
        weak = [i for i in range(c) if present[i] and per_class[i] < accuracy - gap]
        if weak:
            findings.append(Finding(
                "accuracy.weak-class", "medium",
                f"{len(weak)} class(es) are more than {gap:.0%} below the overall accuracy of {accuracy:.1%}: "
                + ", ".join(f"{names[i]} ({per_class[i]:.1%})" for i in weak[:5]),
                {"classes": [names[i] for i in weak], "accuracies": [float(per_class[i]) for i in weak]}))
        metrics = {
            "accuracy": accuracy,
            "balanced_accuracy": float(np.nanmean(per_class[present])),
            "worst_class_accuracy": float(per_class[worst]),
            "n": int(len(y)),
        }
        details = {"class_names": names, "per_class_accuracy": per_class.tolist(), "support": support.tolist(),
                   "confusion_matrix": confusion.tolist(), "worst_class": names[worst]}
        arrays = {"pred": pred.numpy(), "correct": (pred == y).numpy(),
                  "confidence": probs.max(1).values.numpy().astype(np.float32)}
        return CheckResult(self.id, status_from_findings(findings), metrics, findings, details, arrays)
