"""Benchmark: brittle's adversarial evaluation vs AutoAttack "standard" (rebuilt from torchattacks' parts)
and ART's AutoProjectedGradientDescent, on MNIST-5k models, in one run.

    pip install -c constraints.txt -e ".[bench]" && pip install --no-deps torchattacks==3.5.1
    python bench/attacks.py --n 1000

Every library's adversarial examples are re-verified by brittle's verifier (inside the ball, inside the
bounds, misclassified), and every library calls the model through the same counting wrapper, so robust
accuracy and passes per point are measured the same way for all. Passes are in samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _mnist import Counting, Quantised, Saturated, split, train  # noqa: E402

import brittle  # noqa: E402
from brittle.attacks import PGD, verify  # noqa: E402


def robust_of(module, x, y, x_adv, eps):
    adapter = brittle.ModelAdapter(module)
    correct = adapter.predict(x) == y
    adv = verify(adapter, x, y, x_adv, eps=eps, norm="Linf").adversarial
    return float((correct & ~adv).float().mean())


def run_brittle(module, x, y, eps, curve: bool):
    t0 = time.perf_counter()
    r = brittle.audit(module, (x, y), checks=["adversarial"],
                      config={"adversarial": {"eps": eps, "max_samples": len(x), "curve": curve}})
    a = r["adversarial"]
    return {"robust_accuracy": a.metrics["robust_accuracy"], "forward": a.metrics["forward_passes_per_point"],
            "backward": a.metrics["backward_passes_per_point"], "seconds": time.perf_counter() - t0,
            "reliable": a.metrics["reliable"], "fired": [p["id"] for p in a.details["soundness"]]}


def run_pgd(module, x, y, eps, straight_through: bool):
    adapter = brittle.ModelAdapter(module)
    t0 = time.perf_counter()
    with adapter.escalated(straight_through=straight_through):
        x_adv = PGD(eps=eps, steps=50, restarts=1)(adapter, x, y)
    f, b = adapter.counter.snapshot()
    return {"robust_accuracy": robust_of(module, x, y, x_adv, eps), "forward": f / len(x), "backward": b / len(x),
            "seconds": time.perf_counter() - t0}


def run_autoattack(module, x, y, eps):
    """AutoAttack 'standard' (Croce & Hein 2020) from torchattacks' parts, with the original budgets:
    APGD-CE 100 iterations, APGD-T 100 iterations x 9 targets, FAB-T 9 targets, Square 5000 queries.
    As in AutoAttack, only correctly classified points are attacked, each attack on the points still robust."""
    import torchattacks

    counted = Counting(module).eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        correct = counted(x).argmax(1) == y
    attack = torchattacks.MultiAttack([
        torchattacks.APGD(counted, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
        torchattacks.APGDT(counted, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=10, seed=0),
        torchattacks.FAB(counted, norm="Linf", eps=eps, steps=100, n_restarts=1, multi_targeted=True, n_classes=10,
                         seed=0),
        torchattacks.Square(counted, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=0),
    ])
    x_adv = x.clone()
    idx = correct.nonzero().squeeze(1)
    for chunk in idx.split(500):
        x_adv[chunk] = attack(x[chunk], y[chunk])
    seconds = time.perf_counter() - t0
    return {"robust_accuracy": robust_of(module, x, y, x_adv, eps), "forward": counted.forward_passes / len(x),
            "backward": counted.backward / len(x), "seconds": seconds}


def run_art(module, x, y, eps):
    from art.attacks.evasion import AutoProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    counted = Counting(module).eval()
    clf = PyTorchClassifier(counted, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                            clip_values=(0.0, 1.0), device_type="cpu")
    attack = AutoProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=100, batch_size=250,
                                          verbose=False)  # ART defaults otherwise (5 random inits)
    t0 = time.perf_counter()
    x_adv = torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))
    seconds = time.perf_counter() - t0
    return {"robust_accuracy": robust_of(module, x, y, x_adv, eps), "forward": counted.forward_passes / len(x),
            "backward": counted.backward / len(x), "seconds": seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="test points per model")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "attacks.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    _, (x_test, y_test) = split()
    x, y = x_test[: args.n], y_test[: args.n]
    print("training (or loading) the models...", flush=True)
    standard = train("standard", epochs=5)
    robust = train("pgd", epochs=15, eps=0.3)
    models = {
        "standard CNN": (standard, 0.1),
        "PGD-trained CNN": (robust, 0.3),
        "quantised CNN": (Quantised(standard).eval(), 0.1),
        "saturated CNN": (Saturated(standard).eval(), 0.1),
    }
    results = {}
    for name, (module, eps) in models.items():
        row = {"eps": eps}
        print(f"== {name} (eps {eps})", flush=True)
        row["brittle"] = run_brittle(module, x, y, eps, curve=True)  # the default configuration
        print("  brittle", row["brittle"], flush=True)
        row["brittle-no-curve"] = run_brittle(module, x, y, eps, curve=False)
        print("  brittle-no-curve", row["brittle-no-curve"], flush=True)
        row["pgd"] = run_pgd(module, x, y, eps, straight_through=False)
        row["pgd-bpda"] = run_pgd(module, x, y, eps, straight_through=True)
        print("  pgd", row["pgd"], "\n  pgd-bpda", row["pgd-bpda"], flush=True)
        if not args.skip_peers:
            row["autoattack"] = run_autoattack(module, x, y, eps)
            print("  autoattack", row["autoattack"], flush=True)
            row["art-apgd"] = run_art(module, x, y, eps)
            print("  art-apgd", row["art-apgd"], flush=True)
        results[name] = row
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n": args.n, "torch_threads": torch.get_num_threads(), "results": results},
                                         indent=2))
    print(table(results))
    return 0


def table(results: dict) -> str:
    lines = ["| model (eps) | method | robust acc | fwd/pt | bwd/pt | time s | passes vs AA | time vs AA |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        aa = row.get("autoattack")
        for method in ("brittle", "brittle-no-curve", "autoattack", "art-apgd", "pgd", "pgd-bpda"):
            r = row.get(method)
            if r is None:
                continue
            ratio = time_ratio = "-"
            if aa:
                ratio = f"{(r['forward'] + r['backward']) / (aa['forward'] + aa['backward']):.3f}"
                time_ratio = f"{r['seconds'] / aa['seconds']:.3f}"
            lines.append(f"| {name} ({row['eps']}) | {method} | {r['robust_accuracy']:.3f} | {r['forward']:.0f} | "
                         f"{r['backward']:.0f} | {r['seconds']:.1f} | {ratio} | {time_ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
