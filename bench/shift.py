"""Shift benchmark on MNIST-5k: accuracy without labels over corrupted target sets, and drift detection power.

    python bench/shift.py [--models 2] [--windows 20]

Two CNNs trained on the 4,000 training digits (seeds 0 and 1). The 1,000 test digits are split in two
halves: the source half (clean, labelled) fits the estimators and is the monitor's reference; the target
half is corrupted by every corruption x severity (18 types on grey digits: `saturate` needs colour), and
moved geometrically: translated by 1-4 pixels and rotated by 15-60 degrees (a random direction per image),
shifts the corruptions do not cover.
- Accuracy estimates of the first model on each corrupted target vs its true accuracy: mean absolute error
  per method, the largest error, and how many errors over 30 pp came without a warning.
- Drift: windows of 200 target images (clean for the false-alarm rate, corrupted for power), against the
  500-image reference, with `brittle monitor`'s test (KS on probabilities, MMD on features and on inputs,
  alpha 0.05) and
  KS alone at the full alpha for comparison.
Results are printed as a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _mnist import split, train  # noqa: E402

from brittle.corruptions import corrupt, corruption_names  # noqa: E402
from brittle.drift import drift_test, input_view, ks_2samp  # noqa: E402
from brittle.label_free import estimate_accuracy, fit_source, prediction_instability  # noqa: E402
from brittle.model import ModelAdapter  # noqa: E402


# Geometric shifts: the instability warning (threshold, perturbation) was designed looking at translations and
# rotations of model seed 0 (the design half). A first held-out evaluation (zoom and shear; the model of seed 2)
# led to one more design change; its held-out half is zoom and shear, and every set of the model of seed 3.
# Seed 3 then showed the 15-degree rotation missed (as on seed 0); the interval's low end now also drops by the
# excess of unstable predictions (a design change looked at on seed 0 only); seed 4 is its fresh held-out model.
GEOMETRIC = {"translate": (1, 2, 3, 4), "rotate": (15, 30, 45, 60), "zoom": (0.9, 0.8, 0.7, 0.6),
             "shear": (0.2, 0.4, 0.6, 0.8)}
DESIGN = ("translate", "rotate")
UNITS = {"translate": "px", "rotate": " deg", "zoom": "x", "shear": " shear"}


def geometric(x: torch.Tensor, kind: str, amount: float, seed: int = 0) -> torch.Tensor:
    """Each image moved by `amount` (pixels, or degrees) in a random direction, zero-filled."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    if kind == "translate":
        angle = torch.randint(0, 4, (n,), generator=g).float() * (np.pi / 2)
        shift = torch.stack([torch.cos(angle), torch.sin(angle)], 1) * amount * 2 / x.shape[-1]
        theta = torch.cat([torch.eye(2).expand(n, 2, 2), -shift[:, :, None]], 2)
    elif kind == "zoom":  # the digit shrinks to `amount` of its size (the grid samples a larger area)
        theta = torch.cat([torch.eye(2).expand(n, 2, 2) / amount, torch.zeros(n, 2, 1)], 2)
    elif kind == "shear":
        sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, 0, 1] = sign * amount
    else:
        angle = (torch.randint(0, 2, (n,), generator=g).float() * 2 - 1) * np.deg2rad(amount)
        c, s_ = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([c, -s_, torch.zeros(n)], 1), torch.stack([s_, c, torch.zeros(n)], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=int, default=2, help="models for the agreement-based estimates")
    ap.add_argument("--windows", type=int, default=20, help="drift windows per corrupted set")
    ap.add_argument("--window", type=int, default=200)
    ap.add_argument("--false-alarm-windows", type=int, default=300, help="clean windows for the false-alarm rate")
    ap.add_argument("--primary-seed", type=int, default=0, help="training seed of the model whose accuracy is "
                    "estimated (0: the design model; 3: held out)")
    args = ap.parse_args()
    torch.manual_seed(0)
    _, (x_test, y_test) = split()
    seeds = [args.primary_seed] + [s for s in range(args.models + 1) if s != args.primary_seed][: args.models - 1]
    models = [ModelAdapter(train("standard", epochs=5, seed=s)) for s in seeds]
    src, tgt = np.arange(500), np.arange(500, 1000)
    x_src, y_src, x_tgt, y_tgt = x_test[src], y_test[src].numpy(), x_test[tgt], y_test[tgt].numpy()

    def outputs(x):
        out = [m.logits_and_embedding(x) for m in models]
        return [o[0].numpy() for o in out], out[0][1].numpy()

    src_logits, src_emb = outputs(x_src)
    fit = fit_source(src_logits, y_src)
    source_instability = prediction_instability(models[0], x_src)
    p_ref = torch.softmax(torch.from_numpy(src_logits[0]), 1).numpy()
    v_ref = input_view(x_src)

    rows, t_est, t_drift = [], 0.0, 0.0
    g = np.random.default_rng(0)
    names = corruption_names(1)
    clean_logits, clean_emb = outputs(x_tgt)
    far = {"monitor": [], "ks": []}
    v_clean = input_view(x_tgt)
    for w in range(args.false_alarm_windows):
        idx = g.choice(500, args.window, replace=False)
        r = drift_test(p_ref, src_emb, torch.softmax(torch.from_numpy(clean_logits[0][idx]), 1).numpy(),
                       clean_emb[idx], v_ref, v_clean[idx], seed=w)
        far["monitor"].append(r.drift)
        far["ks"].append(min(ks_2samp(p_ref[:, c], torch.softmax(torch.from_numpy(clean_logits[0][idx]), 1).numpy()[:, c])[1]
                             for c in range(10)) < 0.05 / 10)
    shifts = [(name, sev, lambda n=name, s=sev: corrupt(x_tgt, n, s, seed=0)) for name in names for sev in range(1, 6)]
    shifts += [(kind, k + 1, lambda kind=kind, a=a: geometric(x_tgt, kind, a)) for kind, amounts in GEOMETRIC.items()
               for k, a in enumerate(amounts)]
    for name, sev, make in shifts:
        xc = make()
        logits, emb = outputs(xc)
        truth = float((logits[0].argmax(1) == y_tgt).mean())
        t0 = time.perf_counter()
        est = estimate_accuracy(fit, logits, instability=(source_instability, prediction_instability(models[0], xc)))
        t_est += time.perf_counter() - t0
        probs = torch.softmax(torch.from_numpy(logits[0]), 1).numpy()
        view = input_view(xc)
        t0 = time.perf_counter()
        det_m, det_k = [], []
        for w in range(args.windows):
            idx = g.choice(500, args.window, replace=False)
            det_m.append(drift_test(p_ref, src_emb, probs[idx], emb[idx], v_ref, view[idx], seed=w).drift)
            det_k.append(min(ks_2samp(p_ref[:, c], probs[idx, c])[1] for c in range(10)) < 0.05 / 10)
        t_drift += time.perf_counter() - t0
        rows.append(dict(name=name, severity=sev, truth=truth, est=est, monitor=np.mean(det_m), ks=np.mean(det_k)))

    methods = list(rows[0]["est"].methods) + ["estimate"]
    print(f"## Accuracy without labels ({len(rows)} shifted sets of 500: corruptions x 5 severities, translations "
          f"and rotations x 4; {args.models} models)\n")
    print("| method | MAE (pp) | max error (pp) | sets off > 30 pp |")
    print("|---|---|---|---|")
    for m in methods:
        err = np.array([abs((r["est"].estimate if m == "estimate" else r["est"].methods[m]) - r["truth"]) for r in rows])
        print(f"| {m} | {100 * err.mean():.1f} | {100 * err.max():.1f} | {(err > 0.3).sum()} |")
    err = np.array([abs(r["est"].estimate - r["truth"]) for r in rows])
    warned = np.array([bool(r["est"].warnings) for r in rows])
    inside = np.array([r["est"].interval[0] <= r["truth"] <= r["est"].interval[1] for r in rows])
    width = np.array([r["est"].interval[1] - r["est"].interval[0] for r in rows])
    print(f"interval width: mean {100 * width.mean():.1f} pp, median {100 * np.median(width):.1f} pp")
    print(f"\nestimate: off > 30 pp without a warning: {int(((err > 0.3) & ~warned).sum())}; off > 15 pp without a "
          f"warning: {int(((err > 0.15) & ~warned).sum())}; warned: {int(warned.sum())} sets; truth inside the "
          f"interval: {inside.mean():.2f}; {1000 * t_est / len(rows):.0f} ms per estimate")
    print(f"\nestimated model: seed {args.primary_seed}; design half: {', '.join(DESIGN) if args.primary_seed == 0 else 'none'}")
    for kind in GEOMETRIC:
        part = [r for r in rows if r["name"] == kind]
        print(f"  {kind}: " + "; ".join(
            f"{a}{UNITS[kind]} truth {r['truth']:.2f} estimate {r['est'].estimate:.2f} "
            f"[{r['est'].interval[0]:.2f}, {r['est'].interval[1]:.2f}] warnings {len(r['est'].warnings)} "
            f"unstable {r['est'].instability[1]:.3f} (source {r['est'].instability[0]:.3f})"
            for a, r in zip(GEOMETRIC[kind], part)))
        missed = [r for r in part if not (r["est"].interval[0] <= r["truth"] <= r["est"].interval[1])
                  and not r["est"].warnings]
        half = "design" if kind in DESIGN and args.primary_seed == 0 else "held-out"
        print(f"    ({half}) truth outside the interval without a warning: {len(missed)} of {len(part)}")
    corr = [r for r in rows if r["name"] not in GEOMETRIC]
    ok = [r for r in corr if r["est"].interval[0] <= r["truth"] <= r["est"].interval[1] or abs(r["est"].estimate - r["truth"]) < 0.05]
    unstable = [r for r in corr if any("unstable" in w for w in r["est"].warnings)]
    print(f"  corruptions: instability warning on {len(unstable)} of {len(corr)} sets, of which "
          f"{sum(r in ok for r in unstable)} had an estimate within the interval or 5 points of the truth")
    worst = sorted(rows, key=lambda r: -abs(r["est"].estimate - r["truth"]))[:5]
    for r in worst:
        print(f"  {r['name']} s{r['severity']}: truth {r['truth']:.2f} estimate {r['est'].estimate:.2f} "
              f"{ {k: round(v, 2) for k, v in r['est'].methods.items()} } warnings {len(r['est'].warnings)}")
    print(f"\n## Drift: windows of {args.window} vs a reference of 500, alpha 0.05\n")
    print("| test | false alarms | power sev 1 | sev 2 | sev 3 | sev 4 | sev 5 |")
    print("|---|---|---|---|---|---|---|")
    for key, label in (("monitor", "brittle monitor (KS, feature MMD, input MMD; alpha/3 each)"), ("ks", "KS on probabilities alone")):
        power = [np.mean([r[key] for r in rows if r["severity"] == s and r["name"] not in GEOMETRIC]) for s in range(1, 6)]
        print(f"| {label} | {np.mean(far[key]):.3f} | " + " | ".join(f"{p:.2f}" for p in power) + " |")
    print(f"\ndrift tests: {1000 * t_drift / (len(rows) * args.windows):.0f} ms per window")
    truth_acc = np.array([r["truth"] for r in rows])
    print(f"true accuracies: min {truth_acc.min():.2f} median {np.median(truth_acc):.2f} max {truth_acc.max():.2f}")


if __name__ == "__main__":
    main()
