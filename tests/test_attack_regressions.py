"""Points the original AutoAttack broke and brittle's ensemble once missed (issue 16, held-out rounds 1 and 2) stay
broken by the default `adversarial` check. Models and points: tests/fixtures/attack_misses.pt, written by
bench/attack_regressions.py (float16 weights; the old ensemble still misses these points on them)."""

from pathlib import Path

import pytest
import torch
from torch import nn

from brittle import audit
from brittle.demo.model import DemoCNN

CASES = torch.load(Path(__file__).parent / "fixtures" / "attack_misses.pt", weights_only=True)


def _cnn_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 5, padding=2), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_a_point_only_autoattack_broke_once_stays_broken(case):
    model = {"cnn_bn": _cnn_bn, "demo_cnn": DemoCNN}[case["architecture"]]()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in case["state_dict"].items()})
    x, y = case["x"].float() / 255, case["y"]
    r = audit(model.eval(), (x, y), checks=["adversarial"],
              config={"adversarial": {"norm": case["norm"], "eps": case["eps"]}})["adversarial"]
    assert r.metrics["clean_accuracy"] == 1.0
    still_robust = case["test_index"][torch.from_numpy(r.arrays["robust"])].tolist()
    assert still_robust == [], f"{case['name']}: test points {still_robust} are robust again"
