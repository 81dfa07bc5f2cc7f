"""``edgellm quantize``: a QDQ ONNX model with int8 weights that ONNX Runtime runs and that agrees with fp32."""

import json

import numpy as np
import onnx
import pytest

from edgellm import zoo
from edgellm.compress.onnx_int8 import quantize_onnx, run_int8_onnx
from edgellm.errors import EdgeError
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def kws_int8(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "kws-int8.onnx"
    return out, quantize_onnx("zoo:kws-cnn", out, "random")


def test_quantized_model_has_int8_weights_and_qdq_pairs(kws_int8):
    path, report = kws_int8
    model = onnx.load(str(path))
    assert report["QuantizeLinear"] > 0 and report["DequantizeLinear"] >= report["QuantizeLinear"]
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert len(int8) == report["int8_weight_tensors"] >= 5  # the conv / linear weights are stored as int8
    assert report["int8_bytes"] < 0.6 * report["fp32_bytes"]


def test_quantized_model_agrees_with_fp32(kws_int8):
    path, report = kws_int8
    stats = next(iter(report["evaluation"]["outputs"].values()))  # kws-cnn has one output
    assert stats["cosine_mean"] >= 0.99, stats
    x = np.random.default_rng(3).standard_normal((1, 1, 49, 40)).astype(np.float32)
    import torch

    with torch.no_grad():
        expected = zoo.build("kws-cnn").module(torch.from_numpy(x)).numpy()
    got = run_int8_onnx(path, {"features": x})[0]
    cos = float((expected * got).sum() / np.linalg.norm(expected) / np.linalg.norm(got))
    assert cos >= 0.99 and not np.array_equal(got, expected)  # close, and really quantized


def test_cli_json_and_bad_output(tmp_path):
    bad = run_cli("quantize", "zoo:kws-cnn", "--calib", "random", "-o", str(tmp_path / "kws.edgepkg"))
    assert bad.returncode == 2 and "should end in .onnx" in bad.stderr and not list(tmp_path.iterdir())
    missing = run_cli("quantize", "zoo:kws-cnn", "--calib", str(tmp_path / "nope"), "-o", str(tmp_path / "k.onnx"))
    assert missing.returncode == 2 and "nope" in missing.stderr and not list(tmp_path.iterdir())
    ok = run_cli("quantize", "zoo:kws-cnn", "--calib", "random", "-o", str(tmp_path / "k.onnx"), "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["output"] == str(tmp_path / "k.onnx") and (tmp_path / "k.onnx").is_file()


def test_output_folder_must_exist(tmp_path):
    with pytest.raises(EdgeError, match="does not exist"):
        quantize_onnx("zoo:kws-cnn", tmp_path / "no" / "k.onnx", "random")
