"""Failure slices: coherent groups of inputs where the model fails more, found in its own feature space.

1. Failure directions (Jain et al. 2023, "Distilling model failures as directions in latent space"): per
   class, a linear SVM on the model's penultimate features separates correct from wrong predictions;
   decision values are out-of-sample (K-fold), so a direction that only memorises the errors finds
   nothing. The slice is the class's inputs furthest along the direction.
2. Error-rich clusters: k-means on the features of all inputs; a cluster whose accuracy is far below the
   overall accuracy is a slice.
A slice is reported when its accuracy is at least `min_gap` below its reference (the class, or overall).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from ..result import CheckResult, Finding
from .base import AuditContext, Check, CheckOptions, Needs, missing_packages, status_from_findings


class SliceOptions(CheckOptions):
    slice_share: float = Field(0.2, gt=0, lt=1, description="share of a class furthest along its failure direction")
    min_errors: int = Field(4, ge=2, description="a class needs this many errors for a failure direction")
    folds: int = Field(3, ge=2, le=20)
    clusters: int | None = Field(None, ge=2, description="k-means clusters (default: 2 per class)")
    min_size: int = Field(10, ge=2, description="smallest slice reported")
    min_gap: float = Field(0.15, gt=0, le=1, description="accuracy gap below the reference that makes a slice")
    examples_shown: int = Field(8, ge=0, le=32)


class Slices(Check):
    id = "slices"
    title = "Failure slices"
    needs = Needs(labels=True)
    metrics = ("slices_found", "worst_slice_accuracy")
    Options = SliceOptions
    order = 30

    def unmet(self, ctx: AuditContext) -> str | None:
        return missing_packages({"sklearn": "scikit-learn"})

    def run(self, ctx: AuditContext) -> CheckResult:
        o = self.options
        x, y = ctx.data.x, ctx.data.y.numpy()
        logits, feats, space = ctx.model.logits_and_embedding(x)
        feats = feats.numpy().astype(np.float64)
        pred = logits.argmax(1).numpy()
        correct = pred == y
        z = (feats - feats.mean(0)) / (feats.std(0) + 1e-8)
        names = ctx.data.class_names or [str(i) for i in range(int(max(y.max(), pred.max()) + 1))]
        slices = self._directions(z, y, correct, ctx.seed) + self._clusters(z, y, correct, ctx.seed)
        slices = [s for s in slices if s["size"] >= o.min_size and s["reference"] - s["accuracy"] >= o.min_gap]
        slices.sort(key=lambda s: s["accuracy"] - s["reference"])
        findings = []
        if slices:
            worst = slices[0]
            findings.append(Finding(
                "slices.found", "medium",
                f"{len(slices)} coherent slice(s) of the data where the model fails more; the worst, {worst['name']} "
                f"({worst['size']} inputs), has accuracy {worst['accuracy']:.0%} against {worst['reference']:.0%}.",
                {"slices": [{k: v for k, v in s.items() if k != "members"} for s in slices[:5]]}))
        arrays: dict[str, np.ndarray] = {}
        for k, s in enumerate(slices[:4]):
            members = np.asarray(s.pop("members"))
            shown = members[np.argsort(correct[members], kind="stable")][: o.examples_shown]  # errors first
            arrays[f"slice{k}_members"] = ctx.data.positions(members)
            arrays[f"slice{k}_index"] = ctx.data.positions(shown)
            arrays[f"slice{k}_image"] = x[torch.as_tensor(shown)].numpy()
            arrays[f"slice{k}_label"] = y[shown]
            arrays[f"slice{k}_pred"] = pred[shown]
        for s in slices[4:]:
            s.pop("members")
        metrics = {"slices_found": len(slices), "worst_slice_accuracy": slices[0]["accuracy"] if slices else
                   float(correct.mean())}
        details = {"class_names": names, "slices": slices[:10], "accuracy": float(correct.mean()), "embedding": space}
        return CheckResult(self.id, status_from_findings(findings), metrics, findings, details, arrays)

    def _directions(self, z, y, correct, seed) -> list[dict]:
        from sklearn.model_selection import StratifiedKFold
        from sklearn.svm import LinearSVC

        o, out = self.options, []
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            wrong = int((~correct[idx]).sum())
            if wrong < max(o.min_errors, o.folds) or wrong == len(idx):
                continue
            scores = np.zeros(len(idx))
            target = (~correct[idx]).astype(int)
            for fit, held in StratifiedKFold(o.folds, shuffle=True, random_state=seed % 2**32).split(idx, target):
                svm = LinearSVC(C=0.1, class_weight="balanced").fit(z[idx[fit]], target[fit])
                scores[held] = svm.decision_function(z[idx[held]])
            top = idx[np.argsort(-scores)[: max(int(o.slice_share * len(idx)), 1)]]
            out.append({"name": f"class {c} along its failure direction", "kind": "direction", "class": int(c),
                        "size": len(top), "accuracy": float(correct[top].mean()),
                        "reference": float(correct[idx].mean()), "members": top.tolist()})
        return out

    def _clusters(self, z, y, correct, seed) -> list[dict]:
        from sklearn.cluster import KMeans

        k = self.options.clusters or 2 * len(np.unique(y))
        k = min(k, max(len(z) // max(self.options.min_size, 1), 2))
        labels = KMeans(k, n_init=3, random_state=seed % 2**32).fit_predict(z)
        overall, out = float(correct.mean()), []
        for j in range(k):
            members = np.flatnonzero(labels == j)
            if len(members) == 0:
                continue
            classes = np.bincount(y[members])
            out.append({"name": f"cluster {j} (mostly class {int(classes.argmax())})", "kind": "cluster",
                        "class": int(classes.argmax()), "size": len(members), "accuracy": float(correct[members].mean()),
                        "reference": overall, "members": members.tolist()})
        return out
