"""Backdoor / poisoning: does the training set carry a planted trigger, for which class, in which examples?

Four kinds of evidence, each cheap, combined (no single method is trusted):

1. Trigger persistence (model behaviour, after STRIP, Gao et al. 2019). A poisoned example is classified
   by its trigger, so it keeps its label when overlaid with held-out inputs of other classes; a clean
   example's label is carried by its content, which the overlay scrambles. Each training example's
   persistence is compared with the same score on the held-out (audit) examples of its class, which
   the model never fitted.
2. Content disagreement (data). A k-nearest-neighbour classifier on raw inputs, fitted on the held-out
   data only (so poisons cannot vouch for each other), says what the example looks like. A poison looks
   like its source class, not its label.
3. A shared residual (data). What an example has that its nearest held-out look-alikes lack (its residual)
   is, for a poison, mostly the trigger, the same in every poison whatever its content. So a poison's
   nearest residuals, among all training examples, belong to other examples with its label that look like
   yet another class. A natural misfit's residual (a 4 written like a 9) is shared, if at all, by examples
   that look like the same class. This finds triggers the model memorised example by example, which
   persistence misses.
4. Confirmation (model behaviour). The trigger is reconstructed as the mean difference between the
   flagged examples and held-out inputs of other classes, stamped on held-out inputs of other classes,
   and must flip them to the target class more often than the same construction from unflagged examples
   of the classes the flagged ones look like (their content without the trigger), by a margin and
   significantly (McNemar over the same inputs).

Examples that disagree and persist, and examples that disagree and share a residual, are counted per
class; the decision is made across classes with a robust statistic (median and MAD of each count), not by
flagging a fixed share of every class. In a class that is an outlier on either count, those examples give
the trigger's direction (their mean residual), and every disagreeing example of the class whose residual
aligns with it far beyond the other classes' misfits is flagged. The finding is `high` when the
confirmation holds and `medium` (the data carries a pattern the model has not learned) otherwise.
"""

from __future__ import annotations

from html import escape

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from ..render import bar_chart, class_label, count_axis, figure_row, gallery, image, perturbation_image
from ..result import CheckResult, Finding
from ..seeds import derive_seed
from ..seeds import rng as seeded_rng
from .base import AuditContext, Check, CheckOptions, FindingDoc, Needs, make_details, robust_z, status_from_findings

MIN_REFERENCE_PER_CLASS = 10  # held-out examples a class needs for its own persistence null
RESIDUAL_DIMS = 1024  # residuals of larger inputs are projected to this many dimensions


class BackdoorOptions(CheckOptions):
    overlays: int = Field(16, ge=2, le=256, description="held-out inputs overlaid on each example")
    overlay: Literal["max", "mean"] = Field("max", description="how two inputs are overlaid: pixel-wise max or mean")
    null_quantile: float = Field(0.99, gt=0.5, lt=1, description="persistence above this quantile of held-out "
                                 "examples of the class counts as persistent, for the class decision")
    content_neighbours: int = Field(5, ge=1, description="k of the content classifier on held-out inputs")
    residual_neighbours: int = Field(10, ge=2, description="nearest residuals (among all training examples) "
                                     "looked at for each disagreeing example")
    shared_share: float = Field(0.5, gt=0, le=1, description="share of those that must have the example's label, "
                                "disagree, and look like another class than it, for its residual to count as shared")
    min_poisons: int = Field(8, ge=1, description="fewest persistent (or sharing), disagreeing examples that make a "
                             "class suspect")
    outlier_z: float = Field(5.0, gt=0, description="robust z of a class's count against the other classes")
    alignment_z: float = Field(4.5, gt=0, description="once a class is suspect, its disagreeing examples whose "
                               "residual aligns with the trigger's this many robust z above the other classes' "
                               "disagreeing examples are flagged")
    confirm_gain: float = Field(0.1, ge=0, le=1, description="how much more often the reconstructed trigger must "
                                "flip held-out inputs than the control construction")
    confirm_z: float = Field(3.1, gt=0, description="... and how significantly: McNemar's z over the same inputs "
                             "(3.1: one-sided p < 0.001)")
    examples_shown: int = Field(16, ge=0, le=64, description="most suspicious training examples pictured")


class Backdoor(Check):
    id = "backdoor"
    title = "Backdoors and poisoned training examples"
    needs = Needs(labels=True, train_data=True, train_labels=True)
    Options = BackdoorOptions
    order = 35
    metrics = {"backdoor_detected": "1 when a planted trigger was found and confirmed",
               "flagged": "training examples flagged as poisoned", "flagged_share": "their share of the training set",
               "target_class": "the strongest suspect class (-1: none)",
               "trigger_success_rate": "how often its reconstructed trigger flips held-out inputs of other classes"}
    Details = make_details("BackdoorDetails", {
        "class_names": (list[str], "class names, by index"),
        "suspicious_per_class": (list[int], "disagreeing, persistent training examples per label"),
        "count_z": (list[float], "robust z of those counts across classes"),
        "shared_per_class": (list[int], "disagreeing examples per label that share a residual"),
        "shared_count_z": (list[float], "robust z of those counts"),
        "targets": (list[dict], "per suspect class: target, flagged, count z's, success and control rates, gain, z"),
        "overlays": (int, "overlays per example"), "overlay": (str, "max or mean"),
        "reference": (str, "what the held-out reference is")})
    arrays = {"train_index": "training-file position of each training example", "score": "suspicion per example",
              "persistence": "own-label probability under overlays", "shared_residual": "residual-sharing share",
              "trigger_alignment": "cosine of the residual with a suspect class's trigger",
              "flagged": "flagged as poisoned", "example_index": "positions of the examples shown",
              "example_image": "the most suspicious examples", "example_label": "their labels",
              "example_looks_like": "the class each looks like", "trigger": "the reconstructed trigger (optional)"}
    quick_options = {"overlays": 4}
    findings = {
        "backdoor.found": FindingDoc(
            "high",
            "A class carries a planted trigger: an outlying number of training examples with that label look like "
            "other classes and either keep their label under overlays with held-out inputs (the model classifies "
            "them by something other than their content) or share one residual across different contents (what "
            "their look-alikes lack: the trigger); and the trigger reconstructed from the flagged examples, "
            "stamped on held-out inputs of other classes, flips them to the class significantly more often than "
            "the control. Evidence: the class, the flagged count, the stamped trigger's success rate and its "
            "control, the robust z of both counts. The flagged examples are `flagged` in `arrays/backdoor.npz` "
            "(by training-file position in `train_index`; `score`, `persistence`, `shared_residual` and "
            "`trigger_alignment` per example beside it). Remove them and retrain; see [data-audit.md](data- "
            "audit.md)."),
        "backdoor.suspected": FindingDoc(
            "medium",
            "As above, but the reconstructed trigger did not confirm it. Either the data carries a planted "
            "pattern this model has not (yet) learned as a trigger (few poisons, or a model that memorised them "
            "one by one: remove them anyway), or the flagged examples are a group of systematically mislabelled "
            "examples that happen to share something. Inspect them."),
    }

    def unmet(self, ctx: AuditContext) -> str | None:
        if len(ctx.data) < 50:
            return f"needs at least 50 held-out (audit) examples as the clean reference; got {len(ctx.data)}"
        return None

    def run(self, ctx: AuditContext) -> CheckResult:
        o = self.options
        model, train, ref = ctx.model, ctx.train_data, ctx.data
        x_tr, y_tr = train.x, train.y.numpy()
        x_ref, y_ref = ref.x, ref.y.numpy()
        classes = int(max(y_tr.max(), y_ref.max()) + 1)
        g = seeded_rng(ctx.seed, self.id, "confirm")
        ctx.progress.message(f"backdoor: overlay persistence of {len(y_tr)} training examples ({o.overlays} overlays each)")
        tasks = [(f"{r:03d}", (o.overlay, derive_seed(ctx.seed, self.id, "overlay", r))) for r in range(o.overlays)]
        rounds = ctx.map_shards("overlay", overlay_persistence, tasks, shared=(x_tr, y_tr, x_ref, y_ref),
                                label="backdoor overlays")
        s_tr = np.mean([r["train"] for r in rounds], 0)
        s_ref = np.mean([r["reference"] for r in rounds], 0)
        ctx.progress.message("backdoor: content and residuals against the held-out inputs")
        content, unit_residual = _content_and_residual(x_ref, y_ref, x_tr, classes, o.content_neighbours)
        label_support = content[np.arange(len(y_tr)), y_tr]  # how much the example looks like its label
        looks_like = content.argmax(1)
        disagree = label_support < 0.5
        shared = _shared_residual(unit_residual, y_tr, looks_like, disagree, o.residual_neighbours)

        thresholds = np.array([self._threshold(s_ref, y_ref, c, o.null_quantile) for c in range(classes)])
        persistent = disagree & (s_tr > thresholds[y_tr])
        sharing = disagree & (shared >= o.shared_share)
        counts = np.bincount(y_tr[persistent], minlength=classes)
        shared_counts = np.bincount(y_tr[sharing], minlength=classes)
        z, shared_z = robust_z(counts, pad=1.0), robust_z(shared_counts, pad=1.0)  # counts: small integers
        outlier = ((counts >= o.min_poisons) & (z >= o.outlier_z)) | \
                  ((shared_counts >= o.min_poisons) & (shared_z >= o.outlier_z))
        candidates = [int(c) for c in np.argsort(-np.maximum(counts, shared_counts), kind="stable") if outlier[c]]

        flagged = np.zeros(len(y_tr), dtype=bool)
        alignment = np.zeros(len(y_tr))
        findings, per_target, triggers = [], [], []
        names = train.class_names or ref.class_names or [str(i) for i in range(classes)]
        for t in candidates:
            # The core (persistent or sharing) gives the trigger's residual; every disagreeing example of the
            # class is then judged by how well its residual aligns with it, against the other classes' misfits.
            core = (y_tr == t) & (persistent | sharing)
            aligned = _alignment(unit_residual, core)
            against_misfits = robust_z(aligned, aligned[disagree & (y_tr != t)])
            members = (y_tr == t) & disagree & (against_misfits >= o.alignment_z)
            alignment[y_tr == t] = aligned[y_tr == t]
            confirm = self._confirm(model, x_tr, y_tr, x_ref, y_ref, t, members, looks_like, g)
            triggers.append(confirm.pop("trigger"))
            flagged |= members
            per_target.append({"target": t, "flagged": int(members.sum()), "count_z": float(z[t]),
                               "shared_count_z": float(shared_z[t]), **confirm})
            confirmed = confirm["gain"] >= o.confirm_gain and confirm["z"] >= o.confirm_z
            source = np.bincount(looks_like[members], minlength=classes)
            sources = (f"mostly {names[int(source.argmax())]}" if source.max() >= 0.5 * max(members.sum(), 1)
                       else f"{int((source > 0).sum())} different ones")
            findings.append(Finding(
                "backdoor.found" if confirmed else "backdoor.suspected", "high" if confirmed else "medium",
                f"Class {names[t]} {'carries' if confirmed else 'may carry'} a planted trigger: {int(members.sum())} "
                f"training examples labelled {names[t]} look like other classes ({sources}); "
                f"{int((members & persistent).sum())} of them keep the label when overlaid with other inputs, "
                f"{int((members & sharing).sum())} share what their look-alikes lack, and all carry the same residual "
                f"(the trigger). Stamping the trigger reconstructed from them flips "
                f"{confirm['success_rate']:.0%} of held-out inputs of other classes to {names[t]} "
                f"(control: {confirm['control_rate']:.0%})"
                + ("." if confirmed else ": the data carries the pattern, this model has not learned it as a trigger."),
                {"target_class": names[t], "flagged": int(members.sum()), "success_rate": confirm["success_rate"],
                 "control_rate": confirm["control_rate"], "count_z": float(z[t]),
                 "shared_count_z": float(shared_z[t])}))
        first = per_target[0] if per_target else None
        # persistent, sharing or aligned with a suspect class's trigger, and looking like another class
        score = np.maximum(np.maximum(s_tr, shared), alignment.clip(0, 1)) * (1.0 - label_support)
        order = np.flatnonzero(flagged)[np.argsort(-alignment[flagged], kind="stable")][: o.examples_shown]
        details = {"class_names": names, "suspicious_per_class": counts.tolist(), "count_z": z.round(3).tolist(),
                   "shared_per_class": shared_counts.tolist(), "shared_count_z": shared_z.round(3).tolist(),
                   "targets": per_target, "overlays": o.overlays, "overlay": o.overlay,
                   "reference": "the audit data (assumed clean)"}
        arrays = {"train_index": train.positions(np.arange(len(y_tr))), "score": score.astype(np.float32),
                  "persistence": s_tr.astype(np.float32), "shared_residual": shared.astype(np.float32),
                  "trigger_alignment": alignment.astype(np.float32), "flagged": flagged,
                  "example_index": train.positions(order), "example_image": x_tr[torch.as_tensor(order)].numpy(),
                  "example_label": y_tr[order], "example_looks_like": looks_like[order]}
        if triggers:
            arrays["trigger"] = triggers[0].astype(np.float32)  # the strongest candidate's
        metrics = {"backdoor_detected": int(any(f.id == "backdoor.found" for f in findings)),
                   "flagged": int(flagged.sum()), "flagged_share": float(flagged.mean()),
                   "target_class": int(first["target"]) if first else -1,
                   "trigger_success_rate": float(first["success_rate"]) if first else 0.0}
        return CheckResult(self.id, status_from_findings(findings), metrics, findings, details, arrays)

    # ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _threshold(s_ref: np.ndarray, y_ref: np.ndarray, c: int, q: float) -> float:
        own = s_ref[y_ref == c]
        return float(np.quantile(own if len(own) >= MIN_REFERENCE_PER_CLASS else s_ref, q))

    def _confirm(self, model, x_tr, y_tr, x_ref, y_ref, t: int, members: np.ndarray, looks_like: np.ndarray,
                 g: np.random.Generator) -> dict:
        """Stamp the trigger reconstructed from the flagged examples on held-out inputs of other classes.

        The control is the same construction from unflagged training examples of the classes the flagged
        ones look like (their content without the trigger): only a shared trigger makes the first flip more.
        """
        pool = x_ref[torch.as_tensor(y_ref != t)]
        idx = np.flatnonzero(members)
        if len(pool) == 0 or len(idx) == 0:
            return {"success_rate": 0.0, "control_rate": 0.0, "gain": 0.0, "z": 0.0,
                    "trigger": np.zeros(tuple(x_tr.shape[1:]))}
        base = pool.mean(0)
        lo, hi = model.bounds
        trigger = x_tr[torch.as_tensor(idx)].mean(0) - base
        control_idx = []
        for i in idx:
            same_content = np.flatnonzero((y_tr == looks_like[i]) & ~members)
            if len(same_content):
                control_idx.append(int(g.choice(same_content)))
        control = x_tr[torch.as_tensor(control_idx)].mean(0) - base if control_idx else torch.zeros_like(trigger)

        def flips(delta: torch.Tensor) -> np.ndarray:
            return (model.logits((pool + delta).clamp(lo, hi), batch_size=512).argmax(1) == t).numpy()

        stamped, controlled = flips(trigger), flips(control)
        only_stamped, only_control = int((stamped & ~controlled).sum()), int((controlled & ~stamped).sum())
        z = (only_stamped - only_control) / max(only_stamped + only_control, 1) ** 0.5  # McNemar, paired inputs
        rate, control_rate = float(stamped.mean()), float(controlled.mean())
        return {"success_rate": rate, "control_rate": control_rate, "gain": rate - control_rate, "z": float(z),
                "trigger": trigger.numpy()}

    @staticmethod
    def render(r: CheckResult, audit) -> str:
        """This check's section of report.html."""
        d, a = r.details, r.arrays
        names = d.get("class_names") or []
        label = class_label(names)
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
                    bar_chart(names, series, ymax=count_axis([c for v in series.values() for c in v]),
                              title="suspicious examples per class")]
        for t in d.get("targets", []):
            out.append(f"<p>Target <b>{escape(label(t['target']))}</b>: {t['flagged']} flagged; the reconstructed trigger "
                       f"flips {t['success_rate']:.0%} of held-out inputs (control {t['control_rate']:.0%}"
                       + (f", McNemar z {t['z']:.1f}" if "z" in t else "") + ").</p>")
        if "trigger" in a:
            img = perturbation_image(a["trigger"])
            if img is not None:
                out += figure_row("Reconstructed trigger (mean flagged example minus mean held-out input; amplified)",
                                   [image(img, "reconstructed trigger", scale=4)])
        if "example_image" in a:
            out += gallery("Most suspicious training examples", a["example_image"],
                            [f"train #{int(i)}: labelled {label(int(lab))}, looks like {label(int(like))}" for i, lab, like
                             in zip(a["example_index"], a["example_label"], a["example_looks_like"])], audit)
        return "".join(out)


def overlay_persistence(model, x_tr: torch.Tensor, y_tr: np.ndarray, x_ref: torch.Tensor, y_ref: np.ndarray,
                        overlay: str, seed: int) -> dict[str, np.ndarray]:
    """One overlay round (a shard task): the probability of each training and each held-out example's own label
    when overlaid with a random held-out input of another class."""
    g = np.random.default_rng(seed)
    out = {}
    for key, x, y in (("train", x_tr, y_tr), ("reference", x_ref, y_ref)):
        other = x_ref[torch.as_tensor(_other_class_partners(y, y_ref, g))]
        mixed = torch.maximum(x, other) if overlay == "max" else 0.5 * (x + other)
        probs = torch.softmax(model.logits(mixed, batch_size=512, fast=True), 1).numpy()
        out[key] = probs[np.arange(len(x)), y]
    return out


def _other_class_partners(y: np.ndarray, pool_y: np.ndarray, g: np.random.Generator) -> np.ndarray:
    """For each label in y, the index of a random pool example of another class."""
    partner = g.integers(0, len(pool_y), len(y))
    for _ in range(100):
        same = pool_y[partner] == y
        if not same.any():
            break
        partner[same] = g.integers(0, len(pool_y), int(same.sum()))
    return partner


def _content_and_residual(x_ref: torch.Tensor, y_ref: np.ndarray, x: torch.Tensor, classes: int, k: int
                          ) -> tuple[np.ndarray, torch.Tensor]:
    """What each input looks like, by its k nearest held-out inputs (raw input space: a small or faint trigger
    barely moves it), and its residual as a unit vector: the input minus the mean of those neighbours, flattened
    (projected to RESIDUAL_DIMS by a fixed Gaussian matrix when inputs are larger; cosines survive that)."""
    ref = x_ref.reshape(len(x_ref), -1)
    votes = np.zeros((len(x), classes))
    k = min(k, len(ref))
    ref_sq = (ref * ref).sum(1)
    dims = ref.shape[1]
    project = None if dims <= RESIDUAL_DIMS else torch.randn(
        dims, RESIDUAL_DIMS, generator=torch.Generator().manual_seed(0)) / RESIDUAL_DIMS ** 0.5
    residual = torch.empty(len(x), min(dims, RESIDUAL_DIMS))
    for s in range(0, len(x), 1024):
        q = x[s:s + 1024].reshape(min(1024, len(x) - s), -1)
        d2 = (q * q).sum(1, keepdim=True) - 2 * q @ ref.T + ref_sq[None]
        nearest = d2.topk(k, dim=1, largest=False).indices
        r = q - ref[nearest].mean(1)
        residual[s:s + len(q)] = r if project is None else r @ project
        np.add.at(votes, (np.repeat(np.arange(s, s + len(q)), k), y_ref[nearest.numpy()].ravel()), 1.0)
    return votes / k, residual / residual.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _shared_residual(unit: torch.Tensor, y: np.ndarray, looks_like: np.ndarray, disagree: np.ndarray,
                     m: int) -> np.ndarray:
    """For each disagreeing example, the share of its m nearest residuals (cosine, among all training examples)
    that belong to examples with its label that also disagree and look like another class than it does.

    A trigger is shared across contents; a natural misfit's oddity is shared, if at all, within one content.
    The search runs over every training example, so clean examples absorb the natural look-alikes."""
    out = np.zeros(len(y))
    rows = np.flatnonzero(disagree)
    if len(rows) == 0 or len(y) < 2:
        return out
    m = min(m, len(y) - 1)
    for s in range(0, len(rows), 256):  # 256 rows x all training examples per similarity block
        idx = rows[s:s + 256]
        sim = unit[torch.as_tensor(idx)] @ unit.T
        sim[torch.arange(len(idx)), torch.as_tensor(idx)] = -float("inf")  # not its own neighbour
        nb = sim.topk(m, dim=1).indices.numpy()
        sibling = disagree[nb] & (y[nb] == y[idx, None]) & (looks_like[nb] != looks_like[idx, None])
        out[idx] = sibling.mean(1)
    return out


def _alignment(unit: torch.Tensor, core: np.ndarray) -> np.ndarray:
    """Cosine of each residual with the core's mean residual (the trigger); a core member is compared with the
    mean of the others, so it does not vouch for itself."""
    members = unit[torch.as_tensor(core)]
    total = members.sum(0)
    direction = total / total.norm().clamp_min(1e-12)
    out = (unit @ direction).numpy().astype(np.float64)
    others = total[None] - members
    out[core] = ((members * others).sum(1) / others.norm(dim=1).clamp_min(1e-12)).numpy()
    return out
