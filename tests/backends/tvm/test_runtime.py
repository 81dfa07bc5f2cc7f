"""The runtime's contract: inputs checked by name/shape/dtype, tampered packages refused, profile schema."""

import json
import zipfile

import numpy as np
import pytest

from edgellm import runtime
from edgellm.runtime import InputError, PackageError


@pytest.fixture(scope="module")
def model(kws_pkg):
    return runtime.load(kws_pkg, threads=2)


def test_inputs_by_position_and_by_name_agree(model):
    x = model.example_inputs()["features"]
    assert np.array_equal(model(x), model(features=x))
    assert list(model.run(x)) == ["logits"]


@pytest.mark.parametrize("call, message", [
    (lambda m, x: m(x, x), r"takes 1 input\(s\) \(features\), got 2"),
    (lambda m, x: m(), r"takes 1 input\(s\) \(features\), got 0"),
    (lambda m, x: m(feature=x), "unknown input 'feature'.*inputs are features"),
    (lambda m, x: m(x[:, :, :10]), r"input 'features' has shape \[1, 1, 10, 40\], the model expects \[1, 1, 49, 40\]"),
    (lambda m, x: m(x.astype(np.float64)), r"dtype float64, the model expects float32.*astype\('float32'\)"),
])
def test_wrong_inputs_are_named(model, call, message):
    with pytest.raises(InputError, match=message):
        call(model, model.example_inputs()["features"])


@pytest.mark.parametrize("shape, dtype, message", [((1, 1, 40, 49), "float32", "shape"), ((1, 1, 49, 40), "float64", "dtype")])
def test_the_vm_itself_checks_its_inputs(model, shape, dtype, message):
    """Kernels are compiled without argument checks (tirx.disable_assert): the VM's own check of the
    model's inputs is what stands between a wrong tensor and the kernels, also below edgellm's checks."""
    import tvm

    bad = tvm.runtime.tensor(np.zeros(shape, dtype))
    with pytest.raises(Exception, match=f"param=features.*{message}"):
        with model._engine._session() as session:
            session.main(bad)


def test_tampered_package_is_refused(kws_pkg, tmp_path):
    bad = tmp_path / "bad.edgepkg"
    with zipfile.ZipFile(kws_pkg) as src, zipfile.ZipFile(bad, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "model.so":
                data = data[:-100] + bytes(100)
            dst.writestr(name, data)
    with pytest.raises(PackageError, match="model.so fails its sha256 check"):
        runtime.load(bad)


def test_profile_report_follows_the_schema(model):
    report = model.profile(runs=20, warmup=2, per_op=True)
    assert report["schema"] == "edgellm.profile/1"
    lat = report["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert report["throughput_per_s"] > 0 and report["load_ms"] > 0 and report["first_inference_ms"] > 0
    assert report["peak_rss_mb"] > 10 and report["device"]["threads"] == 2
    ops = report["per_op"]
    kernels = [o for o in ops if o["kind"] == "kernel"]
    assert any("conv2d" in o["name"] for o in kernels)
    assert abs(sum(o["share"] for o in ops) - 1) < 1e-6
    assert [o["ms"] for o in ops] == sorted((o["ms"] for o in ops), reverse=True)
    json.dumps(report, allow_nan=False)  # strict JSON


def test_check_reference_passes_on_a_good_package(model):
    result = model.check_reference()
    assert result["rel_max_abs"] <= 1e-4
