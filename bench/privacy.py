"""Membership inference on MNIST-5k: brittle's memorization check (loss threshold, LiRA offline and online) beside
ART's black-box membership attack, in one run, on an overfitted and a regularised model.

    pip install -c constraints.txt -e ".[bench]"
    python bench/privacy.py [--members 1000] [--references 16]

Each target model (an MLP 784-256-10) is trained on `--members` of the 4,000 training digits; as many of the 1,000
test digits are the non-members. overfitted: 60 epochs, no regularisation; regularised: 8 epochs, weight decay
5e-3 and label smoothing 0.1. brittle's LiRA trains `--references` reference models with the target's own recipe
(through the check's `train_fn`, here this file's functions), each on a random half of the pool. ART's
`MembershipInferenceBlackBox` (a learned attack on the model's probabilities and the label) is trained on a
random half of the members and non-members and evaluated on the other half; brittle's scores are evaluated on
the same half. privacy-meter 1.0.1 is not run: it imports tensorflow and opacus at import time, which the
project's environment does not carry.

Printed: TPR at 0.1% and 1% FPR, AUC and balanced accuracy per attack and model, and the most memorised
examples' label-flip share when `--flip` labels are flipped in the training set. Then `brittle unlearn-check`
on three candidate "unlearned" overfitted models (forget = the first `--forget` members): one retrained
without them (another seed), the original, and the original after gradient ascent on them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _mnist import split  # noqa: E402

import brittle  # noqa: E402
from brittle.privacy import roc  # noqa: E402

RECIPES = {"overfitted": dict(epochs=60, weight_decay=0.0, smoothing=0.0),
           "regularised": dict(epochs=8, weight_decay=5e-3, smoothing=0.1)}


def _fit(x, y, *, seed: int, epochs: int, weight_decay: float, smoothing: float) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx], label_smoothing=smoothing).backward()
            opt.step()
    return model.eval()


def train_overfitted(x, y, *, seed: int) -> nn.Module:
    return _fit(x, y, seed=seed, **RECIPES["overfitted"])


def train_regularised(x, y, *, seed: int) -> nn.Module:
    return _fit(x, y, seed=seed, **RECIPES["regularised"])


def art_scores(model, x_m, y_m, x_n, y_n, train_part: np.ndarray) -> np.ndarray:
    """ART's black-box membership attack: fitted on `train_part` of the pool, its membership probability for all."""
    from art.attacks.inference.membership_inference import MembershipInferenceBlackBox
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x_m.shape[1:]), nb_classes=10,
                            clip_values=(0.0, 1.0))
    x = np.concatenate([x_m, x_n])
    y = np.concatenate([y_m, y_n])
    member = np.r_[np.ones(len(x_m), bool), np.zeros(len(x_n), bool)]
    attack = MembershipInferenceBlackBox(clf, attack_model_type="rf")
    fit_m, fit_n = train_part & member, train_part & ~member
    attack.fit(x[fit_m], y[fit_m], x[fit_n], y[fit_n])
    return np.asarray(attack.infer(x, y, probabilities=True)).reshape(len(x), -1)[:, -1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--references", type=int, default=16)
    ap.add_argument("--flip", type=float, default=0.1, help="share of the members' labels flipped (0: none)")
    ap.add_argument("--forget", type=int, default=100, help="members in unlearn-check's forget set")
    ap.add_argument("--unlearn-references", type=int, default=4, help="retrained models of unlearn-check")
    args = ap.parse_args()
    torch.set_num_threads(2)
    (x_all, y_all), (x_test, y_test) = split()
    x_m, y_m = x_all[: args.members].numpy(), y_all[: args.members].numpy().copy()
    flipped = np.zeros(len(y_m), bool)
    if args.flip:
        g = np.random.default_rng(0)
        flipped[g.choice(len(y_m), int(args.flip * len(y_m)), replace=False)] = True
        y_m[flipped] = (y_m[flipped] + g.integers(1, 10, flipped.sum())) % 10
    n = min(args.members, len(x_test))
    x_n, y_n = x_test[:n].numpy(), y_test[:n].numpy()
    member = np.r_[np.ones(len(x_m), bool), np.zeros(n, bool)]
    evaluate = np.random.default_rng(1).random(len(member)) < 0.5  # ART trains on the rest
    print(f"members {len(x_m)} ({flipped.sum()} labels flipped), non-members {n}; evaluated on {evaluate.sum()} "
          f"({(evaluate & member).sum()} members), ART's attack fitted on the other {(~evaluate).sum()}\n", flush=True)
    rows = []
    for name, fn in (("overfitted", train_overfitted), ("regularised", train_regularised)):
        model = fn(x_m, y_m, seed=0)
        acc = float((model(torch.as_tensor(x_n)).argmax(1).numpy() == y_n).mean())
        t0 = time.perf_counter()
        r = brittle.audit(model, (x_n, y_n), train_data=(x_m, y_m), checks=["memorization"],
                          config={"memorization": {"members": len(x_m), "non_members": n,
                                                   "train_fn": f"privacy:train_{name}",
                                                   "reference_models": args.references}})["memorization"]
        seconds = time.perf_counter() - t0
        scores = {f"brittle {k}": r.arrays[f"score_{k}"] for k in ("population", "lira_offline", "lira_online")}
        t0 = time.perf_counter()
        scores["ART black-box (rf)"] = art_scores(model, x_m, y_m, x_n, y_n, ~evaluate)
        art_seconds = time.perf_counter() - t0
        for attack, s in scores.items():
            res = roc(s[evaluate], member[evaluate])
            rows.append((name, acc, attack, res))
        memo = r.arrays["memorisation"]
        top = np.argsort(-memo)[:100]
        print(f"{name}: test accuracy {acc:.3f}; brittle {seconds:.0f} s ({args.references} reference models), ART "
              f"{art_seconds:.0f} s; flipped share of the 100 most memorised: {flipped[top].mean():.2f} "
              f"(base rate {flipped.mean():.2f}); TRAK self-influence agreement {r.details['proxy_agreement']}",
              flush=True)
    unlearning = unlearn_rows(x_m, y_m, x_n, y_n, args.forget, args.unlearn_references)
    print("\n| model | test acc | attack | TPR @ 0.1% FPR | TPR @ 1% FPR | AUC | balanced acc |")
    print("|---|---|---|---|---|---|---|")
    for name, acc, attack, res in rows:
        print(f"| {name} | {acc:.3f} | {attack} | {res.tpr_at[0.001]:.3f} | {res.tpr_at[0.01]:.3f} | {res.auc:.3f} | "
              f"{res.balanced_accuracy:.3f} |")
    print(f"\n## brittle unlearn-check: forget = the first {args.forget} members, retain = the rest, "
          f"{args.unlearn_references} retrained reference models\n")
    print("| model | verdict | KS p | membership AUC (forget vs test) | membership p | forget acc (model / retrained) |")
    print("|---|---|---|---|---|---|")
    for name, r in unlearning:
        print(f"| {name} | {r.verdict} | {r.ks_p_value:.3g} | {r.membership_auc:.3f} | {r.membership_p_value:.3g} | "
              f"{r.accuracy['forget']:.3f} / {r.accuracy['retrained_forget']:.3f} |")
    return 0


def _gradient_ascent(model: nn.Module, x, y, *, target_accuracy: float, max_epochs: int = 10,
                     lr: float = 1e-3) -> nn.Module:
    """The unlearning shortcut most often tried (NegGrad): gradient ascent on the forget set, with Adam (an
    overfitted model's loss gradients are tiny; plain SGD at a small rate leaves it unchanged), stopped at the end
    of the first epoch where its forget-set accuracy is down to `target_accuracy` (the usual stopping rule: as
    accurate on the forget set as on unseen data)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(max_epochs):
        model.train()
        for idx in torch.arange(len(x)).split(64):
            opt.zero_grad()
            (-nn.functional.cross_entropy(model(x[idx]), y[idx])).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            if float((model(x).argmax(1) == y).double().mean()) <= target_accuracy:
                break
    return model.eval()


def unlearn_rows(x_m, y_m, x_n, y_n, forget: int, references: int):
    """Three candidate "unlearned" models against models retrained without the forget set: retrained itself
    (another seed), the original, and the original after gradient ascent on the forget set."""
    import copy

    from brittle.unlearning import unlearn_check

    f, r = (x_m[:forget], y_m[:forget]), (x_m[forget:], y_m[forget:])
    original = train_overfitted(x_m, y_m, seed=0)
    with torch.no_grad():
        test_accuracy = float((original(torch.as_tensor(x_n)).argmax(1) == torch.as_tensor(y_n)).double().mean())
    candidates = {"retrained without the forget set (seed 99)": train_overfitted(*r, seed=99),
                  "original (trained on everything)": original,
                  "original + gradient ascent on the forget set (Adam 1e-3, until forget accuracy <= test accuracy)":
                      _gradient_ascent(copy.deepcopy(original), *f, target_accuracy=test_accuracy)}
    return [(name, unlearn_check(m, f, r, (x_n, y_n), train_fn="privacy:train_overfitted",
                                 reference_models=references)) for name, m in candidates.items()]


if __name__ == "__main__":
    raise SystemExit(main())
