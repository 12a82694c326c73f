"""Benchmark: brittle's training-set checks vs ART 1.20's poison detectors and cleanlab's default, in one run.

    pip install -c constraints.txt -e ".[bench]"
    python bench/data_audit.py

MNIST-5k (4,000 train / 1,000 held out, seed-0 shuffle), the demo CNN trained 4 epochs on each planted set.
- Backdoors: a 3x3 white patch by the corner or a full-image blend (alpha 0.2, fixed noise pattern), poisons
  from other classes relabelled 7, making up a third or 5% of class 7; plus clean sets (seeds 0-2).
  `--seeds K` repeats the planted sets for seeds 0..K-1 (split, poisons, training) and adds clean seeds
  up to K+1; `--first-seed` and `--target` move them (sets the detector's thresholds were not chosen on).
  brittle `backdoor` vs ART's ActivationDefence (2-means on PCA-10 of what its PyTorch wrapper gives:
  the logits) and SpectralSignatureDefense (defaults, expected_pp_poison 0.33).
- Shortcuts: a 2x2 white mark in the top-left corner of 90% of class 3's training images, absent at test,
  and a clean set; brittle `shortcuts` only (no peer does this).
- Label errors: 5% and 10% of labels flipped at random. brittle `label_errors` (K-fold kNN on the model's
  features: no retraining; and with `train_fn`, retraining the CNN 5 times) vs cleanlab's default
  `find_label_issues` on 5-fold out-of-sample probabilities from retraining the CNN 5 times (cleanlab's
  recommended recipe; its cost is the K trainings).
Precision and recall are over the whole training set; time is wall-clock on this machine.
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

import _planted as planted  # noqa: E402
from _mnist import cached_model  # noqa: E402

import brittle  # noqa: E402
from brittle.demo.model import DemoCNN  # noqa: E402
from brittle.demo.train import train_classifier  # noqa: E402


def trained(name: str, x: np.ndarray, y: np.ndarray, seed: int = 0) -> torch.nn.Module:
    model = DemoCNN()
    return cached_model(f"data_{name}_s{seed}.pt", model, lambda: train_classifier(model, x, y, epochs=4, seed=seed))


def score(flagged: np.ndarray, truth: np.ndarray) -> dict:
    flagged = np.asarray(flagged, bool)
    tp = int((flagged & truth).sum())
    return {"flagged": int(flagged.sum()), "precision": tp / max(int(flagged.sum()), 1),
            "recall": tp / max(int(truth.sum()), 1)}


def run_brittle_backdoor(model, p: planted.Planted) -> dict:
    t0 = time.perf_counter()
    r = brittle.audit(model, (p.x_test, p.y_test), train_data=(p.x_train, p.y_train), checks=["backdoor"])["backdoor"]
    out = score(r.arrays["flagged"], p.truth)
    out.update(seconds=time.perf_counter() - t0, detected=bool(r.metrics["backdoor_detected"]),
               target=int(r.metrics["target_class"]))
    return out


def art_classifier(model):
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                             clip_values=(0.0, 1.0))


def run_art(model, p: planted.Planted, which: str) -> dict:
    from art.defences.detector.poison import ActivationDefence, SpectralSignatureDefense

    onehot = np.eye(10, dtype=np.float32)[p.y_train]
    t0 = time.perf_counter()
    if which == "art-activation":
        defence = ActivationDefence(art_classifier(model), p.x_train, onehot)
        _, is_clean = defence.detect_poison(nb_clusters=2, nb_dims=10, reduce="PCA")
    else:
        defence = SpectralSignatureDefense(art_classifier(model), p.x_train, onehot, expected_pp_poison=0.33)
        _, is_clean = defence.detect_poison()
    flagged = np.asarray(is_clean) == 0
    out = score(flagged, p.truth)
    target = p.target if p.target is not None else 7
    within = p.y_train == target
    out["within_target"] = score(flagged[within], p.truth[within])
    out["seconds"] = time.perf_counter() - t0
    return out


def run_brittle_shortcuts(model, p: planted.Planted) -> dict:
    t0 = time.perf_counter()
    r = brittle.audit(model, (p.x_test, p.y_test), train_data=(p.x_train, p.y_train), checks=["shortcuts"])["shortcuts"]
    found = [c for c in r.details["candidates"] if any(f.evidence["region"] == c["region"] for f in r.findings)]
    return {"found": found, "largest_flip_rate_not_found": max(
        [c["flip_rate"] for c in r.details["candidates"] if c not in found], default=0.0),
        "seconds": time.perf_counter() - t0}


def run_brittle_labels(model, p: planted.Planted, options: dict | None = None) -> dict:
    t0 = time.perf_counter()
    r = brittle.audit(model, (p.x_test, p.y_test), train_data=(p.x_train, p.y_train), checks=["label_errors"],
                      config={"label_errors": options or {}})["label_errors"]
    out = score(r.arrays["flagged"], p.truth)
    out["seconds"] = time.perf_counter() - t0
    return out


def run_cleanlab(p: planted.Planted, folds: int = 5) -> dict:
    from cleanlab.filter import find_label_issues
    from sklearn.model_selection import StratifiedKFold

    t0 = time.perf_counter()
    probs = np.zeros((len(p.y_train), 10))
    for k, (fit, held) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=0).split(p.x_train, p.y_train)):
        model = train_classifier(DemoCNN(), p.x_train[fit], p.y_train[fit], epochs=4, seed=k)
        with torch.no_grad():
            probs[held] = torch.softmax(model(torch.from_numpy(p.x_train[held])), 1).numpy()
    out = score(find_label_issues(p.y_train, probs), p.truth)
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "data_audit.json"))
    ap.add_argument("--skip-peers", action="store_true", help="only brittle (no ART, no cleanlab retraining)")
    ap.add_argument("--only", choices=["backdoor", "label_errors", "shortcuts"], help="run one part")
    ap.add_argument("--seeds", type=int, default=1, help="backdoor part: planted sets from this many seeds "
                    "(split, poison choice, training), and clean sets from two more")
    ap.add_argument("--first-seed", type=int, default=0, help="backdoor part: seeds start here")
    ap.add_argument("--target", type=int, default=7, help="backdoor part: the poisons' target class")
    args = ap.parse_args()
    torch.set_num_threads(2)
    results: dict = {"backdoor": {}, "label_errors": {}, "shortcuts": {}}

    def stem(label: str) -> str:  # cache file name of a planted set's model (the seed is added by `trained`)
        return label.replace(" ", "_").replace(",", "").replace("%", "pct")

    seeds = range(args.first_seed, args.first_seed + args.seeds)
    t = args.target
    cases = [(f"{kind}, {where}" + (f", seed {s}" if s else ""), stem(f"{kind}, {where}"), s,
              lambda kind=kind, share=share, s=s: planted.backdoor(kind, share, target=t, seed=s))
             for s in seeds for kind in planted.TRIGGER_KINDS
             for where, share in ((f"a third of class {t}", 1 / 3), (f"5% of class {t}", 0.05))]
    cases += [(f"clean, seed {s}", stem(f"clean, seed {s}"), s, lambda s=s: planted.clean(s))
              for s in range(args.first_seed, args.first_seed + args.seeds + 2)]
    for name, cache_stem, seed, make in cases if args.only in (None, "backdoor") else []:
        p = make()
        model = trained(cache_stem, p.x_train, p.y_train, seed=seed)
        row = {"brittle": run_brittle_backdoor(model, p)}
        if not args.skip_peers:
            for which in ("art-activation", "art-spectral"):
                row[which] = run_art(model, p, which)
        results["backdoor"][name] = row
        print(f"== backdoor: {name}", flush=True)
        for k, v in row.items():
            print(f"  {k} {json.dumps(v)}", flush=True)
    for rate in (0.05, 0.10) if args.only in (None, "label_errors") else ():
        p = planted.label_flips(rate)
        model = trained(f"flips{rate}", p.x_train, p.y_train)
        row = {"brittle": run_brittle_labels(model, p)}
        if not args.skip_peers:
            # the same recipe both ways: five DemoCNN trainings of 4 epochs, each without one fold
            row["brittle-5fold-retrain"] = run_brittle_labels(model, p, {"train_fn": "brittle.demo.train:fit_demo_cnn"})
            row["cleanlab-5fold-retrain"] = run_cleanlab(p)
        results["label_errors"][f"{rate:.0%} flipped"] = row
        print(f"== label errors: {rate:.0%} flipped", flush=True)
        for k, v in row.items():
            print(f"  {k} {json.dumps(v)}", flush=True)
    for name, make in ((("marker on 90% of class 3", planted.shortcut), ("clean, seed 0", planted.clean))
                       if args.only in (None, "shortcuts") else ()):
        p = make()
        model = trained("shortcut" if name.startswith("marker") else "clean_seed_0", p.x_train, p.y_train)
        results["shortcuts"][name] = row = run_brittle_shortcuts(model, p)
        print(f"== shortcuts: {name}\n  brittle {json.dumps(row)}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
