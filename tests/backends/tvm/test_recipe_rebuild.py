"""`edgellm build --recipe` rebuilds a package from its own manifest: the same files where the build is
deterministic, else the same verification figures; options given beside --recipe override its fields."""

import json
import zipfile

import pytest

from edgellm import api
from edgellm.recipe import Recipe
from tests.conftest import run_cli


def manifest(pkg):
    with zipfile.ZipFile(pkg) as z:
        return json.loads(z.read("manifest.json"))


def assert_same_build(a, b, deterministic=True):
    ma, mb = manifest(a), manifest(b)
    assert mb["recipe"] == ma["recipe"] and mb["target"] == ma["target"] and mb["source"]["sha256"] == ma["source"]["sha256"]
    hashes = lambda m: {name: f["sha256"] for name, f in m["files"].items()}  # noqa: E731
    if deterministic:
        assert hashes(mb) == hashes(ma)
    else:
        assert hashes(mb)["reference.npz"] == hashes(ma)["reference.npz"]
    assert mb["verification"] == ma["verification"] and mb["compression"] == ma["compression"]


def test_cli_rebuilds_kws_cnn_from_its_package_and_its_manifest(kws_pkg, tmp_path):
    again = tmp_path / "again.edgepkg"
    proc = run_cli("build", "--recipe", str(kws_pkg), "-o", str(again))
    assert proc.returncode == 0, proc.stderr
    assert_same_build(kws_pkg, again)

    (tmp_path / "manifest.json").write_text(json.dumps(manifest(kws_pkg)))
    looser = tmp_path / "looser.edgepkg"
    proc = run_cli("build", "--recipe", str(tmp_path / "manifest.json"), "--tolerance", "0.001", "-o", str(looser))
    assert proc.returncode == 0, proc.stderr
    m = manifest(looser)
    assert m["recipe"] == {**manifest(kws_pkg)["recipe"], "tolerance": 0.001}
    assert m["files"]["model.so"]["sha256"] == manifest(kws_pkg)["files"]["model.so"]["sha256"]


def test_cli_build_without_source_or_recipe_is_one_line_error():
    proc = run_cli("build")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: build needs a SOURCE") and "Traceback" not in proc.stderr


@pytest.mark.parametrize("model, options, deterministic", [
    ("kws-cnn", {"quantize": "int8", "calib": "random", "target": "x86_64-avx512"}, True),  # calibrated here, int8 VNNI code
    pytest.param("mobilenet-v2", {}, True, marks=pytest.mark.slow),
    pytest.param("minilm", {}, True, marks=pytest.mark.slow),
])
def test_zoo_models_rebuild_from_their_packages(model, options, deterministic, tmp_path):
    first = api.build(f"zoo:{model}", output=tmp_path / "first.edgepkg", **options).path
    again = api.build(f"zoo:{model}", Recipe.load(first), tmp_path / "again.edgepkg").path
    assert_same_build(first, again, deterministic)
