"""The memorization check: membership inference (loss threshold, LiRA) and memorisation scores, on digits MLPs
trained here; and the privacy module's metrics against their definitions."""

import numpy as np
import pytest
import torch
from torch import nn

import brittle
from brittle.privacy import lira_offline, lira_online, logit_confidence, memorisation, roc

MEMBERS, NON_MEMBERS = 300, 300


def _digits(seed: int = 0, flip: float = 0.0):
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    x = (d.images[order] / 16.0).astype(np.float32)[:, None]
    y = d.target[order].astype(np.int64)
    x_tr, y_tr, x_te, y_te = x[:MEMBERS], y[:MEMBERS].copy(), x[MEMBERS: MEMBERS + NON_MEMBERS], y[MEMBERS: MEMBERS + NON_MEMBERS]
    flipped = np.zeros(MEMBERS, bool)
    if flip:
        flipped[np.random.default_rng(seed + 1).choice(MEMBERS, int(flip * MEMBERS), replace=False)] = True
        y_tr[flipped] = (y_tr[flipped] + 1 + np.random.default_rng(seed + 2).integers(0, 9, flipped.sum())) % 10
    return x_tr, y_tr, x_te, y_te, flipped


def _fit(x, y, *, seed: int, steps: int, weight_decay: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=weight_decay)
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def train_overfit(x, y, *, seed: int) -> nn.Module:
    """`[memorization] train_fn` of these tests (tests.test_memorization:train_overfit): trained to fit every label."""
    return _fit(x, y, seed=seed, steps=300)


def train_regularised(x, y, *, seed: int) -> nn.Module:
    return _fit(x, y, seed=seed, steps=40, weight_decay=0.05)


def _audit(train_fn: str | None, *, flip: float, regularised: bool = False):
    x_tr, y_tr, x_te, y_te, flipped = _digits(flip=flip)
    model = (train_regularised if regularised else train_overfit)(x_tr, y_tr, seed=0)
    cfg = {"memorization": {"reference_models": 8, "proj_dim": 128}}
    if train_fn:
        cfg["memorization"]["train_fn"] = train_fn
    r = brittle.audit(model, (x_te, y_te), train_data=(x_tr, y_tr), checks=["memorization"], config=cfg)
    return r["memorization"], flipped


@pytest.fixture(scope="module")
def overfit_with_references():
    return _audit("tests.test_memorization:train_overfit", flip=0.1)


def test_lira_beats_the_loss_threshold_at_low_false_positive_rates(overfit_with_references):
    r, _ = overfit_with_references
    attacks = r.details["attacks"]
    assert r.status in ("warn", "fail") and r.findings[0].id == "memorization.membership-leak"
    population, online = attacks["population"], attacks["lira_online"]
    assert online["tpr_at_1pct_fpr"] >= 2 * max(population["tpr_at_1pct_fpr"], 0.01)
    assert r.details["strongest"] in ("lira_online", "lira_offline")
    assert r.metrics["membership_tpr_1pct_fpr"] == max(a["tpr_at_1pct_fpr"] for a in attacks.values())
    assert len(r.arrays["score_lira_online"]) == MEMBERS + NON_MEMBERS


def test_flipped_labels_are_the_most_memorised(overfit_with_references):
    r, flipped = overfit_with_references
    memo = r.arrays["memorisation"]
    top = np.argsort(-memo)[:30]
    assert flipped[top].mean() >= 0.5  # 10% of the labels, at least half of the 30 most memorised
    shown = r.arrays["example_index"]
    assert flipped[shown[:8]].mean() >= 0.5 and r.details["reference_models"] == 8
    assert r.details["proxy_agreement"] is not None and r.details["proxy_agreement"] > 0.2  # TRAK agrees


def test_a_regularised_model_leaks_less_and_no_train_fn_still_gives_the_population_attack():
    overfit, _ = _audit(None, flip=0.0)
    regular, _ = _audit(None, flip=0.0, regularised=True)
    assert set(overfit.details["attacks"]) == {"population"} and overfit.details["reference_models"] == 0
    assert overfit.details["memorisation_source"] == "TRAK self-influence" and "memorisation" in overfit.arrays
    for key in ("auc", "balanced_accuracy"):
        assert regular.details["attacks"]["population"][key] < overfit.details["attacks"]["population"][key]


def test_roc_matches_its_definition_and_sklearn():
    from sklearn.metrics import roc_auc_score

    g = np.random.default_rng(0)
    member = g.random(2000) < 0.5
    scores = g.normal(size=2000) + 1.5 * member
    r = roc(scores, member)
    assert abs(r.auc - roc_auc_score(member, scores)) < 1e-12
    threshold = np.sort(scores[~member])[::-1][9]  # 10 of 1,000-odd non-members above: FPR just under 1%
    admitted = scores > threshold
    assert r.tpr_at[0.01] >= admitted[member].mean() - 1e-12
    assert (r.fpr[1:] >= r.fpr[:-1]).all() and (r.tpr[1:] >= r.tpr[:-1]).all()
    with pytest.raises(ValueError):
        roc(scores, np.ones(2000, bool))


def test_lira_scores_and_memorisation_on_known_gaussians():
    """Members' confidence is N(2, 1) under models that trained on them, N(0, 1) otherwise: the online score is
    the exact likelihood ratio, memorisation recovers the shift, and logit_confidence is log(p / (1 - p))."""
    g = np.random.default_rng(1)
    k, n = 64, 400
    included = np.argsort(g.random((k, n)), axis=0) < k // 2
    shift = np.where(np.arange(n) < n // 2, 2.0, 0.5)
    ref = g.normal(size=(k, n)) + included * shift
    target = g.normal(size=n) + shift * (np.arange(n) % 2 == 0)  # even examples are members of the target
    member = np.arange(n) % 2 == 0
    assert roc(lira_online(target, ref, included), member).auc > roc(target, member).auc
    assert roc(lira_offline(target, ref, included), member).auc > 0.6
    assert np.abs(memorisation(ref, included) - shift).mean() < 0.3
    z = g.normal(size=(5, 3))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([0, 1, 2, 0, 1])
    assert np.allclose(logit_confidence(z, y), np.log(p[np.arange(5), y] / (1 - p[np.arange(5), y])))


def test_the_report_marks_memorised_examples_that_label_errors_flagged(tmp_path):
    from tests.conftest import check_report_html

    x_tr, y_tr, x_te, y_te, flipped = _digits(flip=0.1)
    model = train_overfit(x_tr, y_tr, seed=0)
    r = brittle.audit(model, (x_te, y_te), train_data=(x_tr, y_tr), checks=["memorization", "label_errors"],
                      config={"memorization": {"proj_dim": 128}}, out=tmp_path / "audit")
    html = (tmp_path / "audit" / "report.html").read_text()
    check_report_html(html)
    flagged = set(r["label_errors"].arrays["train_index"][r["label_errors"].arrays["flagged"]].tolist())
    shown = [int(i) for i in r["memorization"].arrays["example_index"]]
    marked = [i for i in shown if f"train #{i}: labelled" in html and i in flagged]
    assert "flagged by the label_errors check" in html and marked  # the two checks' verdicts meet in the report
    assert all(f"train #{i}: labelled" in html for i in shown)


def test_reference_models_are_reused_from_the_cache_by_an_audit_of_another_model(tmp_path):
    """Reference models do not depend on the audited model: a second audit (another model of the same recipe)
    reads them from `reference_cache`; another seed of the audit trains new ones."""
    x_tr, y_tr, x_te, y_te, _ = _digits()
    cfg = {"memorization": {"reference_models": 4, "proj_dim": 64, "members": 100, "non_members": 100,
                            "train_fn": "tests.test_memorization:train_regularised",
                            "reference_cache": str(tmp_path / "reference")}}
    runs = [brittle.audit(train_regularised(x_tr, y_tr, seed=s), (x_te, y_te), train_data=(x_tr, y_tr),
                          checks=["memorization"], config={**cfg, "seed": audit_seed})["memorization"]
            for s, audit_seed in ((0, 0), (1, 0), (1, 1))]
    assert [r.details["reference_models_reused"] for r in runs] == [0, 4, 0]
    assert len(list((tmp_path / "reference").glob("*.npz"))) == 8
    assert runs[0].details["attacks"]["lira_online"] != runs[1].details["attacks"]["lira_online"]  # other targets
