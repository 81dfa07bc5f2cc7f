"""Every kind of source builds: ONNX, torch.export .pt2, a Python factory; shapes can be overridden."""

import numpy as np
import pytest
import torch

from edgellm import api, runtime
from edgellm.errors import EdgeError
from edgellm.runtime.accuracy import compare
from tests.conftest import ROOT


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, image):
        return self.fc(torch.relu(self.conv(image)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    torch.onnx.export(Tiny().eval(), (torch.randn(1, 3, 16, 16),), str(path), input_names=["image"], output_names=["scores"],
                      dynamic_axes={"image": {0: "batch"}}, dynamo=False)
    return path


def test_onnx_file_with_a_dynamic_batch_needs_and_takes_an_input_shape(tiny_onnx, tmp_path):
    with pytest.raises(EdgeError, match=r"input 'image' has a dynamic shape.*--input-shape image=Nx3x16x16"):
        api.build(str(tiny_onnx), "host", tmp_path / "a.edgepkg")
    result = api.build(str(tiny_onnx), "host", tmp_path / "a.edgepkg", input_shapes=["image=2x3x16x16"])
    model = runtime.load(result.path)
    assert model.inputs[0].shape == (2, 3, 16, 16) and model.outputs[0].name == "scores"
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = Tiny().eval()(torch.from_numpy(x)).numpy()
    assert compare(expected, model(x))["rel_max_abs"] <= 1e-4


def test_pt2_program(tmp_path):
    path = tmp_path / "tiny.pt2"
    x = torch.randn(1, 3, 16, 16)
    torch.export.save(torch.export.export(Tiny().eval(), (x,)), str(path))
    result = api.build(str(path), "host", tmp_path / "t.edgepkg")
    model = runtime.load(result.path)
    with torch.no_grad():
        expected = Tiny().eval()(x).numpy()
    assert compare(expected, model(x.numpy()))["rel_max_abs"] <= 1e-4
    assert result.manifest["source"]["kind"] == "pt2"


def test_python_factory_example(tmp_path):
    result = api.build(f"{ROOT}/examples/kws/model.py:build", "host", tmp_path / "k.edgepkg")
    assert result.manifest["source"]["kind"] == "factory"
    assert result.manifest["verification"]["status"] == "passed"
    assert runtime.load(result.path).check_reference()["rel_max_abs"] <= 1e-4


def test_input_shape_override_on_a_torch_model(tmp_path):
    result = api.build("zoo:kws-cnn", "host", tmp_path / "k.edgepkg", input_shapes=["features=1x1x98x40"])
    assert result.manifest["inputs"][0]["shape"] == [1, 1, 98, 40]
    assert result.manifest["verification"]["rel_max_abs"] <= 1e-4


def test_factory_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n"
                   "def raises():\n    raise RuntimeError('weights file missing')\n"
                   "def wrong():\n    return 42\n"
                   "def not_module():\n    return 'model', (torch.zeros(1),)\n")
    for fn, message in [("raises", "raised RuntimeError: weights file missing"), ("wrong", "returned a int"),
                        ("not_module", "returned a str where a torch.nn.Module belongs"), ("nothere", "has no function 'nothere'")]:
        with pytest.raises(EdgeError, match=message):
            api.build(f"{bad}:{fn}", "host", tmp_path / "x.edgepkg")
    assert not (tmp_path / "x.edgepkg").exists()


def test_corrupt_and_missing_model_files(tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(EdgeError, match="is not a valid ONNX model"):
        api.build(str(tmp_path / "broken.onnx"), "host", tmp_path / "x.edgepkg")
    (tmp_path / "broken.pt2").write_bytes(b"nope")
    with pytest.raises(EdgeError, match="is not a torch.export program"):
        api.build(str(tmp_path / "broken.pt2"), "host", tmp_path / "x.edgepkg")
    with pytest.raises(EdgeError, match="does not exist"):
        api.build(str(tmp_path / "absent.onnx"), "host", tmp_path / "x.edgepkg")
    with pytest.raises(EdgeError, match="unknown zoo model 'nope'.*kws-cnn"):
        api.build("zoo:nope", "host", tmp_path / "x.edgepkg")


def test_unsupported_torch_op_is_named_with_its_node(tmp_path):
    factory = tmp_path / "det.py"
    factory.write_text("import torch\nclass Det(torch.nn.Module):\n    def forward(self, x):\n        return torch.linalg.det(x)\n"
                       "def build():\n    return Det(), (torch.randn(2, 3, 3),)\n")
    with pytest.raises(EdgeError, match=r"TVM cannot import op _linalg_det.default \(node linalg_det\)"):
        api.build(f"{factory}:build", "host", tmp_path / "x.edgepkg")


def test_unsupported_onnx_op_is_named_with_its_node(tmp_path):
    import onnx.helper as h

    graph = h.make_graph([h.make_node("Det", ["x"], ["y"], name="my_det")], "g",
                         [h.make_tensor_value_info("x", 1, [3, 3])], [h.make_tensor_value_info("y", 1, [])])
    import onnx

    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8), str(tmp_path / "det.onnx"))
    with pytest.raises(EdgeError, match=r"TVM cannot import op Det \(node my_det\)"):
        api.build(str(tmp_path / "det.onnx"), "host", tmp_path / "x.edgepkg")


def test_wrong_backend_for_target(tmp_path):
    with pytest.raises(EdgeError, match="unknown backend 'tensorrt'"):
        api.build("zoo:kws-cnn", "x86_64", tmp_path / "x.edgepkg", backend="tensorrt")
    with pytest.raises(EdgeError, match="target rpi4 does not allow backend 'openvino'"):
        api.build("zoo:kws-cnn", "rpi4", tmp_path / "x.edgepkg", backend="openvino")


def test_interrupted_build_leaves_no_package(tmp_path, monkeypatch):
    """Ctrl-C in the middle of packaging: no .edgepkg, no temp file."""
    import edgellm.package as package

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(package, "npz_bytes", interrupt)
    monkeypatch.setattr(api, "npz_bytes", interrupt)
    with pytest.raises(KeyboardInterrupt):
        api.build("zoo:kws-cnn", "host", tmp_path / "k.edgepkg")
    assert list(tmp_path.iterdir()) == []
