"""Calibration: does the model's confidence mean what it says?

ECE (equal-width, equal-mass, classwise), NLL and Brier score on the audit data, a reliability diagram,
and what temperature scaling would give. The temperature is fitted and evaluated by 2-fold cross-fitting
on the audit data (each half scored with the temperature fitted on the other), so the "after" numbers are
not fitted to the data they are measured on. `brittle calibrate` fits it on all of a labelled set and
writes a calibrated model.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from ..calibration import brier, classwise_ece, ece, fit_temperature, nll, reliability, softmax
from ..render import reliability_chart
from ..result import CheckResult, Finding
from .base import AuditContext, Check, CheckOptions, FindingDoc, Needs, make_details, status_from_findings


class CalibrationOptions(CheckOptions):
    bins: int = Field(15, ge=2, le=100, description="confidence bins of the ECE and the reliability diagram")
    max_ece: float = Field(0.05, gt=0, le=1, description="an ECE above this is a finding")


class Calibration(Check):
    id = "calibration"
    title = "Calibration"
    needs = Needs(labels=True)
    Options = CalibrationOptions
    order = 20
    metrics = {"ece": "expected calibration error, equal-width bins of top-class confidence",
               "ece_equal_mass": "the same with equal-mass bins", "classwise_ece": "ECE averaged over classes",
               "nll": "negative log-likelihood", "brier": "Brier score", "temperature": "temperature fitted on the data",
               "ece_after_scaling": "ECE after temperature scaling (2-fold cross-fitted)"}
    Details = make_details("CalibrationDetails", {
        "bins": (int, "bins of the reliability diagram"), "mean_confidence": (float, "mean top-class probability"),
        "accuracy": (float, "accuracy on the audit data"),
        "after_scaling": (dict[str, float], "ece, nll and brier after temperature scaling"),
        "reliability": (dict[str, list], "per non-empty bin: confidence, accuracy, count, lower, upper"),
        "reliability_after_scaling": (dict[str, list], "the same after temperature scaling")})
    arrays = {"confidence": "top-class probability per input", "confidence_scaled": "the same after scaling"}
    findings = {
        "calibration.overconfident": FindingDoc(
            "medium",
            "The expected calibration error (15 equal-width bins of top-class confidence) exceeds `max_ece` "
            "(0.05) and the mean confidence is above the accuracy. Evidence: ECE, mean confidence, accuracy, the "
            "fitted temperature and the ECE after scaling (2-fold cross-fitted). Fix: `brittle calibrate --model "
            "M --data VALIDATION.npz --out calibrated.ts` writes a TorchScript model whose logits are divided by "
            "the temperature: same predictions, calibrated probabilities."),
        "calibration.underconfident": FindingDoc(
            "medium",
            "As above, with the mean confidence below the accuracy (T < 1)."),
    }

    def run(self, ctx: AuditContext) -> CheckResult:
        o = self.options
        logits = ctx.model.logits(ctx.data.x).numpy().astype(np.float64)
        y = ctx.data.y.numpy()
        probs = softmax(logits)
        t_all = fit_temperature(logits, y)
        halves = np.random.default_rng(ctx.seed).permutation(len(y)) % 2 == 0
        scaled = np.zeros_like(probs)
        for part in (halves, ~halves):
            t = fit_temperature(logits[~part], y[~part]) if (~part).any() else 1.0
            scaled[part] = softmax(logits[part], t)
        before = {"ece": ece(probs, y, bins=o.bins), "ece_equal_mass": ece(probs, y, bins=o.bins, scheme="mass"),
                  "classwise_ece": classwise_ece(probs, y, bins=o.bins), "nll": nll(probs, y), "brier": brier(probs, y)}
        after = {"ece": ece(scaled, y, bins=o.bins), "nll": nll(scaled, y), "brier": brier(scaled, y)}
        conf, acc = float(probs.max(1).mean()), float((probs.argmax(1) == y).mean())
        findings = []
        if before["ece"] > o.max_ece:
            over = conf > acc
            findings.append(Finding(
                "calibration.overconfident" if over else "calibration.underconfident", "medium",
                f"Confidence does not match accuracy: ECE {before['ece']:.3f} (mean confidence {conf:.1%}, accuracy "
                f"{acc:.1%}). Temperature scaling (T = {t_all:.2f}, cross-fitted) brings ECE to {after['ece']:.3f}; "
                "`brittle calibrate` writes the scaled model.",
                {"ece": before["ece"], "mean_confidence": conf, "accuracy": acc, "temperature": t_all,
                 "ece_after_scaling": after["ece"]}))
        metrics = {**before, "temperature": t_all, "ece_after_scaling": after["ece"]}
        details = {"bins": o.bins, "mean_confidence": conf, "accuracy": acc, "after_scaling": after,
                   "reliability": reliability(probs, y, bins=o.bins),
                   "reliability_after_scaling": reliability(scaled, y, bins=o.bins)}
        arrays = {"confidence": probs.max(1).astype(np.float32), "confidence_scaled": scaled.max(1).astype(np.float32)}
        return CheckResult(self.id, status_from_findings(findings), metrics, findings, details, arrays)

    @staticmethod
    def render(r: CheckResult, audit) -> str:
        """This check's section of report.html."""
        d = r.details
        rel, after = d.get("reliability") or {}, d.get("reliability_after_scaling") or {}
        if not rel.get("confidence"):
            return ""
        out = [f'<p class="meta">Mean confidence {d.get("mean_confidence", 0):.1%}, accuracy {d.get("accuracy", 0):.1%}. '
               f"Temperature scaling (T = {r.metrics.get('temperature', 1):.2f}, 2-fold cross-fitted) gives ECE "
               f"{r.metrics.get('ece_after_scaling', 0):.3f} (from {r.metrics.get('ece', 0):.3f}).</p>",
               "<h4>Reliability diagram: accuracy per confidence bin (the number of inputs above each bar; pale bars "
               "hold too few inputs to mean much), the diagonal is perfect calibration</h4>",
               reliability_chart(rel, title="reliability diagram")]
        if after.get("confidence"):
            out += ["<h4>After temperature scaling</h4>",
                    reliability_chart(after, title="reliability after temperature scaling")]
        return "".join(out)
