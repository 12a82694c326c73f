"""Writes tests/fixtures/attack_misses.pt: the points of issue 16's held-out rounds 1 and 2 that the original
AutoAttack broke and brittle's ensemble of that time did not, with their models (weights in float16, half the
size; the old ensemble still misses them on the rounded models and the present one breaks them, checked when the
fixture was made), so that tests/test_attack_regressions.py keeps them broken without the bench cache.

    python bench/attack_regressions.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _mnist import split  # noqa: E402
from _suite import SUITE  # noqa: E402

MISSES = {"CNN with BatchNorm": ("cnn_bn", [24, 33, 76, 116]),
          "PGD-trained CNN, eps 0.3, seed 1": ("demo_cnn", [152, 181]),
          "PGD-trained CNN, eps 0.3, seed 2": ("demo_cnn", [24]),  # 118: still missed (see benchmarks.md)
          # held-out round 2's misses that the near-boundary restarts break in the suite. PGD 0.3 seed 3's 7 and 49
          # are left out: coin flips (they cross on about every other start), not broken alone on the rounded
          # model; its 23 is still missed.
          "CNN with BatchNorm, seed 1": ("cnn_bn", [1])}
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "attack_misses.pt"


def main() -> int:
    _, (x_test, y_test) = split()
    cases = []
    for case in SUITE:
        if case.name not in MISSES:
            continue
        arch, idx = MISSES[case.name]
        weights = {k: v.half() if v.is_floating_point() else v for k, v in case.build().state_dict().items()}
        cases.append({"name": case.name, "architecture": arch, "norm": case.norm, "eps": case.eps,
                      "test_index": torch.tensor(idx), "x": (x_test[idx] * 255).round().to(torch.uint8),
                      "y": y_test[idx], "state_dict": weights})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cases, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
