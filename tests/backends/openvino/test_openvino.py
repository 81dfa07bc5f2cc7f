"""The OpenVINO backend: zoo models and ONNX files build to OpenVINO IR packages that match the fp32 reference,
profile per op, load with OpenVINO's runtime alone, and refuse targets and ops it cannot serve in one line."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("openvino")

import torch  # noqa: E402

from edgellm import api, runtime, zoo  # noqa: E402
from edgellm.errors import EdgeError  # noqa: E402
from edgellm.runtime.accuracy import compare  # noqa: E402
from tests.conftest import ROOT, import_blocker  # noqa: E402

TOLERANCE = 1e-4  # max |error| relative to the output's scale, max(1, max|ref|)


@pytest.fixture(scope="module", autouse=True)
def _own_cache(tmp_path_factory):
    """OpenVINO's model cache in a fresh folder, so the tests see first loads and cached loads of their own."""
    old = os.environ.get("EDGELLM_CACHE")
    os.environ["EDGELLM_CACHE"] = str(tmp_path_factory.mktemp("edgellm-cache"))
    yield
    if old is None:
        os.environ.pop("EDGELLM_CACHE", None)
    else:
        os.environ["EDGELLM_CACHE"] = old


@pytest.fixture(scope="module")
def kws_ov(packages):
    return packages("kws-cnn", backend="openvino")


def test_fresh_inputs_agree_too(kws_ov):
    spec = zoo.build("kws-cnn")
    model = runtime.load(kws_ov, threads=2)
    for seed in (1, 2):
        x = np.random.default_rng(seed).standard_normal((1, 1, 49, 40)).astype(np.float32)
        with torch.no_grad():
            expected = spec.module(torch.from_numpy(x)).numpy()
        got = model(x)
        assert compare(expected, got)["rel_max_abs"] <= TOLERANCE
        got[...] = 0  # outputs are the caller's copies: the next run is unaffected
    assert compare(expected, model(x))["rel_max_abs"] <= TOLERANCE


def test_manifest_describes_the_ir(kws_ov):
    m = api.inspect(kws_ov)
    backend = m["backend"]
    assert backend["name"] == "openvino" and backend["precision"] == "f32" and backend["device"] == "CPU"
    assert backend["openvino"] == "2026.4.1" and m["runtime_requires"] == ["openvino==2026.4.1", "numpy"]
    assert backend["input_names"] == ["features"] and backend["output_names"] == ["logits"]
    assert {"model.xml", "model.bin", "reference.npz"} <= set(m["files"])
    assert m["recipe"]["backend"] == "openvino"


def test_cached_load_gives_the_same_answers(kws_ov, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))
    first = runtime.load(kws_ov, threads=1)
    blobs = list((tmp_path / "ov-cache").glob("*.blob"))
    assert blobs, "OpenVINO wrote no cache blob"
    second = runtime.load(kws_ov, threads=1)
    assert sorted((tmp_path / "ov-cache").glob("*.blob")) == sorted(blobs)  # a hit, not a new entry
    x = second.example_inputs()
    np.testing.assert_array_equal(first.run(**x)["logits"], second.run(**x)["logits"])
    assert second.check_reference()["rel_max_abs"] <= TOLERANCE


def test_per_op_profile(kws_ov):
    model = runtime.load(kws_ov, threads=2)
    report = model.profile(runs=5, per_op=True)
    rows = report["per_op"]
    assert rows and report["backend"] == "openvino"
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert all(r["ms"] >= 0 and r["calls"] >= 1 for r in rows)
    assert any(r["name"].startswith(("Convolution:", "FullyConnected:")) for r in rows)
    # profiling uses its own compiled model: plain runs still agree afterwards
    assert model.check_reference()["rel_max_abs"] <= TOLERANCE


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, image, bias):
        h = torch.relu(self.conv(image)).mean(dim=(2, 3))
        return self.fc(h) + bias, h


def test_onnx_source(tmp_path):
    path = tmp_path / "tiny.onnx"
    module = Tiny().eval()
    torch.onnx.export(module, (torch.randn(1, 3, 16, 16), torch.randn(1, 5)), str(path), input_names=["image", "bias"],
                      output_names=["scores", "features"], dynamic_axes={"image": {0: "batch"}}, dynamo=False)
    result = api.build(str(path), "host", tmp_path / "tiny.edgepkg", backend="openvino", input_shapes=["image=2x3x16x16"])
    assert result.manifest["source"]["kind"] == "onnx" and result.manifest["verification"]["status"] == "passed"
    model = runtime.load(result.path)
    assert [s.name for s in model.inputs] == ["image", "bias"] and [s.name for s in model.outputs] == ["scores", "features"]
    assert model.inputs[0].shape == (2, 3, 16, 16)
    rng = np.random.default_rng(3)
    x, b = rng.standard_normal((2, 3, 16, 16)).astype(np.float32), rng.standard_normal((1, 5)).astype(np.float32)
    with torch.no_grad():
        scores, features = (t.numpy() for t in module(torch.from_numpy(x), torch.from_numpy(b)))
    got = model.run(bias=b, image=x)
    assert compare(scores, got["scores"])["rel_max_abs"] <= TOLERANCE
    assert compare(features, got["features"])["rel_max_abs"] <= TOLERANCE


def test_target_it_cannot_serve_is_one_line(tmp_path):
    target = json.dumps({"name": "jetson-gpu", "description": "a GPU", "arch": "aarch64", "tvm": {"kind": "cuda"},
                         "backends": ["tvm", "openvino"]})
    with pytest.raises(EdgeError, match="target jetson-gpu is 'cuda'") as info:
        api.build("zoo:kws-cnn", target, tmp_path / "g.edgepkg", backend="openvino")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "g.edgepkg").exists()


def test_target_that_does_not_allow_it(tmp_path):
    with pytest.raises(EdgeError, match="target arm64 does not allow backend 'openvino'"):
        api.build("zoo:kws-cnn", "arm64", tmp_path / "a.edgepkg", backend="openvino")


class Det(torch.nn.Module):
    def forward(self, x):
        return torch.linalg.det(x) + 1


def test_unconvertible_op_is_named(tmp_path):
    path = tmp_path / "det.pt2"
    torch.export.save(torch.export.export(Det(), (torch.randn(2, 4, 4),)), str(path))
    with pytest.raises(EdgeError, match=r"OpenVINO has no conversion rule for op aten\._linalg_det\.default \(node .*linalg_det") as info:
        api.build(str(path), "host", tmp_path / "det.edgepkg", backend="openvino")
    assert "\n" not in str(info.value)


PURE = import_blocker("torch", "onnx", "onnxruntime", "click", "rich", "tvm", "edgellm.api", "edgellm.backends", "edgellm.cli",
                      "openvino.tools", "openvino.frontend.pytorch", "openvino.frontend.onnx") + r"""
import json, re
import edgellm.runtime as rt
m = rt.load(sys.argv[1], threads=1)
check = m.check_reference()
report = m.profile(runs=3, warmup=1, per_op=True)
maps = open("/proc/self/maps").read()
print(json.dumps({"error": check["rel_max_abs"], "ops": len(report["per_op"]),
                  "libs": sorted(set(re.findall(r"libopenvino\w*", maps))),
                  "heavy": sorted({k.split(".")[0] for k in sys.modules} & {"torch", "onnx", "onnxruntime", "tvm", "click", "rich"})}))
"""


def test_runtime_needs_only_openvino_runtime(kws_ov):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "EDGELLM_CACHE": os.environ["EDGELLM_CACHE"]}
    proc = subprocess.run([sys.executable, "-c", PURE, str(kws_ov)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] <= TOLERANCE and result["ops"] > 0
    assert result["heavy"] == []
    assert not [lib for lib in result["libs"] if re.search(r"pytorch|onnx|tensorflow|paddle", lib)], result["libs"]


NO_OPENVINO = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("no openvino here")
sys.meta_path.insert(0, Block())
import edgellm.runtime as rt
from edgellm.errors import EdgeError
try:
    rt.load(sys.argv[1])
except EdgeError as e:
    print("EDGEERROR", e)
"""


def test_missing_openvino_says_what_to_install(kws_ov):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", NO_OPENVINO, str(kws_ov)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "EDGEERROR this package needs OpenVINO's runtime (openvino==2026.4.1) (pip install openvino==2026.4.1)" in proc.stdout
