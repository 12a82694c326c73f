import numpy as np
import pytest
import torch

from brittle import InputError, UsageError, load_model
from brittle.loading.models import ModelSpec

from .conftest import TinyMLP


def test_torchscript_loads_and_matches(tmp_path, tiny_model, blobs):
    path = tmp_path / "m.ts"
    torch.jit.script(tiny_model).save(str(path))
    adapter = load_model(str(path))
    x = torch.from_numpy(blobs[0][:5])
    assert torch.allclose(adapter.logits(x), tiny_model(x), atol=1e-6)
    assert adapter.differentiable


def test_export_pt2_loads(tmp_path, tiny_model, blobs):
    x = torch.from_numpy(blobs[0][:4])
    ep = torch.export.export(tiny_model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, str(tmp_path / "m.pt2"))
    adapter = load_model(str(tmp_path / "m.pt2"))
    assert torch.allclose(adapter.logits(torch.from_numpy(blobs[0][:7])), tiny_model(torch.from_numpy(blobs[0][:7])), atol=1e-5)


def test_onnx_is_black_box(tmp_path, tiny_model, blobs):
    pytest.importorskip("onnxruntime")
    x = torch.from_numpy(blobs[0][:4])
    torch.onnx.export(tiny_model, (x,), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    adapter = load_model(str(tmp_path / "m.onnx"))
    assert not adapter.differentiable
    assert torch.allclose(adapter.logits(x), tiny_model(x), atol=1e-4)
    with pytest.raises(RuntimeError, match="black-box"):
        adapter.logits_and_grad(x, lambda z: z.sum(1))


def test_factory_with_state_dict_and_safetensors(tmp_path, tiny_model, blobs):
    torch.save(tiny_model.state_dict(), tmp_path / "w.pt")
    x = torch.from_numpy(blobs[0][:3])
    a = load_model(ModelSpec(factory="tests.conftest:TinyMLP", weights=str(tmp_path / "w.pt")))
    assert torch.allclose(a.logits(x), tiny_model(x), atol=1e-6)
    from safetensors.torch import save_file

    save_file(tiny_model.state_dict(), str(tmp_path / "w.safetensors"))
    b = load_model(ModelSpec(factory="tests.conftest:TinyMLP", weights=str(tmp_path / "w.safetensors")))
    assert torch.allclose(b.logits(x), tiny_model(x), atol=1e-6)


def test_factory_errors_are_clear(tmp_path, tiny_model):
    torch.save(TinyMLP(classes=5).state_dict(), tmp_path / "w5.pt")
    with pytest.raises(InputError, match="do not fit"):
        load_model(ModelSpec(factory="tests.conftest:TinyMLP", weights=str(tmp_path / "w5.pt")))
    with pytest.raises(UsageError, match="needs weights"):
        load_model(ModelSpec(factory="tests.conftest:TinyMLP"))
    with pytest.raises(UsageError, match="Cannot import"):
        load_model(ModelSpec(factory="no_such_pkg.mod:f", weights=str(tmp_path / "w5.pt")))


class _Boom:
    """Unpickling this runs os.system: the classic malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"w": _Boom(marker)}, evil)
    with pytest.raises(InputError, match="arbitrary code"):
        load_model(ModelSpec(factory="tests.conftest:TinyMLP", weights=str(evil)))
    assert not marker.exists()
    # A whole pickled module passed as a model file is refused too, with the way out.
    torch.save(TinyMLP(), tmp_path / "module.pt")
    with pytest.raises(InputError, match="does not unpickle"):
        load_model(str(tmp_path / "module.pt"))


def test_truncated_and_missing_model_files(tmp_path, tiny_model):
    path = tmp_path / "m.ts"
    torch.jit.script(tiny_model).save(str(path))
    (tmp_path / "cut.ts").write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputError, match="cut.ts"):
        load_model(str(tmp_path / "cut.ts"))
    with pytest.raises(InputError, match="no such model file"):
        load_model(str(tmp_path / "nope.ts"))


def test_adapter_never_modifies_the_callers_module(tiny_model, blobs):
    from brittle import ModelAdapter

    tiny_model.train()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    grads_before = [p.requires_grad for p in tiny_model.parameters()]
    adapter = ModelAdapter(tiny_model)
    adapter.logits_and_grad(torch.from_numpy(blobs[0][:4]), lambda z: z.sum(1))
    assert tiny_model.training
    assert [p.requires_grad for p in tiny_model.parameters()] == grads_before
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    tiny_model.eval()


def test_normalisation_lives_inside_the_adapter(blobs):
    from brittle import ModelAdapter

    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    a = ModelAdapter(lin, mean=[0.5], std=[0.25])
    x = torch.from_numpy(blobs[0][:4])
    assert torch.allclose(a.logits(x), lin((x - 0.5) / 0.25), atol=1e-6)
    np.testing.assert_equal(a.bounds, (0.0, 1.0))
