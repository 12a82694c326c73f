"""Certified robustness: what is proven, what is broken, what is unknown, per point and across eps.

A cascade per point, cheapest first, so compute goes where it is needed: the attack ensemble (APGD-CE then
targeted APGD-DLR) marks points broken; IBP, then CROWN, then alpha-CROWN try to prove the rest. A point ends
`certified`, `broken` or `unknown`. Certified accuracy is a lower bound on robust accuracy, the attack's
an upper bound; the report shows both across eps. With `smoothing_sigma`, the Gaussian-smoothed classifier is
certified too (Cohen et al.; an L2 radius per point, a different classifier from the audited one).
"""

from __future__ import annotations

from html import escape

from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from ..attacks.apgd import APGD, APGDTargeted
from ..attacks.engine import Plan, evaluate_shard
from ..attacks.geometry import normalise_norm
from ..certify import alpha_crown_margins, crown_margins, ibp_margins, network_from
from ..config import DEFAULT_EPS, ThreatModel
from ..errors import UsageError
from ..render import check_ran, line_chart
from ..result import CheckResult, Finding
from ..seeds import derive_seed, seeded_subset
from ..smoothing import SmoothingResult
from ..smoothing import certify as smooth_certify
from .base import AuditContext, Check, CheckOptions, FindingDoc, Needs, make_details, validate_eps

METHODS = ("ibp", "crown", "alpha_crown")


class CertifiedOptions(CheckOptions):
    norm: Literal["Linf", "L2"] | None = Field(None, description="default: the threat model's ([threat] norm)")
    eps: float | None = Field(None, gt=0, description="default: the threat model's ([threat] eps)")
    eps_curve: list[float] | None = Field(None, description="fractions of eps for the curve (default: the threat "
                                          "model's)")
    methods: list[str] = Field(default_factory=lambda: list(METHODS), description="bound methods of the cascade "
                               "(ibp, crown, alpha_crown; run cheapest first)")
    max_samples: int = Field(100, ge=1, description="points certified (a seeded subset)")
    batch_size: int = Field(50, ge=1, description="points per unit of resumable work")
    alpha_steps: int = Field(20, ge=1, description="optimisation steps of alpha-CROWN")
    alpha_intermediate: bool = Field(False, description="points the final-slope alpha-CROWN leaves unproven get "
                                     "alpha-CROWN with the intermediate bounds' slopes optimised too (tighter; about "
                                     "20x CROWN's cost: minutes per point on a mid-size CNN on CPU)")
    attack_steps: int = Field(50, ge=1, description="APGD iterations of the cascade's attacks")
    smoothing_sigma: float | None = Field(None, gt=0, description="certify the Gaussian-smoothed model too")
    smoothing_n0: int = Field(100, ge=1, description="noise samples that choose the smoothed class")
    smoothing_n: int = Field(10_000, ge=10, description="noise samples that bound its probability")
    smoothing_alpha: float = Field(0.001, gt=0, lt=1, description="failure probability of each smoothing "
                                   "certificate")
    smoothing_samples: int = Field(50, ge=1, description="points certified by smoothing (it costs n forwards each)")

    @field_validator("norm", mode="before")
    @classmethod
    def _norm(cls, v: str | None) -> str | None:
        return None if v is None else normalise_norm(v)

    def with_threat(self, threat: ThreatModel) -> "CertifiedOptions":
        norm = self.norm or threat.norm
        eps = self.eps if self.eps is not None else (threat.radius if norm == threat.norm else DEFAULT_EPS[norm])
        return self.model_copy(update={"norm": norm, "eps": eps, "eps_curve": self.eps_curve or threat.eps_curve})

    def validate_against(self, bounds: tuple[float, float]) -> None:
        validate_eps("certified", self.norm, self.eps, bounds)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in METHODS]
        if bad or not v:
            raise ValueError(f"methods must be a non-empty subset of {list(METHODS)}; got {v}")
        return [m for m in METHODS if m in v]  # always cheapest first


_BOUND = {"ibp": ibp_margins, "crown": crown_margins, "alpha_crown": alpha_crown_margins}


class Certified(Check):
    id = "certified"
    title = "Certified robustness"
    needs = Needs(labels=True, gradients=True)
    Options = CertifiedOptions
    order = 85
    metrics = {"certified_accuracy": "share of points proven robust at eps (a lower bound on robust accuracy)",
               "empirical_robust_accuracy": "share not broken by the cascade's attacks (an upper bound)",
               "unknown_share": "share neither proven nor broken", "clean_accuracy": "accuracy on the points",
               "smoothed_certified_accuracy": "randomized smoothing: share certified at the L2 radius of eps "
                                              "(only with smoothing_sigma)"}
    Details = make_details("CertifiedDetails", {
        "eps": (float, "the radius"), "norm": (str, "Linf or L2"), "points": (int, "points certified"),
        "methods": (list[str], "bound methods, cheapest first"),
        "curve": (dict, "eps grid; certified, empirical, unknown shares and what settled the points, per eps"),
        "certified_by": (dict[str, int], "points settled at eps by each stage (attack: broken)"),
        "layers": (list[str], "the network as the bound propagation read it"),
        "smoothing": (dict | None, "randomized smoothing: sigma, n0, n, alpha, points, abstentions, radius curve")})
    arrays = {"index": "audit position of each point", "status": "0 broken, 1 unknown, 2 certified"}
    quick_options = {"max_samples": 6, "batch_size": 6, "alpha_steps": 3, "attack_steps": 5}
    findings = {
        "certified.mostly-unknown": FindingDoc(
            "low",
            "More than half of the points are neither broken by the attacks nor proven by the bound methods: "
            "robust accuracy is somewhere between the certified and the empirical figure. Tighter methods (alpha- "
            "CROWN with more steps), a smaller eps, or a model trained for certification (IBP training) narrow "
            "the gap ([certify.md](certify.md))."),
    }

    def unmet(self, ctx: AuditContext) -> str | None:
        try:
            network_from(ctx.model)
        except UsageError as exc:
            return str(exc)
        return None

    def run(self, ctx: AuditContext) -> CheckResult:
        o = self.options
        eps = o.eps
        net = network_from(ctx.model)
        idx = seeded_subset(len(ctx.data), o.max_samples, ctx.seed, self.id)
        x, y = ctx.data.x[torch.as_tensor(idx)], ctx.data.y[torch.as_tensor(idx)]
        curve_eps = sorted({round(eps * f, 10) for f in o.eps_curve} | {eps})
        curve = {"eps": curve_eps, "certified": [], "empirical": [], "unknown": [], "by_method": []}
        final: dict = {}
        batches = list(range(0, len(x), o.batch_size))
        tasks = [(f"{i:02d}-{b:05d}", (np.arange(start, min(start + o.batch_size, len(x))), e, o.model_dump(),
                                        derive_seed(ctx.seed, self.id, i, b)))
                 for i, e in enumerate(curve_eps) for b, start in enumerate(batches)]
        shards = iter(ctx.map_shards("cascade", cascade_positions, tasks, shared=(x, y), label="certified"))
        for e in curve_eps:
            parts = [next(shards) for _ in batches]
            status = np.concatenate([p["status"] for p in parts]).astype(str)
            by = {name: int(sum(int(p[f"by_{name}"]) for p in parts)) for name in ("attack", *o.methods)}
            curve["certified"].append(float((status == "certified").mean()))
            curve["empirical"].append(float((status != "broken").mean()))
            curve["unknown"].append(float((status == "unknown").mean()))
            curve["by_method"].append(by)
            if e == eps:
                final = {"status": status, "by": by}
        status = final["status"]
        clean = float((ctx.model.predict(x) == y).float().mean())
        metrics = {"certified_accuracy": float((status == "certified").mean()),
                   "empirical_robust_accuracy": float((status != "broken").mean()),
                   "unknown_share": float((status == "unknown").mean()), "clean_accuracy": clean}
        details: dict = {"eps": eps, "norm": o.norm, "points": len(idx), "methods": o.methods, "curve": curve,
                         "certified_by": final["by"],
                         "layers": net.describe()}
        if o.smoothing_sigma:
            n_s = min(o.smoothing_samples, len(idx))
            chunks = [np.arange(start, min(start + 10, n_s)) for start in range(0, n_s, 10)]
            parts = ctx.map_shards("smoothing", smoothed_positions, [
                (f"{k:04d}", (c, o.smoothing_sigma, o.smoothing_n0, o.smoothing_n, o.smoothing_alpha,
                              derive_seed(ctx.seed, self.id, "smoothing", k))) for k, c in enumerate(chunks)],
                shared=(x,), label="randomized smoothing")
            sm = SmoothingResult(*(np.concatenate([p[k] for p in parts]) for k in ("prediction", "radius", "p_lower")))
            ok = (sm.prediction == y[:n_s].numpy())
            radius_eps = eps if o.norm == "L2" else eps * float(np.sqrt(x[0].numel()))  # Linf ball inside L2 ball
            metrics["smoothed_certified_accuracy"] = float((ok & (sm.radius >= radius_eps)).mean())
            radii = np.sort(np.where(ok, sm.radius, -1.0))
            grid = np.linspace(0, max(float(radii.max()), 1e-6), 20)
            details["smoothing"] = {"sigma": o.smoothing_sigma, "n0": o.smoothing_n0, "n": o.smoothing_n,
                                    "alpha": o.smoothing_alpha, "points": n_s,
                                    "abstain_share": float((sm.prediction == -1).mean()),
                                    "radius_grid": grid.tolist(),
                                    "certified_at_radius": [float((radii >= r).mean()) for r in grid],
                                    "l2_radius_for_eps": radius_eps}
        findings = []
        if metrics["unknown_share"] > 0.5:
            findings.append(Finding(
                "certified.mostly-unknown", "low",
                f"At eps {eps:g} ({o.norm}), {metrics['unknown_share']:.0%} of the points are neither broken by the "
                f"attacks nor proven by {', '.join(o.methods)}: between the certified {metrics['certified_accuracy']:.1%} "
                f"and the empirical {metrics['empirical_robust_accuracy']:.1%} the truth is unknown.",
                {"eps": eps, **metrics}))
        arrays = {"index": ctx.data.positions(idx), "status": np.array([
            {"certified": 2, "broken": 0, "unknown": 1}[s] for s in status], dtype=np.int8)}
        return CheckResult(self.id, "warn" if findings else "pass", metrics, findings, details, arrays)

    @staticmethod
    def render(r: CheckResult, audit) -> str:
        """This check's section of report.html."""
        d, m = r.details, r.metrics
        curve = d.get("curve") or {}
        if not curve.get("eps"):
            return ""
        by = d.get("certified_by") or {}
        series = {"empirical (cascade attacks)": curve["empirical"], "certified": curve["certified"]}
        if check_ran(audit, "adversarial") and d.get("norm") == audit.check("adversarial").details.get("norm"):
            # the adversarial check's stronger ensemble on its own points, read at the same eps
            adv = audit.check("adversarial").details.get("curve") or {}
            if adv.get("eps"):
                series["adversarial check (its points)"] = np.interp(curve["eps"], adv["eps"],
                                                                     adv["robust_accuracy"]).tolist()
        rows = "".join(
            f"<tr><td>{e:g}</td><td>{c:.1%}</td><td>{u:.1%}</td><td>{1 - emp:.1%}</td><td>"
            + ", ".join(f"{escape(k)} {v}" for k, v in (b or {}).items() if v) + "</td></tr>"
            for e, c, u, emp, b in zip(curve["eps"], curve["certified"], curve["unknown"], curve["empirical"],
                                       curve.get("by_method") or [None] * len(curve["eps"])))
        out = [f'<p class="meta">{d.get("points")} points, {escape(str(d.get("norm")))} eps {d.get("eps"):g}: '
               f'certified {m.get("certified_accuracy", 0):.1%} (a lower bound on robust accuracy), empirical '
               f'{m.get("empirical_robust_accuracy", 0):.1%} (an upper bound), unknown {m.get("unknown_share", 0):.1%}. '
               "Cascade per point: " + ", ".join(f"{escape(k)} settled {v}" for k, v in by.items()) + ".</p>",
               "<h4>Certified vs empirical robust accuracy across eps</h4>",
               line_chart(curve["eps"], series, xlabel="eps (log scale)", title="certified vs empirical robust accuracy",
                          xlog=True),
               "<h4>Per eps: certified, unknown, broken (misclassified points count as broken)</h4>"
               "<table><tr><th>eps</th><th>certified</th><th>unknown</th><th>broken</th><th>settled by</th></tr>"
               + rows + "</table>"]
        sm = d.get("smoothing")
        if sm:
            out += [f"<h4>Randomized smoothing (sigma {sm['sigma']:g}, n {sm['n']}, alpha {sm['alpha']:g}): share of "
                    f"points certified at each L2 radius</h4>",
                    f'<p class="meta">{sm["points"]} points; {sm["abstain_share"]:.0%} abstain. The smoothed model is '
                    "a different classifier from the audited one.</p>",
                    line_chart(sm["radius_grid"], {"certified": sm["certified_at_radius"]}, xlabel="L2 radius",
                               title="smoothing certified radius curve")]
        return "".join(out)


def cascade_positions(model, x: torch.Tensor, y: torch.Tensor, positions: np.ndarray, eps: float, options: dict,
                      seed: int) -> dict[str, np.ndarray]:
    """One batch at one eps (a shard task): attacks mark points broken; IBP, then CROWN, then alpha-CROWN try to
    prove the rest. Statuses per point, and how many each stage settled."""
    o = CertifiedOptions(**options)
    net = network_from(model)
    xb, yb = x[torch.as_tensor(positions)], y[torch.as_tensor(positions)]
    status = np.array(["unknown"] * len(xb), dtype="U9")
    plan = Plan(o.norm, eps, (APGD(norm=o.norm, eps=eps, steps=o.attack_steps, loss="ce"),
                              APGDTargeted(norm=o.norm, eps=eps, steps=o.attack_steps, n_targets=3)))
    out = evaluate_shard(model, xb, yb, plan, seed=seed)
    robust = out.robust.numpy()
    status[~robust] = "broken"
    by = {"by_attack": int(out.correct.sum() - out.robust.sum())}
    left = np.flatnonzero(robust)
    stages = [(m, {}) for m in o.methods if m != "alpha_crown"]
    if "alpha_crown" in o.methods:  # the cheap variant first, the full one on what it leaves
        stages += [("alpha_crown", {"steps": o.alpha_steps, "intermediate": False})]
        if o.alpha_intermediate:
            stages += [("alpha_crown", {"steps": o.alpha_steps, "intermediate": True})]
    by.update({f"by_{m}": 0 for m in o.methods})
    crown_state = None  # CROWN's bounds and intermediate bounds, the start of alpha-CROWN on what it leaves
    for method, kwargs in stages:
        if not len(left):
            break
        on = torch.as_tensor(left)  # bounds run where the model lives (its weights are the network's)
        xs, ys = xb[on].to(model.device, model.dtype), yb[on].to(model.device)
        if method == "crown":
            lb, problem = crown_margins(net, xs, ys, eps, model.bounds, norm=o.norm, return_state=True)
            crown_state = (lb, problem, left)
        elif method == "alpha_crown" and crown_state is not None:
            c_lb, problem, c_left = crown_state
            rows = torch.as_tensor(np.searchsorted(c_left, left))
            lb = alpha_crown_margins(net, xs, ys, eps, model.bounds, norm=o.norm, start=(c_lb[rows],
                                     problem.subset(rows.to(c_lb.device))), **kwargs)
        else:
            lb = _BOUND[method](net, xs, ys, eps, model.bounds, norm=o.norm, **kwargs)
        proven = (lb > 0).all(1).cpu().numpy()
        status[left[proven]] = "certified"
        left = left[~proven]
        by[f"by_{method}"] += int(proven.sum())
    return {"status": status, **by}


def smoothed_positions(model, x: torch.Tensor, positions: np.ndarray, sigma: float, n0: int, n: int, alpha: float,
                       seed: int) -> dict[str, np.ndarray]:
    """Randomized-smoothing certificates of a few points (a shard task; each costs n0 + n forwards)."""
    r = smooth_certify(model, x[torch.as_tensor(positions)], sigma=sigma, n0=n0, n=n, alpha=alpha, seed=seed)
    return {"prediction": r.prediction, "radius": r.radius, "p_lower": r.p_lower}
