"""Attribution: which training examples drive the model's predictions (TRAK, `brittle.attribution`).

The audit points the model gets wrong come first among the targets: for each, the training examples that
pushed it towards its label (proponents) and away from it (opponents). Self-influence ranks the training
examples the model had to memorise: mislabelled, ambiguous or poisoned ones gather there.
"""

from __future__ import annotations

from html import escape

import numpy as np
from pydantic import Field

from ..attribution import attribute_prepared
from ..render import class_label, gallery
from ..result import CheckResult
from ..seeds import rng as seeded_rng
from ..seeds import seeded_subset
from .base import AuditContext, Check, CheckOptions, Needs, load_other_model, make_details


class AttributionOptions(CheckOptions):
    model_files = ("other_models",)
    max_targets: int = Field(20, ge=1, le=1000, description="audit points to explain (errors first)")
    max_train: int = Field(20000, ge=10, description="training examples used (a seeded subset above this)")
    proj_dim: int | None = Field(None, ge=16, description="None: exact gradients for Linear-only models, else 2048")
    ridge: float = Field(3.0, gt=0, description="lambda = ridge * mean eigenvalue of the weighted kernel")
    other_models: list[str] = Field(default_factory=list, description="model files for the ensemble")
    top: int = Field(5, ge=1, le=50, description="proponents and opponents listed per target")


class Attribution(Check):
    id = "attribution"
    title = "Data attribution"
    needs = Needs(labels=True, train_data=True, train_labels=True, gradients=True)
    Options = AttributionOptions
    order = 75
    metrics = {"targets": "audit points explained", "error_targets": "of which the model gets wrong"}
    Details = make_details("AttributionDetails", {
        "exact_gradients": (bool, "exact gradient kernels (Linear-only models) or projections"),
        "dim": (int, "feature dimension"), "lambdas": (list[float], "ridge per model"),
        "targets": (list[dict], "per target: position, label, prediction, top proponents and opponents with scores"),
        "self_influence_top": (list[int], "training positions with the highest self-influence"),
        "self_influence_top_scores": (list[float], "their scores"), "models": (int, "models in the ensemble"),
        "train_examples": (int, "training examples attributed to"), "error_targets": (int, "targets the model gets wrong"),
        "class_names": (list[str], "class names (empty when unknown)")})
    arrays = {"scores": "(targets, training examples) TRAK scores", "target_index": "audit positions of the targets",
              "train_index": "training positions of the columns", "self_influence": "per training example",
              "target_image": "the first targets (images)", "proponent_image": "their top proponents",
              "opponent_image": "their top opponents", "self_image": "the most self-influential training examples",
              "self_label": "their labels"}
    quick_options = {"max_targets": 4, "max_train": 200}

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

    @staticmethod
    def render(r: CheckResult, audit) -> str:
        """This check's section of report.html."""
        d, a = r.details, r.arrays
        names = d.get("class_names") or []
        label = class_label(names)
        out = [f'<p class="meta">TRAK over {d.get("train_examples")} training examples, {d.get("models")} model(s), '
               f'{"exact gradients" if d.get("exact_gradients") else "gradients projected to " + str(d.get("dim"))}; '
               f'{d.get("error_targets", 0)} of the {r.metrics.get("targets", 0)} explained audit points are errors.</p>']
        tops = d.get("targets") or []
        if "target_image" in a:
            for t in range(len(a["target_image"])):
                info = tops[t]
                out += gallery(f"Audit #{info['target']} (label {label(info['label'])}, predicted "
                                f"{label(info['prediction'])}): itself, its top proponents, its top opponents",
                                [a["target_image"][t], *a["proponent_image"][t], *a["opponent_image"][t]],
                                ["audit input"] + [f"for: train #{p}" for p in info["proponents"][:3]]
                                + [f"against: train #{p}" for p in info["opponents"][:3]], audit)
        if "self_image" in a:
            out += gallery("Highest self-influence: training examples the model had to memorise", a["self_image"],
                            [f"train #{p}, labelled {label(int(lab))}" for p, lab in
                             zip(d.get("self_influence_top", []), a["self_label"])], audit)
        elif tops:  # not images: the training rows, by their position in the training file
            rows = "".join(f"<tr><td>{t['target']}</td><td>{escape(label(t['label']))}</td>"
                           f"<td>{escape(label(t['prediction']))}</td><td>{', '.join(map(str, t['proponents'][:5]))}</td>"
                           f"<td>{', '.join(map(str, t['opponents'][:5]))}</td></tr>" for t in tops[:10])
            out.append("<h4>Training rows that drive each prediction (positions in the training file)</h4><table><tr>"
                       "<th>audit row</th><th>label</th><th>predicted</th><th>top proponents</th><th>top opponents</th>"
                       f"</tr>{rows}</table><p class=\"meta\">Highest self-influence (rows the model had to memorise): "
                       + ", ".join(map(str, d.get("self_influence_top", [])[:12])) + "</p>")
        return "".join(out)
