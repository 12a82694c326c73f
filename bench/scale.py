"""Benchmark: the same adversarial audit in-process, on 1 and on 2 local Ray workers, and a process pool.

    pip install -c constraints.txt -e ".[bench,ray]"
    python bench/scale.py --n 2000

Reports wall time of the audit (cluster start-up measured separately), the speed-up of 2 workers over 1,
whether every number is bit-identical to the in-process run, and the overhead at a small size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _mnist import split, train  # noqa: E402

import brittle  # noqa: E402
from brittle.backends import make_backend  # noqa: E402


def numbers(result):
    a = result["adversarial"]
    return json.dumps([a.metrics, a.cost.forward_passes, a.cost.backward_passes, a.arrays["robust"].tolist(),
                       a.arrays["distance"].tolist(), a.details["curve"]], sort_keys=True)


def timed_audit(model, x, y, backend, shard_size):
    cfg = {"adversarial": {"eps": 0.1, "max_samples": len(x), "shard_size": shard_size}}
    t0 = time.perf_counter()
    r = brittle.audit(model, (x, y), checks=["adversarial"], config=cfg, backend=backend)
    return time.perf_counter() - t0, r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--small", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "scale.json"))
    args = p.parse_args()
    (xt, yt), (xs, ys) = split()
    x, y = torch.cat([xs, xt])[: args.n], torch.cat([ys, yt])[: args.n]  # test digits first, then training ones
    model = train("standard", epochs=5)
    rows, reference = {}, {}
    for size in (args.n, args.small):
        xx, yy = x[:size], y[:size]
        seconds, r = timed_audit(model, xx, yy, "local", args.shard_size)
        reference[size] = numbers(r)
        rows[f"in-process, n={size}"] = {"seconds": seconds, "identical": True}
        print(f"in-process n={size}: {seconds:.1f} s", flush=True)
    for workers in (1, 2):
        t0 = time.perf_counter()
        backend = make_backend("ray", workers=workers)
        start = time.perf_counter() - t0
        print(f"ray cluster with {backend.cpus:g} CPUs", flush=True)
        try:
            for size in (args.n, args.small):
                seconds, r = timed_audit(model, x[:size], y[:size], backend, args.shard_size)
                rows[f"ray {workers} worker(s), n={size}"] = {"seconds": seconds, "cluster_start": start,
                                                             "cpus": backend.cpus,
                                                             "identical": numbers(r) == reference[size]}
                print(f"ray {workers} n={size}: {seconds:.1f} s (start {start:.1f} s), identical "
                      f"{numbers(r) == reference[size]}", flush=True)
        finally:
            backend.close()
    seconds, r = timed_audit(model, x, y, make_backend("process", workers=2), args.shard_size)
    rows[f"process pool 2, n={args.n}"] = {"seconds": seconds, "identical": numbers(r) == reference[args.n]}
    speedup = rows[f"ray 1 worker(s), n={args.n}"]["seconds"] / rows[f"ray 2 worker(s), n={args.n}"]["seconds"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "speedup_2_over_1": speedup}, indent=2))
    print("| run | seconds | cluster start s | identical to in-process |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['seconds']:.1f} | {row.get('cluster_start', 0):.1f} | {row['identical']} |")
    print(f"speed-up, 2 Ray workers over 1: {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
