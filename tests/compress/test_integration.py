"""api.build / CLI with compression: active once the snippets from edgellm/compress/plan.py are in api.py and cli.py."""

import inspect
import json

import pytest

from edgellm import api, cli
from tests.conftest import run_cli

pytest.importorskip("torch_pruning")
pytest.importorskip("nncf")

needs_api = pytest.mark.skipif("quantize" not in inspect.signature(api.build).parameters,
                               reason="api.build has no compression options yet (integration pending)")
needs_prune_cmd = pytest.mark.skipif("prune" not in cli.main.commands, reason="no `edgellm prune` command yet (integration pending)")


@needs_api
def test_build_prune_int8_manifest(tmp_path):
    result = api.build("zoo:kws-cnn", "host", tmp_path / "k.edgepkg", backend="openvino", prune=0.3, quantize="int8",
                       calib="random", max_drop=5.0)
    comp = result.manifest["compression"]
    assert comp["prune"]["mode"] == "structured" and comp["prune"]["after"]["params"] < comp["prune"]["before"]["params"]
    assert comp["quantize"]["mode"] == "int8" and comp["quantize"]["nncf"]
    assert comp["evaluation"]["status"] == "measured" and comp["evaluation"]["max_drop"] == 5.0
    assert result.manifest["backend"]["quantize"] == comp["quantize"]
    assert result.manifest["verification"]["status"] == "passed"
    for stage in ("prune", "samples", "evaluate"):
        assert stage in result.seconds


@needs_api
def test_unstructured_package_is_deflated(tmp_path):
    dense = api.build("zoo:kws-cnn", "host", tmp_path / "d.edgepkg", backend="openvino").path
    sparse = api.build("zoo:kws-cnn", "host", tmp_path / "s.edgepkg", backend="openvino", prune=0.7, prune_mode="unstructured").path
    assert sparse.stat().st_size < dense.stat().st_size
    from edgellm.runtime.model import Model

    model = Model(sparse)  # deflated members load like stored ones
    assert model.run(**model.example_inputs())["logits"].shape == (1, 12)


@needs_api
def test_cli_errors(tmp_path):
    r = run_cli("build", "zoo:kws-cnn", "--backend", "tvm", "--quantize", "int8-weights", "-o", str(tmp_path / "t.edgepkg"))
    assert r.returncode == 2
    assert r.stderr.strip().endswith("error: weight-only int8 (int8-weights) is not implemented for the TVM backend "
                                     "(use --quantize int8 (static / dynamic int8 with integer kernels), or --backend openvino)")
    r = run_cli("build", "zoo:kws-cnn", "--backend", "tvm", "--quantize", "int8", "-o", str(tmp_path / "t.edgepkg"))
    # the host target decides which comes first: without AVX-512 VNNI, TVM int8 itself is refused
    assert r.returncode == 2 and ("error: static int8 needs calibration data (give --calib" in r.stderr
                                  or "error: edgellm's TVM int8 needs AVX-512 VNNI (x86_64) or arm64; target x86-64-v3" in r.stderr)
    r = run_cli("build", "zoo:kws-cnn", "--backend", "openvino", "--quantize", "int8", "-o", str(tmp_path / "t.edgepkg"))
    assert r.returncode == 2 and "error: static int8 needs calibration data (give --calib" in r.stderr
    assert not (tmp_path / "t.edgepkg").exists()
    r = run_cli("build", "zoo:kws-cnn", "--backend", "openvino", "--prune", "0.9", "--eval", "random", "--max-drop", "0",
                "-o", str(tmp_path / "p.edgepkg"))
    assert r.returncode == 2 and "percentage points of top-1 agreement" in r.stderr and "--max-drop 0" in r.stderr
    assert not (tmp_path / "p.edgepkg").exists()


@needs_prune_cmd
def test_cli_prune_then_build(tmp_path):
    out = tmp_path / "kws-pruned.pt2"
    r = run_cli("prune", "zoo:kws-cnn", "--ratio", "0.3", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "params 23.2k -> 12.4k" in (r.stdout + r.stderr).replace("\n", " ") and out.exists()
    r = run_cli("build", str(out), "--backend", "openvino", "-o", str(tmp_path / "kp.edgepkg"))
    assert r.returncode == 0, r.stderr
    r = run_cli("prune", "zoo:kws-cnn", "--ratio", "0.3", "--round-to", "16", "--json", "-o", str(tmp_path / "r.pt2"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["round_to"] == 16  # 64 -> 48 channels: test_prune.test_round_to_keeps_the_nearest_multiple
