"""Model diff: how the audited model (A) differs from another model (B) of the same task (`brittle.model_diff`).

Where the two disagree (per class, and by which of them is right), and why: the ModelDiff directions in
training-example space that one model's predictions depend on and the other's do not, with their training
examples and test points as pictures, each tested by stamping what its training examples share where that
can be made concrete. Runs when `[model_diff] other_model` names the other model's file.
"""

from __future__ import annotations

from html import escape

import numpy as np
from pydantic import Field

from ..model_diff import MIN_MODELS, SHOWN, diff_prepared, other_side, test_evidence
from ..render import class_label, gallery
from ..result import CheckResult, Finding
from ..seeds import seeded_subset
from .base import AuditContext, Check, CheckOptions, FindingDoc, Needs, load_other_model, make_details



class ModelDiffOptions(CheckOptions):
    model_files = ("other_model", "ensemble", "other_ensemble")
    other_model: str | None = Field(None, description="the model file to compare the audited model with (same "
                                    "classes and input domain); the check is skipped without it")
    ensemble: list[str] = Field([], description="more trainings of the audited model's recipe (other seeds), "
                                "optional: attributions are averaged over them and, with at least 5 per side, the "
                                "counterfactual test takes the models as its unit")
    other_ensemble: list[str] = Field([], description="more trainings of the other model's recipe, the same way")
    targets: int = Field(300, ge=2, le=5000, description="audit points attributed (a seeded subset)")
    directions: int = Field(3, ge=1, le=20, description="distinguishing directions per model")
    top: int = Field(20, ge=3, le=200, description="training examples listed per direction")
    max_train: int = Field(20000, ge=10, description="training examples attributed to (a seeded subset above this)")
    proj_dim: int | None = Field(None, ge=16, description="None: exact gradients for Linear-only models, else 2048")
    ridge: float = Field(3.0, gt=0, description="lambda = ridge * mean eigenvalue of the weighted kernel")


class ModelDiffCheck(Check):
    id = "model_diff"
    title = "Model diff"
    needs = Needs(labels=True, train_data=True, train_labels=True, gradients=True)
    Options = ModelDiffOptions
    order = 80
    metrics = {"disagreement": "share of audit points the two models predict differently",
               "accuracy_change": "the other model's accuracy minus the audited model's",
               "confirmed_directions": "distinguishing directions confirmed by their counterfactual test"}
    Details = make_details("ModelDiffDetails", {
        "names": (dict[str, str], "A (the audited model) and B (the other model)"),
        "n_test": (int, "audit points compared"), "n_train": (int, "training examples attributed to"),
        "accuracy": (dict[str, float], "accuracy of A and B"), "disagreement": (float, "share predicted differently"),
        "quadrants": (dict[str, int], "both right, only A right, only B right, both wrong"),
        "per_class": (list[dict], "per class: n, accuracy_A, accuracy_B, disagreement"),
        "directions": (list[dict], "per direction: owner, rank, variance, train_index, train_weight, train_label, "
                       "test_index, test_loading, label, label_share, slice_accuracy, counterfactual"),
        "attributed_points": (int, "audit points attributed"), "exact_gradients": (bool, "exact kernels or projected"),
        "models": (dict[str, int], "models per side: 1, or the model and its ensemble"),
        "class_names": (list[str], "class names, by index")})
    arrays = {"prediction_A": "A's prediction per audit point", "prediction_B": "B's prediction per audit point",
              "direction<k>_train_image": "direction k's top training examples (images)",
              "direction<k>_test_image": "the audit points loading most on direction k (images)"}
    quick_options = {"targets": 40, "directions": 1, "top": 5, "max_train": 200, "proj_dim": 64}
    findings = {
        "model_diff.distinguishing-feature": FindingDoc(
            "medium",
            "One model's predictions depend on something in the training set that the other's do not, and the "
            "counterfactual test confirms it: stamping what the direction's top training examples share onto inputs "
            "of other classes closes more of that model's logit gap to their class than of the other's. With one "
            "model per side: at least a quarter more (median), on significantly more inputs (sign test z >= 3); with "
            f"ensembles of at least {MIN_MODELS} per side: a tenth more on average over the models' medians, "
            "significant in a permutation test over the models (family-wise 0.05 over the directions). Evidence: "
            "the owner, the class, the window, the share of each side's gap closed, the predictions stamping turned, "
            "the z or the p. Look at the pictured training examples: a mark, a background or an artefact of one data "
            "pipeline is the usual cause."),
    }

    def unmet(self, ctx: AuditContext) -> str | None:
        if not self.options.other_model:
            return "needs another model to compare with: set [model_diff] other_model = 'path/to/model'"
        return None

    def run(self, ctx: AuditContext) -> CheckResult:
        o = self.options
        other = load_other_model(o.other_model, ctx)
        more = {side: [load_other_model(path, ctx) for path in paths]
                for side, paths in (("A", o.ensemble), ("B", o.other_ensemble))}
        train = ctx.train_data
        if len(train) > o.max_train:
            train = train.subset(seeded_subset(len(train), o.max_train, ctx.seed, self.id, "train"))
        store = None if ctx.state.root is None else ctx.state.root / "features"
        result = diff_prepared(ctx.model, other, ctx.data, train, a_ensemble=more["A"], b_ensemble=more["B"],
                               targets=o.targets, directions=o.directions, top=o.top, proj_dim=o.proj_dim,
                               ridge=o.ridge, seed=ctx.seed, progress=ctx.progress,
                               map_shards=ctx.map_shards, store=store)
        details = {**result.to_json(), "class_names": ctx.data.class_names or []}
        arrays = diff_arrays(result, images=ctx.data.x.ndim == 4)
        findings = []
        for d in result.confirmed:
            cf, owner = d.counterfactual, d.owner
            other_key = other_side(owner)
            i, j, side = cf["window"]
            findings.append(Finding(
                "model_diff.distinguishing-feature", "medium",
                f"{result.names[owner]} ({owner}) relies on what its direction {d.rank + 1}'s top training examples "
                f"(mostly class {d.label}) share in the {side}x{side} window at row {i}, column {j}, and "
                f"{result.names[other_key]} ({other_key}) does not: stamping it onto other classes' inputs "
                f"{test_evidence(cf, owner, str(d.label))}.",
                {"owner": owner, "class": d.label, "window": cf["window"], "gap_closed": cf["gap_closed"],
                 "excess_gap_closed": cf["excess_gap_closed"], "flip_rate": cf["flip_rate"], "z": cf["z"],
                 "unit": cf["unit"], "p": cf.get("p"),
                 "train_index": d.train_index[:10]}))
        metrics = {"disagreement": result.disagreement,
                   "accuracy_change": result.accuracy["B"] - result.accuracy["A"],
                   "confirmed_directions": len(result.confirmed)}
        return CheckResult(self.id, "warn" if findings else "pass", metrics, findings, details, arrays)

    @staticmethod
    def render(r: CheckResult, audit) -> str:
        """This check's section of report.html."""
        return render_diff(r.details, r.arrays, audit)


def diff_arrays(result, *, images: bool) -> dict[str, np.ndarray]:
    """Both models' predictions and, for images, each direction's pictures."""
    arrays = {"prediction_A": result.predictions["A"], "prediction_B": result.predictions["B"]}
    if images:
        for k, d in enumerate(result.directions):
            arrays[f"direction{k}_train_image"] = np.stack([result.train_images[p] for p in d.train_index[:SHOWN]])
            arrays[f"direction{k}_test_image"] = np.stack([result.test_images[p] for p in d.test_index[:SHOWN]])
    return arrays


def render_diff(d: dict, arrays: dict, audit) -> str:
    """The diff's HTML (the audit's section and `brittle diff`'s page): the disagreement table, then each direction
    with its training examples, its test points and its counterfactual test."""
    names = d.get("names") or {"A": "A", "B": "B"}
    label = class_label(d.get("class_names") or [])
    acc, q = d.get("accuracy") or {}, d.get("quadrants") or {}
    out = [f'<p class="meta">A = {escape(names["A"])}, B = {escape(names["B"])}; {d.get("n_test")} audit points '
           f'({d.get("attributed_points")} attributed) and {d.get("n_train")} training examples. Accuracy '
           f'{acc.get("A", 0):.3f} (A) vs {acc.get("B", 0):.3f} (B); they disagree on {d.get("disagreement", 0):.1%}: '
           f'only A right {q.get("only_A_right")}, only B right {q.get("only_B_right")}, both wrong '
           f'{q.get("both_wrong")}.</p>']
    sizes = d.get("models") or {"A": 1, "B": 1}
    if max(sizes.values()) > 1:
        out.append(f'<p class="meta">Ensembles: attributions averaged over {sizes["A"]} trainings of A\'s recipe and '
                   f'{sizes["B"]} of B\'s; the accuracy and disagreement above are A\'s and B\'s own.</p>')
    rows = "".join(f"<tr><td>{escape(label(c['class']))}</td><td>{c['n']}</td><td>{c['accuracy_A']:.3f}</td>"
                   f"<td>{c['accuracy_B']:.3f}</td><td>{c['disagreement']:.1%}</td></tr>"
                   for c in sorted(d.get("per_class") or [], key=lambda c: -c["disagreement"]))
    out.append("<h4>Where they disagree, per class (most disagreement first)</h4><table><tr><th>class</th><th>n</th>"
               f"<th>accuracy A</th><th>accuracy B</th><th>disagreement</th></tr>{rows}</table>")
    for k, dr in enumerate(d.get("directions") or []):
        owner = dr["owner"]
        other = other_side(owner)
        cf = dr.get("counterfactual") or {}
        if cf.get("status") in ("confirmed", "not confirmed"):
            test = (f"counterfactual: {cf['status']}; stamping the window (row {cf['window'][0]}, column "
                    f"{cf['window'][1]}, side {cf['window'][2]}) onto {cf['stamped_inputs']} inputs of other classes "
                    f"{test_evidence(cf, owner, label(dr['label']))}; removing it from the training examples lowers "
                    f"their class probability by {cf['removal_drop'][owner]:.3f} ({owner}) and "
                    f"{cf['removal_drop'][other]:.3f} ({other})")
        else:
            test = f"counterfactual: {cf.get('status', 'not run')} ({cf.get('reason', '')})"
        sl = dr.get("slice_accuracy") or {}
        out.append(f"<h4>Direction {dr['rank'] + 1} of {escape(names[owner])} ({owner}) against {other}</h4>"
                   f'<p class="meta">Variance of the attributions along it: {dr["variance"][owner]:.3f} ({owner}) vs '
                   f'{dr["variance"][other]:.3f} ({other}). Its top {len(dr["train_index"])} training examples are '
                   f'{dr["label_share"]:.0%} labelled {escape(label(dr["label"]))}; on the audit points that load '
                   f'most on it, accuracy {sl.get("A", 0):.2f} (A) vs {sl.get("B", 0):.2f} (B). {escape(test)}.</p>')
        if f"direction{k}_train_image" in arrays:
            out += gallery("Training examples with the most weight on it", arrays[f"direction{k}_train_image"],
                           [f"train #{p}, labelled {label(lab)}" for p, lab in zip(dr["train_index"], dr["train_label"])],
                           audit)
            out += gallery("Audit points that load most on it", arrays[f"direction{k}_test_image"],
                           [f"audit #{p}" for p in dr["test_index"]], audit)
        else:
            out.append(f'<p class="meta">Training rows with the most weight: '
                       f'{", ".join(map(str, dr["train_index"][:12]))}; audit rows that load most: '
                       f'{", ".join(map(str, dr["test_index"][:12]))}.</p>')
    return "".join(out)
