"""How two models differ: where their predictions part, and which training examples one relies on that the
other does not (ModelDiff, Shah, Park, Ilyas and Madry 2022).

1. **Where.** Accuracy of both models and how often they disagree, per class and by which of them is right.
2. **Why.** Each model's TRAK attributions of the same test points to the same training set (`brittle.attribution`,
   without TRAK's (1 - p) weight, see `diff_prepared`), each row scaled to unit length. A's residual attributions are what is left of each row after removing its
   projection on B's row for the same point: the training examples A's prediction leans on that B's does not.
   The top principal directions of the residuals (in training-example space) are the *distinguishing
   directions* of A against B; and the same with A and B swapped. Each comes with the variance of A's and of B's
   attributions along it (A's is high, B's low, when the direction is A's own), the training examples with the
   largest weight on it and the test points whose residuals load most on it.
3. **Test.** A direction is a hypothesis; on images it is tested where it can be made concrete. The window where
   the direction's top training examples differ most from the rest of their class is what they share; when that
   difference is concentrated there (at least `CONCENTRATION` times the window's share of the image), the
   window's content is stamped onto test inputs of other classes and removed (filled with the class's mean) from
   the top training examples. The effect on a model is the share of its logit gap to the class that stamping
   closes (a ratio of logit differences: two models of different temperature are compared fairly). With one
   model per side the unit is the stamped input: confirmed when stamping closes a median of at least
   `MIN_GAP_CLOSED` more of the owning model's gap than of the other's, on significantly more inputs than the
   reverse (sign test over the same stamped inputs, z >= 3). With ensembles (at least `MIN_MODELS` trainings of
   each recipe, other seeds) the unit is the trained model, the source of the noise that makes two seeds of one
   recipe "differ": each model's median gap closed, owner's models against the other's, a permutation test over
   the models (Bonferroni over the directions tested) and a mean difference of at least `MIN_MODEL_EFFECT`.
   Predictions turned to the class and the removal's effect are reported beside it: a feature can move a model a
   long way without overturning the evidence of a well-drawn digit.

Ensembles also steady the attributions: each side's TRAK scores are the average over its models (TRAK's ensemble),
which names a planted feature that one model's scores mix with the shape of a class.

Everything is computed on the CPU copy of the attributions; the models run on their adapters' devices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .attribution import attribute_prepared
from .errors import UsageError
from .seeds import seeded_subset
from .stats import mcnemar_z, permutation_p

__all__ = ["Direction", "ModelDiff", "diff", "diff_prepared", "residual_attributions", "distinguishing_directions",
           "other_side", "test_evidence"]

CONCENTRATION = 3.0  # a window holds a shared feature when its share of the contrast is this many times its area share
# Stamping must close at least this much more of the owner's logit gap to the class than of the other's (median over
# the stamped inputs; see _gap_closed).
MIN_GAP_CLOSED = 0.25
Z_CONFIRM = 3.0
# With ensembles: at least this many models per side (5 + 5 give a permutation p down to 1/252), a mean difference of
# per-model medians of at least a tenth of the gap (set before any ensemble run was evaluated), at this family-wise
# level over the directions tested.
MIN_MODELS = 5
MIN_MODEL_EFFECT = 0.10
FAMILY_ALPHA = 0.05
SHOWN = 8  # pictures per direction


@dataclass
class Direction:
    owner: str  # "A" or "B": the model whose predictions depend on the direction
    rank: int
    variance: dict[str, float]  # variance of each model's unit attributions along it (owner's high, other's low)
    train_index: list[int]  # training-file positions with the largest weight on it, strongest first
    train_weight: list[float]
    train_label: list[int]
    test_index: list[int]  # audit positions whose residual attributions load most on it
    test_loading: list[float]
    label: int  # the majority label of the top training examples
    label_share: float
    slice_accuracy: dict[str, float]  # both models' accuracy on the test points that load most on it
    counterfactual: dict = field(default_factory=dict)  # the stamp/removal test ({"status": ...} when not run)


@dataclass
class ModelDiff:
    names: dict[str, str]  # {"A": ..., "B": ...}
    n_test: int
    n_train: int
    accuracy: dict[str, float]
    disagreement: float  # share of audit points the two predict differently
    quadrants: dict[str, int]  # both right, only A right, only B right, both wrong
    per_class: list[dict]  # class, n, accuracy_A, accuracy_B, disagreement
    directions: list[Direction]
    attributed_points: int
    exact_gradients: bool
    models: dict[str, int] = field(default_factory=lambda: {"A": 1, "B": 1})  # models per side (ensembles)
    bounds: tuple[float, float] = (0.0, 1.0)  # the input domain, for pictures
    images: bool = False  # inputs are (C, H, W) images
    predictions: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    train_images: dict[int, np.ndarray] = field(default_factory=dict, repr=False)  # shown examples, by position
    test_images: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def confirmed(self) -> list[Direction]:
        return [d for d in self.directions if d.counterfactual.get("status") == "confirmed"]

    def to_json(self) -> dict:
        out = asdict(self)
        for key in ("bounds", "images", "predictions", "train_images", "test_images"):
            out.pop(key)
        return out

    def summary(self) -> str:
        a, b = self.names["A"], self.names["B"]
        lines = [f"A = {a}, B = {b}: accuracy {self.accuracy['A']:.3f} vs {self.accuracy['B']:.3f} on {self.n_test} "
                 f"audit points; they disagree on {self.disagreement:.1%} (only A right {self.quadrants['only_A_right']}, "
                 f"only B right {self.quadrants['only_B_right']})"]
        if max(self.models.values()) > 1:
            lines.append(f"  attributions averaged over {self.models['A']} models (A's recipe) and {self.models['B']} "
                         "(B's)")
        worst = sorted(self.per_class, key=lambda c: -c["disagreement"])[:3]
        lines.append("  most disagreement: " + ", ".join(
            f"class {c['class']} {c['disagreement']:.1%} (A {c['accuracy_A']:.2f}, B {c['accuracy_B']:.2f})" for c in worst))
        for d in self.directions:
            cf = d.counterfactual
            test = cf.get("status", "not run")
            if test in ("confirmed", "not confirmed"):
                test += f": stamping the shared window {test_evidence(cf, d.owner, str(d.label))}"
            lines.append(f"  {d.owner}-only direction {d.rank + 1}: variance {d.variance[d.owner]:.3f} ({d.owner}) vs "
                         f"{d.variance[other_side(d.owner)]:.3f}; top training examples {d.train_index[:5]} "
                         f"({d.label_share:.0%} labelled {d.label}); {test}")
        return "\n".join(lines)


def other_side(owner: str) -> str:
    """The other model's key: "B" for "A", "A" for "B"."""
    return "B" if owner == "A" else "A"


def test_evidence(cf: dict, owner: str, label: str) -> str:
    """A run counterfactual test's numbers in words, after "stamping the window" (summary, finding and report)."""
    other = other_side(owner)
    g, flip = cf["gap_closed"], cf["flip_rate"]
    if cf.get("unit") == "models":
        sizes = {k: len(v) for k, v in cf["model_gap_closed"].items()}
        stat = (f"closes {_percent(g[owner])} of the logit gap to {label} for {owner}'s {sizes[owner]} models and "
                f"{_percent(g[other])} for {other}'s {sizes[other]} (means of per-model medians; permutation test "
                f"over the models p {cf['p']:.2g}, at most {cf['alpha']:.2g} to confirm)")
    else:
        stat = (f"closes {_percent(g[owner])} of {owner}'s logit gap to {label} and {_percent(g[other])} of "
                f"{other}'s (medians; sign test over the inputs z {cf['z']:.1f})")
    return (f"{stat}; turns {_percent(flip[owner], 1)} of {owner}'s predictions to {label} and "
            f"{_percent(flip[other], 1)} of {other}'s")


def _percent(share: float, decimals: int = 0) -> str:
    """A share as a percentage, with no "-0%" for a value that rounds to nothing."""
    value = round(100 * share, decimals) or 0.0  # -0.0 is falsy
    return f"{value:.{decimals}f}%"


def residual_attributions(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each row of `a` (unit length) minus its projection on the same row of `b`: what A's attribution of a point
    holds that B's does not."""
    a, b = _unit_rows(a), _unit_rows(b)
    coef = (a * b).sum(1) / np.maximum((b * b).sum(1), 1e-30)
    return a - coef[:, None] * b


def _unit_rows(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    return s / np.maximum(np.linalg.norm(s, axis=1, keepdims=True), 1e-30)


def distinguishing_directions(a: np.ndarray, b: np.ndarray, k: int
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The top-k principal directions (k, n_train) of A's residual attributions against B, the test points'
    loadings on them (t, k), and the variance of A's and of B's unit attributions along each (k,). A direction's
    sign is set so that its heaviest training examples weigh positively."""
    r = residual_attributions(a, b)
    r = r - r.mean(0)
    _, _, vt = np.linalg.svd(r, full_matrices=False)
    dirs = vt[:k]
    for i, v in enumerate(dirs):
        heaviest = np.argsort(-np.abs(v))[:20]
        if v[heaviest].sum() < 0:
            dirs[i] = -v
    loadings = r @ dirs.T

    def variance(s):
        u = _unit_rows(s)
        return ((u - u.mean(0)) @ dirs.T).var(0)

    return dirs, loadings, variance(a), variance(b)


def diff(model, other_model, data, train_data, *, ensemble=(), other_ensemble=(), targets: int = 300,
         directions: int = 3, top: int = 20, max_train: int = 20000, proj_dim: int | None = None, ridge: float = 3.0,
         seed: int = 0, config=None, progress=None) -> ModelDiff:
    """Compare `model` (A) with `other_model` (B): both as `brittle.audit` takes a model (path, module or adapter),
    same classes and input domain. `ensemble`, `other_ensemble`: more trainings of A's and of B's recipe (other
    seeds), optional; each side's attributions are averaged over its models and, with at least `MIN_MODELS` per
    side, the counterfactual test takes the models as its unit. `data`: labelled audit data; `train_data`: the
    labelled training set all are attributed to (a seeded subset of `max_train` above that). `targets`: audit
    points attributed (a seeded subset); `directions`: distinguishing directions per side; `top`: training
    examples listed per direction."""
    from .config import as_config
    from .prepare import prepare_data, prepare_model, prepare_other_model

    cfg = as_config(config)
    first = prepare_model(model, cfg)
    test = prepare_data(data, first, cfg, role="data")
    train = prepare_data(train_data, first, cfg, role="train_data")
    second = prepare_other_model(other_model, cfg, like=first, x_example=test.x)
    more = {side: [prepare_other_model(m, cfg, like=first, x_example=test.x) for m in models]
            for side, models in (("A", ensemble), ("B", other_ensemble))}
    if len(train) > max_train:
        train = train.subset(seeded_subset(len(train), max_train, seed, "model_diff", "train"))
    return diff_prepared(first, second, test, train, a_ensemble=more["A"], b_ensemble=more["B"], targets=targets,
                         directions=directions, top=top, proj_dim=proj_dim, ridge=ridge, seed=seed, progress=progress)


def diff_prepared(a, b, test, train, *, a_ensemble=(), b_ensemble=(), targets: int = 300, directions: int = 3,
                  top: int = 20, proj_dim: int | None = None, ridge: float = 3.0, seed: int = 0, progress=None,
                  map_shards=None, store=None) -> ModelDiff:
    """The work of `diff` on prepared adapters and datasets (the model_diff check passes its context's
    `map_shards`, so A's featurisation runs as resumable shards; `store` keeps the other models' features for a
    resumed run). `a_ensemble`, `b_ensemble`: prepared adapters of more trainings of each recipe."""
    if test.y is None or train.y is None:
        raise UsageError("A model diff needs labels in the audit data and in the training data (the attributions "
                         "are of each model's margin on the labelled class).")
    sides = {"A": [a, *a_ensemble], "B": [b, *b_ensemble]}
    for m in sides["A"] + sides["B"]:
        if m.module is None:
            raise UsageError(f"{m.name} is a black-box model: the diff's attributions need its weights' gradients "
                             "(TorchScript, .pt2 or a factory with weights).")
    if directions < 1 or top < 1 or targets < 2:
        raise UsageError(f"directions and top must be >= 1 and targets >= 2; got {directions}, {top}, {targets}.")
    pred = {"A": a.predict(test.x).numpy(), "B": b.predict(test.x).numpy()}
    y = test.y.numpy()
    right = {k: p == y for k, p in pred.items()}
    per_class = [{"class": int(c), "n": int((y == c).sum()), "accuracy_A": float(right["A"][y == c].mean()),
                  "accuracy_B": float(right["B"][y == c].mean()),
                  "disagreement": float((pred["A"][y == c] != pred["B"][y == c]).mean())} for c in np.unique(y)]
    quadrants = {"both_right": int((right["A"] & right["B"]).sum()), "only_A_right": int((right["A"] & ~right["B"]).sum()),
                 "only_B_right": int((~right["A"] & right["B"]).sum()), "both_wrong": int((~right["A"] & ~right["B"]).sum())}

    rows = np.sort(seeded_subset(len(test), min(targets, len(test)), seed, "model_diff", "targets"))
    points = test.subset(rows)
    scores = {}
    for key, shards in (("A", map_shards), ("B", None)):  # with shards, A's first model is featurised there
        sub = None if store is None else Path(store) / f"model_{key}"
        # Unweighted: TRAK's (1 - p_i) factor shrinks the training examples a model fits confidently, and a
        # feature one model leans on (a mark, a background) is exactly what makes its examples easy to fit.
        scores[key] = attribute_prepared(sides[key], train, points, proj_dim=proj_dim, ridge=ridge, seed=seed,
                                         progress=progress, map_shards=shards, weighted=False, store=sub)
    exact = scores["A"].exact
    train_pos = train.positions(np.arange(len(train)))
    found = []
    k = min(directions, len(rows) - 1)
    for owner in ("A", "B"):
        s_own, s_other = scores[owner].scores, scores[other_side(owner)].scores
        dirs, loadings, var_own, var_other = distinguishing_directions(s_own, s_other, k)
        for rank, v in enumerate(dirs):
            heavy = np.argsort(-v)[:top]
            labels = train.y.numpy()[heavy]
            label = int(np.bincount(labels).argmax())
            loading = loadings[:, rank]
            lead = np.argsort(-loading)[:min(len(rows), max(top, 10))]
            found.append(Direction(
                owner, rank, {owner: float(var_own[rank]), other_side(owner): float(var_other[rank])},
                train_pos[heavy].tolist(), v[heavy].tolist(), labels.tolist(),
                points.positions(lead).tolist(), loading[lead].tolist(), label, float((labels == label).mean()),
                {m: float(right[m][rows[lead]].mean()) for m in ("A", "B")},
                counterfactual_test(sides, owner, train, heavy, label, test, tests=2 * k)))
    # The pictures the report shows: each direction's strongest training examples and test points.
    train_row = {int(p): i for i, p in enumerate(train_pos)}
    test_row = {int(p): i for i, p in enumerate(test.positions(np.arange(len(test))))}
    shown_train = {p: train.x[train_row[p]].numpy() for d in found for p in d.train_index[:SHOWN]}
    shown_test = {p: test.x[test_row[p]].numpy() for d in found for p in d.test_index[:SHOWN]}
    return ModelDiff({"A": a.name, "B": b.name}, len(test), len(train),
                     {m: float(right[m].mean()) for m in ("A", "B")}, float((pred["A"] != pred["B"]).mean()),
                     quadrants, per_class, found, len(rows), bool(exact), {m: len(v) for m, v in sides.items()},
                     tuple(a.bounds), test.x.ndim == 4, pred, shown_train, shown_test)


def shared_window(top: torch.Tensor, rest: torch.Tensor, side: int) -> tuple[tuple[int, int], float]:
    """The side x side window where the mean of `top` differs most from the mean of `rest` (images, (N, C, H, W)),
    and how concentrated the difference is there: the window's share of the total absolute difference over its
    share of the image's area (1: no more than anywhere else)."""
    contrast = (top.double().mean(0) - rest.double().mean(0)).abs().sum(0)  # (H, W)
    h, w = contrast.shape
    sums = torch.nn.functional.avg_pool2d(contrast[None, None], side, stride=1)[0, 0] * side * side
    flat = int(sums.argmax())
    i, j = divmod(flat, sums.shape[1])
    total = float(contrast.sum())
    share = float(sums[i, j]) / total if total > 0 else 0.0
    return (i, j), share / (side * side / (h * w))


def counterfactual_test(models: dict, owner: str, train, heavy: np.ndarray, label: int, test, *, tests: int = 1,
                        max_inputs: int = 500) -> dict:
    """Stamp what a direction's top training examples share onto other classes' test inputs, and remove it from
    those examples: does the owning side react and the other not? `models`: {"A": [...], "B": [...]}, each side's
    compared model first, then its ensemble; `tests`: directions tested in the diff (the Bonferroni factor of the
    test over models)."""
    x = train.x
    if x.ndim != 4 or min(x.shape[2:]) < 4:
        return {"status": "not testable", "reason": "the inputs are not images"}
    top = x[torch.as_tensor(heavy)]
    top = top[train.y[torch.as_tensor(heavy)] == label]
    in_class = np.setdiff1d(np.flatnonzero(train.y.numpy() == label), heavy)
    if len(top) < 3 or len(in_class) < 3:
        return {"status": "not testable", "reason": "too few top training examples of one class"}
    rest = x[torch.as_tensor(in_class)]
    side = max(2, round(min(x.shape[2:]) / 7))
    (i, j), concentration = shared_window(top, rest, side)
    window = (..., slice(i, i + side), slice(j, j + side))
    out = {"window": [int(i), int(j), int(side)], "concentration": concentration}
    if concentration < CONCENTRATION:
        return {**out, "status": "not testable",
                "reason": f"what the top training examples share is spread over the image (concentration "
                          f"{concentration:.1f} < {CONCENTRATION:g}), not one window that can be stamped"}
    others = test.x[test.y != label][:max_inputs]
    stamped = others.clone()
    stamped[window] = top[window].mean(0)
    removed = top.clone()
    removed[window] = rest[window].mean(0)
    effects = {}  # side -> per model: (gap closed per input, predictions turned to the class, removal's drop)
    for key, side_models in models.items():
        effects[key] = []
        for m in side_models:
            before, after = m.logits(others).double(), m.logits(stamped).double()
            flip = float((after.argmax(1) == label).double().mean() - (before.argmax(1) == label).double().mean())
            drop = float((torch.softmax(m.logits(top), 1)[:, label]
                          - torch.softmax(m.logits(removed), 1)[:, label]).mean())
            effects[key].append((_gap_closed(before, after, label), flip, drop))
    other = other_side(owner)
    first = {key: e[0][0] for key, e in effects.items()}  # the compared models, A's and B's first
    usable = np.isfinite(first[owner]) & np.isfinite(first[other])  # inputs neither model already gave the class
    excess = first[owner][usable] - first[other][usable]
    z = mcnemar_z(excess > 0, excess < 0)  # sign test: the owner moved further on how many more inputs
    out.update({"stamped_inputs": int(usable.sum()), "z": float(z)})
    if min(len(models["A"]), len(models["B"])) >= MIN_MODELS:
        # The unit is the trained model: each one's median gap closed, owner's side against the other's.
        medians = {key: [_median(c) for c, _, _ in e] for key, e in effects.items()}
        effect = float(np.mean(medians[owner]) - np.mean(medians[other]))
        p = permutation_p(medians[owner], medians[other])
        alpha = FAMILY_ALPHA / tests
        confirmed = effect >= MIN_MODEL_EFFECT and p <= alpha
        out.update({"unit": "models", "model_gap_closed": medians, "p": p, "alpha": alpha,
                    "gap_closed": {key: float(np.mean(v)) for key, v in medians.items()},
                    "flip_rate": {key: float(np.mean([f for _, f, _ in e])) for key, e in effects.items()},
                    "removal_drop": {key: float(np.mean([d for _, _, d in e])) for key, e in effects.items()}})
    else:
        effect = float(np.median(excess)) if usable.any() else 0.0
        confirmed = effect >= MIN_GAP_CLOSED and z >= Z_CONFIRM
        out.update({"unit": "inputs", "gap_closed": {key: _median(c) for key, c in first.items()},
                    "flip_rate": {key: e[0][1] for key, e in effects.items()},
                    "removal_drop": {key: e[0][2] for key, e in effects.items()}})
    return {**out, "status": "confirmed" if confirmed else "not confirmed", "excess_gap_closed": effect}


def _median(closed: np.ndarray) -> float:
    """Median gap closed over the inputs that were not already the class (0 when there are none)."""
    return float(np.nanmedian(closed)) if np.isfinite(closed).any() else 0.0


def _gap_closed(before: torch.Tensor, after: torch.Tensor, label: int) -> np.ndarray:
    """Per input, the share of its logit gap to `label` (best other logit minus the label's) that stamping closed:
    0 nothing, 1 the label reached the top (clipped to [-1, 1]; NaN where the label was already on top). A ratio
    of logit differences, so a model's logit scale (its temperature) does not change it."""
    def gap(z):
        rest = z.clone()
        rest[:, label] = -torch.inf
        return rest.max(1).values - z[:, label]

    g0, g1 = gap(before), gap(after)
    out = ((g0 - g1) / g0).clamp(-1, 1)
    out[g0 <= 0] = torch.nan
    return out.numpy()
