"""Membership inference and memorisation: what the model gives away about its training set.

The training set (`--train-data`) holds the members, the audit data the non-members: a seeded subset of each
forms the pool the attacks score. Always: the population attack (the audited model's logit-scaled confidence,
a loss threshold). With `train_fn` (the user's training function, as for label_errors): K reference models,
each trained on a random half of the pool, every pool example in exactly half of them; then LiRA offline (only
the models trained without an example) and online (with and without), and each training example's
memorisation score (mean confidence of the models that trained on it minus that of the ones that did not).
Each reference model is a shard task: saved as it comes, resumable, and trained in parallel on the process or
Ray backend. Without reference models, the TRAK self-influence of each training example stands in for its
memorisation (with reference models, both are computed and their rank agreement is reported).
"""

from __future__ import annotations

from html import escape

import numpy as np
import torch
from pydantic import Field

from ..privacy import lira_offline, lira_online, logit_confidence, memorisation, roc
from ..reference_models import reference_model_logits
from ..render import class_label, gallery, line_chart
from ..result import CheckResult, Finding
from ..seeds import derive_seed, rng as seeded_rng, seeded_subset
from .base import AuditContext, Check, CheckOptions, FindingDoc, Needs, make_details, status_from_findings

ATTACKS = ("population", "lira_offline", "lira_online")


class MemorizationOptions(CheckOptions):
    members: int = Field(1000, ge=10, description="training examples scored (a seeded subset; the members)")
    non_members: int = Field(1000, ge=10, description="audit examples scored (a seeded subset; the non-members). "
                             "TPR at 0.1% FPR needs 1,000 or more")
    train_fn: str | None = Field(None, description="'package.module:function' called as fn(x, y, seed=...); it trains "
                                 "and returns a model that takes the inputs as the audited model does. Enables LiRA "
                                 "and memorisation scores from reference models")
    reference_models: int = Field(8, ge=2, le=256, description="K reference models, each on a random half of the pool")
    reference_cache: str | None = Field(None, description="a folder where reference models are kept (their logits) by "
                                        "what determines them: an audit of another model trained the same way on the "
                                        "same data reuses them instead of retraining")
    proj_dim: int = Field(512, ge=16, description="projection of the TRAK self-influence proxy")
    leak_tpr: float = Field(0.05, gt=0, le=1, description="TPR at 1% FPR of the strongest attack at or above this "
                            "(5x a guess) is a finding; high at 4x this")
    examples_shown: int = Field(16, ge=0, le=64, description="most memorised training examples pictured")


class Memorization(Check):
    id = "memorization"
    title = "Membership inference and memorisation"
    needs = Needs(labels=True, train_data=True, train_labels=True)
    Options = MemorizationOptions
    order = 45
    metrics = {"membership_tpr_low_fpr": "TPR at 0.1% FPR of the strongest membership attack that ran",
               "membership_tpr_1pct_fpr": "TPR at 1% FPR of the strongest membership attack that ran",
               "membership_auc": "AUC of the strongest membership attack that ran",
               "population_tpr_1pct_fpr": "TPR at 1% FPR of the loss-threshold attack (no reference models)"}
    Details = make_details("MemorizationDetails", {
        "attacks": (dict[str, dict], "per attack: auc, balanced_accuracy, tpr_at_0.1pct_fpr, tpr_at_1pct_fpr"),
        "strongest": (str, "the attack the metrics come from (the highest TPR at 1% FPR)"),
        "roc": (dict[str, dict], "per attack: fpr and tpr on a log grid, for the log-log ROC"),
        "members": (int, "training examples scored"), "non_members": (int, "audit examples scored"),
        "reference_models": (int, "reference models used (0: none)"),
        "reference_models_reused": (int, "of those, read from `reference_cache` instead of trained"),
        "train_fn": (str | None, "the train function"),
        "memorisation_source": (str, "reference models (in-out confidence) or TRAK self-influence"),
        "proxy_agreement": (float | None, "Spearman rank correlation of TRAK self-influence with the reference "
                            "models' memorisation, where both ran"),
        "fpr_resolution": (float, "1 / non-members: TPR at a lower FPR is TPR at no false positive at all"),
        "class_names": (list[str], "class names, by index")})
    arrays = {"member_index": "training-file position of each member scored",
              "non_member_index": "audit-file position of each non-member scored",
              "score_population": "loss-threshold membership score of each pool example (members first)",
              "score_lira_offline": "LiRA offline score of each pool example (with reference models)",
              "score_lira_online": "LiRA online score of each pool example (with reference models)",
              "memorisation": "memorisation score of each member (higher: more memorised)",
              "self_influence": "TRAK self-influence of each member",
              "example_index": "training-file positions of the most memorised examples shown",
              "example_image": "the most memorised training examples", "example_label": "their labels",
              "example_score": "their memorisation scores"}
    quick_options = {"members": 60, "non_members": 60, "reference_models": 4, "proj_dim": 64}
    findings = {
        "memorization.membership-leak": FindingDoc(
            "medium or high",
            "A membership-inference attack tells training examples from unseen ones far better than a guess at a "
            "low false-positive rate: TPR at 1% FPR of at least `leak_tpr` (medium; high at 4x). Evidence: the "
            "attack, its TPR at 0.1% and 1% FPR, its AUC. Regularisation, early stopping, more data or "
            "differentially private training lower it; the most memorised examples (report) are often "
            "mislabelled or atypical."),
    }

    def unmet(self, ctx: AuditContext) -> str | None:
        if len(ctx.data) < 10 or len(ctx.train_data) < 10:
            return "needs at least 10 audit (non-member) and 10 training (member) examples"
        return None

    def run(self, ctx: AuditContext) -> CheckResult:
        o = self.options
        train, data = ctx.train_data, ctx.data
        mem = seeded_subset(len(train), o.members, ctx.seed, self.id, "members")
        non = seeded_subset(len(data), o.non_members, ctx.seed, self.id, "non-members")
        x = torch.cat([train.x[torch.as_tensor(mem)], data.x[torch.as_tensor(non)]])
        y = torch.cat([train.y[torch.as_tensor(mem)], data.y[torch.as_tensor(non)]])
        member = np.r_[np.ones(len(mem), bool), np.zeros(len(non), bool)]
        ctx.progress.message(f"memorization: membership of {len(mem)} training and {len(non)} audit examples")
        phi = logit_confidence(ctx.model.logits(x).numpy(), y.numpy())
        scores = {"population": phi}
        reference = self._reference_models(ctx, x, y) if o.train_fn else None
        memo, source, agreement, reused = None, "TRAK self-influence", None, 0
        self_influence = self._self_influence(ctx, x[: len(mem)], y[: len(mem)])
        if reference is not None:
            ref_phi, included, reused = reference
            scores["lira_offline"] = lira_offline(phi, ref_phi, included)
            scores["lira_online"] = lira_online(phi, ref_phi, included)
            memo = memorisation(ref_phi, included)[: len(mem)]
            source = f"{o.reference_models} reference models (in-out confidence)"
            if self_influence is not None:
                agreement = _spearman(memo, self_influence)
        elif self_influence is not None:
            memo = self_influence
        rocs = {k: roc(s, member) for k, s in scores.items()}
        strongest = max(rocs, key=lambda k: (rocs[k].tpr_at[0.01], rocs[k].auc))
        best = rocs[strongest]
        findings = []
        if best.tpr_at[0.01] >= o.leak_tpr:
            findings.append(Finding(
                "memorization.membership-leak", "high" if best.tpr_at[0.01] >= 4 * o.leak_tpr else "medium",
                f"{_ATTACK_NAMES[strongest][0].upper()}{_ATTACK_NAMES[strongest][1:]} tells training examples from "
                f"unseen ones: it finds "
                f"{best.tpr_at[0.01]:.1%} of the members at 1% false positives ({best.tpr_at[0.001]:.1%} at 0.1%; "
                f"a guess finds 1% and 0.1%), AUC {best.auc:.2f}.",
                {"attack": strongest, **best.summary()}))
        names = train.class_names or data.class_names or [str(i) for i in range(int(y.max()) + 1)]
        details = {"attacks": {k: r.summary() for k, r in rocs.items()}, "strongest": strongest,
                   "roc": {k: _log_grid(r) for k, r in rocs.items()}, "members": len(mem), "non_members": len(non),
                   "reference_models": o.reference_models if reference is not None else 0, "train_fn": o.train_fn,
                   "reference_models_reused": reused,
                   "memorisation_source": source if memo is not None else "none", "proxy_agreement": agreement,
                   "fpr_resolution": 1.0 / len(non), "class_names": names}
        arrays = {"member_index": train.positions(mem), "non_member_index": data.positions(non),
                  **{f"score_{k}": s.astype(np.float32) for k, s in scores.items()}}
        if self_influence is not None:
            arrays["self_influence"] = self_influence.astype(np.float32)
        if memo is not None:
            arrays["memorisation"] = memo.astype(np.float32)
            shown = np.argsort(-np.nan_to_num(memo, nan=-np.inf), kind="stable")[: o.examples_shown]
            arrays.update(example_index=train.positions(mem[shown]), example_image=x[torch.as_tensor(shown)].numpy(),
                          example_label=y[torch.as_tensor(shown)].numpy(), example_score=memo[shown].astype(np.float32))
        metrics = {"membership_tpr_low_fpr": best.tpr_at[0.001], "membership_tpr_1pct_fpr": best.tpr_at[0.01],
                   "membership_auc": best.auc, "population_tpr_1pct_fpr": rocs["population"].tpr_at[0.01]}
        return CheckResult(self.id, status_from_findings(findings), metrics, findings, details, arrays)

    def _reference_models(self, ctx: AuditContext, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
        """K models through the user's train function, each on a random half of the pool; every example is in
        exactly half of them (LiRA's balanced design: each example has as many "in" as "out" models)."""
        from ..loading.models import import_callable

        o = self.options
        import_callable(o.train_fn, "train function", "it must train and return an nn.Module")  # fail here, not later
        g = seeded_rng(ctx.seed, self.id, "halves")
        k, n = o.reference_models, len(x)
        included = np.argsort(g.random((k, n)), axis=0) < k // 2  # per example, a random half of the models
        tasks = [(f"{m:03d}", (o.train_fn, np.flatnonzero(included[m]), derive_seed(ctx.seed, self.id, "model", m),
                               o.reference_cache)) for m in range(k)]
        outs = ctx.map_shards("reference", reference_model_logits, tasks, shared=(x, y),
                              label=f"memorization: {k} reference models through {o.train_fn}")
        logits = np.stack([r["logits"] for r in outs])
        reused = int(sum(bool(r.get("cached", False)) for r in outs))
        return logit_confidence(logits, y.numpy()), included, reused

    def _self_influence(self, ctx: AuditContext, x: torch.Tensor, y: torch.Tensor) -> np.ndarray | None:
        from ..attribution import Trak, featurize

        model = ctx.model
        if model.module is None:
            return None  # a black box: no gradients for the proxy
        feats = featurize(model.eager_module(), model.normalise(x), y, proj_dim=self.options.proj_dim, seed=ctx.seed,
                          counter=model.counter)
        return Trak([feats]).self_influence()

    @staticmethod
    def render(r: CheckResult, audit) -> str:
        """This check's section of report.html."""
        d, a = r.details, r.arrays
        attacks = d.get("attacks") or {}
        rows = "".join(f"<tr><td>{escape(_ATTACK_NAMES.get(k, k))}</td><td>{v['tpr_at_0.1pct_fpr']:.2%}</td>"
                       f"<td>{v['tpr_at_1pct_fpr']:.2%}</td><td>{v['auc']:.3f}</td><td>{v['balanced_accuracy']:.3f}</td></tr>"
                       for k, v in attacks.items())
        ref = (f"{d.get('reference_models')} reference models trained through {escape(str(d.get('train_fn')))}"
               if d.get("reference_models") else "no reference models (give [memorization] train_fn for LiRA)")
        out = [f'<p class="meta">Members: {d.get("members")} training examples; non-members: {d.get("non_members")} '
               f"audit examples; {ref}. A guess has TPR equal to its FPR; with {d.get('non_members')} non-members no "
               f"FPR below {d.get('fpr_resolution', 0):.2%} is resolved (below it, TPR means: at no false positive)."
               "</p>",
               "<table><tr><th>attack</th><th>TPR at 0.1% FPR</th><th>TPR at 1% FPR</th><th>AUC</th>"
               f"<th>balanced accuracy</th></tr>{rows}</table>"]
        curves = d.get("roc") or {}
        if curves:
            grid = next(iter(curves.values()))["fpr"]
            series = {_ATTACK_NAMES.get(k, k): c["tpr"] for k, c in curves.items()}
            series["a guess"] = grid
            out += ["<h4>ROC, log-log (true-positive rate against false-positive rate): the low false-positive end is "
                    "what matters</h4>",
                    line_chart(grid, series, xlabel="false-positive rate (log scale)", title="membership ROC",
                               xlog=True, ylog=1e-3)]
        if d.get("proxy_agreement") is not None:
            out.append(f'<p class="meta">TRAK self-influence agrees with the reference models\' memorisation with '
                       f"Spearman rank correlation {d['proxy_agreement']:.2f}.</p>")
        if "example_image" in a:
            label = class_label(d.get("class_names") or [])
            suspect = _flagged_labels(audit)
            note = " (\u26a0 = flagged by the label_errors check)" if suspect is not None else ""
            out += gallery(f"Most memorised training examples ({escape(str(d.get('memorisation_source')))}){note}",
                           a["example_image"], [f"train #{int(i)}: labelled {label(int(c))} ({float(s):.2f})"
                                                + (" \u26a0" if suspect is not None and int(i) in suspect else "")
                                                for i, c, s in zip(a["example_index"], a["example_label"],
                                                                   a["example_score"])], audit)
        return "".join(out)


_ATTACK_NAMES = {"population": "a loss-threshold attack", "lira_offline": "LiRA (offline)", "lira_online": "LiRA (online)"}


def _flagged_labels(audit) -> set[int] | None:
    """Training-file positions the label_errors check of the same audit flagged, or None when it did not run."""
    for c in getattr(audit, "checks", []):
        if c.id == "label_errors" and c.arrays and "flagged" in c.arrays:
            return {int(i) for i in np.asarray(c.arrays["train_index"])[np.asarray(c.arrays["flagged"], bool)]}
    return None


def _log_grid(r, points: int = 7) -> dict[str, list[float]]:
    """The ROC's TPR at FPRs spaced evenly in log from 1e-3 to 1 (a step function: the largest TPR at or below)."""
    grid = np.logspace(-3, 0, points)
    return {"fpr": grid.tolist(), "tpr": [float(r.tpr[r.fpr <= f + 1e-12].max()) for f in grid]}


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Rank correlation over the examples where both scores are finite (None with fewer than 3)."""
    from ..attribution import spearman

    ok = np.isfinite(a) & np.isfinite(b)
    return spearman(a[ok], b[ok]) if ok.sum() >= 3 else None
