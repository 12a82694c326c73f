"""Label errors in the training set: confident learning (cleanlab) on out-of-sample probabilities.

What users most often get wrong is the probabilities: the audited model has fitted its own training labels,
wrong ones included, so its in-sample softmax hides the errors. Here every training example is scored by a
model that never saw it. By default a cheap one: K-fold k-nearest-neighbours on the audited model's
penultimate features (standardised; the model's logits where it has no feature layer); the features come
from one forward pass, the K fits take seconds. With `train_fn` (the user's training function), the model
itself is retrained K times, each time without one fold (cleanlab's own recipe; K trainings, resumable per
fold). cleanlab's `find_label_issues` then flags (plus the examples whose label gets almost no out-of-sample
probability), and self-confidence ranks.
"""

from __future__ import annotations

from html import escape

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from ..render import bar_chart, class_label, count_axis, gallery
from ..result import CheckResult, Finding
from ..seeds import derive_seed
from .base import (
    AuditContext, Check, CheckOptions, FindingDoc, Needs, make_details, missing_packages, status_from_findings,
)


class LabelErrorOptions(CheckOptions):
    folds: int = Field(5, ge=2, le=50, description="K of the K-fold out-of-sample probabilities")
    estimator: Literal["knn", "logistic", "retrain"] | None = Field(
        None, description="the out-of-sample model: knn or logistic on the audited model's features, or retrain "
        "through train_fn (default: retrain when train_fn is given, else knn)")
    train_fn: str | None = Field(None, description="'package.module:function' called as fn(x, y, seed=...); it "
                                 "trains and returns a model that takes the inputs as the audited model does")
    neighbours: int = Field(25, ge=1, description="k of the k-nearest-neighbours estimator")
    min_label_support: float = Field(0.1, ge=0, le=1, description="also flag examples whose given label gets less "
                                     "than this out-of-sample probability")
    max_share: float = Field(0.01, ge=0, le=1, description="a flagged share above this is a finding")
    examples_shown: int = Field(16, ge=0, le=64, description="most suspicious labels pictured")

    @model_validator(mode="after")
    def _retrain_needs_a_function(self) -> "LabelErrorOptions":
        if self.estimator == "retrain" and not self.train_fn:
            raise ValueError("estimator 'retrain' needs train_fn = 'package.module:function' (it is called as "
                             "fn(x, y, seed=...) and returns the trained model)")
        return self

    @property
    def method(self) -> str:
        return self.estimator or ("retrain" if self.train_fn else "knn")


class LabelErrors(Check):
    id = "label_errors"
    title = "Label errors in the training set"
    needs = Needs(labels=False, train_data=True, train_labels=True)
    Options = LabelErrorOptions
    order = 40
    metrics = {"label_issue_share": "share of training labels flagged as probably wrong",
               "label_issues": "training labels flagged"}
    Details = make_details("LabelErrorsDetails", {
        "estimator": (str, "knn, logistic or retrain"), "train_fn": (str | None, "the train function, when retraining"),
        "folds": (int, "K of the K-fold"), "embedding": (str | None, "the feature space of knn/logistic"),
        "class_names": (list[str], "class names, by index"), "flagged_per_class": (list[int], "flags per given label"),
        "out_of_sample_accuracy": (float, "agreement of out-of-sample predictions with the given labels")})
    arrays = {"train_index": "training-file position of each example", "flagged": "flagged as probably mislabelled",
              "label_quality": "self-confidence of the given label", "suggested_label": "the out-of-sample prediction",
              "example_index": "positions of the examples shown", "example_image": "the most suspicious labels",
              "example_label": "their given labels", "example_suggested": "their suggested labels",
              "example_quality": "their self-confidence"}
    quick_options = {"folds": 3}
    findings = {
        "label_errors.found": FindingDoc(
            "medium",
            "More than `max_share` (default 1%) of the training labels are probably wrong according to confident "
            "learning on out-of-sample probabilities. Evidence: the count, the share, the positions of the 20 "
            "most suspicious. `arrays/label_errors.npz` has the flag, the self-confidence score and the suggested "
            "label for every training example."),
    }

    def unmet(self, ctx: AuditContext) -> str | None:
        missing = missing_packages({"cleanlab": "cleanlab", "sklearn": "scikit-learn"})
        if missing:
            return missing
        counts = np.bincount(ctx.train_data.y.numpy())
        if counts[counts > 0].min() < self.options.folds:
            return (f"needs at least folds={self.options.folds} training examples in every class (the smallest has "
                    f"{int(counts[counts > 0].min())}): lower 'folds' in [label_errors]")
        return None

    def run(self, ctx: AuditContext) -> CheckResult:
        o = self.options
        from cleanlab.filter import find_label_issues
        train = ctx.train_data
        y = train.y.numpy()
        if o.method == "retrain":
            probs = self._retrained_probabilities(ctx)
            space = None  # no features: the user's model, retrained
        else:
            ctx.progress.message(f"label_errors: out-of-sample probabilities for {len(y)} training examples "
                                 f"({o.folds}-fold {o.method})")
            _, embedding, space = ctx.model.logits_and_embedding(train.x)
            probs = out_of_sample_probabilities(embedding.numpy().astype(np.float64), y, folds=o.folds,
                                                estimator=o.method, neighbours=o.neighbours, seed=ctx.seed)
        quality = probs[np.arange(len(y)), y]  # self-confidence: cleanlab's default label quality score
        # cleanlab prunes an estimated number per class and can stop short of examples whose label no
        # out-of-sample neighbour shares; on MNIST those were most of its misses.
        flagged = find_label_issues(y, probs) | (quality < o.min_label_support)
        suggested = probs.argmax(1)
        share = float(flagged.mean())
        order = np.flatnonzero(flagged)[np.argsort(quality[flagged], kind="stable")]
        names = train.class_names or [str(i) for i in range(probs.shape[1])]
        findings = []
        if share > o.max_share:
            findings.append(Finding(
                "label_errors.found", "medium",
                f"{int(flagged.sum())} of {len(y)} training labels ({share:.1%}) are probably wrong (confident learning "
                f"on {o.folds}-fold out-of-sample probabilities); the most suspicious are listed in the report.",
                {"flagged": int(flagged.sum()), "share": share, "top": train.positions(order[:20]).tolist()}))
        per_class = [int(flagged[y == c].sum()) for c in range(probs.shape[1])]
        shown = order[: o.examples_shown]
        details = {"estimator": o.method, "train_fn": o.train_fn, "folds": o.folds, "embedding": space,
                   "class_names": names, "flagged_per_class": per_class,
                   "out_of_sample_accuracy": float((suggested == y).mean())}
        arrays = {"train_index": train.positions(np.arange(len(y))), "flagged": flagged, "label_quality": quality.astype(np.float32),
                  "suggested_label": suggested, "example_index": train.positions(shown),
                  "example_image": train.x[torch.as_tensor(shown, dtype=torch.long)].numpy(),
                  "example_label": y[shown], "example_suggested": suggested[shown],
                  "example_quality": quality[shown].astype(np.float32)}
        metrics = {"label_issue_share": share, "label_issues": int(flagged.sum())}
        return CheckResult(self.id, status_from_findings(findings), metrics, findings, details, arrays)

    def _retrained_probabilities(self, ctx: AuditContext) -> np.ndarray:
        """K-fold: train through the user's function without each fold, predict the fold. Each fold is a shard
        task, saved as it comes, so an interrupted run resumes at the next training (and folds can train in
        parallel on the process or Ray backend)."""
        from sklearn.model_selection import StratifiedKFold

        from ..loading.models import import_callable

        o = self.options
        train = ctx.train_data
        y = train.y.numpy()
        import_callable(o.train_fn, "train function", "it must train and return an nn.Module")  # fail here, not later
        splits = StratifiedKFold(o.folds, shuffle=True, random_state=ctx.seed % 2**32).split(np.zeros(len(y)), y)
        tasks = [(f"{k:02d}", (o.train_fn, fit, held, derive_seed(ctx.seed, self.id, "fold", k)))
                 for k, (fit, held) in enumerate(splits)]
        folds = ctx.map_shards("fold", retrained_fold, tasks, shared=(train.x, train.y),
                               label=f"label_errors: {o.folds} trainings through {o.train_fn}")
        probs = np.zeros((len(y), max(int(y.max()) + 1, max(f["probs"].shape[1] for f in folds))))
        for (_, (_, _, held, _)), fold in zip(tasks, folds):
            probs[held, : fold["probs"].shape[1]] = fold["probs"]  # a model may know classes absent from the labels
        return probs

    @staticmethod
    def render(r: CheckResult, audit) -> str:
        """This check's section of report.html."""
        d, a = r.details, r.arrays
        source = (f"the model retrained {d.get('folds')} times through {escape(str(d.get('train_fn')))}, each time "
                  "without the fold it predicts" if d.get("estimator") == "retrain" else
                  f"{d.get('folds')}-fold {escape(str(d.get('estimator')))} on the model's {escape(str(d.get('embedding')))}")
        out = [f'<p class="meta">Out-of-sample probabilities: {source} (out-of-sample accuracy '
               f'{d.get("out_of_sample_accuracy", 0):.3f}); flagged by cleanlab\'s confident learning, ranked by '
               "self-confidence.</p>"]
        names = d.get("class_names") or []
        if d.get("flagged_per_class"):
            out += ["<h4>Flagged labels per given class</h4>", bar_chart(names, {"flagged": d["flagged_per_class"]},
                                                                         ymax=count_axis(d["flagged_per_class"]),
                                                                         title="flagged labels per class")]
        if "example_image" in a:
            label = class_label(names)
            out += gallery("Most suspicious labels (self-confidence in brackets)", a["example_image"],
                            [f"train #{int(i)}: labelled {label(int(g))}, looks like {label(int(sug))} ({float(q):.2f})"
                             for i, g, sug, q in zip(a["example_index"], a["example_label"], a["example_suggested"],
                                                     a["example_quality"])], audit)
        return "".join(out)


def retrained_fold(model, x: torch.Tensor, y: torch.Tensor, train_fn: str, fit: np.ndarray, held: np.ndarray,
                   seed: int) -> dict[str, np.ndarray]:
    """One fold (a shard task): the user's train function on the other folds, its probabilities on this one."""
    from ..loading.models import train_and_predict

    logits = train_and_predict(train_fn, x, y, fit, held, seed)
    return {"probs": torch.softmax(logits.double(), 1).numpy(), "passes": np.array([0, 0])}


def out_of_sample_probabilities(embedding: np.ndarray, y: np.ndarray, *, folds: int, estimator: str, neighbours: int,
                                seed: int) -> np.ndarray:
    """(n, classes) probabilities, each row from a model fitted without that row. Classes absent from a fold's
    training part get probability 0 there (cross_val_predict handles the column alignment)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    z = (embedding - embedding.mean(0)) / (embedding.std(0) + 1e-8)
    model = (KNeighborsClassifier(min(neighbours, len(y) // 2)) if estimator == "knn"
             else LogisticRegression(C=0.1, max_iter=1000))
    probs = cross_val_predict(model, z, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed % 2**32),
                              method="predict_proba")
    full = np.zeros((len(y), max(int(y.max()) + 1, probs.shape[1])))
    full[:, np.unique(y)] = probs
    return full
