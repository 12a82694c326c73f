"""Attribution: which training examples drive the model's predictions (TRAK, `brittle.attribution`).

The audit points the model gets wrong come first among the targets: for each, the training examples that
pushed it towards its label (proponents) and away from it (opponents). Self-influence ranks the training
examples the model had to memorise: mislabelled, ambiguous or poisoned ones gather there.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from ..attribution import attribute_prepared
from ..result import CheckResult
from ..seeds import rng as seeded_rng
from ..seeds import seeded_subset
from .base import AuditContext, Check, CheckOptions, Needs, load_other_model


class AttributionOptions(CheckOptions):
    model_files = ("other_models",)
    max_targets: int = Field(20, ge=1, le=1000, description="audit points to explain (errors first)")
    max_train: int = Field(20000, ge=10, description="training examples used (a seeded subset above this)")
    proj_dim: int | None = Field(None, ge=16, description="None: exact gradients for Linear-only models, else 2048")
    ridge: float = Field(3.0, gt=0, description="lambda = ridge * mean eigenvalue of the weighted kernel")
    other_models: list[str] = Field(default_factory=list, description="model files for the ensemble")
    top: int = Field(5, ge=1, le=50)


class Attribution(Check):
    id = "attribution"
    title = "Data attribution"
    needs = Needs(labels=True, train_data=True, train_labels=True, gradients=True)
    metrics = ("targets", "error_targets")
    Options = AttributionOptions
    order = 75

    def run(self, ctx: AuditContext) -> CheckResult:
        o = self.options
        g = seeded_rng(ctx.seed, self.id, "targets")
        train = ctx.train_data
        if len(train) > o.max_train:
            train = train.subset(seeded_subset(len(train), o.max_train, ctx.seed, self.id))
        preds = ctx.model.predict(ctx.data.x).numpy()
        y = ctx.data.y.numpy()
        wrong = np.flatnonzero(preds != y)
        right = np.flatnonzero(preds == y)
        rows = np.concatenate([wrong, g.permutation(right)])[: o.max_targets]
        targets = ctx.data.subset(rows)
        adapters = [ctx.model] + [load_other_model(p, ctx) for p in o.other_models]
        store = None if ctx.state.root is None else ctx.state.root / "features"
        result = attribute_prepared(adapters, train, targets, proj_dim=o.proj_dim, ridge=o.ridge, store=store,
                                    progress=ctx.progress, seed=ctx.seed, map_shards=ctx.map_shards)
        summary = result.summary(o.top)
        for t, row in zip(summary["targets"], rows):
            t.update(label=int(y[row]), prediction=int(preds[row]))
        n_err = int(min(len(wrong), len(rows)))
        details = {**summary, "models": len(adapters), "train_examples": len(train), "error_targets": n_err,
                   "class_names": ctx.data.class_names or []}
        arrays = {"scores": result.scores.astype(np.float32), "target_index": result.target_positions,
                  "train_index": result.train_positions, "self_influence": result.self_influence.astype(np.float32)}
        if ctx.data.x.ndim == 4:
            shown = min(4, len(rows))
            pos = {int(p): i for i, p in enumerate(train.positions(np.arange(len(train))))}
            arrays["target_image"] = targets.x[:shown].numpy()
            arrays["proponent_image"] = np.stack([train.x[[pos[p] for p in summary["targets"][t]["proponents"][:3]]]
                                                  .numpy() for t in range(shown)])
            arrays["opponent_image"] = np.stack([train.x[[pos[p] for p in summary["targets"][t]["opponents"][:3]]]
                                                 .numpy() for t in range(shown)])
            arrays["self_image"] = train.x[[pos[p] for p in summary["self_influence_top"][:8]]].numpy()
            arrays["self_label"] = train.y[[pos[p] for p in summary["self_influence_top"][:8]]].numpy()
        return CheckResult(self.id, "pass", {"targets": len(rows), "error_targets": n_err}, [], details, arrays)
