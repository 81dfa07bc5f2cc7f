"""The steps api.build runs for --prune/--quantize/--calib/--eval/--max-drop, driven here without api.build."""

import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgellm import backends, source, targets
from edgellm.compress.plan import INT8_TOLERANCE, Plan
from edgellm.errors import EdgeError
from edgellm.runtime import engines
from edgellm.trace import trace

pytest.importorskip("torch_pruning")
pytest.importorskip("nncf")

HOST = targets.resolve("host")


def _build(plan, ref="zoo:kws-cnn", backend="openvino"):
    src = source.load(ref)
    plan.check_backend(backend)
    plan.keep_reference(src)
    pruned = plan.prune_source(src)
    traced = trace(src)
    note = plan.load_samples(traced)
    with tempfile.TemporaryDirectory() as tmp:
        compiled = backends.get(backend).compile(traced, HOST, {"pipeline": "default", **plan.options()}, Path(tmp))
        members = {n: Path(p).read_bytes() for n, p in compiled.files.items()}
    engine = engines.get(backend)({"backend": compiled.info, "target": HOST.to_dict(), "runtime_requires": compiled.runtime_requires},
                                  members, 2)
    line = plan.evaluate(engine, traced)
    return pruned, note, line, plan.manifest(compiled.info)


def test_prune_and_int8_kws(tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    rng = np.random.default_rng(5)
    for i in range(20):
        np.save(calib / f"{i:02d}.npy", rng.standard_normal((1, 1, 49, 40)).astype(np.float32))
    plan = Plan(prune=0.3, quantize="int8", calib=str(calib), max_drop=50.0)
    pruned, note, line, manifest = _build(plan)
    assert "params 23.2k -> 12.4k" in pruned
    assert "16/4" in note
    assert "top-1 agreement" in line and "limit 50 pp" in line
    assert manifest["prune"]["mode"] == "structured" and "tensors" not in manifest["prune"]
    assert manifest["quantize"]["mode"] == "int8" and manifest["quantize"]["subset_size"] == 16
    ev = manifest["evaluation"]
    assert ev["samples"] == 4 and ev["against"] == "the original fp32 model" and ev["max_drop"] == 50.0
    assert plan.tolerance(1e-4) == INT8_TOLERANCE


def test_max_drop_exceeded_raises():
    plan = Plan(prune=0.9, max_drop=0.0, eval="random")
    with pytest.raises(EdgeError, match=r"the pruned 0.9 model drops .* percentage points .* --max-drop 0"):
        _build(plan)


def test_int8_weights_unstructured_kws():
    plan = Plan(prune=0.5, prune_mode="unstructured", quantize="int8-weights")
    pruned, _, line, manifest = _build(plan)
    assert "50% of weights zero" in pruned
    assert manifest["prune"]["layer_sparsity"] and manifest["quantize"]["mode"] == "int8-weights"
    assert "drop" in line


@pytest.mark.parametrize("kwargs, words", [
    ({"prune": 1.5}, "--prune 1.5 is not between 0 and 1"),
    ({"prune": 0.3, "prune_mode": "blocks"}, "unknown --prune-mode"),
    ({"quantize": "int4"}, "unknown --quantize"),
    ({"calib": "calib/"}, "go with --prune, --quantize or --precision int8 | auto"),
    ({"quantize": "int8", "max_drop": -1}, "negative"),
])
def test_bad_options(kwargs, words):
    with pytest.raises(EdgeError, match=words):
        Plan(**kwargs)


def test_tvm_int8_weights_refused_early_and_inactive_plan_is_a_no_op():
    with pytest.raises(EdgeError, match="int8-weights"):
        Plan(quantize="int8-weights").check_backend("tvm")
    with pytest.raises(EdgeError, match="static int8 needs calibration data"):
        Plan(quantize="int8").check_backend("openvino")  # NNCF is static: calibration required up front
    # TVM picks static or dynamic int8 from the graph, and refuses static without --calib itself
    # (test_integration.test_cli_errors); dynamic needs none (tvm_int8/test_models.py)
    Plan(quantize="int8").check_backend("tvm")
    Plan(quantize="int8", calib="random").check_backend("tvm")
    Plan(prune=0.3).check_backend("tvm")  # pruning works with any backend
    plan = Plan()
    assert not plan.active and plan.options() == {} and plan.tolerance(1e-4) == 1e-4
    assert plan.manifest({"name": "tvm"}) == {"prune": None, "quantize": None}


def test_max_drop_needs_a_runnable_engine():
    plan = Plan(quantize="int8", max_drop=1.0)
    with pytest.raises(EdgeError, match="cannot check --max-drop"):
        plan.evaluate(None, None)
    plan = Plan(quantize="int8")
    assert plan.evaluate(None, None).startswith("skipped")
    assert plan.manifest({})["evaluation"]["status"] == "skipped"
