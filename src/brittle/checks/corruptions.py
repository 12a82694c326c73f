"""Corruptions: accuracy under common corruptions, and whether accuracy can be estimated there without labels.

Images get the 19 corruptions of `brittle.corruptions` (18 on non-RGB images) at 5 severities; tabular
inputs get feature noise, missing values and rescaled features. Reported: mean corruption accuracy, the
relative drop from clean accuracy, per-type curves over severity, the worst type, and the mean corruption
error relative to a reference model (mCE, Hendrycks & Dietterich) when `reference_model` is given.

Each corrupted set is also a test of the label-free accuracy estimators (`brittle.label_free`): they are fitted
on a clean half of the audit data and estimate the accuracy on the corrupted other half, where the truth is
known. The report shows estimate vs truth, so a user knows how far to trust `brittle estimate` on this model
before relying on it in production.
"""

from __future__ import annotations

from html import escape

from pathlib import Path

import numpy as np
import torch
from pydantic import Field, field_validator

from ..corruptions import TABULAR, corrupt, corrupt_tabular, corruption_names
from ..label_free import estimate_accuracy, fit_source, prediction_instability
from ..render import bar_chart, gallery, line_chart
from ..result import CheckResult, Finding
from ..seeds import rng as seeded_rng
from ..seeds import seeded_subset
from .base import (
    AuditContext, Check, CheckOptions, FindingDoc, Needs, load_other_model, make_details, status_from_findings,
)


# The instability that warns an estimate off (brittle.label_free) is a share: 2 draws on 250 points give it to about
# 1.3 points, at a third of the cost of predicting the set itself.
INSTABILITY_POINTS, INSTABILITY_DRAWS = 250, 2


class CorruptionsOptions(CheckOptions):
    model_files = ("reference_model", "other_models")
    corruptions: list[str] | None = Field(None, description="corruption names (default: every one that applies)")
    severities: list[int] = Field(default_factory=lambda: [1, 2, 3, 4, 5], description="severities, 1 to 5")
    max_samples: int = Field(1000, ge=20, description="audit points used (a seeded subset)")
    max_relative_drop: float = Field(0.2, gt=0, le=1, description="a mean relative accuracy drop above this is a finding")
    max_type_drop: float = Field(0.5, gt=0, le=1, description="so is one corruption's relative drop above this")
    reference_model: str | None = Field(None, description="a model file (same input domain) for the relative mCE")
    other_models: list[str] = Field(default_factory=list,
                                    description="model files (same input domain) for agreement-based accuracy estimates")

    @field_validator("severities")
    @classmethod
    def _severities(cls, v: list[int]) -> list[int]:
        if not v or any(s not in (1, 2, 3, 4, 5) for s in v):
            raise ValueError(f"severities must be a non-empty list of 1..5; got {v}")
        return sorted(set(v))


class Corruptions(Check):
    id = "corruptions"
    title = "Common corruptions"
    needs = Needs(labels=True)
    Options = CorruptionsOptions
    order = 25
    metrics = {"clean_accuracy": "accuracy on the evaluated audit points",
               "mean_corruption_accuracy": "accuracy averaged over corruptions and severities",
               "relative_drop": "(clean - mean corruption accuracy) / clean",
               "worst_corruption_accuracy": "the corruption with the lowest mean accuracy",
               "mce": "mean corruption error relative to reference_model (only with one)",
               "estimate_mae": "mean absolute error of the label-free accuracy estimate over corrupted sets",
               "estimate_max_error": "its largest error"}
    Details = make_details("CorruptionsDetails", {
        "severities": (list[int], "severities evaluated"), "accuracy": (dict[str, list[float]], "per corruption, per severity"),
        "per_type": (dict[str, float], "per corruption, mean over severities"), "worst": (str, "the worst corruption"),
        "points": (int, "audit points used"), "kind": (str, "image or tabular"),
        "estimates": (list[dict], "per corrupted set: corruption, severity, estimate, truth, warned"),
        "estimator_models": (int, "models the label-free estimators used"),
        "estimator_split": (list[int], "points fitting the estimators (clean), points judging them (corrupted)"),
        "ce": (dict[str, float] | None, "corruption error per type relative to the reference model"),
        "reference_clean_error": (float | None, "the reference model's clean error"),
        "reference_model": (str | None, "the reference model's file name")})
    arrays = {"example_clean": "one audit input", "example_corrupted": "it under each corruption (severity 3)"}
    quick_options = {"max_samples": 60, "severities": [2], "corruptions": None}
    findings = {
        "corruptions.fragile": FindingDoc(
            "medium",
            "Under the common corruptions, accuracy falls by more than `max_relative_drop` (0.2) of the clean "
            "accuracy on average, or by more than `max_type_drop` (0.5) under one corruption. Evidence: clean and "
            "mean corruption accuracy, the relative drop, the three worst corruptions. What helps: data "
            "augmentation with the corruptions that hurt (AugMix-style mixing keeps clean accuracy), or noise "
            "training (`docs/shift.md`)."),
        "corruptions.estimate-unreliable": FindingDoc(
            "low",
            "On at least one corrupted set, the label-free accuracy estimate (fitted on clean audit data) is off "
            "by more than 30 points and none of its warnings fired. Evidence: the sets with estimate and truth. "
            "Do not rely on `brittle estimate` alone for this model under such shifts; give it other models "
            "(`--other-model`) so that agreement-based estimates join in."),
    }

    def _names(self, x: torch.Tensor) -> tuple[str, ...]:
        available = corruption_names(x.shape[1]) if x.ndim == 4 else TABULAR
        if self.options.corruptions is None:
            return available
        return tuple(self.options.corruptions)

    def unusable_options(self, ctx: AuditContext) -> str | None:
        x = ctx.data.x
        available = corruption_names(x.shape[1]) if x.ndim == 4 else TABULAR
        unknown = [n for n in self.options.corruptions or () if n not in available]
        if unknown:
            kind = "image" if x.ndim == 4 else "tabular"
            return (f"corruptions: {', '.join(map(repr, unknown))} do not apply to these {kind} inputs of shape "
                    f"{tuple(x.shape[1:])}; choose from {', '.join(available)}")
        return None

    def unmet(self, ctx: AuditContext) -> str | None:
        if ctx.data.x.ndim not in (2, 4):
            return f"needs images (N, C, H, W) or tabular rows (N, D); the inputs have shape {tuple(ctx.data.x.shape)}"
        return None

    def run(self, ctx: AuditContext) -> CheckResult:
        o = self.options
        idx = seeded_subset(len(ctx.data), o.max_samples, ctx.seed, self.id)
        x, y = ctx.data.x[torch.as_tensor(idx)], ctx.data.y[torch.as_tensor(idx)].numpy()
        names = self._names(x)
        others = [load_other_model(p, ctx) for p in o.other_models]
        reference = load_other_model(o.reference_model, ctx) if o.reference_model else None
        models = [ctx.model] + others + ([reference] if reference else [])
        # Estimators are fitted on a clean half and judged on the corrupted other half.
        halves = seeded_rng(ctx.seed, self.id, "halves").permutation(len(idx)) % 2 == 0
        fit_part, judge_part = np.flatnonzero(halves), np.flatnonzero(~halves)
        clean = [m.logits(x).numpy() for m in models]
        n_est = 1 + len(others)
        fit = fit_source([z[fit_part] for z in clean[:n_est]], y[fit_part], num_classes=clean[0].shape[1])
        tabular = (x.mean(0), x.std(0)) if x.ndim == 2 else None
        scale = None if tabular is None else tabular[1]
        source_instability = prediction_instability(ctx.model, x[torch.as_tensor(fit_part[:INSTABILITY_POINTS])],
                                                    seed=ctx.seed, scale=scale, draws=INSTABILITY_DRAWS)
        # One task per corruption and severity: the tasks' costs differ by corruption, and small ones keep two
        # workers busy to the end (each severity is corrupted with the same seed whichever task runs it).
        tasks = [(f"{name}-{sev}", (name, [sev], ctx.seed, source_instability)) for name in names for sev in o.severities]
        shards = ctx.map_shards("set", corrupted_predictions, tasks, shared=(x, y, models[1:], judge_part, fit, n_est,
                                                                             tabular), label="corruptions")
        per_set = len(o.severities)
        accuracy = {n: [] for n in names}  # the audited model's, per severity
        ref_error = {n: [] for n in names}
        estimates = []
        for k, name in enumerate(names):
            parts = shards[k * per_set:(k + 1) * per_set]
            preds = np.concatenate([part["predictions"] for part in parts], 1)  # (models, severities, N)
            est = np.concatenate([part["estimates"] for part in parts])  # (severities, 3)
            accuracy[name] = (preds[0] == y[None]).mean(1).tolist()
            if reference is not None:
                ref_error[name] = (1 - (preds[-1] == y[None]).mean(1)).tolist()
            estimates += [dict(corruption=name, severity=sev, estimate=float(e[0]), truth=float(e[1]), warned=bool(e[2]))
                          for sev, e in zip(o.severities, est)]

        clean_acc = float((clean[0].argmax(1) == y).mean())
        per_type = {n: float(np.mean(a)) for n, a in accuracy.items()}
        mca = float(np.mean(list(per_type.values())))
        drop = (clean_acc - mca) / clean_acc if clean_acc > 0 else 0.0
        worst = min(per_type, key=per_type.get)
        metrics = {"clean_accuracy": clean_acc, "mean_corruption_accuracy": mca, "relative_drop": drop,
                   "worst_corruption_accuracy": per_type[worst]}
        details: dict = {"severities": o.severities, "accuracy": accuracy, "per_type": per_type, "worst": worst,
                         "points": len(idx), "kind": "image" if x.ndim == 4 else "tabular",
                         "estimates": estimates, "estimator_models": n_est,
                         "estimator_split": [len(fit_part), len(judge_part)]}
        if reference is not None:
            ref_clean = float(1 - (clean[-1].argmax(1) == y).mean())
            ce = {n: float(np.sum(1 - np.array(accuracy[n])) / max(np.sum(ref_error[n]), 1e-12)) for n in names}
            metrics["mce"] = float(np.mean(list(ce.values())))
            details.update(ce=ce, reference_clean_error=ref_clean, reference_model=Path(o.reference_model).name)
        errors = np.array([abs(e["estimate"] - e["truth"]) for e in estimates])
        metrics["estimate_mae"] = float(errors.mean())
        metrics["estimate_max_error"] = float(errors.max())

        findings = []
        type_drop = (clean_acc - per_type[worst]) / clean_acc if clean_acc > 0 else 0.0
        if drop > o.max_relative_drop or type_drop > o.max_type_drop:
            weakest = sorted(per_type, key=per_type.get)[:3]
            findings.append(Finding(
                "corruptions.fragile", "medium",
                f"Accuracy falls from {clean_acc:.1%} to {mca:.1%} on average under common corruptions (relative drop "
                f"{drop:.0%}); worst: " + ", ".join(f"{n.replace('_', ' ')} {per_type[n]:.1%}" for n in weakest) + ".",
                {"clean_accuracy": clean_acc, "mean_corruption_accuracy": mca, "relative_drop": drop,
                 "worst": {n: per_type[n] for n in weakest}}))
        silent = [e for e in estimates if abs(e["estimate"] - e["truth"]) > 0.3 and not e["warned"]]
        if silent:
            findings.append(Finding(
                "corruptions.estimate-unreliable", "low",
                f"Without labels, accuracy would be misjudged by more than 30 points without a warning on {len(silent)} "
                "corrupted set(s): " + ", ".join(f"{e['corruption']} {e['severity']} (estimate {e['estimate']:.0%}, "
                                                 f"truth {e['truth']:.0%})" for e in silent[:3]) + ".",
                {"sets": silent[:10]}))
        arrays = {}
        low, high = ctx.model.bounds
        span = high - low
        if x.ndim == 4:
            shown = x[:1]
            arrays["example_clean"] = shown.numpy()
            arrays["example_corrupted"] = np.stack([
                (corrupt((shown - low) / span, n, 3 if 3 in o.severities else o.severities[-1], seed=ctx.seed) * span
                 + low)[0].numpy() for n in names])
        return CheckResult(self.id, status_from_findings(findings), metrics, findings, details, arrays)

    @staticmethod
    def render(r: CheckResult, audit) -> str:
        """This check's section of report.html."""
        d, a, m = r.details, r.arrays, r.metrics
        per_type = d.get("per_type") or {}
        if not per_type:
            return ""
        names = list(per_type)
        out = [f'<p class="meta">{d.get("points")} audit points, severities {d.get("severities")}. Clean accuracy '
               f'{m.get("clean_accuracy", 0):.1%}, mean corruption accuracy {m.get("mean_corruption_accuracy", 0):.1%} '
               f'(relative drop {m.get("relative_drop", 0):.0%})'
               + (f', mCE {m["mce"]:.2f} relative to {escape(str(d.get("reference_model")))}' if "mce" in m else "")
               + ".</p>",
               "<h4>Accuracy per corruption (mean over severities)</h4>",
               bar_chart([_short(n) for n in names], {"accuracy": [per_type[n] for n in names]},
                         width=max(560, 44 * len(names)), title="accuracy per corruption")]
        sev = d.get("severities") or []
        if len(sev) > 1:
            worst = sorted(names, key=per_type.get)[:4]
            out += ["<h4>Accuracy vs severity (the four worst corruptions and the mean)</h4>",
                    line_chart(sev, {**{_short(n): d["accuracy"][n] for n in worst},
                                     "mean": np.mean([d["accuracy"][n] for n in names], 0).tolist()},
                               xlabel="severity", title="accuracy vs severity")]
        est = sorted(d.get("estimates") or [], key=lambda e: e["truth"])
        if est:
            warned = sum(e["warned"] for e in est)
            out += [f"<h4>Accuracy estimated without labels vs the truth, per corrupted set (sorted by true accuracy)</h4>"
                    f'<p class="meta">Estimators fitted on {d["estimator_split"][0]} clean points, judged on the corrupted '
                    f'other {d["estimator_split"][1]}; {d.get("estimator_models", 1)} model(s). Mean absolute error '
                    f'{m.get("estimate_mae", 0) * 100:.1f} points, largest {m.get("estimate_max_error", 0) * 100:.1f}; '
                    f"{warned} of {len(est)} estimates came with a warning.</p>",
                    line_chart(list(range(1, len(est) + 1)), {"true accuracy": [e["truth"] for e in est],
                                                              "estimate": [e["estimate"] for e in est]},
                               xlabel="corrupted set", title="estimate vs truth")]
        if "example_corrupted" in a:
            out += gallery("One audit input under each corruption", [a["example_clean"][0], *a["example_corrupted"]],
                            ["clean", *[n.replace("_", " ") for n in names]], audit)
        return "".join(out)


_SHORT = {"gaussian_noise": "gauss", "gaussian_blur": "g-blur", "elastic_transform": "elastic",
          "jpeg_compression": "jpeg", "brightness": "bright", "feature_noise": "noise", "missing_values": "missing",
          "feature_scaling": "scaling"}


def _short(name: str) -> str:
    """A corruption's name short enough for a chart's axis."""
    return _SHORT.get(name, name.split("_")[0][:8])


def corrupted_predictions(model, x: torch.Tensor, y: np.ndarray, others: list, judge_part: np.ndarray, fit, n_est: int,
                          tabular, name: str, severities: list[int], seed: int,
                          source_instability: float) -> dict[str, np.ndarray]:
    """One shard: every model's predictions on `x` under one corruption at each severity, and the label-free
    estimate of the audited model's accuracy on the judged half beside its truth (a shard task)."""
    models = [model, *others]
    low, high = model.bounds
    span = high - low
    preds = np.zeros((len(models), len(severities), len(x)), np.int64)
    est = np.zeros((len(severities), 3))  # estimate, truth, warned
    for si, sev in enumerate(severities):
        if tabular is None:
            xc = corrupt((x - low) / span, name, sev, seed=seed) * span + low
        else:
            xc = corrupt_tabular(x, name, sev, seed=seed, mean=tabular[0], std=tabular[1]).clamp(low, high)
        logits = [m.logits(xc, fast=True).numpy() for m in models]
        preds[:, si] = np.stack([z.argmax(1) for z in logits])
        judged = xc[torch.as_tensor(judge_part[:INSTABILITY_POINTS])]
        instability = prediction_instability(model, judged, seed=seed, scale=None if tabular is None else tabular[1],
                                             draws=INSTABILITY_DRAWS)
        e = estimate_accuracy(fit, [z[judge_part] for z in logits[:n_est]],
                              instability=(source_instability, instability))
        est[si] = (e.estimate, float((preds[0, si, judge_part] == y[judge_part]).mean()), bool(e.warnings))
    return {"predictions": preds, "estimates": est}
