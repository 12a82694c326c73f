"""Certification on MNIST-5k, the recipes' side: the cascade on a natural and an IBP-trained model, the training
recipes (standard, PGD, TRADES, IBP, noise) and randomized smoothing vs ART.

    python bench/certify_training.py [--points 100] [--skip-peers]

Models are trained with `brittle.train` and cached in bench/.cache. Bounds are timed in CPU-seconds with one
thread. The bound-for-bound comparison with auto_LiRPA is bench/certify.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _mnist import split  # noqa: E402
from _models import trained  # noqa: E402

from brittle.attacks.apgd import APGD, APGDTargeted  # noqa: E402
from brittle.attacks.engine import Plan, evaluate_shard  # noqa: E402
from brittle.certify import alpha_crown_margins, crown_margins, ibp_margins, network_from  # noqa: E402
from brittle.model import ModelAdapter  # noqa: E402
from brittle.smoothing import certify as smooth_certify  # noqa: E402


def attack_robust(adapter, x, y, eps):
    plan = Plan("Linf", eps, (APGD(norm="Linf", eps=eps, steps=100, loss="ce"),
                              APGDTargeted(norm="Linf", eps=eps, steps=100, n_targets=3)))
    return evaluate_shard(adapter, x, y, plan, seed=0).robust.numpy()


def bounds_table(title, model, x, y, eps, alpha_points):
    adapter = ModelAdapter(model)
    adapter.bind(x[:2])
    net = network_from(adapter)
    rows, proven = [], {}
    for name, fn, pts in (("IBP", ibp_margins, len(x)), ("CROWN", crown_margins, len(x)),
                          ("alpha-CROWN", alpha_crown_margins, alpha_points)):
        t0 = time.process_time()
        lb = fn(net, x[:pts], y[:pts], eps, (0.0, 1.0))
        cpu = time.process_time() - t0
        proven[name] = (lb > 0).all(1).numpy()
        rows.append((name, float(proven[name].mean()), pts, cpu / pts * 100))
    robust = attack_robust(adapter, x, y, eps)
    union = proven["IBP"][:alpha_points] | proven["CROWN"][:alpha_points] | proven["alpha-CROWN"]
    print(f"\n### {title}, Linf eps {eps}\n")
    print("| method | certified | points | CPU-s per 100 points |")
    print("|---|---|---|---|")
    for name, share, pts, cpu in rows:
        print(f"| {name} | {share:.3f} | {pts} | {cpu:.2f} |")
    print(f"| union of the three (the cascade) | {union.mean():.3f} | {alpha_points} | - |")
    print(f"| APGD-CE + APGD-T (upper bound) | {robust.mean():.3f} | {len(x)} | - |")
    print(f"| APGD-CE + APGD-T on the same {alpha_points} points | {robust[:alpha_points].mean():.3f} | {alpha_points} | - |")
    sound = not (union & ~robust[:alpha_points]).any()
    print(f"\nno certified point broken by the attacks: {sound}")
    return sound


def smoothing_table(model, x, y, sigma, n0, n, alpha, skip_peers):
    adapter = ModelAdapter(model)
    adapter.bind(x[:2])
    t0 = time.process_time()
    ours = smooth_certify(adapter, x, sigma=sigma, n0=n0, n=n, alpha=alpha, batch=500, seed=0)
    t_ours = time.process_time() - t0
    print(f"\n### Randomized smoothing, sigma {sigma}, n0 {n0}, n {n}, alpha {alpha}, {len(x)} points\n")
    print("| library | CPU-s | certified correct | mean radius (correct) |")
    print("|---|---|---|---|")
    ok = ours.prediction == y.numpy()
    print(f"| brittle | {t_ours:.1f} | {ok.mean():.3f} | {ours.radius[ok].mean():.3f} |")
    if skip_peers:
        return
    from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing

    art = PyTorchRandomizedSmoothing(model, torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                     nb_classes=10, clip_values=None, device_type="cpu", sample_size=n0, scale=sigma,
                                     alpha=alpha)
    np.random.seed(0)
    t0 = time.process_time()
    pred, radius = art.certify(x.numpy(), n=n, batch_size=500)
    t_art = time.process_time() - t0
    ok_a = pred == y.numpy()
    both = ok & ok_a
    print(f"| ART 1.20.1 | {t_art:.1f} | {ok_a.mean():.3f} | {radius[ok_a].mean():.3f} |")
    print(f"\nthroughput brittle / ART: {t_art / t_ours:.2f}x; same prediction on {(pred == ours.prediction).mean():.3f} "
          f"of the points; mean |radius difference| where both certify correctly: "
          f"{np.abs(radius[both] - ours.radius[both]).mean():.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=100)
    ap.add_argument("--skip-peers", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, (x_test, y_test) = split()
    x, y = x_test[: args.points], y_test[: args.points]
    print("\n## The cascade")
    natural, _ = trained("_models:cnn", "standard", 3, lr=1e-3)
    sound = bounds_table("Naturally trained CNN", natural, x, y, 0.01, min(args.points, 20))
    ibp_mlp, _ = trained("_models:mlp", "ibp", 10, lr=1e-3, eps=0.1)
    sound &= bounds_table("IBP-trained MLP (eps_train 0.1)", ibp_mlp, x, y, 0.1, min(args.points, 50))

    print("\n## Training recipes on MNIST-5k (CNN, Adam 1e-3, batch 64)")
    print("\n| recipe | epochs | train wall s | clean | robust (APGD, eps 0.1) | certified (IBP + CROWN, eps 0.1) |")
    print("|---|---|---|---|---|---|")
    recipes = [("standard", 5, {}), ("pgd", 5, {"eps": 0.1, "steps": 7}), ("trades", 5, {"eps": 0.1, "steps": 7}),
               ("ibp", 10, {"eps": 0.1}), ("noise", 5, {"sigma": 0.25})]
    models = {}
    for method, epochs, kw in recipes:
        model, secs = trained("_models:cnn", method, epochs, lr=1e-3, **kw)
        models[method] = model
        adapter = ModelAdapter(model)
        adapter.bind(x[:2])
        net = network_from(adapter)
        clean = float((model(x).argmax(1) == y).float().mean())
        robust = attack_robust(adapter, x, y, 0.1).mean()
        cert = ((ibp_margins(net, x, y, 0.1, (0.0, 1.0)) > 0).all(1)
                | (crown_margins(net, x, y, 0.1, (0.0, 1.0)) > 0).all(1)).float().mean()
        print(f"| {method} | {epochs} | {secs:.0f} | {clean:.3f} | {robust:.3f} | {float(cert):.3f} |")
    print("\n(train wall s is 0 when the model came from the cache)")
    smoothing_table(models["noise"], x, y, 0.25, 100, 1000, 0.001, args.skip_peers)
    print(f"\nsoundness over the bound tables: {sound}")


if __name__ == "__main__":
    main()
