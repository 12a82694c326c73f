"""Bound for bound against auto_LiRPA: IBP, CROWN and alpha-CROWN on five architectures, one process, one thread.

    python bench/certify.py --lirpa-src /path/to/auto_LiRPA [--points 100] [--half design|held-out|both]

auto_LiRPA is not on PyPI in a version that runs here: give the path of a source checkout of
github.com/Verified-Intelligence/auto_LiRPA (its setup.py pins torch<2.9, so it is imported from the checkout
rather than installed; the packages it imports are in the `bench` extra). Nothing of it is copied here.

Models (MNIST-5k, brittle.train, 3 epochs, cached in bench/.cache): an MLP, a CNN, a Conv -> AvgPool CNN
(two affine layers before the first ReLU), the demo's MaxPool CNN and a residual CNN with BatchNorm. Seed 0
of each is the design half (looked at while building), seed 1 the held-out half (evaluated once).

Per model: three Linf eps (balls clipped to [0, 1], auto_LiRPA given the same box) and one L2 eps (unclipped:
auto_LiRPA's L2 ball ignores input bounds). Per method: the largest |difference| of the margins' lower bounds,
the mean bounds, the certified shares, and CPU seconds (bounds only; reading the model is timed apart).
Soundness: every margin's lower bound is compared with the smallest margin a 100-step PGD on that margin
finds, and every certified point is attacked by the adversarial check's ensemble.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _mnist import split  # noqa: E402
from _models import trained  # noqa: E402

from brittle.attacks.engine import evaluate_shard  # noqa: E402
from brittle.certify import alpha_crown_margins, crown_margins, ibp_margins, network_from  # noqa: E402
from brittle.certify.interval import specification  # noqa: E402
from brittle.checks.adversarial import ensemble_plan  # noqa: E402
from brittle.model import ModelAdapter  # noqa: E402

MODELS = {  # name: factory, Linf eps, L2 eps
    "MLP": ("_models:mlp", (0.002, 0.005, 0.01), 0.1),
    "CNN": ("_models:cnn", (0.002, 0.005, 0.01), 0.1),
    "Conv-AvgPool CNN": ("_models:conv_avgpool", (0.002, 0.005, 0.01), 0.1),
    "MaxPool CNN (demo)": ("_models:demo_cnn", (0.002, 0.005, 0.01), 0.1),
    "residual BN CNN": ("_models:residual_bn", (0.002, 0.005, 0.01), 0.1),
}
METHODS = ("IBP", "CROWN", "alpha-CROWN (final slopes)", "alpha-CROWN (full)")
ALPHA = {"iteration": 20, "lr_alpha": 0.5, "lr_decay": 0.98}


def ours(net, method, x, y, eps, norm, box):
    if method == "IBP":
        return ibp_margins(net, x, y, eps, box, norm=norm)
    if method == "CROWN":
        return crown_margins(net, x, y, eps, box, norm=norm)
    return alpha_crown_margins(net, x, y, eps, box, norm=norm, steps=ALPHA["iteration"], lr=ALPHA["lr_alpha"],
                               intermediate=method.endswith("(full)"))


def theirs(bounded, method, x, y, eps, norm, box):
    from auto_LiRPA import BoundedTensor, PerturbationLpNorm

    if norm == "Linf":
        ptb = PerturbationLpNorm(norm=np.inf, eps=eps, x_L=(x - eps).clamp(*box), x_U=(x + eps).clamp(*box))
    else:
        ptb = PerturbationLpNorm(norm=2, eps=eps)
    spec = specification(y, 10)
    if method.startswith("alpha"):
        bounded.set_bound_opts({"optimize_bound_args": {**ALPHA, "fix_interm_bounds": method.endswith("slopes)")}})
    name = {"IBP": "IBP", "CROWN": "backward"}.get(method, "CROWN-Optimized")
    lb, _ = bounded.compute_bounds(x=(BoundedTensor(x, ptb),), C=spec, method=name, bound_upper=False)
    return lb.detach()


def smallest_margins(model, x, y, eps, norm, box, steps=100):
    """Per point and class j != y: the smallest z_y - z_j a PGD on that margin reaches in the ball (an upper bound on
    the true minimum; any sound lower bound must stay below it)."""
    k = 10
    found = torch.full((len(x), k - 1), float("inf"))
    others = torch.arange(k)[None].expand(len(x), k)
    others = others[others != y[:, None]].view(len(x), k - 1)
    for col in range(k - 1):
        j = others[:, col]
        delta = torch.zeros_like(x)
        step = 2.5 * eps / steps
        for _ in range(steps + 1):
            delta.requires_grad_(True)
            z = model((x + delta).clamp(*box))
            margin = z.gather(1, y[:, None])[:, 0] - z.gather(1, j[:, None])[:, 0]
            found[:, col] = torch.minimum(found[:, col], margin.detach())
            (g,) = torch.autograd.grad(margin.sum(), delta)
            with torch.no_grad():
                if norm == "Linf":
                    delta = (delta - step * g.sign()).clamp(-eps, eps)
                else:
                    g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                    delta = delta - step * g
                    n = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                    delta = delta * (eps / n).clamp(max=1.0)
                delta = (x + delta).clamp(*box) - x
    return found


def run_model(title, factory, seed, linf, l2, x, y, points, alpha_points, rows, sound, methods=METHODS, balls=()):
    from auto_LiRPA import BoundedModule

    model, _ = trained(factory, "standard", 3, lr=1e-3, seed=seed)
    adapter = ModelAdapter(model)
    adapter.bind(x[:2])
    t0 = time.process_time()
    net = network_from(adapter)
    read_ours = time.process_time() - t0
    t0 = time.process_time()
    # auto_LiRPA's default patches mode does not bound MaxPool ("Please use --conv_mode matrix")
    matrix = any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    bounded = BoundedModule(model, torch.empty_like(x[:1]), device="cpu", verbose=0,
                            bound_opts={"compare_crown_with_ibp": True, **({"conv_mode": "matrix"} if matrix else {})})
    read_theirs = time.process_time() - t0
    print(f"\n### {title}, seed {seed} (read: brittle {read_ours:.2f} s, auto_LiRPA {read_theirs:.2f} s"
          f"{'; auto_LiRPA in conv_mode matrix, as MaxPool needs' if matrix else ''})\n", flush=True)
    print("| ball | method | points | max abs diff | mean bound brittle / auto_LiRPA | certified brittle / auto_LiRPA "
          "| CPU-s brittle / auto_LiRPA | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for method in methods:  # warm-up: first calls pay one-off costs (allocator, autograd, lazy imports)
        ours(net, method, x[:2], y[:2], linf[0], "Linf", (0.0, 1.0))
        theirs(bounded, method, x[:2], y[:2], linf[0], "Linf", (0.0, 1.0))
    for norm, eps in [("Linf", e) for e in linf] + [("L2", l2)]:
        if balls and f"{norm} {eps:g}" not in balls:
            continue
        box = (0.0, 1.0) if norm == "Linf" else (-float("inf"), float("inf"))
        worst = smallest_margins(model, x, y, eps, norm, box)
        for method in methods:
            n = alpha_points if method.startswith("alpha") else points
            xs, ys = x[:n], y[:n]
            t0 = time.process_time()
            a = ours(net, method, xs, ys, eps, norm, box)
            t_a = time.process_time() - t0
            t0 = time.process_time()
            b = theirs(bounded, method, xs, ys, eps, norm, box)
            t_b = time.process_time() - t0
            diff = float((a - b).abs().max())
            cert_a, cert_b = (a > 0).all(1), (b > 0).all(1)
            above = float((a - worst[:n]).max())  # > 0: a lower bound above a margin PGD reached (unsound)
            sound["bound_above_attack"] = max(sound["bound_above_attack"], above)
            sound.setdefault("certified", []).append((title, seed, norm, eps, xs[cert_a], ys[cert_a]))
            ratio = t_a / max(t_b, 1e-9)
            print(f"| {norm} {eps:g} | {method} | {n} | {diff:.1e} | {float(a.mean()):.4f} / {float(b.mean()):.4f} | "
                  f"{float(cert_a.float().mean()):.2f} / {float(cert_b.float().mean()):.2f} | {t_a:.2f} / {t_b:.2f} | "
                  f"{ratio:.2f} |", flush=True)
            rows.append({"model": title, "seed": seed, "norm": norm, "eps": eps, "method": method, "points": n,
                         "max_abs_diff": diff, "mean_ours": float(a.mean()), "mean_theirs": float(b.mean()),
                         "mean_diff": float((a - b).mean()), "certified_ours": float(cert_a.float().mean()),
                         "certified_theirs": float(cert_b.float().mean()), "cpu_ours": t_a, "cpu_theirs": t_b,
                         "max_bound_minus_pgd": above})
    # every certified point attacked by the adversarial check's full ensemble
    broken = 0
    for t, s, norm, eps, xc, yc in sound.pop("certified"):
        if len(xc):
            out = evaluate_shard(adapter, xc, yc, ensemble_plan(norm, eps), seed=0)
            broken += int((~out.robust).sum())
    sound["certified_broken"] += broken


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lirpa-src", required=True, help="a source checkout of Verified-Intelligence/auto_LiRPA")
    ap.add_argument("--points", type=int, default=100)
    ap.add_argument("--alpha-points", type=int, default=100)
    ap.add_argument("--half", choices=["design", "held-out", "both"], default="both")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--json", type=Path, help="write the rows here")
    ap.add_argument("--balls", default="", help='comma-separated subset of the balls, e.g. "Linf 0.002,L2 0.1" '
                    "(default: all four)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.lirpa_src).resolve()))
    import auto_LiRPA

    torch.set_num_threads(1)
    print(f"auto_LiRPA {auto_LiRPA.__version__} from {args.lirpa_src}; torch {torch.__version__}; one thread")
    _, (x_test, y_test) = split()
    x, y = x_test[: args.points], y_test[: args.points]
    seeds = {"design": [0], "held-out": [1], "both": [0, 1]}[args.half]
    rows: list[dict] = []
    sound = {"bound_above_attack": -float("inf"), "certified_broken": 0}
    for seed in seeds:
        for title in args.models.split(","):
            factory, linf, l2 = MODELS[title]
            run_model(title, factory, seed, linf, l2, x, y, args.points, args.alpha_points, rows, sound,
                      [m for m in METHODS if m in args.methods.split(",")],
                      [b.strip() for b in args.balls.split(",") if b.strip()])
    print("\n## Summary per half\n")
    print("| half | method | max abs diff | mean diff (brittle - auto_LiRPA) | certified brittle - auto_LiRPA (worst) "
          "| CPU brittle / auto_LiRPA (total) | worst ratio |")
    print("|---|---|---|---|---|---|---|")
    for seed in seeds:
        for method in METHODS:
            r = [row for row in rows if row["seed"] == seed and row["method"] == method]
            if not r:
                continue
            print(f"| {'design' if seed == 0 else 'held-out'} | {method} | {max(q['max_abs_diff'] for q in r):.1e} | "
                  f"{np.mean([q['mean_diff'] for q in r]):+.1e} | "
                  f"{min(q['certified_ours'] - q['certified_theirs'] for q in r):+.2f} | "
                  f"{sum(q['cpu_ours'] for q in r) / sum(q['cpu_theirs'] for q in r):.2f} | "
                  f"{max(q['cpu_ours'] / max(q['cpu_theirs'], 1e-9) for q in r):.2f} |")
    print(f"\nsoundness: largest (lower bound - smallest PGD margin) {sound['bound_above_attack']:.2e} "
          f"(must be <= 0); certified points broken by the ensemble: {sound['certified_broken']}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "soundness": sound}, indent=1))


if __name__ == "__main__":
    main()
