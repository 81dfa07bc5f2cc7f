"""`--backend auto` decides by measurement; `edgellm bench` runs every engine side by side."""

import json
import os

import pytest

from edgellm import api, runtime, targets
from tests.conftest import run_cli

pytest.importorskip("openvino")


def test_auto_builds_every_allowed_backend_and_keeps_the_fastest_correct(tmp_path):
    result = api.build("zoo:kws-cnn", "host", tmp_path / "k.edgepkg", backend="auto")
    choice = result.manifest["backend_choice"]
    trials = {t["backend"]: t for t in choice["trials"]}
    assert set(trials) == set(result.manifest["target"]["backends"]) >= {"tvm", "openvino"}
    assert all(t["status"] == "passed" and t["rel_max_abs"] <= 1e-4 for t in trials.values())
    fastest = min(trials.values(), key=lambda t: t["p50_ms"])["backend"]
    assert choice["chosen"] == fastest == result.manifest["backend"]["name"]
    assert runtime.load(result.path).check_reference()["rel_max_abs"] <= 1e-4


def test_auto_for_a_cross_target_takes_the_first_allowed_without_measuring(tmp_path):
    result = api.build("zoo:kws-cnn", "rpi4", tmp_path / "k.edgepkg", backend="auto")
    assert result.manifest["backend_choice"]["chosen"] == "tvm"
    assert "not measured" in result.manifest["backend_choice"]["why"]


def test_tvm_threads_follow_the_request_without_pinning_the_process(kws_pkg):
    """TVM pins the calling thread to one core when asked for more threads than its cap: never here."""
    import tvm

    before = os.sched_getaffinity(0)
    model = runtime.load(kws_pkg, threads=2)
    model(**model.example_inputs())
    assert os.sched_getaffinity(0) == before
    assert tvm.runtime.num_threads() == min(2, len(before))


def test_bench_reports_every_engine_with_accuracy(tmp_path):
    proc = run_cli("bench", "zoo:kws-cnn", "--runs", "3", "--warmup", "1", "--json", "--html", str(tmp_path / "b.html"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    engines = report["models"][0]["engines"]
    assert {"pytorch", "onnxruntime", "openvino", "openvino-f32", "edgellm-tvm", "edgellm-openvino"} <= set(engines)
    assert min(e["ratio_to_best_peer"] for k, e in engines.items() if not k.startswith("edgellm")) == pytest.approx(1.0)
    for name in ("edgellm-tvm", "edgellm-openvino"):
        assert engines[name]["rel_max_abs"] <= 1e-4 and engines[name]["package_bytes"] > 0
    # auto: the fastest edgellm package within fp32's tolerance (on an AMX host that can be TVM's bf16 package)
    within = {k: e for k, e in engines.items() if k.startswith("edgellm") and e["rel_max_abs"] <= 1e-4}
    assert report["models"][0]["auto_choice"] == min(within, key=lambda k: within[k]["p50_ms"])
    assert "data:image/png;base64," in (tmp_path / "b.html").read_text()


def test_bench_int8_adds_onnxruntime_int8_and_edgellm_int8(tmp_path):
    from edgellm.bench import bench

    report = bench(["zoo:kws-cnn"], threads=1, runs=3, warmup=1, build_dir=tmp_path, quantize="int8", calib="random")
    model = report["models"][0]
    tvm_int8 = "+avx512vnni" in targets.resolve("host").tvm.get("mattr", [])  # TVM int8 on x86 is AVX-512 VNNI code
    assert {"onnxruntime-int8", "edgellm-openvino-int8"} | ({"edgellm-tvm-int8"} if tvm_int8 else set()) <= set(model["engines"])
    for backend in ("openvino", "tvm") if tvm_int8 else ("openvino",):
        assert model["engines"][f"edgellm-{backend}-int8"]["cosine"] > 0.99
    assert model["engines"]["edgellm-openvino-int8"]["package_bytes"] < model["engines"]["edgellm-openvino"]["package_bytes"]


@pytest.mark.slow
def test_bench_tune_adds_a_tuned_tvm_package_that_matches_fp32(tmp_path, monkeypatch):
    from edgellm.bench import bench

    monkeypatch.setenv("EDGELLM_TUNING_DIR", str(tmp_path / "tuning"))  # a fresh tuning database, not the user's
    report = bench(["zoo:kws-cnn"], threads=1, runs=3, warmup=1, build_dir=tmp_path, tune=4, tune_budget=60)
    engines = report["models"][0]["engines"]
    assert {"edgellm-tvm", "edgellm-tvm-tuned"} <= set(engines)
    assert engines["edgellm-tvm-tuned"]["rel_max_abs"] <= 1e-4 and engines["edgellm-tvm-tuned"]["p50_ms"] > 0
