"""--precision: the contract each precision writes into its package and verification holds it to, OpenVINO's
f32 pin and bf16 hint, and --precision auto's comparison. Real builds of the tiny kws-cnn; no mocks."""

import json
import zipfile

import numpy as np
import pytest

from edgellm import api, runtime
from edgellm.errors import EdgeError
from edgellm.runtime.device import cpu_flags
from edgellm.verify import verify
from tests.conftest import run_cli

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def rewrite_contract(src, dst, **changes):
    """A copy of the package whose stored contract (manifest["precision"]["contract"]) is changed."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
        for name in z.namelist():
            data = z.read(name)
            if name == "manifest.json":
                m = json.loads(data)
                m["precision"]["contract"].update(changes)
                data = json.dumps(m).encode()
            out.writestr(name, data)
    return dst


@pytest.fixture(scope="module")
def kws_auto(tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "kws-auto.edgepkg"
    return api.build("zoo:kws-cnn", "x86_64", out, precision="auto", max_drop=1.0)


def test_fp32_package_states_its_contract_and_verify_enforces_it(packages, tmp_path):
    pkg = packages("kws-cnn", "x86_64")
    manifest = api.inspect(pkg)
    assert manifest["precision"] == {"name": "fp32", "contract": {"tolerance": 1e-4}}
    assert verify(pkg)["passed"]
    # the same package, its stored contract tightened past what it meets: verify fails, naming why
    tight = rewrite_contract(pkg, tmp_path / "tight.edgepkg", tolerance=1e-12)
    result = verify(tight)
    assert not result["passed"] and "> tolerance 1e-12" in result["problem"]
    proc = run_cli("verify", str(tight))
    assert proc.returncode == 1
    floor = rewrite_contract(pkg, tmp_path / "floor.edgepkg", min_cosine=1.5)
    assert "cosine" in verify(floor)["problem"]
    top1 = rewrite_contract(pkg, tmp_path / "top1.edgepkg", top1_outputs=["logits"], min_top1=1.5)
    assert "top-1 agreement 100% < 150%" in runtime.load(top1).check_reference()["problem"]


def test_openvino_fp32_pins_f32_inference_precision(packages):
    """OpenVINO runs f32 IR in bf16 on CPUs with AVX512-BF16 / AMX unless told: an fp32 package pins f32."""
    model = runtime.load(packages("kws-cnn", "x86_64", "openvino"))
    assert model.manifest["backend"]["precision"] == "f32"
    assert str(model._engine.compiled.get_property("INFERENCE_PRECISION_HINT")) in ("<Type: 'float32'>", "f32")


def test_bf16_package_for_an_amx_target_asks_openvino_for_bf16_and_is_refused_here(tmp_path):
    result = api.build("zoo:kws-cnn", "x86_64-amx", tmp_path / "k.edgepkg", precision="bf16")
    m = result.manifest
    assert m["backend"]["name"] == "openvino" and m["backend"]["precision"] == "bf16"
    assert m["precision"]["name"] == "bf16" and m["precision"]["contract"]["min_cosine"] == 0.995
    assert m["precision"]["contract"]["top1_outputs"] == ["logits"]
    if not set(BF16_FLAGS) & cpu_flags():  # this CPU cannot run it: not verified here, and refused at load
        assert m["verification"]["status"] == "skipped"
        with pytest.raises(EdgeError, match="needs CPU features this CPU lacks: .*amx_bf16"):
            runtime.load(result.path)


def test_bf16_runs_natively_within_its_contract(tmp_path):
    missing = [f for f in BF16_FLAGS if f not in cpu_flags()]
    if len(missing) == len(BF16_FLAGS):
        pytest.skip(f"this CPU has no bf16 arithmetic: /proc/cpuinfo lacks {' and '.join(missing)}")
    pytest.importorskip("openvino")
    target = "x86_64-amx" if "amx_bf16" in cpu_flags() else "x86_64-avx512-bf16"
    result = api.build("zoo:kws-cnn", target, tmp_path / "k.edgepkg", precision="bf16")
    assert result.manifest["verification"]["status"] == "passed"
    assert runtime.load(result.path).check_reference()["passed"]


def test_bf16_and_fp16_are_refused_in_one_line_where_the_target_cannot_run_them(tmp_path):
    for target, precision, message in (("x86_64", "bf16", "cannot run bf16: its CPU features lack avx512_bf16 / amx_bf16"),
                                       ("x86_64", "fp16", "cannot run fp16"), ("rpi4", "fp16", "cannot run fp16"),
                                       ("arm64", "fp16", "cannot run fp16")):
        proc = run_cli("build", "zoo:kws-cnn", "--target", target, "--precision", precision, "-o", str(tmp_path / "x.edgepkg"))
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and not list(tmp_path.iterdir())


def test_auto_compares_the_candidates_and_keeps_the_fastest_within_the_budget(kws_auto):
    m = kws_auto.manifest
    choice = m["precision_choice"]
    trials = {(t["backend"], t["precision"]): t for t in choice["trials"]}
    assert set(trials) == {("tvm", "fp32"), ("openvino", "fp32"), ("tvm", "int8"), ("openvino", "int8")}
    assert choice["measured"] and choice["max_drop"] == 1.0
    good = [t for t in choice["trials"] if t["status"] in ("chosen", "within budget")]
    assert good and all(t["drop_pp"] <= 1.0 for t in good)
    chosen = trials[choice["chosen"]["backend"], choice["chosen"]["precision"]]
    assert chosen["status"] == "chosen" and chosen["p50_ms"] == min(t["p50_ms"] for t in good)
    for t in choice["trials"]:  # every candidate has a verdict; those that ran have figures
        assert t["status"] in ("chosen", "within budget", "over budget", "failed", "failed verification")
        if t["status"] != "failed":
            assert {"p50_ms", "drop_pp", "cosine_mean", "top1", "p50_vs_fp32"} <= set(t)
    assert m["precision"]["name"] == choice["chosen"]["precision"] and m["backend"]["name"] == choice["chosen"]["backend"]
    assert m["compression"]["evaluation"]["drop_pp"] == chosen["drop_pp"]
    assert runtime.load(kws_auto.path).check_reference()["passed"]


def test_auto_refuses_a_negative_budget(tmp_path):
    with pytest.raises(EdgeError, match="--max-drop -1 is negative"):
        api.build("zoo:kws-cnn", "x86_64", tmp_path / "k.edgepkg", precision="auto", max_drop=-1)


def test_auto_for_a_target_this_machine_cannot_run_keeps_fp32_and_says_so(tmp_path):
    m = api.build("zoo:kws-cnn", "rpi5", tmp_path / "k.edgepkg", precision="auto").manifest
    choice = m["precision_choice"]
    assert not choice["measured"] and "not measured" in choice["why"] and m["precision"]["name"] == "fp32"
    assert [(t["backend"], t["precision"]) for t in choice["trials"]] == [("tvm", "fp32"), ("tvm", "fp16"), ("tvm", "int8")]
    assert all(t["status"] in ("chosen", "not measured") for t in choice["trials"])
    assert not any("p50_ms" in t for t in choice["trials"])
