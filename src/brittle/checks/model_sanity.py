"""Is the model what an evaluation assumes? Logits out, a deterministic forward, eval mode.

Each problem here silently breaks later numbers: softmax outputs saturate and zero the gradients that
attacks follow (AutoAttack flags the same), a random forward makes every single-sample result a draw,
and training-mode BatchNorm/Dropout change predictions with the batch.
"""

from __future__ import annotations

from html import escape

import torch

from ..attacks.soundness import forwards_differ, rows_are_probabilities
from ..result import CheckResult, Finding
from .base import AuditContext, Check, FindingDoc, Needs, make_details, status_from_findings

PROBE_SAMPLES = 64


class ModelSanity(Check):
    id = "model"
    title = "Model sanity"
    needs = Needs(labels=False)
    order = 0
    metrics = {"deterministic": "two forwards on the same inputs agree",
               "outputs_probabilities": "the outputs are probabilities (rows in [0, 1] summing to 1), not logits"}
    Details = make_details("ModelDetails", {
        "probe_samples": (int, "inputs the probes ran on"), "num_classes": (int, "the model's outputs"),
        "input_shape": (list[int], "one input's shape"), "differentiable": (bool, "input gradients are available")})
    findings = {
        "model.outputs-probabilities": FindingDoc(
            "high",
            "The outputs are in [0, 1] and sum to 1: the model ends in a softmax. Saturated probabilities have "
            "vanishing gradients, so gradient attacks stall and robustness looks better than it is (AutoAttack's "
            "flags doc lists the same pitfall). Remove the softmax and return logits."),
        "model.outputs-log-probabilities": FindingDoc(
            "low",
            "The outputs are log-softmax. Predictions and margins are unchanged; losses that apply softmax again "
            "are distorted slightly."),
        "model.random-forward": FindingDoc(
            "high",
            "Two forward passes on the same inputs differ. Any single-run attack result is a draw; robust "
            "accuracy needs expectation over transformation (EOT). Evidence: the largest difference between two "
            "passes."),
        "model.training-mode": FindingDoc(
            "high",
            "The module was handed over in training mode and has BatchNorm or Dropout layers. brittle evaluates a "
            "private eval-mode copy; call `model.eval()` before export so that deployment sees the same model."),
    }

    def run(self, ctx: AuditContext) -> CheckResult:
        model = ctx.model
        x = ctx.data.x[:PROBE_SAMPLES]
        first = model.logits(x)
        second = model.logits(x)
        findings: list[Finding] = []
        random, max_diff = forwards_differ(first, second)
        deterministic = not random
        if random:
            findings.append(Finding(
                "model.random-forward", "high",
                "Two forward passes on the same inputs gave different outputs: the model is random at test time. "
                "Single-sample attack results are draws; robust accuracy needs expectation over the randomness (EOT).",
                {"max_abs_difference": max_diff, "samples": len(x)}))
        row_sums = first.sum(1)
        probs = rows_are_probabilities(first)
        log_probs = bool((first <= 1e-6).all()) and bool(((torch.logsumexp(first, 1)).abs() < 1e-3).all())
        if probs:
            findings.append(Finding(
                "model.outputs-probabilities", "high",
                "The model's outputs are in [0, 1] and sum to 1: it returns probabilities, not logits. Saturated "
                "softmax outputs hide gradients from attacks and make robustness look better than it is. "
                "Remove the final softmax.",
                {"mean_row_sum": float(row_sums.mean())}))
        elif log_probs:
            findings.append(Finding(
                "model.outputs-log-probabilities", "low",
                "The outputs are log-probabilities (log-softmax). Margins and predictions are unchanged, but "
                "cross-entropy-based losses apply softmax twice.",
                {"max_abs_logsumexp": float(torch.logsumexp(first, 1).abs().max())}))
        if model.given_in_training_mode:
            findings.append(Finding(
                "model.training-mode", "high",
                "The model was handed over in training mode with BatchNorm/Dropout layers. brittle evaluates a "
                "private copy in eval mode (the given model is not modified); call model.eval() before export "
                "so deployment sees the same model.",
                {}))
        metrics = {"deterministic": deterministic, "outputs_probabilities": probs}
        return CheckResult(self.id, status_from_findings(findings), metrics, findings,
                           details={"probe_samples": len(x), "num_classes": model.num_classes,
                                    "input_shape": list(model.input_shape or ()),
                                    "differentiable": model.differentiable})

    @staticmethod
    def render(r: CheckResult, audit) -> str:
        """This check's section of report.html."""
        d = r.details
        shown = {k: ("yes" if v else "no") if isinstance(v, bool) else v for k, v in d.items()}
        rows = "".join(f"<tr><th>{escape(k.replace('_', ' '))}</th><td>{escape(str(v))}</td></tr>"
                       for k, v in shown.items())
        return f'<table class="kv">{rows}</table>' if rows else ""
