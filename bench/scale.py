"""Benchmark: the whole default audit, training-set checks included, in-process, on 1 and 2 Ray workers, on a
process pool of 1 and 2, and killed with SIGKILL then resumed; every number and array compared.

    pip install -c constraints.txt -e ".[bench,ray]"
    python bench/scale.py [--n 2000] [--train 3000]

MNIST-5k, the demo CNN (5 epochs on the 4,000 training digits). The audit data are the 1,000 test digits and
the first 1,000 training digits (--n); the training-set checks get the other 3,000 training digits (--train).
Every check with its default options. Wall time per audit (Ray cluster start-up measured apart), the speed-up of
2 workers over 1 for Ray and for the pool, and whether each run's report (metrics, details without per-worker
timings, arrays, pass counts) is identical to the in-process run's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _mnist import split, train  # noqa: E402

import brittle  # noqa: E402
from brittle.backends import make_backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def numbers(result) -> str:
    """Everything a report says, but for what depends on where it ran (worker names, seconds)."""
    out = []
    for c in result.checks:
        details = {k: v for k, v in c.to_json()["details"].items() if k != "workers"}
        arrays = {k: np.asarray(v).tolist() for k, v in sorted(c.arrays.items())}
        out.append([c.id, c.status, c.metrics, details, arrays, c.cost.forward_passes, c.cost.backward_passes])
    return json.dumps(out, sort_keys=True, default=str)


def timed(model, data, train_data, backend, checks) -> tuple[float, object]:
    t0 = time.perf_counter()
    r = brittle.audit(model, data, train_data=train_data, backend=backend, checks=checks)
    return time.perf_counter() - t0, r


def killed_and_resumed(files: dict, reference: str, kill_after: float, checks) -> dict:
    """The CLI in a subprocess, SIGKILLed once some shards are saved, then resumed; the result compared."""
    out = Path(files["dir"]) / "killed"
    args = [sys.executable, "-m", "brittle.cli", "audit", "--model", "_models:demo_cnn", "--weights",
            files["weights"], "--data", files["data"], "--train-data", files["train"], "--out", str(out), "--quiet"]
    if checks:
        args += ["--checks", ",".join(checks)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent), str(ROOT / "src")]))
    proc = subprocess.Popen(args, env=env)
    deadline = time.time() + 600
    while time.time() < deadline and len(list(out.glob("state/*/*.npz"))) < 3:
        time.sleep(0.2)
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = len(list(out.glob("state/*/*.npz")))
    t0 = time.perf_counter()
    subprocess.run(args + ["--resume"], env=env, check=False)
    resumed = brittle.AuditResult.load(out)
    return {"shards_saved_before_kill": saved, "resume_seconds": time.perf_counter() - t0,
            "identical": numbers(resumed) == reference}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--kill-after", type=float, default=20.0, help="seconds after the third saved shard")
    p.add_argument("--skip", default="", help="comma-separated checks left out of the default audit (e.g. certified, "
                   "whose bound propagation on this CNN costs minutes per run)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "scale.json"))
    args = p.parse_args()
    (xt, yt), (xs, ys) = split()
    extra = args.n - len(xs)
    data = (torch.cat([xs, xt[:extra]]).numpy(), torch.cat([ys, yt[:extra]]).numpy())
    train_data = (xt[extra: extra + args.train].numpy(), yt[extra: extra + args.train].numpy())
    model = train("standard", epochs=5)
    skip = {c for c in args.skip.split(",") if c}
    checks = None
    if skip:  # every check runs on these inputs (image data with labels, a training set): all but the skipped
        # model_diff needs a second model: the default audit skips it, so does this list.
        checks = [c for c in brittle.checks.available_checks() if c not in skip | {"model_diff"}]
    rows = {}
    seconds, r = timed(model, data, train_data, "local", checks)
    reference = numbers(r)
    rows["in-process"] = {"seconds": seconds, "identical": True,
                          "checks": {c.id: round(c.cost.seconds, 1) for c in r.checks}}
    print(f"in-process: {seconds:.1f} s {rows['in-process']['checks']}", flush=True)
    for kind in ("ray", "process"):
        for workers in (1, 2):
            t0 = time.perf_counter()
            backend = make_backend(kind, workers=workers)
            start = time.perf_counter() - t0
            try:
                seconds, r = timed(model, data, train_data, backend, checks)
            finally:
                backend.close()
            rows[f"{kind} x{workers}"] = {"seconds": seconds, "start": start, "identical": numbers(r) == reference,
                                          "checks": {c.id: round(c.cost.seconds, 1) for c in r.checks}}
            print(f"{kind} x{workers}: {seconds:.1f} s (start {start:.1f} s), identical "
                  f"{rows[f'{kind} x{workers}']['identical']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        files = {"dir": tmp, "weights": str(Path(tmp) / "w.pt"), "data": str(Path(tmp) / "d.npz"),
                 "train": str(Path(tmp) / "t.npz")}
        torch.save(model.state_dict(), files["weights"])
        np.savez(files["data"], x=data[0], y=data[1])
        np.savez(files["train"], x=train_data[0], y=train_data[1])
        rows["killed + resumed (CLI)"] = killed_and_resumed(files, reference, args.kill_after, checks)
    speedups = {kind: rows[f"{kind} x1"]["seconds"] / rows[f"{kind} x2"]["seconds"] for kind in ("ray", "process")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "speedup_2_over_1": speedups}, indent=2))
    print("\n| run | seconds | start s | identical to in-process |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row.get('seconds', row.get('resume_seconds', 0)):.1f} | {row.get('start', 0):.1f} | "
              f"{row['identical']} |")
    print(f"speed-up of 2 workers over 1: Ray {speedups['ray']:.2f}x, process pool {speedups['process']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
