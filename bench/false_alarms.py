"""Benchmark: which findings fire on models with nothing planted, and is every planted cause still found?

    pip install -c constraints.txt -e ".[bench]"
    python bench/false_alarms.py [--out bench/results/false_alarms.json]

Full audits (every check that looks at data, shift or the training set: model, accuracy, calibration,
corruptions, slices, backdoor, label_errors, shortcuts; the adversarial, certified and attribution checks
measure properties every standard model really has, so they are not false alarms and are left out) of:
- clean models: the demo CNN on MNIST-5k (seeds 0-2), a small CNN on scikit-learn's 8x8 digits (seeds 0-1),
  an MLP on scikit-learn's breast-cancer table (seeds 0-1, standardised features);
- the eight planted-fault cases on MNIST-5k: a patch and a blend backdoor, each a third and 5% of class 7;
  a 2x2 mark on 90% of class 3's training images; a one-pixel mark whose column encodes the label on 95% of
  the training images; 5% and 10% of labels flipped.
A finding is explained when its kind was planted (a backdoor explains backdoor.*, the shortcut finding of its
trigger and label_errors of its relabelled poisons; a mark explains shortcuts.found; flips explain
label_errors.found). The table gives, per check, the share of audits where it raised an unexplained
high finding and an unexplained medium one, and whether each planted cause was found.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _planted as planted  # noqa: E402
from data_audit import trained  # noqa: E402

import brittle  # noqa: E402

CHECKS = ["model", "accuracy", "calibration", "corruptions", "slices", "backdoor", "label_errors", "shortcuts"]
CACHE = Path(__file__).resolve().parent / ".cache"
EXPLAINS = {"backdoor": {"backdoor.found", "backdoor.suspected", "shortcuts.found", "label_errors.found"},
            "mark": {"shortcuts.found"}, "flips": {"label_errors.found"}, "clean": set()}
FOUND_BY = {"backdoor": "backdoor.found", "mark": "shortcuts.found", "flips": "label_errors.found"}


def _fit(model: nn.Module, x: np.ndarray, y: np.ndarray, seed: int, epochs: int, lr: float = 3e-3) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt, g = torch.from_numpy(x), torch.from_numpy(y), torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def digits_case(seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    x = (d.images[order] / 16.0).astype(np.float32)[:, None]
    y = d.target[order].astype(np.int64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10))
    return _fit(model, x[:1200], y[:1200], seed, 12), (x[1200:], y[1200:]), (x[:1200], y[:1200]), {}


def tabular_case(seed: int):
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    order = np.random.default_rng(seed).permutation(len(d.target))
    x, y = d.data[order], d.target[order].astype(np.int64)
    x = ((x - x[:400].mean(0)) / x[:400].std(0)).astype(np.float32)
    torch.manual_seed(seed)
    model = _fit(nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2)), x[:400], y[:400], seed, 60, 1e-3)
    bounds = [float(np.floor(x.min())), float(np.ceil(x.max()))]
    checks = [c for c in CHECKS if c != "shortcuts"]  # occlusion needs images: asking for it here is refused
    return model, (x[400:], y[400:]), (x[:400], y[:400]), {"model": {"bounds": bounds}, "checks": checks}


def mnist_case(make, name: str, seed: int):
    p = make()
    model = trained(name, p.x_train, p.y_train, seed=seed)
    return model, (p.x_test, p.y_test), (p.x_train, p.y_train), {}


def cases():
    for s in range(3):
        yield f"MNIST CNN, clean, seed {s}", "clean", lambda s=s: mnist_case(lambda: planted.clean(s), f"clean_seed_{s}", s)
    for s in range(2):
        yield f"digits CNN, clean, seed {s}", "clean", lambda s=s: digits_case(s)
    for s in range(2):
        yield f"breast-cancer MLP, clean, seed {s}", "clean", lambda s=s: tabular_case(s)
    for kind in planted.TRIGGER_KINDS:
        for where, share in (("a third of class 7", 1 / 3), ("5% of class 7", 0.05)):
            stem = f"{kind}_{where}".replace(" ", "_").replace("%", "pct")
            yield f"{kind} backdoor, {where}", "backdoor", lambda k=kind, sh=share, st=stem: mnist_case(
                lambda: planted.backdoor(k, sh), st, 0)
    yield "2x2 mark on 90% of class 3", "mark", lambda: mnist_case(planted.shortcut, "shortcut", 0)
    yield "label-wide one-pixel mark", "mark", lambda: mnist_case(planted.label_wide_mark, "label_wide_mark", 0)
    for rate in (0.05, 0.10):
        yield f"{rate:.0%} labels flipped", "flips", lambda r=rate: mnist_case(lambda: planted.label_flips(r),
                                                                                  f"flips{r}", 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "false_alarms.json"))
    args = ap.parse_args()
    rows = []
    for name, cause, make in cases():
        model, data, train, config = make()
        t0 = time.perf_counter()
        r = brittle.audit(model, data, train_data=train, config={"checks": CHECKS, **config})
        skipped = [c for c in CHECKS if c not in r.run["config"]["checks"]]
        found = [(f.id, f.severity) for c in r.checks for f in c.findings if f.severity in ("medium", "high")]
        unexplained = [(fid, sev) for fid, sev in found if fid not in EXPLAINS[cause]]
        rows.append({"case": name, "cause": cause, "findings": found, "unexplained": unexplained,
                     "planted_found": FOUND_BY.get(cause) in {fid for fid, _ in found} if cause != "clean" else None,
                     "skipped": skipped + [c.id for c in r.checks if c.status == "skipped"],
                     "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| check | unexplained high | unexplained medium |\n|---|---|---|")
    for check in CHECKS:
        ran = [row for row in rows if check not in row["skipped"]]
        high = sum(any(f.startswith(check + ".") and s == "high" for f, s in row["unexplained"]) for row in ran)
        medium = sum(any(f.startswith(check + ".") and s == "medium" for f, s in row["unexplained"]) for row in ran)
        print(f"| {check} | {high}/{len(ran)} | {medium}/{len(ran)} |")
    print("\n| case | planted cause found | unexplained findings |\n|---|---|---|")
    for row in rows:
        found = "-" if row["planted_found"] is None else ("yes" if row["planted_found"] else "NO")
        print(f"| {row['case']} | {found} | {', '.join(f'{f} ({s})' for f, s in row['unexplained']) or '-'} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
