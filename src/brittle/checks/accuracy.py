"""Clean accuracy: overall, per class, and the confusion matrix."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from ..render import bar_chart, heatmap
from ..result import CheckResult, Finding
from .base import AuditContext, Check, CheckOptions, FindingDoc, Needs, make_details, status_from_findings


class AccuracyOptions(CheckOptions):
    weak_class_gap: float = Field(0.15, gt=0, le=1, description="a class this far below the overall accuracy is a "
                                  "finding")


class Accuracy(Check):
    id = "accuracy"
    title = "Clean accuracy"
    needs = Needs(labels=True)
    Options = AccuracyOptions
    order = 10
    metrics = {"accuracy": "share of the audit data classified correctly",
               "balanced_accuracy": "mean of the per-class accuracies (classes present in the data)",
               "worst_class_accuracy": "the lowest per-class accuracy", "n": "inputs evaluated"}
    Details = make_details("AccuracyDetails", {
        "class_names": (list[str], "class names, by index"),
        "per_class_accuracy": (list[float | None], "accuracy per class (null: class absent)"),
        "support": (list[int], "inputs per class"), "confusion_matrix": (list[list[int]], "rows true, columns predicted"),
        "worst_class": (str, "the class with the lowest accuracy")})
    arrays = {"pred": "predicted class per input", "correct": "prediction equals the label",
              "confidence": "top-class softmax probability"}
    findings = {
        "accuracy.below-chance": FindingDoc(
            "high",
            "Accuracy is far below what guessing gives (more than 5 standard errors under 1/classes): the labels "
            "almost certainly do not match the model's outputs, e.g. a CSV's string labels, which brittle numbers "
            "in sorted order, against a model trained with another order. Every other number of the audit is then "
            "meaningless. Evidence: the accuracy, chance, the z score; the message lists the label mapping."),
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
        chance = 1.0 / max(int(present.sum()), 1)
        below = (chance - accuracy) / max((chance * (1 - chance) / len(y)) ** 0.5, 1e-12)
        if below > 5:
            mapping = (" The labels are class names numbered in sorted order (" + ", ".join(
                f"{n} = {i}" for i, n in enumerate(names[:6])) + "); if the model was trained with another order, "
                "relabel the data (or give integer labels)." if ctx.data.class_names else "")
            findings.append(Finding(
                "accuracy.below-chance", "high",
                f"Accuracy {accuracy:.1%} is far below chance ({chance:.0%} for {int(present.sum())} classes): the "
                f"labels probably do not match the model's output order.{mapping}",
                {"accuracy": accuracy, "chance": chance, "z": float(below)}))
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

    @staticmethod
    def render(r: CheckResult, audit) -> str:
        """This check's section of report.html."""
        d = r.details
        if not d:
            return ""
        names = d.get("class_names", [])
        out = ["<h4>Accuracy per class</h4>", bar_chart(names, {"accuracy": d.get("per_class_accuracy", [])},
                                                        title="accuracy per class")]
        if d.get("confusion_matrix") and len(names) <= 30:
            out += ["<h4>Confusion matrix (rows: true class, columns: predicted)</h4>",
                    heatmap(d["confusion_matrix"], names, title="confusion matrix")]
        return "".join(out)
