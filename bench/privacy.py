"""Membership inference on MNIST-5k: brittle's memorization check (loss threshold, LiRA offline and online) beside
privacy-meter's and ART's membership attacks, in one run, on an overfitted and a regularised model.

    pip install -c constraints.txt -e ".[bench,bench-privacy]"
    python bench/privacy.py [--members 1500] [--non-members 1500] [--references 16]

Each target model (an MLP 784-256-10) is trained on `--members` of the 4,000 training digits; the non-members are
the 1,000 test digits and then, up to `--non-members`, training digits no target saw (the same distribution);
the training digits left over are the population privacy-meter's attacks draw on. overfitted: 60 epochs, no
regularisation; regularised: 8 epochs, weight decay 5e-3 and label smoothing 0.1.

- brittle's LiRA trains `--references` reference models with the target's own recipe (through the check's
  `train_fn`, here this file's functions), each on a random half of the pool (members and non-members): with as
  many of each, a half is the size of the target's training set.
- privacy-meter 1.0.1 (`pip install -c constraints.txt -e ".[bench,bench-privacy]"`, its own environment: it
  imports tensorflow and opacus): its population attack (the target's loss against the population's loss
  quantiles), its class-wise population attack, and its reference attack (per-example thresholds from as many
  reference models, trained with the same recipe on random `--members`-sized samples of the population), with
  its default threshold (quantiles of the reference losses) and with a Gaussian fitted to the logit-rescaled
  losses (its `logit_rescale_threshold_func`, offline LiRA's form). Each
  is run at 600 FPR tolerances from 1e-12 to 1; an example's score is the smallest tolerance at which the attack
  calls it a member, so its ROC is read like the others'. Skipped, with a message, when it does not import.
- ART's `MembershipInferenceBlackBox` (a learned attack on the model's probabilities and the label) is
  cross-fitted: fitted on one random half of the members and non-members it scores the other, and the other way
  round.

Every attack is evaluated on the whole pool (with 1,500 non-members, 0.1% FPR is 1.5 false positives: resolved).

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


def art_scores(model, x_m, y_m, x_n, y_n, fold: np.ndarray) -> np.ndarray:
    """ART's black-box membership attack, cross-fitted: each example's membership probability from the attack
    fitted on the other fold (`fold`: a boolean per pool example)."""
    from art.attacks.inference.membership_inference import MembershipInferenceBlackBox
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x_m.shape[1:]), nb_classes=10,
                            clip_values=(0.0, 1.0))
    x = np.concatenate([x_m, x_n])
    y = np.concatenate([y_m, y_n])
    member = np.r_[np.ones(len(x_m), bool), np.zeros(len(x_n), bool)]
    out = np.empty(len(x))
    for part in (fold, ~fold):
        np.random.seed(0)  # its random forest draws from numpy's global generator: seeded, the run repeats
        attack = MembershipInferenceBlackBox(clf, attack_model_type="rf")
        attack.fit(x[part & member], y[part & member], x[part & ~member], y[part & ~member])
        scored = np.asarray(attack.infer(x[~part], y[~part], probabilities=True))
        out[~part] = scored.reshape(int((~part).sum()), -1)[:, -1]
    return out


def privacy_meter_scores(model, train_fn, members, non_members, population, references: int,
                         seed: int = 0) -> dict[str, np.ndarray]:
    """privacy-meter 1.0.1's population, class-wise population and reference attacks on the pool (members first).
    Score: minus the smallest FPR tolerance (of 600, log-spaced from 1e-12) at which the attack calls the example
    a member."""
    from privacy_meter.dataset import Dataset
    from privacy_meter.hypothesis_test import linear_itp_threshold_func, logit_rescale_threshold_func
    from privacy_meter.information_source import InformationSource
    from privacy_meter.information_source_signal import ModelLoss
    from privacy_meter.metric import GroupPopulationMetric, PopulationMetric, ReferenceMetric
    from privacy_meter.model import PytorchModelTensor

    def split(x, y):
        return {"x": torch.as_tensor(x), "y": torch.as_tensor(y, dtype=torch.long), "g": np.asarray(y)}

    def wrap(m):
        return PytorchModelTensor(model_obj=m, loss_fn=nn.CrossEntropyLoss(), batch_size=500)

    target_data = Dataset({"train": split(*members), "test": split(*non_members)}, "x", "y", default_group="g")
    population_data = Dataset({"train": split(*population)}, "x", "y", default_group="g")
    target = InformationSource(models=[wrap(model)], datasets=[target_data])
    on_population = InformationSource(models=[wrap(model)], datasets=[population_data])
    g = np.random.default_rng(seed)
    size = len(members[0])
    refs = []
    for k in range(references):  # the target's recipe on random population samples of the target's size
        idx = g.choice(len(population[0]), size=size, replace=False)
        refs.append(wrap(train_fn(population[0][idx], population[1][idx], seed=1000 + k)))
    reference = InformationSource(models=refs, datasets=[target_data])
    alphas = np.r_[0.0, np.logspace(-12, 0, 600)]
    attacks = {"population": PopulationMetric(target, on_population, [ModelLoss()], linear_itp_threshold_func),
               "population by class": GroupPopulationMetric(target, on_population, [ModelLoss()],
                                                            linear_itp_threshold_func),
               "reference": ReferenceMetric(target, reference, [ModelLoss()], linear_itp_threshold_func),
               # per example, a Gaussian fitted to the reference models' logit-rescaled losses (offline LiRA's form)
               "reference, Gaussian": ReferenceMetric(target, reference, [ModelLoss()], logit_rescale_threshold_func)}
    out = {}
    for name, metric in attacks.items():
        metric.prepare_metric()
        with np.errstate(invalid="ignore", over="ignore"):  # the Gaussian's threshold at tolerance 0 is NaN: no one
            called = np.asarray(metric.run_metric(fpr_tolerance_rate_list=alphas)[0].predicted_labels, bool)
        first = np.where(called.any(0), called.argmax(0), len(alphas))  # predictions are monotone in the tolerance
        out[f"privacy-meter {name}"] = -np.r_[alphas, 2.0][first]
    return out


def interval(scores: np.ndarray, member: np.ndarray, fpr: float, resamples: int = 400) -> tuple[float, float]:
    """95% bootstrap interval of the TPR at `fpr` (members and non-members resampled separately)."""
    g = np.random.default_rng(0)
    pos, neg = np.flatnonzero(member), np.flatnonzero(~member)
    t = [roc(scores[idx], member[idx]).tpr_at[fpr] for idx in
         (np.r_[g.choice(pos, len(pos)), g.choice(neg, len(neg))] for _ in range(resamples))]
    return float(np.quantile(t, 0.025)), float(np.quantile(t, 0.975))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=1500)
    ap.add_argument("--non-members", type=int, default=1500, help="the 1,000 test digits, then unused training digits")
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
    unused = len(x_all) - args.members  # training digits no target trains on
    if args.non_members > len(x_test) + unused:
        ap.error(f"--non-members: at most {len(x_test) + unused} with --members {args.members}")
    x_n = torch.cat([x_test, x_all[args.members:]])[: args.non_members].numpy()
    y_n = torch.cat([y_test, y_all[args.members:]])[: args.non_members].numpy()
    n = len(x_n)
    used = args.members + max(0, n - len(x_test))  # training digits taken as members or non-members
    population = (x_all[used:].numpy(), y_all[used:].numpy())
    try:
        import privacy_meter  # noqa: F401
    except ImportError as e:
        print(f"privacy-meter not run: {e} (pip install -c constraints.txt -e '.[bench-privacy]')")
        run_privacy_meter = False
    else:
        run_privacy_meter = True
    member = np.r_[np.ones(len(x_m), bool), np.zeros(n, bool)]
    fold = np.random.default_rng(1).random(len(member)) < 0.5  # ART's cross-fitting folds
    print(f"members {len(x_m)} ({flipped.sum()} labels flipped), non-members {n} (0.1% FPR = {n / 1000:g} false "
          f"positives); every attack evaluated on all of them, ART's cross-fitted on two folds\n", flush=True)
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
        scores["ART black-box (rf)"] = art_scores(model, x_m, y_m, x_n, y_n, fold)
        art_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        if run_privacy_meter:
            scores.update(privacy_meter_scores(model, fn, (x_m, y_m), (x_n, y_n), population, args.references))
        pm_seconds = time.perf_counter() - t0
        for attack, s in scores.items():
            rows.append((name, acc, attack, roc(s, member), interval(s, member, 0.001), interval(s, member, 0.01)))
        memo = r.arrays["memorisation"]
        top = np.argsort(-memo)[:100]
        print(f"{name}: non-member accuracy {acc:.3f}; brittle {seconds:.0f} s ({args.references} reference models), "
              f"ART {art_seconds:.0f} s, privacy-meter {pm_seconds:.0f} s ({len(population[0])} population digits); "
              f"flipped share of the 100 most memorised: {flipped[top].mean():.2f} (base rate {flipped.mean():.2f}); "
              f"TRAK self-influence agreement {r.details['proxy_agreement']}",
              flush=True)
    unlearning = unlearn_rows(x_m, y_m, x_n, y_n, args.forget, args.unlearn_references)
    print("\n| model | non-member acc | attack | TPR @ 0.1% FPR (95% interval) | TPR @ 1% FPR (95% interval) | AUC | "
          "balanced acc |")
    print("|---|---|---|---|---|---|---|")
    for name, acc, attack, res, low, one in rows:
        print(f"| {name} | {acc:.3f} | {attack} | {res.tpr_at[0.001]:.4f} ({low[0]:.4f}-{low[1]:.4f}) | "
              f"{res.tpr_at[0.01]:.3f} ({one[0]:.3f}-{one[1]:.3f}) | {res.auc:.3f} | {res.balanced_accuracy:.3f} |")
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
