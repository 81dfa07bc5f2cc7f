"""A signed kws-cnn package loads and runs under trusted keys; unsigned and foreign-signed copies are refused before
any native code is loaded (checked on /proc/self/maps in a process that has only the runtime)."""

import json
import shutil
import subprocess
import sys

import pytest

from edgellm import runtime
from edgellm.runtime import PackageError
from edgellm.signing import keygen, sign_package
from tests.conftest import ROOT, import_blocker


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return keygen(folder / "release"), keygen(folder / "stranger")


@pytest.fixture(scope="module")
def signed(kws_pkg, keys, tmp_path_factory):
    path = tmp_path_factory.mktemp("signed") / "kws.edgepkg"
    shutil.copy(kws_pkg, path)
    sign_package(path, keys[0]["private"])
    return path


def test_signed_package_loads_and_runs_with_its_key(signed, keys):
    model = runtime.load(signed, threads=1, trusted_keys=[keys[0]["public"]])
    assert model.check_reference()["passed"]


def test_unsigned_and_foreign_packages_are_refused(kws_pkg, keys, signed):
    with pytest.raises(PackageError, match="is unsigned and trusted keys are set"):
        runtime.load(kws_pkg, trusted_keys=[keys[0]["public"]])
    with pytest.raises(PackageError, match="is signed by key .* not among the 1 trusted key"):
        runtime.Model(signed, trusted_keys=[keys[1]["public"]])


SCRIPT = import_blocker("torch", "onnx", "click", "rich", "edgellm.api", "edgellm.package", "edgellm.signing") + r"""
import json
import edgellm.runtime as rt
from edgellm.runtime import PackageError

def mapped():
    maps = open("/proc/self/maps").read()
    return {"tvm_runtime": "libtvm_runtime" in maps, "package_code": "edgellm-" in maps}

result = {}
for name, path in (("unsigned", sys.argv[1]), ("foreign", sys.argv[2])):
    try:
        rt.load(path, threads=1, trusted_keys=[sys.argv[3]])
        result[name] = "loaded"
    except PackageError as e:
        result[name] = str(e)
result["after_refusals"] = mapped()
model = rt.load(sys.argv[4], threads=1, trusted_keys=[sys.argv[3]])
result["passed"] = model.check_reference()["passed"]
result["after_load"] = mapped()
print(json.dumps(result))
"""


def test_refused_before_any_native_code_is_loaded(kws_pkg, keys, signed, tmp_path):
    foreign = tmp_path / "foreign.edgepkg"
    shutil.copy(kws_pkg, foreign)
    sign_package(foreign, keys[1]["private"])
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(kws_pkg), str(foreign), keys[0]["public"], str(signed)],
                          capture_output=True, text=True, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "is unsigned" in result["unsigned"] and "not among the 1 trusted key" in result["foreign"]
    assert result["after_refusals"] == {"tvm_runtime": False, "package_code": False}  # not even TVM's runtime
    assert result["passed"] and result["after_load"] == {"tvm_runtime": True, "package_code": True}  # the same probe sees a real load
