"""Device plumbing, tested on the CPU: the adapter owns device and dtype, tensors the attack code makes follow
the input's device, out-of-memory errors halve the batch, autocast never touches a verification."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import brittle
from brittle import UsageError
from brittle.model import ModelAdapter

SRC = Path(__file__).resolve().parents[1] / "src" / "brittle"
FACTORIES = {"zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint", "eye", "tensor", "linspace",
             "as_tensor"}


def test_attack_code_creates_every_tensor_on_a_named_device():
    """On a GPU, a tensor made without `device=` lands on the CPU and the next operation with a CUDA tensor fails.
    The attack code names a device for every tensor it makes (the input's, or the CPU for seeded draws)."""
    missing = []
    for path in sorted((SRC / "attacks").glob("*.py")) + [SRC / "smoothing.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "device" for k in node.keywords)):
                missing.append(f"{path.name}:{node.lineno} torch.{node.func.attr}")
    assert not missing, missing


def test_an_unavailable_device_is_a_usage_error(tiny_model, blobs):
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="sees no CUDA device"):
            brittle.audit(tiny_model, blobs, checks=["accuracy"], config={"model": {"device": "cuda"}})
    with pytest.raises(UsageError, match="must be auto, cpu, cuda, cuda:N or mps"):
        ModelAdapter(tiny_model, device="tpu")
    r = brittle.audit(tiny_model, blobs, checks=["accuracy"], config={"model": {"device": "cpu"}})
    assert r.run["device"] == "cpu"


class _SmallMemory(nn.Module):
    """Raises the device's out-of-memory error on batches larger than 16."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if len(x) > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x)


def test_out_of_memory_halves_the_batch_and_says_so(tiny_model, blobs, tmp_path):
    cfg = {"checks": ["accuracy", "calibration", "adversarial"],
           "adversarial": {"eps": 0.1, "max_samples": 40, "shard_size": 40, "steps": 5, "curve": False}}
    small = brittle.audit(_SmallMemory(tiny_model), blobs, config=cfg, out=tmp_path)
    plain = brittle.audit(tiny_model, blobs, config=cfg)
    assert small["accuracy"].metrics == plain["accuracy"].metrics
    assert small["calibration"].metrics["ece"] == pytest.approx(plain["calibration"].metrics["ece"], abs=1e-6)
    assert small["adversarial"].status == plain["adversarial"].status != "error"  # gradients in checkpointed chunks
    np.testing.assert_array_equal(small["adversarial"].arrays["robust"], plain["adversarial"].arrays["robust"])
    assert [n for n in small.run["notes"] if "out of memory" in n] == [
        "the device ran out of memory: batch size halved from 256 to 16 (gradients then come from chunks "
        "recomputed in the backward pass)"]
    assert "batch size halved" in (tmp_path / "report.html").read_text()


def test_autocast_never_changes_a_verified_number(tiny_model, blobs):
    cfg = {"checks": ["adversarial", "corruptions"], "corruptions": {"corruptions": ["gaussian_noise", "fog"]},
           "adversarial": {"eps": 0.1, "max_samples": 40, "steps": 5, "curve": False}}
    exact = brittle.audit(tiny_model, blobs, config=cfg)
    mixed = brittle.audit(tiny_model, blobs, config={**cfg, "model": {"autocast": "bf16"}})
    np.testing.assert_array_equal(exact["adversarial"].arrays["robust"], mixed["adversarial"].arrays["robust"])
    assert exact["adversarial"].metrics["robust_accuracy"] == mixed["adversarial"].metrics["robust_accuracy"]
    # corruptions ran its bulk forwards in bfloat16: close, not necessarily equal
    assert abs(exact["corruptions"].metrics["mean_corruption_accuracy"]
               - mixed["corruptions"].metrics["mean_corruption_accuracy"]) < 0.05
    with pytest.raises(UsageError, match="fp16 needs a GPU"):
        ModelAdapter(tiny_model, device="cpu", autocast="fp16")


def test_outputs_come_back_where_the_inputs_came_from(tiny_model):
    adapter = ModelAdapter(tiny_model, device="cpu")
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)  # another dtype: the adapter casts to the model's
    assert adapter.logits(x).dtype == torch.float32 and adapter.logits(x).device == x.device
    logits, grad = adapter.logits_and_grad(x.float(), lambda z: z[:, 0])
    assert grad.shape == x.shape and grad.device == x.device
