"""Per-check HTML sections. A check without a renderer of its own gets the generic one."""

from __future__ import annotations

from html import escape
from typing import Callable

import numpy as np

from ..result import AuditResult, CheckResult
from .png import perturbation_image, png_data_uri, to_display_image
from .svg import bar_chart, heatmap, line_chart, reliability_chart

__all__ = ["SECTIONS", "section_renderer", "render_section_body"]

SECTIONS: dict[str, Callable[[CheckResult, AuditResult], str]] = {}


def section_renderer(check_id: str):
    def register(fn):
        SECTIONS[check_id] = fn
        return fn
    return register


def render_section_body(result: CheckResult, audit: AuditResult) -> str:
    fn = SECTIONS.get(result.id)
    return fn(result, audit) if fn else ""


MIN_SIDE = 56  # pixels on screen: an 8x8 digit drawn at 24 px cannot be read


def _img(arr: np.ndarray | None, caption: str, scale: int = 3) -> str:
    if arr is None:
        return ""
    h, w = arr.shape[:2]
    scale = max(scale, -(-MIN_SIDE // min(h, w)))
    if min(h, w) < 32:  # small inputs are enlarged in the PNG itself (nearest neighbour), not left to the browser
        arr = np.repeat(np.repeat(arr, scale, 0), scale, 1)
        h, w, scale = h * scale, w * scale, 1
    return (f'<figure><img src="{png_data_uri(arr)}" width="{w * scale}" height="{h * scale}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _gallery(heading: str, images, captions, audit: AuditResult) -> list[str]:
    """A heading and a row of input images with captions; nothing when the inputs are not images."""
    low, high = audit.run.get("bounds", [0.0, 1.0])
    figs = []
    for img, caption in zip(images, captions):
        shown = to_display_image(img, low, high)
        if shown is None:
            return []
        figs.append(_img(shown, caption))
    return _figure_row(heading, figs)


def _figure_row(heading: str, figs: list[str]) -> list[str]:
    """A heading over a row of rendered figures; nothing when there are none."""
    return [f"<h4>{escape(heading)}</h4>", '<div class="examples">' + "".join(figs) + "</div>"] if figs else []


def _class_label(names: list[str]):
    return lambda k: names[k] if 0 <= k < len(names) else str(k)


@section_renderer("accuracy")
def _accuracy(r: CheckResult, audit: AuditResult) -> str:
    d = r.details
    if not d:
        return ""
    names = d.get("class_names", [])
    out = ["<h4>Accuracy per class</h4>", bar_chart(names, {"accuracy": d.get("per_class_accuracy", [])},
                                                    title="accuracy per class")]
    if d.get("confusion_matrix") and len(names) <= 30:
        out += ["<h4>Confusion matrix (rows: true class, columns: predicted)</h4>",
                heatmap(d["confusion_matrix"], names, title="confusion matrix")]
    return "".join(out)


@section_renderer("adversarial")
def _adversarial(r: CheckResult, audit: AuditResult) -> str:
    d, a = r.details, r.arrays
    out = []
    reliable = d.get("reliable", True)
    out.append(f'<p><b>{"Reliable" if reliable else "UNRELIABLE"}</b>: '
               + ("every soundness check passed or was settled by escalation." if reliable else
                  "a soundness check fired and escalation did not settle it; treat robust accuracy as an upper bound "
                  "that may be far too high.") + "</p>")
    if d.get("plan"):
        out.append("<p class=\"meta\">Ensemble: " + escape("; ".join(d["plan"])) + "</p>")
    if d.get("soundness"):
        rows = "".join(
            f"<tr><td>{escape(p['id'])}</td><td>{escape(p['escalation'])}</td><td>"
            f"{'settled' if p['settled'] else 'NOT settled'}</td></tr>" for p in d["soundness"])
        out.append("<h4>Soundness checks that fired</h4><table><tr><th>check</th><th>escalation</th><th>outcome</th></tr>"
                   f"{rows}</table>")
    curve = d.get("curve") or {}
    if curve.get("eps"):
        out += [f"<h4>Robust accuracy as a function of eps ({escape(str(d.get('norm')))})</h4>",
                line_chart(curve["eps"], {"robust accuracy (upper bound)": curve["robust_accuracy"]},
                           xlabel="eps", title="robustness curve"),
                f'<p class="meta">From the smallest verified adversarial perturbation per point (minimum-norm attack '
                f"and ensemble). At the audit's eps: ensemble {curve.get('ensemble_at_eps', 0):.3f}"
                + (f", minimum-norm attack alone {curve['min_norm_only_at_eps']:.3f}"
                   if curve.get("min_norm_only_at_eps") is not None else "") + ".</p>"]
    if d.get("passes_by_stage"):
        rows = "".join(f"<tr><td>{escape(k)}</td><td>{v[0]:.1f}</td><td>{v[1]:.1f}</td></tr>"
                       for k, v in d["passes_by_stage"].items())
        out.append("<h4>Cost by attack (passes per evaluated point)</h4><table><tr><th>attack</th><th>forward</th>"
                   f"<th>backward</th></tr>{rows}</table>")
    if d.get("per_class_robust_accuracy"):
        acc = audit.check("accuracy").details.get("per_class_accuracy") if _has(audit, "accuracy") else None
        names = (audit.check("accuracy").details.get("class_names") if _has(audit, "accuracy") else None) or \
            [str(i) for i in range(len(d["per_class_robust_accuracy"]))]
        series = {"clean": acc} if acc else {}
        series["robust"] = d["per_class_robust_accuracy"]
        out += ["<h4>Robust accuracy per class</h4>", bar_chart(names, series, title="robust accuracy per class")]
    if "example_clean" in a and len(a["example_clean"]):
        low, high = audit.run.get("bounds", [0.0, 1.0])
        figs = []
        for i in range(len(a["example_clean"])):
            clean, adv = a["example_clean"][i], a["example_adversarial"][i]
            ci = to_display_image(clean, low, high)
            if ci is None:
                break
            dist = float(np.abs(adv - clean).max()) if d.get("norm") == "Linf" else float(np.linalg.norm(adv - clean))
            figs.append('<div class="triple">' + _img(ci, f"#{int(a['example_index'][i])} label {int(a['example_label'][i])}")
                        + _img(to_display_image(adv, low, high), f"adversarial: {int(a['example_adversarial_pred'][i])}")
                        + _img(perturbation_image(adv - clean), f"perturbation ({d.get('norm')} {dist:.3g})") + "</div>")
        out += _figure_row("Most fragile examples: clean, adversarial, perturbation (amplified)", figs)
    return "".join(out)


@section_renderer("backdoor")
def _backdoor(r: CheckResult, audit: AuditResult) -> str:
    d, a = r.details, r.arrays
    names = d.get("class_names") or []
    label = _class_label(names)
    out = [f'<p class="meta">Evidence per training example that looks like another class (to a nearest-neighbour '
           f"classifier fitted on held-out inputs): its label persists under {d.get('overlays')} overlays with held-out "
           "inputs of other classes (beyond what held-out examples of its class show), or its residual (what its "
           "look-alikes lack) is shared with examples of its label that look like yet other classes. Counts per class "
           "are compared across classes (median and MAD); in a suspect class, examples whose residual aligns with the "
           "trigger's are flagged, and the class is confirmed by stamping the reconstructed trigger on held-out "
           "inputs.</p>"]
    if d.get("suspicious_per_class"):
        series = {"persistent": d["suspicious_per_class"]}
        if d.get("shared_per_class"):
            series["shared residual"] = d["shared_per_class"]
        out += ["<h4>Training examples per label that look like another class and persist, or share a residual</h4>",
                bar_chart(names, series, ymax=_count_axis([c for v in series.values() for c in v]),
                          title="suspicious examples per class")]
    for t in d.get("targets", []):
        out.append(f"<p>Target <b>{escape(label(t['target']))}</b>: {t['flagged']} flagged; the reconstructed trigger "
                   f"flips {t['success_rate']:.0%} of held-out inputs (control {t['control_rate']:.0%}"
                   + (f", McNemar z {t['z']:.1f}" if "z" in t else "") + ").</p>")
    if "trigger" in a:
        img = perturbation_image(a["trigger"])
        if img is not None:
            out += _figure_row("Reconstructed trigger (mean flagged example minus mean held-out input; amplified)",
                               [_img(img, "reconstructed trigger", scale=4)])
    if "example_image" in a:
        out += _gallery("Most suspicious training examples", a["example_image"],
                        [f"train #{int(i)}: labelled {label(int(lab))}, looks like {label(int(like))}" for i, lab, like
                         in zip(a["example_index"], a["example_label"], a["example_looks_like"])], audit)
    return "".join(out)


@section_renderer("shortcuts")
def _shortcuts(r: CheckResult, audit: AuditResult) -> str:
    d, a = r.details, r.arrays
    names = d.get("class_names") or []
    out = [f'<p class="meta">Occlusion of {d.get("region_side")}x{d.get("region_side")} regions in training images, '
           "per class; candidates are regions far more important to one class than to the others. A candidate is a "
           "shortcut when occluding it costs the class training accuracy (significantly) and its training pictures "
           "differ from the class's held-out pictures (a mark that is not there at test); a stroke of the object is "
           "relied on too, but looks the same in both.</p>"]
    rows = "".join(
        f"<tr><td>{escape(names[c['class']] if c['class'] < len(names) else str(c['class']))}</td>"
        f"<td>row {c['region'][0]}, col {c['region'][1]}</td><td>{c['z']:.0f}</td>"
        f"<td>{c['accuracy']:.0%} &rarr; {c['accuracy_occluded']:.0%} (z {c['reliance_z']:.1f})</td>"
        f"<td>{c['shift']:.1f}</td><td>{max(c['flip_rate'], 0):.0%}</td>"
        f"<td>{'shortcut' if c['shortcut'] else ('relied on, same at test' if c['relied_on'] else 'not relied on')}"
        "</td></tr>" for c in d.get("candidates", []))
    if rows:
        out.append("<h4>Candidate regions</h4><table><tr><th>class</th><th>region</th><th>specificity z</th>"
                   "<th>training accuracy, occluded</th><th>train vs held-out (sd)</th><th>stamped: flips others</th>"
                   f"<th>verdict</th></tr>{rows}</table>")
    if "heatmap" in a:
        figs = []
        for c in sorted({c["class"] for c in d.get("candidates", [])}):
            img = to_display_image(a["heatmap"][c] / max(float(np.abs(a["heatmap"][c]).max()), 1e-9))
            if img is not None:
                figs.append(_img(img, f"class {names[c] if c < len(names) else c}: occlusion importance", scale=4))
        out += _figure_row("Occlusion heat maps (bright: occluding it costs the class most)", figs)
    return "".join(out)


@section_renderer("slices")
def _slices(r: CheckResult, audit: AuditResult) -> str:
    d, a = r.details, r.arrays
    names = d.get("class_names") or []
    label = _class_label(names)
    out = []
    rows = "".join(f"<tr><td>{escape(s['name'])}</td><td>{s['size']}</td><td>{s['accuracy']:.0%}</td>"
                   f"<td>{s['reference']:.0%}</td></tr>" for s in d.get("slices", []))
    if rows:
        out.append("<h4>Slices (accuracy against the class, or overall for clusters)</h4><table><tr><th>slice</th>"
                   f"<th>inputs</th><th>accuracy</th><th>reference</th></tr>{rows}</table>")
    for k, sl in enumerate(d.get("slices", [])[:4]):
        if f"slice{k}_image" in a:
            out += _gallery(sl["name"], a[f"slice{k}_image"],
                            [f"#{int(i)}: {label(int(t))} -> {label(int(p))}" for i, t, p in
                             zip(a[f"slice{k}_index"], a[f"slice{k}_label"], a[f"slice{k}_pred"])], audit)
    return "".join(out)


@section_renderer("calibration")
def _calibration(r: CheckResult, audit: AuditResult) -> str:
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


_SHORT = {"gaussian_noise": "gauss", "gaussian_blur": "g-blur", "elastic_transform": "elastic",
          "jpeg_compression": "jpeg", "brightness": "bright", "feature_noise": "noise", "missing_values": "missing",
          "feature_scaling": "scaling"}


def _short(name: str) -> str:
    return _SHORT.get(name, name.split("_")[0][:8])


@section_renderer("corruptions")
def _corruptions(r: CheckResult, audit: AuditResult) -> str:
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
        out += _gallery("One audit input under each corruption", [a["example_clean"][0], *a["example_corrupted"]],
                        ["clean", *[n.replace("_", " ") for n in names]], audit)
    return "".join(out)


@section_renderer("attribution")
def _attribution(r: CheckResult, audit: AuditResult) -> str:
    d, a = r.details, r.arrays
    names = d.get("class_names") or []
    label = _class_label(names)
    out = [f'<p class="meta">TRAK over {d.get("train_examples")} training examples, {d.get("models")} model(s), '
           f'{"exact gradients" if d.get("exact_gradients") else "gradients projected to " + str(d.get("dim"))}; '
           f'{d.get("error_targets", 0)} of the {r.metrics.get("targets", 0)} explained audit points are errors.</p>']
    tops = d.get("targets") or []
    if "target_image" in a:
        for t in range(len(a["target_image"])):
            info = tops[t]
            out += _gallery(f"Audit #{info['target']} (label {label(info['label'])}, predicted "
                            f"{label(info['prediction'])}): itself, its top proponents, its top opponents",
                            [a["target_image"][t], *a["proponent_image"][t], *a["opponent_image"][t]],
                            ["audit input"] + [f"for: train #{p}" for p in info["proponents"][:3]]
                            + [f"against: train #{p}" for p in info["opponents"][:3]], audit)
    if "self_image" in a:
        out += _gallery("Highest self-influence: training examples the model had to memorise", a["self_image"],
                        [f"train #{p}, labelled {label(int(lab))}" for p, lab in
                         zip(d.get("self_influence_top", []), a["self_label"])], audit)
    return "".join(out)


@section_renderer("certified")
def _certified(r: CheckResult, audit: AuditResult) -> str:
    d, m = r.details, r.metrics
    curve = d.get("curve") or {}
    if not curve.get("eps"):
        return ""
    by = d.get("certified_by") or {}
    out = [f'<p class="meta">{d.get("points")} points, {escape(str(d.get("norm")))} eps {d.get("eps"):g}: '
           f'certified {m.get("certified_accuracy", 0):.1%} (a lower bound on robust accuracy), empirical '
           f'{m.get("empirical_robust_accuracy", 0):.1%} (an upper bound), unknown {m.get("unknown_share", 0):.1%}. '
           "Cascade per point: " + ", ".join(f"{escape(k)} settled {v}" for k, v in by.items()) + ".</p>",
           "<h4>Certified vs empirical robust accuracy across eps</h4>",
           line_chart(curve["eps"], {"empirical (attacks)": curve["empirical"], "certified": curve["certified"]},
                      xlabel="eps", title="certified vs empirical robust accuracy")]
    sm = d.get("smoothing")
    if sm:
        out += [f"<h4>Randomized smoothing (sigma {sm['sigma']:g}, n {sm['n']}, alpha {sm['alpha']:g}): share of "
                f"points certified at each L2 radius</h4>",
                f'<p class="meta">{sm["points"]} points; {sm["abstain_share"]:.0%} abstain. The smoothed model is '
                "a different classifier from the audited one.</p>",
                line_chart(sm["radius_grid"], {"certified": sm["certified_at_radius"]}, xlabel="L2 radius",
                           title="smoothing certified radius curve")]
    return "".join(out)


@section_renderer("label_errors")
def _label_errors(r: CheckResult, audit: AuditResult) -> str:
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
                                                                     ymax=_count_axis(d["flagged_per_class"]),
                                                                     title="flagged labels per class")]
    if "example_image" in a:
        label = _class_label(names)
        out += _gallery("Most suspicious labels (self-confidence in brackets)", a["example_image"],
                        [f"train #{int(i)}: labelled {label(int(g))}, looks like {label(int(sug))} ({float(q):.2f})"
                         for i, g, sug, q in zip(a["example_index"], a["example_label"], a["example_suggested"],
                                                 a["example_quality"])], audit)
    return "".join(out)


@section_renderer("model")
def _model(r: CheckResult, audit: AuditResult) -> str:
    d = r.details
    rows = "".join(f"<tr><th>{escape(k.replace('_', ' '))}</th><td>{escape(str(v))}</td></tr>" for k, v in d.items())
    return f'<table class="kv">{rows}</table>' if rows else ""


def _count_axis(counts) -> float:
    """A y-axis top for counts: the largest, rounded up to an even number (so the mid tick is whole)."""
    top = max([int(c) for c in counts] + [1])
    return float(top + top % 2)


def _has(audit: AuditResult, cid: str) -> bool:
    return any(c.id == cid and c.status not in ("error", "skipped") for c in audit.checks)
