"""The package format: atomic, checksummed, versioned, refused on the wrong device."""

import json
import platform
import zipfile

import numpy as np
import pytest

from edgellm.errors import EdgeError
from edgellm.package import npz_bytes, write_package
from edgellm.runtime.package import FORMAT_VERSION, PackageError, check_device, read_manifest, read_package


def manifest(arch=None, has=()):
    return {"target": {"name": "t", "arch": arch or platform.machine(), "has": list(has)}, "backend": {"name": "tvm"},
            "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}], "outputs": [{"name": "y", "shape": [1, 2], "dtype": "float32"}]}


@pytest.fixture
def pkg(tmp_path):
    path = tmp_path / "m.edgepkg"
    write_package(path, manifest(), {"model.so": b"\x7fELF" + b"x" * 1000, "reference.npz": npz_bytes({"input.x": np.ones((1, 4), np.float16)})})
    return path


def rewrite(path, edit):
    """Copy the archive member by member, letting ``edit(name, data)`` change any of them."""
    with zipfile.ZipFile(path) as z:
        items = [(n, z.read(n)) for n in z.namelist()]
    with zipfile.ZipFile(path, "w") as z:
        for name, data in items:
            new = edit(name, data)
            if new is not None:
                z.writestr(name, new)


def test_roundtrip_lists_every_member_with_its_hash(pkg):
    m, members = read_package(pkg)
    assert m["format"] == "edgepkg" and m["format_version"] == FORMAT_VERSION
    assert set(m["files"]) == {"model.so", "reference.npz"} == set(members)
    assert m["files"]["model.so"]["size"] == 1004
    assert len(m["files"]["model.so"]["sha256"]) == 64


def test_altered_member_is_refused_by_name(pkg):
    rewrite(pkg, lambda n, d: d.replace(b"x", b"y", 1) if n == "model.so" else d)
    with pytest.raises(PackageError, match="member model.so fails its sha256 check"):
        read_package(pkg)


def test_truncated_package_is_refused(pkg):
    data = pkg.read_bytes()
    pkg.write_bytes(data[: len(data) // 2])
    with pytest.raises(PackageError, match="not a readable .edgepkg"):
        read_package(pkg)


def test_newer_format_is_refused_with_the_fix(pkg):
    rewrite(pkg, lambda n, d: json.dumps({**json.loads(d), "format_version": FORMAT_VERSION + 1}) if n == "manifest.json" else d)
    with pytest.raises(PackageError, match=r"newer than this runtime reads.*upgrade edgellm"):
        read_manifest(pkg)


def test_extra_member_is_refused(pkg):
    with zipfile.ZipFile(pkg, "a") as z:
        z.writestr("evil.so", b"boom")
    with pytest.raises(PackageError, match="does not list"):
        read_package(pkg)


def test_missing_and_non_package_files(tmp_path):
    with pytest.raises(PackageError, match="does not exist"):
        read_package(tmp_path / "nope.edgepkg")
    (tmp_path / "x.edgepkg").write_text("hello")
    with pytest.raises(PackageError, match="not a readable"):
        read_package(tmp_path / "x.edgepkg")


def test_package_for_another_architecture_is_refused():
    other = "aarch64" if platform.machine() == "x86_64" else "x86_64"
    with pytest.raises(PackageError, match=f"package is for {other}"):
        check_device(manifest(arch=other))


def test_package_needing_cpu_features_this_cpu_lacks_is_refused():
    with pytest.raises(PackageError, match="lacks: avx9000"):
        check_device(manifest(has=["avx2", "avx9000"]), cpu_flags={"avx2"})


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "m.edgepkg"
    with pytest.raises(TypeError):
        write_package(path, manifest(), {"model.so": b"ok", "broken": object()})
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_is_refused_before_work(tmp_path):
    with pytest.raises(EdgeError, match="does not exist"):
        write_package(tmp_path / "missing" / "m.edgepkg", manifest(), {})
    with pytest.raises(EdgeError, match="should end in .edgepkg"):
        write_package(tmp_path / "m.zip", manifest(), {})


def test_members_are_deflated_and_hashed_raw(pkg):
    with zipfile.ZipFile(pkg) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_DEFLATED}
        assert z.getinfo("model.so").compress_size < 1004  # the x-run deflates
    _, members = read_package(pkg)
    assert members["model.so"] == b"\x7fELF" + b"x" * 1000


def test_reference_inputs_are_stored_at_half_precision_only_when_exact():
    import numpy as np

    from edgellm.package import narrowed
    from edgellm.trace import sample

    drawn = sample((4, 8), "float32")
    assert drawn.dtype == np.float32 and narrowed(drawn).dtype == np.float16
    assert np.array_equal(narrowed(drawn).astype(np.float32), drawn)
    inexact = np.array([0.1, 1e5], dtype=np.float32)  # 0.1 rounds, 1e5 overflows float16
    assert narrowed(inexact) is inexact
    ids = np.array([1, 2], dtype=np.int64)
    assert narrowed(ids) is ids
