"""Benchmark: brittle's adversarial check against the original AutoAttack ("standard"), model by model, on the
16-model suite of bench/_suite.py, in one run.

    pip install -c constraints.txt -e ".[bench]"
    # AutoAttack is not on PyPI: a source checkout of github.com/fra31/auto-attack, given by path (or in
    # BRITTLE_AUTOATTACK_SRC); it is imported from there, never copied into this repository.
    python bench/attacks_suite.py --autoattack-src /path/to/auto-attack --half design   # while changing the design
    python bench/attacks_suite.py --autoattack-src /path/to/auto-attack --half held-out # once it is frozen
    python bench/attacks_suite.py --autoattack-src ... --half held-out --autoattack-only # AutoAttack's side only

Both run on the same first --n test digits (of the 1,000 held out from training), through the same counting
wrapper (passes in samples; an input-gradient backward counted per sample); both methods' adversarial examples
are re-verified by brittle's verifier. Per model: robust accuracy of each, the points only AutoAttack broke
(test indices), forward and backward passes per point and the ratio of total passes. AutoAttack's results are
cached in bench/results/autoattack_suite.json (it does not change).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _mnist import Counting, split  # noqa: E402
from _suite import SUITE  # noqa: E402

import brittle  # noqa: E402
from brittle.attacks import verify  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run_autoattack(model, x, y, norm, eps, src: str) -> dict:
    sys.path.insert(0, src)
    from autoattack import AutoAttack

    counting = Counting(model).eval()
    attack = AutoAttack(counting, norm=norm, eps=eps, version="standard", device="cpu", seed=0, verbose=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        pass
    x_adv = attack.run_standard_evaluation(x.clone(), y.clone(), bs=250)
    seconds = time.perf_counter() - t0
    forward, backward = counting.forward_passes, counting.backward
    adapter = brittle.ModelAdapter(model, device="cpu")
    correct = adapter.predict(x) == y
    broken = verify(adapter, x, y, x_adv, eps=eps, norm=norm).adversarial
    robust = (correct & ~broken).numpy()
    return {"robust": robust.tolist(), "forward": forward / len(x), "backward": backward / len(x), "seconds": seconds}


def run_brittle(model, x, y, norm, eps, options: dict) -> dict:
    adapter = brittle.ModelAdapter(Counting(model), device="cpu", name="model")
    t0 = time.perf_counter()
    r = brittle.audit(adapter, (x, y), checks=["adversarial"],
                      config={"adversarial": {"norm": norm, "eps": eps, "max_samples": len(x), **options}})
    a = r["adversarial"]
    robust = np.zeros(len(x), bool)
    robust[a.arrays["sample_index"]] = a.arrays["robust"]
    counting = adapter.module
    return {"robust": robust.tolist(), "forward": counting.forward_passes / len(x),
            "backward": counting.backward / len(x), "seconds": time.perf_counter() - t0,
            "reliable": a.metrics["reliable"], "fired": [p["id"] for p in a.details["soundness"]],
            "plan": a.details["plan"], "passes_by_stage": a.details["passes_by_stage"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--autoattack-src", default=os.environ.get("BRITTLE_AUTOATTACK_SRC"),
                    help="a source checkout of fra31/auto-attack (the folder holding autoattack/)")
    ap.add_argument("--half", choices=["design", "held-out", "held-out-2", "held-out-3", "all"], default="design")
    ap.add_argument("--n", type=int, default=200, help="test points per model")
    ap.add_argument("--only", help="comma-separated model names (substrings) to run")
    ap.add_argument("--options", default="{}", help="JSON: options for brittle's [adversarial] table")
    ap.add_argument("--out", default=str(RESULTS / "attacks_suite.json"))
    ap.add_argument("--autoattack-only", action="store_true", help="only fill AutoAttack's cache (it does not depend "
                    "on brittle's design: the held-out half's reference can be computed before the design is frozen)")
    args = ap.parse_args()
    if not args.autoattack_src or not (Path(args.autoattack_src) / "autoattack" / "__init__.py").is_file():
        ap.error("give --autoattack-src (a checkout of github.com/fra31/auto-attack) or BRITTLE_AUTOATTACK_SRC")
    torch.set_num_threads(2)
    _, (x_test, y_test) = split()
    x, y = x_test[: args.n], y_test[: args.n]
    cache_path = RESULTS / "autoattack_suite.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    options = json.loads(args.options)
    rows = []
    for case in SUITE:
        if args.half != "all" and case.half != args.half:
            continue
        if args.only and not any(s.strip() in case.name for s in args.only.split(",")):
            continue
        model = case.build().eval()
        key = f"{case.name}|{case.norm}|{case.eps}|{args.n}"
        if key not in cache:
            cache[key] = run_autoattack(model, x, y, case.norm, case.eps, args.autoattack_src)
            RESULTS.mkdir(exist_ok=True)
            on_disk = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
            cache_path.write_text(json.dumps({**on_disk, key: cache[key]}))  # another run may have added keys
        aa = cache[key]
        if args.autoattack_only:
            print(f"{case.name}: AutoAttack robust accuracy {np.mean(aa['robust']):.3f}", flush=True)
            continue
        ours = run_brittle(model, x, y, case.norm, case.eps, options)
        aa_robust, our_robust = np.array(aa["robust"]), np.array(ours["robust"])
        only_aa = np.flatnonzero(our_robust & ~aa_robust).tolist()
        aa_total, our_total = aa["forward"] + aa["backward"], ours["forward"] + ours["backward"]
        row = {"model": case.name, "half": case.half, "norm": case.norm, "eps": case.eps,
               "robust_brittle": float(our_robust.mean()), "robust_autoattack": float(aa_robust.mean()),
               "only_autoattack_broke": only_aa, "only_brittle_broke": np.flatnonzero(aa_robust & ~our_robust).tolist(),
               "brittle_forward": ours["forward"], "brittle_backward": ours["backward"],
               "autoattack_forward": aa["forward"], "autoattack_backward": aa["backward"],
               "pass_ratio": our_total / aa_total, "target_ratio": 0.1 if aa_total > 1000 else 1.0,
               "brittle_seconds": ours["seconds"], "autoattack_seconds": aa["seconds"],
               "reliable": ours["reliable"], "fired": ours["fired"], "passes_by_stage": ours["passes_by_stage"]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "passes_by_stage"}), flush=True)
    if args.autoattack_only:
        return 0
    print(f"\n| model | half | threat | robust acc brittle / AA | only AA broke (test indices) | fwd/pt brittle | "
          "bwd/pt brittle | fwd/pt AA | bwd/pt AA | passes brittle/AA (target) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = "ok" if r["pass_ratio"] <= r["target_ratio"] else "OVER"
        print(f"| {r['model']} | {r['half']} | {r['norm']} {r['eps']:g} | {r['robust_brittle']:.3f} / "
              f"{r['robust_autoattack']:.3f} | {', '.join(map(str, r['only_autoattack_broke'])) or '-'} | "
              f"{r['brittle_forward']:.0f} | {r['brittle_backward']:.0f} | {r['autoattack_forward']:.0f} | "
              f"{r['autoattack_backward']:.0f} | {r['pass_ratio']:.3f} (<= {r['target_ratio']:g}) {ok} |")
    misses = sum(len(r["only_autoattack_broke"]) for r in rows)
    print(f"\npoints only AutoAttack broke: {misses} of {len(rows) * args.n}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
