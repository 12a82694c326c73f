"""Failure slices: coherent groups of inputs where the model fails more, found in its own feature space.

1. Failure directions (Jain et al. 2023, "Distilling model failures as directions in latent space"): per
   class, a linear SVM on the model's penultimate features separates correct from wrong predictions;
   decision values are out-of-sample (K-fold), so a direction that only memorises the errors finds
   nothing. The slice is the class's inputs furthest along the direction.
2. Error-rich clusters: k-means on the features of all inputs; a cluster whose accuracy is far below the
   overall accuracy is a slice.
Every model fails more on some inputs than on others, so a gap alone is no finding: each candidate's errors
are compared with what random subsets of the same size show (of the class for a direction; with the cluster's
class mix for a cluster), an exact hypergeometric tail, and with what the model's own calibrated confidence on
its members predicts (inputs the model knows it is unsure about are not a hidden failure); the candidates
together pass a Holm correction at `alpha`. A slice is reported when it is significant there and its accuracy is at least `min_gap` below that
reference. On tabular inputs a slice is described by the features that set it apart (named by the CSV
columns when known).
"""

from __future__ import annotations

from html import escape

import numpy as np
import torch
from pydantic import Field

from ..calibration import fit_temperature, softmax
from ..render import class_label, gallery
from ..result import CheckResult, Finding
from .base import (
    AuditContext, Check, CheckOptions, FindingDoc, Needs, make_details, missing_packages, status_from_findings,
)


class SliceOptions(CheckOptions):
    slice_share: float = Field(0.2, gt=0, lt=1, description="share of a class furthest along its failure direction")
    min_errors: int = Field(4, ge=2, description="a class needs this many errors for a failure direction")
    folds: int = Field(3, ge=2, le=20, description="K of the out-of-sample failure directions")
    clusters: int | None = Field(None, ge=2, description="k-means clusters (default: 2 per class)")
    min_size: int = Field(10, ge=2, description="smallest slice reported")
    min_gap: float = Field(0.15, gt=0, le=1, description="accuracy gap below the reference that makes a slice")
    alpha: float = Field(0.05, gt=0, lt=1, description="family-wise false-alarm rate over every candidate slice "
                         "(Holm), against random subsets of the same size")
    examples_shown: int = Field(8, ge=0, le=32, description="inputs pictured per slice")


class Slices(Check):
    id = "slices"
    title = "Failure slices"
    needs = Needs(labels=True)
    Options = SliceOptions
    order = 30
    metrics = {"slices_found": "slices that pass the random-subset and confidence tests (Holm-corrected)",
               "worst_slice_accuracy": "the worst slice's accuracy (the overall accuracy when there is none)"}
    Details = make_details("SlicesDetails", {
        "class_names": (list[str], "class names, by index"),
        "slices": (list[dict], "per slice: name, kind, class, size, accuracy, reference, expected_accuracy, p_value, "
                               "description (tabular)"),
        "accuracy": (float, "overall accuracy"), "embedding": (str, "the space slices were found in"),
        "candidates": (int, "candidate slices tested"), "alpha": (float, "family-wise level of the tests")})
    arrays = {"slice<k>_members": "audit positions of slice k's inputs (k < 4)",
              "slice<k>_index": "positions of the inputs shown", "slice<k>_image": "the inputs shown, errors first",
              "slice<k>_label": "their labels", "slice<k>_pred": "their predictions"}
    findings = {
        "slices.found": FindingDoc(
            "medium",
            "A coherent group of inputs (along a class's failure direction in the model's features, or a "
            "feature-space cluster) holds more errors than random subsets of the same size and class mix do (exact "
            "hypergeometric tail) and than the model's calibrated confidence on it predicts (the model is wrong "
            "there more than it admits), Holm-corrected over every candidate at `alpha` (0.05), and its accuracy "
            "is at least `min_gap` (0.15) below theirs. On clean models this fires at most at the rate `alpha` "
            "allows. Evidence: the slices, their sizes, accuracies, reference accuracies and p-values, and on "
            "tabular data the features that set each slice apart; the report shows their examples, errors "
            "first."),
    }

    def unmet(self, ctx: AuditContext) -> str | None:
        return missing_packages({"sklearn": "scikit-learn"})

    def run(self, ctx: AuditContext) -> CheckResult:
        o = self.options
        x, y = ctx.data.x, ctx.data.y.numpy()
        logits, feats, space = ctx.model.logits_and_embedding(x)
        feats = feats.numpy().astype(np.float64)
        pred = logits.argmax(1).numpy()
        correct = pred == y
        logits64 = logits.numpy().astype(np.float64)
        confidence = softmax(logits64, fit_temperature(logits64, y)).max(1)  # calibrated: what the model admits
        z = (feats - feats.mean(0)) / (feats.std(0) + 1e-8)
        names = ctx.data.class_names or [str(i) for i in range(int(max(y.max(), pred.max()) + 1))]
        candidates = [s for s in self._directions(z, y, correct, ctx.seed) + self._clusters(z, y, correct, ctx.seed)
                      if s["size"] >= o.min_size]
        for s in candidates:
            members = np.asarray(s["members"])
            s["expected_accuracy"] = float(confidence[members].mean())
            # Both must hold (so the larger p-value is a valid test of both): more errors than random subsets of
            # the same size and class mix, and more than the model's own calibrated confidence there predicts. The
            # second keeps out what every model has, inputs it knows it is unsure about.
            s["p_value"] = max(_chance_of_as_many_errors(members, y, correct),
                               _more_errors_than_confidence(members, correct, confidence))
        significant = _holm(np.array([s["p_value"] for s in candidates]), o.alpha)
        slices = [s for s, ok in zip(candidates, significant) if ok and s["reference"] - s["accuracy"] >= o.min_gap]
        slices.sort(key=lambda s: s["accuracy"] - s["reference"])
        if x.dim() == 2:
            for s in slices:
                s["description"] = _describe(x.numpy(), np.asarray(s["members"]), y, s, ctx.data.feature_names)
        findings = []
        if slices:
            worst = slices[0]
            findings.append(Finding(
                "slices.found", "medium",
                f"{len(slices)} coherent slice(s) of the data where the model fails more than random subsets of the "
                f"same size do (Holm-corrected p < {o.alpha:g} over {len(candidates)} candidates); the worst, "
                f"{worst['name']} ({worst['size']} inputs"
                + (f"; {worst['description']}" if worst.get("description") else "")
                + f"), has accuracy {worst['accuracy']:.0%} where random subsets give {worst['reference']:.0%} "
                f"(p = {worst['p_value']:.2g}).",
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
        details = {"class_names": names, "slices": slices[:10], "accuracy": float(correct.mean()), "embedding": space,
                   "candidates": len(candidates), "alpha": o.alpha}
        return CheckResult(self.id, status_from_findings(findings), metrics, findings, details, arrays)

    def _directions(self, z, y, correct, seed) -> list[dict]:
        from sklearn.model_selection import StratifiedKFold
        from sklearn.svm import LinearSVC

        o, out = self.options, []
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            wrong = int((~correct[idx]).sum())
            if wrong < max(o.min_errors, o.folds) or len(idx) - wrong < o.folds:
                continue  # every fold needs both outcomes to fit a direction
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
                        "reference": _class_mix_accuracy(members, y, correct), "members": members.tolist()})
        return out

    @staticmethod
    def render(r: CheckResult, audit) -> str:
        """This check's section of report.html."""
        d, a = r.details, r.arrays
        names = d.get("class_names") or []
        label = class_label(names)
        out = []
        rows = "".join(f"<tr><td>{escape(s['name'])}</td><td>{s['size']}</td><td>{s['accuracy']:.0%}</td>"
                       f"<td>{s['reference']:.0%}</td></tr>" for s in d.get("slices", []))
        if rows:
            out.append("<h4>Slices (accuracy against the class, or overall for clusters)</h4><table><tr><th>slice</th>"
                       f"<th>inputs</th><th>accuracy</th><th>reference</th></tr>{rows}</table>")
        for k, sl in enumerate(d.get("slices", [])[:4]):
            if f"slice{k}_image" in a:
                out += gallery(sl["name"], a[f"slice{k}_image"],
                                [f"#{int(i)}: {label(int(t))} -> {label(int(p))}" for i, t, p in
                                 zip(a[f"slice{k}_index"], a[f"slice{k}_label"], a[f"slice{k}_pred"])], audit)
        return "".join(out)


def _class_mix_accuracy(members: np.ndarray, y: np.ndarray, correct: np.ndarray) -> float:
    """The accuracy a random subset with the members' class mix has on average."""
    return float(np.mean([correct[y == y[i]].mean() for i in members])) if len(members) else 1.0


def _log_hypergeom(total: int, bad: int, draws: int) -> np.ndarray:
    """log P(X = k) for k = 0..draws, X the number of `bad` items among `draws` drawn from `total` without
    replacement (-inf where impossible)."""
    k = np.arange(draws + 1)
    ok = (k <= bad) & (draws - k <= total - bad)
    out = np.full(draws + 1, -np.inf)
    kk = k[ok]
    out[ok] = (_log_choose(bad, kk) + _log_choose(total - bad, draws - kk) - _log_choose(total, draws))
    return out


def _log_choose(n, k):
    from scipy.special import gammaln  # scipy comes with scikit-learn, which this check needs

    n, k = np.asarray(n, np.float64), np.asarray(k, np.float64)
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def _chance_of_as_many_errors(members: np.ndarray, y: np.ndarray, correct: np.ndarray) -> float:
    """P(a random subset with the members' size and class mix holds at least as many errors): the errors of
    each class's part are hypergeometric, independent across classes; their sum's law is the convolution."""
    pmf = np.ones(1)
    for c in np.unique(y[members]):
        cls = y == c
        part = np.exp(_log_hypergeom(int(cls.sum()), int((~correct[cls]).sum()), int((y[members] == c).sum())))
        pmf = np.convolve(pmf, part)
    observed = int((~correct[members]).sum())
    return float(min(1.0, pmf[observed:].sum()))


def _more_errors_than_confidence(members: np.ndarray, correct: np.ndarray, confidence: np.ndarray) -> float:
    """P(at least the observed errors) when each member is wrong with probability 1 - its calibrated confidence
    (the Poisson-binomial law, by dynamic programming)."""
    pmf = np.ones(1)
    for q in 1.0 - confidence[members]:
        pmf = np.convolve(pmf, [1.0 - q, q])
    return float(min(1.0, pmf[int((~correct[members]).sum()):].sum()))


def _holm(p: np.ndarray, alpha: float) -> np.ndarray:
    """Holm's step-down: which hypotheses are rejected at family-wise level alpha."""
    order = np.argsort(p, kind="stable")
    rejected = np.zeros(len(p), bool)
    for rank, i in enumerate(order):
        if p[i] > alpha / (len(p) - rank):
            break
        rejected[i] = True
    return rejected


def _describe(x: np.ndarray, members: np.ndarray, y: np.ndarray, s: dict, names: list[str] | None) -> str:
    """The features that set a tabular slice apart from the rest of its reference group (its class for a
    direction, everything for a cluster), in standard deviations of that group."""
    group = np.flatnonzero(y == s["class"]) if s["kind"] == "direction" else np.arange(len(x))
    rest = np.setdiff1d(group, members)
    if len(rest) < 2:
        return ""
    sd = x[group].std(0) + 1e-12
    shift = (x[members].mean(0) - x[rest].mean(0)) / sd
    top = np.argsort(-np.abs(shift))[:3]
    label = (lambda j: names[j]) if names and len(names) == x.shape[1] else (lambda j: f"feature {j}")
    return ", ".join(f"{label(j)} {'high' if shift[j] > 0 else 'low'} ({shift[j]:+.1f} sd)" for j in top
                     if abs(shift[j]) >= 0.3)
