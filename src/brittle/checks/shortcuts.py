"""Shortcuts: small input regions the model relies on for one class that do not carry the concept.

1. Occlusion per class over the training set: for each region on a grid, fill it with the held-out mean
   input and measure how much the probability of the example's own class drops, averaged per class.
2. Class specificity: a region's drop for class c minus its median drop over all classes (every class
   needs the middle of a digit; only a shortcut's class needs one corner). Candidates are robust outliers
   of that specificity over all (class, region) pairs.
3. Counterfactual tests, which decide: stamping the region's content from class-c training images onto
   held-out inputs of other classes flips them to c (the region alone carries the class); occluding it in
   class-c training images costs accuracy. How differently the region looks in the training and held-out
   images of class c is reported too: a marker present in training and absent at test is the classic case.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from ..result import CheckResult, Finding
from .base import AuditContext, Check, CheckOptions, Needs, robust_z, status_from_findings


class ShortcutOptions(CheckOptions):
    region: int | None = Field(None, ge=1, description="side of the occluded square (default: 1/7 of the image side)")
    per_class: int = Field(32, ge=4, description="training examples per class in the occlusion scan")
    outlier_z: float = Field(6.0, gt=0, description="robust z of a region's class specificity to become a candidate")
    min_flip_rate: float = Field(0.1, gt=0, le=1, description="share of held-out inputs of other classes that the "
                                 "stamped region must flip to the class")
    max_candidates: int = Field(5, ge=1)


class Shortcuts(Check):
    id = "shortcuts"
    title = "Shortcut features"
    needs = Needs(labels=True, train_data=True, train_labels=True)
    metrics = ("shortcuts_found", "worst_accuracy_drop")
    Options = ShortcutOptions
    order = 45

    def unmet(self, ctx: AuditContext) -> str | None:
        if ctx.data.x.dim() != 4:
            return "needs image inputs (N, C, H, W); occlusion has no meaning for other layouts"
        return None

    def run(self, ctx: AuditContext) -> CheckResult:
        o = self.options
        model, train, ref = ctx.model, ctx.train_data, ctx.data
        x_tr, y_tr, x_ref, y_ref = train.x, train.y.numpy(), ref.x, ref.y.numpy()
        classes = int(max(y_tr.max(), y_ref.max()) + 1)
        h, w = x_tr.shape[-2:]
        side = o.region or max(2, min(h, w) // 7)
        stride = side  # a tiling: a marker across a border still loses part of itself in either region
        regions = [(i, j) for i in _starts(h, side, stride) for j in _starts(w, side, stride)]
        fill = x_ref.mean(0)
        g = np.random.default_rng(ctx.seed)
        sample = {c: g.permutation(np.flatnonzero(y_tr == c))[: o.per_class] for c in range(classes)}
        ctx.progress.message(f"shortcuts: occluding {len(regions)} regions of {side}x{side} in "
                             f"{sum(len(v) for v in sample.values())} training images")
        drop = np.zeros((classes, len(regions)))
        for c, idx in sample.items():
            if len(idx) == 0:
                continue
            xc = x_tr[torch.as_tensor(idx)]
            base = torch.softmax(model.logits(xc), 1)[:, c]
            for k, (i, j) in enumerate(regions):
                occluded = xc.clone()
                occluded[..., i:i + side, j:j + side] = fill[..., i:i + side, j:j + side]
                drop[c, k] = float((base - torch.softmax(model.logits(occluded, batch_size=1024), 1)[:, c]).mean())
        specificity = drop - np.median(drop, axis=0, keepdims=True)
        z = robust_z(specificity)
        order = np.dstack(np.unravel_index(np.argsort(-z, axis=None), z.shape))[0]

        names = train.class_names or ref.class_names or [str(i) for i in range(classes)]
        tested, found, findings = [], [], []
        for c, k in order[: o.max_candidates * 4]:
            if len(tested) >= o.max_candidates or z[c, k] < o.outlier_z:
                break
            if any(t["class"] == int(c) for t in tested):
                continue  # one region per class: neighbours of a shortcut are the same shortcut
            t = self._counterfactual(model, x_tr, y_tr, x_ref, y_ref, int(c), regions[k], side, fill)
            t.update({"class": int(c), "region": [int(regions[k][0]), int(regions[k][1]), side], "z": float(z[c, k])})
            tested.append(t)
            if t["flip_rate"] >= o.min_flip_rate:
                found.append(t)
                findings.append(Finding(
                    "shortcuts.found", "high",
                    f"Class {names[c]} depends on a {side}x{side} region at row {regions[k][0]}, column {regions[k][1]}: "
                    f"stamping it from class-{names[c]} training images onto held-out inputs of other classes turns "
                    f"{t['flip_rate']:.0%} of them into {names[c]}; occluding it drops the class's training accuracy "
                    f"from {t['accuracy']:.0%} to {t['accuracy_occluded']:.0%}."
                    + ("" if t["train_vs_heldout"] is None else
                       f" The region differs between training and held-out images of the class by "
                       f"{t['train_vs_heldout']:.2f} (mean absolute difference)."),
                    {"class": names[c], "region": t["region"], "flip_rate": t["flip_rate"],
                     "accuracy": t["accuracy"], "accuracy_occluded": t["accuracy_occluded"]}))
        metrics = {"shortcuts_found": len(found),
                   "worst_accuracy_drop": max((t["accuracy"] - t["accuracy_occluded"] for t in found), default=0.0)}
        details = {"class_names": names, "region_side": side, "stride": stride, "candidates": tested,
                   "regions": [list(r) for r in regions]}
        arrays = {"occlusion_drop": drop.astype(np.float32), "specificity_z": z.astype(np.float32),
                  "heatmap": _heatmaps(drop, regions, side, (h, w)).astype(np.float32)}
        return CheckResult(self.id, status_from_findings(findings), metrics, findings, details, arrays)

    @staticmethod
    def _counterfactual(model, x_tr, y_tr, x_ref, y_ref, c, region, side, fill) -> dict:
        i, j = region
        window = (..., slice(i, i + side), slice(j, j + side))
        own = x_tr[torch.as_tensor(y_tr == c)]
        others = x_ref[torch.as_tensor(y_ref != c)]
        stamped = others.clone()
        stamped[window] = own[window].mean(0)
        flip_rate = float((model.logits(stamped, batch_size=1024).argmax(1) == c).double().mean())
        base_rate = float((model.logits(others, batch_size=1024).argmax(1) == c).double().mean())
        occluded = own.clone()
        occluded[window] = fill[window]
        accuracy = float((model.logits(own, batch_size=1024).argmax(1) == c).double().mean())
        accuracy_occluded = float((model.logits(occluded, batch_size=1024).argmax(1) == c).double().mean())
        held = x_ref[torch.as_tensor(y_ref == c)]
        shift = float((own[window].mean(0) - held[window].mean(0)).abs().mean()) if len(held) else None
        return {"flip_rate": flip_rate - base_rate, "accuracy": accuracy, "accuracy_occluded": accuracy_occluded,
                "train_vs_heldout": shift}


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
