"""Shortcuts: small input regions that one class depends on in training but that held-out images of the class lack.

1. Occlusion per class over the training set: for each region on a grid, fill it with the held-out mean
   input and measure how much the probability of the example's own class drops, averaged per class.
2. Class specificity: a region's drop for class c minus its median drop over all classes (every class
   needs the middle of a digit; only a shortcut's class needs one corner). Candidates are robust outliers
   of that specificity over all (class, region) pairs, the strongest per class.
3. A candidate is a shortcut only when two tests agree, each calibrated against chance:
   - reliance: occluding the region in every training image of the class costs accuracy, significantly
     (McNemar's test on the paired predictions) and by at least `min_accuracy_drop`;
   - absent at test: the region looks different in the class's training images than in its held-out images
     (per pixel, a standardised mean difference that is significant given the sample sizes), beyond how much
     the same region differs for the other classes. A stroke of a digit is relied on too, but its training and
     held-out pictures agree up to sampling noise; a mark planted in training images does not.
   Stamping the region's content onto held-out inputs of other classes (how often they flip to the class) is
   reported as evidence of how much the region carries the class by itself.
4. Shortcuts of several classes in one band of rows (or columns) are one finding: the label is readable from
   that band (e.g. a mark whose position encodes the class), with the accuracy that depends on the band.
A shortcut present in the held-out (audit) data too cannot be told from the concept by data alone: audit with
held-out data from where the model will be used.
"""

from __future__ import annotations

from html import escape

import numpy as np
import torch
from pydantic import Field

from ..render import figure_row, image, to_display_image
from ..result import CheckResult, Finding
from ..seeds import rng as seeded_rng
from ..stats import mcnemar_z
from .base import AuditContext, Check, CheckOptions, FindingDoc, Needs, make_details, robust_z, status_from_findings

SIGNIFICANT_T = 5.0  # a pixel's train/held-out difference counts only beyond this many standard errors
BAND_CLASSES = 3  # shortcuts of this many classes in one band of rows or columns are one label-wide finding


class ShortcutOptions(CheckOptions):
    region: int | None = Field(None, ge=1, description="side of the occluded square (default: 1/7 of the image side)")
    per_class: int = Field(32, ge=4, description="training examples per class in the occlusion scan")
    outlier_z: float = Field(6.0, gt=0, description="robust z of a region's class specificity to become a candidate")
    min_accuracy_drop: float = Field(0.02, gt=0, le=1, description="occluding a shortcut must cost the class at least "
                                     "this much training accuracy ...")
    reliance_z: float = Field(3.1, gt=0, description="... with McNemar's z at least this (3.1: one-sided p < 0.001)")
    min_shift: float = Field(1.0, gt=0, description="the region's training pictures of the class must differ from "
                             "its held-out pictures by this many standard deviations more than the same region does "
                             "for the median class")
    max_candidates: int | None = Field(None, ge=1, description="candidate (class, region) pairs tested (default: "
                                       "the strongest of every class)")


class Shortcuts(Check):
    id = "shortcuts"
    title = "Shortcut features"
    needs = Needs(labels=True, train_data=True, train_labels=True)
    Options = ShortcutOptions
    order = 45
    metrics = {"shortcuts_found": "findings (a label-wide band counts once)",
               "worst_accuracy_drop": "the largest training accuracy that depends on a shortcut"}
    Details = make_details("ShortcutsDetails", {
        "class_names": (list[str], "class names, by index"), "region_side": (int, "side of the occluded squares"),
        "stride": (int, "grid step"), "regions": (list[list[int]], "every region's (row, column)"),
        "candidates": (list[dict], "tested (class, region) pairs: z, reliance, shift, flip rate, verdict"),
        "bands": (list[dict], "label-wide bands found: axis, start, stop, accuracies, readability")})
    arrays = {"occlusion_drop": "(classes, regions) mean own-class probability drop when occluded",
              "specificity_z": "(classes, regions) robust z of the class-specific drop",
              "train_heldout_shift": "(classes, regions) largest significant standardised train/held-out difference",
              "heatmap": "(classes, H, W) occlusion importance per pixel"}
    quick_options = {"per_class": 8}
    findings = {
        "shortcuts.found": FindingDoc(
            "high",
            "A class depends on a small input region that its held-out images lack: occluding the region in the "
            "class's training images costs accuracy (McNemar's test, at least `min_accuracy_drop`), and the "
            "region's training pictures differ from its held-out pictures, for this class more than for the "
            "others (`min_shift` standard deviations). A stroke of the object is relied on too, but looks the "
            "same in training and held-out images; a mark planted in the training images does not. When "
            "several classes have one in the same band of rows or columns (a mark whose position encodes the "
            "class), that is one finding: the label is readable from the band. Evidence: the region or band, "
            "the training accuracy with and without it (the accuracy that depends on it), the shift, and how "
            "often stamping the region flips held-out inputs of other classes. Remove the mark from the "
            "training data (or randomise it across classes) and retrain. A shortcut present in the audit data "
            "too cannot be told from the concept by data alone: audit with held-out data from where the model "
            "will be used."),
    }

    def unmet(self, ctx: AuditContext) -> str | None:
        if ctx.data.x.dim() != 4:
            return "needs image inputs (N, C, H, W); occlusion has no meaning for other layouts"
        return None

    def run(self, ctx: AuditContext) -> CheckResult:
        o = self.options
        train, ref = ctx.train_data, ctx.data
        x_tr, y_tr, x_ref, y_ref = train.x, train.y.numpy(), ref.x, ref.y.numpy()
        classes = int(max(y_tr.max(), y_ref.max()) + 1)
        h, w = x_tr.shape[-2:]
        side = o.region or max(2, min(h, w) // 7)
        stride = side  # a tiling: a marker across a border still loses part of itself in either region
        regions = [(i, j) for i in _starts(h, side, stride) for j in _starts(w, side, stride)]
        fill = x_ref.mean(0)
        g = seeded_rng(ctx.seed, self.id, "sample")
        sample = {c: g.permutation(np.flatnonzero(y_tr == c))[: o.per_class] for c in range(classes)}
        ctx.progress.message(f"shortcuts: occluding {len(regions)} regions of {side}x{side} in "
                             f"{sum(len(v) for v in sample.values())} training images")
        tasks = [(f"{c:04d}", (c, sample[c])) for c in range(classes)]
        rows = ctx.map_shards("occlusion", occlusion_drops, tasks, shared=(x_tr, fill, regions, side),
                              label="shortcuts occlusion")
        drop = np.stack([r["drop"] for r in rows])
        specificity = drop - np.median(drop, axis=0, keepdims=True)
        z = robust_z(specificity)
        shift = _train_heldout_shift(x_tr, y_tr, x_ref, y_ref, classes, regions, side)
        class_shift = shift - np.median(shift, axis=0, keepdims=True)

        names = train.class_names or ref.class_names or [str(i) for i in range(classes)]
        # Candidates: the most class-specific region of every class, and every class-specific region whose training
        # pictures differ from the held-out ones (a mark relied on a little by each class can be relied on a lot
        # as a band: the band test below has all training images to decide with).
        pairs = {int(c): int(np.argmax(z[c])) for c in range(classes) if z[c].max() >= o.outlier_z}
        chosen = sorted({(c, k) for c, k in pairs.items()}
                        | {(int(c), int(k)) for c, k in zip(*np.nonzero((z >= o.outlier_z) & (class_shift >= o.min_shift)))},
                        key=lambda ck: -z[ck])
        tested = [{"class": c, "region": [int(regions[k][0]), int(regions[k][1]), side], "z": float(z[c, k]),
                   "shift": float(class_shift[c, k])} for c, k in chosen[: o.max_candidates]]
        for t in tested:
            t["absent_at_test"] = bool(t["shift"] >= o.min_shift)
        candidate_bands = _bands([t for t in tested if t["absent_at_test"]], h, w, side)
        # Every counterfactual test (a candidate region, or a band of rows or columns) is a shard task: each runs
        # the model over a class's, or every, training image, and they are independent of one another.
        tasks = [(f"region-{t['class']:04d}-{t['region'][0]:04d}-{t['region'][1]:04d}",
                  ("region", t["class"], t["region"][:2])) for t in tested]
        tasks += [(f"band-{b['axis']}-{b['start']:04d}", ("band", b["axis"], b["start"])) for b in candidate_bands]
        outcomes = ctx.map_shards("counterfactual", counterfactual_test, tasks,
                                  shared=(x_tr, torch.as_tensor(y_tr), x_ref, torch.as_tensor(y_ref), fill, side),
                                  label="shortcuts counterfactuals")
        for t, out in zip(tested, outcomes[: len(tested)]):
            t.update({k: float(out[k]) for k in ("flip_rate", "accuracy", "accuracy_occluded", "reliance_z")})
            t["relied_on"] = bool(t["accuracy"] - t["accuracy_occluded"] >= o.min_accuracy_drop
                                  and t["reliance_z"] >= o.reliance_z)
            t["shortcut"] = t["relied_on"] and t["absent_at_test"]
        findings, bands = [], []
        for band, out in zip(candidate_bands, outcomes[len(tested):]):
            band.update({k: float(out[k]) for k in ("accuracy", "accuracy_occluded", "reliance_z", "readable_train",
                                                    "readable_heldout")})
            if band["accuracy"] - band["accuracy_occluded"] >= o.min_accuracy_drop and band["reliance_z"] >= o.reliance_z:
                bands.append(band)
                for t in band["members"]:
                    t["shortcut"] = True
                findings.append(_band_finding(band, names))
        in_band = {id(t) for band in bands for t in band["members"]}
        for t in tested:
            if not t["shortcut"] or id(t) in in_band:
                continue
            c = t["class"]
            findings.append(Finding(
                "shortcuts.found", "high",
                f"Class {names[c]} depends on a {side}x{side} region at row {t['region'][0]}, column {t['region'][1]} "
                f"that its held-out images lack: occluding it drops the class's training accuracy from "
                f"{t['accuracy']:.0%} to {t['accuracy_occluded']:.0%} (McNemar z {t['reliance_z']:.1f}), and the "
                f"region's training pictures differ from its held-out ones by {t['shift']:.1f} standard deviations "
                f"more than for the median class. Stamped on held-out inputs of other classes it turns "
                f"{max(t['flip_rate'], 0):.0%} of them into {names[c]}.",
                {"class": names[c], "region": t["region"], "accuracy": t["accuracy"],
                 "accuracy_occluded": t["accuracy_occluded"], "shift_sd": t["shift"], "flip_rate": t["flip_rate"]}))
        drops = [f.evidence["accuracy"] - f.evidence["accuracy_occluded"] for f in findings]
        metrics = {"shortcuts_found": len(findings), "worst_accuracy_drop": max(drops, default=0.0)}
        details = {"class_names": names, "region_side": side, "stride": stride, "candidates": tested,
                   "regions": [list(r) for r in regions],
                   "bands": [{k: v for k, v in b.items() if k != "members"} for b in bands]}
        arrays = {"occlusion_drop": drop.astype(np.float32), "specificity_z": z.astype(np.float32),
                  "train_heldout_shift": shift.astype(np.float32),
                  "heatmap": _heatmaps(drop, regions, side, (h, w)).astype(np.float32)}
        return CheckResult(self.id, status_from_findings(findings), metrics, findings, details, arrays)

    @staticmethod
    def render(r: CheckResult, audit) -> str:
        """This check's section of report.html."""
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
                    figs.append(image(img, f"class {names[c] if c < len(names) else c}: occlusion importance", scale=4))
            out += figure_row("Occlusion heat maps (bright: occluding it costs the class most)", figs)
        return "".join(out)


def _band_finding(band: dict, names: list[str]) -> Finding:
    classes = ", ".join(names[t["class"]] for t in band["members"])
    where = f"{band['axis']} {band['start']}-{band['stop'] - 1}"
    return Finding(
        "shortcuts.found", "high",
        f"The label is readable from {where} of the training images and the model relies on it: classes {classes} "
        f"each carry something there (at a class-dependent position) that their held-out images lack. From those "
        f"pixels alone the label is told right for {band['readable_train']:.0%} of training images and "
        f"{band['readable_heldout']:.0%} of held-out ones; occluding {where} drops the training accuracy from "
        f"{band['accuracy']:.0%} to {band['accuracy_occluded']:.0%} (McNemar z {band['reliance_z']:.1f}).",
        {"band": where, "classes": [names[t["class"]] for t in band["members"]], "accuracy": band["accuracy"],
         "accuracy_occluded": band["accuracy_occluded"], "readable_train": band["readable_train"],
         "readable_heldout": band["readable_heldout"], "regions": [t["region"] for t in band["members"]]})


def occlusion_drops(model, x_tr: torch.Tensor, fill: torch.Tensor, regions: list, side: int, c: int,
                    idx: np.ndarray) -> dict[str, np.ndarray]:
    """One class (a shard task): the mean drop of its training examples' own-class probability when each region
    is filled with the held-out mean."""
    drop = np.zeros(len(regions))
    if len(idx) == 0:
        return {"drop": drop}
    xc = x_tr[torch.as_tensor(idx)]
    base = torch.softmax(model.logits(xc, fast=True), 1)[:, c]
    for k, (i, j) in enumerate(regions):
        occluded = xc.clone()
        occluded[..., i:i + side, j:j + side] = fill[..., i:i + side, j:j + side]
        drop[k] = float((base - torch.softmax(model.logits(occluded, batch_size=1024, fast=True), 1)[:, c]).mean())
    return {"drop": drop}


def counterfactual_test(model, x_tr: torch.Tensor, y_tr: torch.Tensor, x_ref: torch.Tensor, y_ref: torch.Tensor,
                        fill: torch.Tensor, side: int, kind: str, *where) -> dict[str, np.ndarray]:
    """One counterfactual (a shard task). `("region", c, (i, j))`: the class's training accuracy with the region
    filled with the held-out mean, and how often stamping the class's mean region onto held-out inputs of other
    classes turns them into c. `("band", axis, start)`: the accuracy over all training images with a band of `side`
    rows (or columns) filled, and how well the band's pixels alone tell the label (nearest class mean) in training
    and in held-out images."""
    if kind == "region":
        c, (i, j) = where
        window = (..., slice(i, i + side), slice(j, j + side))
        own = x_tr[y_tr == c]
        others = x_ref[y_ref != c]
        stamped = others.clone()
        stamped[window] = own[window].mean(0)
        flip_rate = float((model.logits(stamped, batch_size=1024).argmax(1) == c).double().mean())
        base_rate = float((model.logits(others, batch_size=1024).argmax(1) == c).double().mean())
        occluded = own.clone()
        occluded[window] = fill[window]
        right = (model.logits(own, batch_size=1024).argmax(1) == c).numpy()
        right_occluded = (model.logits(occluded, batch_size=1024).argmax(1) == c).numpy()
        return {"flip_rate": np.array(flip_rate - base_rate), "accuracy": np.array(right.mean()),
                "accuracy_occluded": np.array(right_occluded.mean()),
                "reliance_z": np.array(mcnemar_z(right, right_occluded))}
    axis, start = where
    rows = slice(start, start + side) if axis == "rows" else slice(None)
    columns = slice(start, start + side) if axis == "columns" else slice(None)
    window = (slice(None), slice(None), rows, columns)
    occluded = x_tr.clone()
    occluded[window] = fill[window[1:]]
    right = (model.logits(x_tr, batch_size=1024).argmax(1) == y_tr).numpy()
    right_occ = (model.logits(occluded, batch_size=1024).argmax(1) == y_tr).numpy()
    pixels_tr, pixels_ref = x_tr[window].flatten(1), x_ref[window].flatten(1)
    labels = torch.unique(y_tr)
    means = torch.stack([pixels_tr[y_tr == c].mean(0) for c in labels])
    return {"accuracy": np.array(right.mean()), "accuracy_occluded": np.array(right_occ.mean()),
            "reliance_z": np.array(mcnemar_z(right, right_occ)),
            "readable_train": np.array(float((labels[torch.cdist(pixels_tr, means).argmin(1)] == y_tr).double().mean())),
            "readable_heldout": np.array(float((labels[torch.cdist(pixels_ref, means).argmin(1)] == y_ref).double().mean()))}


def _train_heldout_shift(x_tr, y_tr, x_ref, y_ref, classes: int, regions, side: int) -> np.ndarray:
    """(classes, regions): the largest standardised difference, over the region's pixels, between the class's
    training and held-out pictures, counting only pixels where the difference is significant for the sample sizes
    (Welch's t above SIGNIFICANT_T). Standard deviations have a floor of 1% of the value range, so that a pixel
    that is constant in both sets does not divide by zero."""
    span = float(max(x_tr.max(), x_ref.max()) - min(x_tr.min(), x_ref.min())) or 1.0
    floor = (0.01 * span) ** 2
    out = np.zeros((classes, len(regions)))
    for c in range(classes):
        a, b = x_tr[torch.as_tensor(y_tr == c)], x_ref[torch.as_tensor(y_ref == c)]
        if len(a) < 2 or len(b) < 2:
            continue
        diff = (a.mean(0) - b.mean(0)).abs()
        va, vb = a.var(0) + floor, b.var(0) + floor
        effect = diff / ((va + vb) / 2).sqrt()
        t = diff / (va / len(a) + vb / len(b)).sqrt()
        effect = torch.where(t >= SIGNIFICANT_T, effect, torch.zeros_like(effect)).amax(0)  # over channels
        for k, (i, j) in enumerate(regions):
            out[c, k] = float(effect[i:i + side, j:j + side].max())
    return out


def _bands(found: list[dict], h: int, w: int, side: int) -> list[dict]:
    """Groups of BAND_CLASSES or more shortcuts of different classes that share a band of rows (or columns)."""
    groups, used = [], set()
    for axis, index, size in (("rows", 0, h), ("columns", 1, w)):
        by_start: dict[int, list[dict]] = {}
        for t in found:
            by_start.setdefault(t["region"][index], []).append(t)
        for start, members in sorted(by_start.items()):
            members = [t for t in members if id(t) not in used]
            if len({t["class"] for t in members}) < BAND_CLASSES:
                continue
            used |= {id(t) for t in members}
            groups.append({"axis": axis, "start": start, "stop": min(start + side, size), "members": members})
    return groups


def _starts(length: int, side: int, stride: int) -> list[int]:
    starts = list(range(0, length - side + 1, stride))
    if starts[-1] != length - side:
        starts.append(length - side)  # cover the last rows/columns too
    return starts


def _heatmaps(drop: np.ndarray, regions, side: int, shape) -> np.ndarray:
    """(classes, H, W): each pixel gets the mean occlusion drop of the regions covering it."""
    total = np.zeros((drop.shape[0],) + tuple(shape))
    cover = np.zeros(tuple(shape))
    for k, (i, j) in enumerate(regions):
        total[:, i:i + side, j:j + side] += drop[:, k, None, None]
        cover[i:i + side, j:j + side] += 1
    return total / np.maximum(cover, 1)
