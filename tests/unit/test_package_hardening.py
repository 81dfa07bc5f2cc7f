"""The package reader under hostile input: every malformed package is one PackageError line, read within the sizes
the manifest declares; and a fixed-time atheris fuzz run finds no other exception, hang or runaway allocation."""

from __future__ import annotations

import io
import json
import os
import platform
import re
import resource
import struct
import subprocess
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest

from edgellm.package import npz_bytes, write_package
from edgellm.runtime.package import MAX_MANIFEST_BYTES, PackageError, load_npz, read_manifest, read_package, sha256_bytes
from tests.conftest import ROOT

MODEL = b"\x7fELF" + bytes(range(256)) * 8
REFERENCE = npz_bytes({"input.x": np.arange(4, dtype=np.float16).reshape(1, 4), "output.y": np.ones((1, 2), np.float32)})


def manifest(**members: bytes) -> dict:
    return {"format": "edgepkg", "format_version": 1, "target": {"name": "t", "arch": platform.machine(), "has": []},
            "backend": {"name": "tvm", "module": "model.so"},
            "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}], "outputs": [{"name": "y", "shape": [1, 2], "dtype": "float32"}],
            "files": {n: {"size": len(d), "sha256": sha256_bytes(d)} for n, d in members.items()}}


def make(path, manifest_json, members: dict[str, bytes], method=zipfile.ZIP_DEFLATED):
    """A package written by hand: ``manifest_json`` a dict (dumped) or the manifest's exact bytes."""
    raw = manifest_json if isinstance(manifest_json, bytes) else json.dumps(manifest_json).encode()
    with zipfile.ZipFile(path, "w", method) as z:
        z.writestr("manifest.json", raw)
        for name, data in members.items():
            z.writestr(name, data)
    return path


def patch_central(path, name: str, compress_size: int | None = None, file_size: int | None = None):
    """Overwrite a member's sizes in the zip's central directory (what zipfile trusts), as a hostile tool would."""
    data = bytearray(path.read_bytes())
    at = 0
    while (at := data.find(b"PK\x01\x02", at)) >= 0:
        n = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46: at + 46 + n] == name.encode():
            if compress_size is not None:
                struct.pack_into("<I", data, at + 20, compress_size)
            if file_size is not None:
                struct.pack_into("<I", data, at + 24, file_size)
            path.write_bytes(bytes(data))
            return
        at += 4
    raise AssertionError(f"no {name} in the central directory")


def refused(path, match: str) -> str:
    """The one line read_package refuses ``path`` with."""
    with pytest.raises(PackageError, match=match) as e:
        read_package(path)
    assert "\n" not in str(e.value) and str(e.value).strip(), str(e.value)
    return str(e.value)


@pytest.fixture
def members():
    return {"model.so": MODEL, "reference.npz": REFERENCE}


def test_a_valid_package_reads(tmp_path, members):
    path = make(tmp_path / "ok.edgepkg", manifest(**members), members)
    _, got = read_package(path)
    assert got == members
    assert load_npz(got["reference.npz"])["input.x"].dtype == np.float16


def test_zip_bomb_is_refused_before_inflating(tmp_path):
    """A member that claims 200 MB from a few kB (deflate tops out near 1032:1): refused from the directory alone."""
    zeros = bytes(4 << 20)
    huge = 200 << 20
    m = manifest(**{"model.so": zeros})
    m["files"]["model.so"]["size"] = huge  # the manifest agrees with the lie
    path = make(tmp_path / "bomb.edgepkg", m, {"model.so": zeros})
    patch_central(path, "model.so", file_size=huge)
    tracemalloc.start()
    refused(path, r"member model\.so claims 209715200 bytes from \d+ \(a zip bomb\)")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20  # nothing was inflated


def test_member_inflating_past_its_declared_size_stops_there(tmp_path):
    """The zip and the manifest both say 1000 bytes, the deflate stream holds 20 MB: reading stops at 1000 + a chunk."""
    zeros = bytes(20 << 20)
    m = manifest(**{"model.so": zeros})
    m["files"]["model.so"] = {"size": 1000, "sha256": sha256_bytes(zeros[:1000])}
    path = make(tmp_path / "long.edgepkg", m, {"model.so": zeros})
    patch_central(path, "model.so", file_size=1000)
    tracemalloc.start()
    refused(path, r"member model\.so is unreadable \(Bad CRC-32")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 << 20


def test_manifest_that_lies_about_a_size_is_refused(tmp_path, members):
    m = manifest(**members)
    m["files"]["model.so"]["size"] = 10
    refused(make(tmp_path / "lie.edgepkg", m, members), r"member model\.so is 2052 bytes in the zip, the manifest says 10")


def test_truncated_member_is_refused(tmp_path):
    noise = os.urandom(8000)  # does not deflate: half the compressed bytes is half a stream
    path = make(tmp_path / "cut.edgepkg", manifest(**{"model.so": noise}), {"model.so": noise})
    with zipfile.ZipFile(path) as z:
        size = z.getinfo("model.so").compress_size
    patch_central(path, "model.so", compress_size=size // 2)
    refused(path, r"member model\.so is (unreadable|truncated)")


def test_other_compression_methods_are_refused(tmp_path, members):
    """bzip2 and lzma inflate far beyond deflate's 1032:1: a package never uses them."""
    path = make(tmp_path / "bz.edgepkg", manifest(**members), members, method=zipfile.ZIP_BZIP2)
    refused(path, "compression method 12, not deflate")


def test_two_members_with_one_name_are_refused(tmp_path, members):
    path = make(tmp_path / "dup.edgepkg", manifest(**members), members)
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "a") as z:
        z.writestr("model.so", b"evil")
    refused(path, "two members with the same name")


def test_non_json_manifest_is_refused(tmp_path, members):
    refused(make(tmp_path / "nj.edgepkg", b"{not json", members), r"manifest\.json is unreadable")
    refused(make(tmp_path / "deep.edgepkg", b"[" * 200_000, members), r"manifest\.json is unreadable")  # past the parser's depth
    refused(make(tmp_path / "bin.edgepkg", b"\xff\xfe\x00garbage", members), r"manifest\.json is unreadable")


def test_oversized_manifest_is_refused_unread(tmp_path, members):
    m = manifest(**members)
    m["padding"] = "x" * MAX_MANIFEST_BYTES
    refused(make(tmp_path / "big.edgepkg", m, members), r"member manifest\.json is \d+ bytes, more than the 1048576 allowed")


def _edit(m: dict, where: str, value):
    """``m`` with the field at path ``where`` ("files/model.so/size") set to ``value`` (deleted when value is ...)."""
    keys = where.split("/")
    node = m
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = int(keys[-1]) if isinstance(node, list) else keys[-1]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return m


@pytest.mark.parametrize("where, value, message", [
    ("format_version", "1", "format_version is missing or not a positive integer"),
    ("format_version", True, "format_version is missing or not a positive integer"),
    ("files", ["model.so"], "field files is missing or not an object"),
    ("files/model.so/sha256", "XYZ", "files.model.so.sha256 is missing or not 64 hex digits"),
    ("files/model.so/size", -1, "files.model.so.size is missing or not a size in bytes"),
    ("files/model.so/size", "2052", "files.model.so.size is missing or not a size in bytes"),
    ("target", ..., "field target is missing or not an object with name and arch"),
    ("target/has", "avx2", "target.has is missing or not a list of CPU features"),
    ("backend/name", "../../x", "backend.name is missing or not a backend name"),
    ("backend/module", "other.so", r"backend.module is missing or not a member the manifest lists \(default model.so\)"),
    ("files/model.so", ..., r"backend.module is missing or not a member the manifest lists \(default model.so\)"),
    ("inputs", {"x": 1}, "field inputs is missing or not a list of tensors"),
    ("inputs/0/shape", [1, "4"], r"inputs\[0\]\.shape is missing or not a list of sizes"),
    ("outputs/0/dtype", None, r"outputs\[0\]\.dtype is missing or not a dtype name"),
    ("verification", [], "field verification is missing or not an object"),
])
def test_wrong_types_in_the_manifest_are_refused_by_field(tmp_path, members, where, value, message):
    m = _edit(manifest(**members), where, value)
    line = refused(make(tmp_path / "t.edgepkg", m, members), message)
    with pytest.raises(PackageError, match=message):
        read_manifest(tmp_path / "t.edgepkg")  # inspect reads the same checks
    assert line.endswith("(the package is corrupt or was altered: copy or build it again)")


def test_manifest_that_is_not_an_object_or_names_an_unsafe_member(tmp_path, members):
    refused(make(tmp_path / "list.edgepkg", b"[1, 2]", members), r"is not an edgellm package \(format 'list'\)")
    evil = {"../evil.so": b"x"}
    m = manifest(**evil)
    refused(make(tmp_path / "path.edgepkg", m, evil), r"files\['\.\./evil\.so'\] is missing or not a plain file name")


def _npy(header: dict, payload: bytes) -> bytes:
    text = repr(header).encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + payload


def _npz(**entries: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buffer.getvalue()


def _compressed_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros(1 << 16))
    return buffer.getvalue()


@pytest.mark.parametrize("npz, message", [
    (npz_bytes({"x": np.array([{"pickle": 1}], dtype=object)}), r"dtype object \(objects and records are refused"),
    (_npz(**{"x.npy": _npy({"descr": "|O", "fortran_order": False, "shape": (1,)}, b"\x80\x04N.")}), "dtype object"),
    (_npz(**{"x.npy": _npy({"descr": "<f8", "fortran_order": False, "shape": (10**12,)}, b"\0" * 8)}),
     r"declares 1000000000000 x 8 bytes, the entry holds 8"),
    (_compressed_npz(), "is compressed or oversized"),  # a nested zip bomb would need this
    (_npz(**{"x.txt": b"hello"}), r"entry 'x\.txt' is not an \.npy array"),
    (b"PK\x03\x04 not really", r"is not a readable \.npz"),
])
def test_hostile_npz_is_refused(tmp_path, npz, message):
    """The reference .npz is a zip of .npy files: no pickle, no nested bomb, no header that allocates what it lacks."""
    members = {"model.so": MODEL, "reference.npz": npz}
    refused(make(tmp_path / "npz.edgepkg", manifest(**members), members), message)
    with pytest.raises(PackageError, match=message):
        load_npz(npz)


def test_npz_arrays_round_trip_exactly():
    arrays = {"a": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "f": np.asfortranarray(np.arange(6).reshape(2, 3)),
              "b": np.array([True, False]), "e": np.zeros((0, 3), np.int8), "s": np.float16(3.5).reshape(())}
    got = load_npz(npz_bytes(arrays))
    for name, array in arrays.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape and np.array_equal(got[name], array)
        assert got[name].flags.writeable


def test_the_writer_and_the_hardened_reader_agree(tmp_path, members):
    path = tmp_path / "w.edgepkg"
    written = write_package(path, {k: v for k, v in manifest().items() if k not in ("format", "format_version", "files")}, members)
    assert read_package(path) == (written, members)


@pytest.mark.slow
def test_fuzzing_the_reader_finds_no_crash(tmp_path):
    """tests/fuzz/fuzz_package.py for 25 s: libFuzzer exits 0 only when every input ended in success or PackageError."""
    pytest.importorskip("atheris", reason="the fuzzer is in the dev extra: pip install -e '.[dev]'")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # memory is capped by RLIMIT_AS (an allocation beyond it is a MemoryError: a crash), not by libFuzzer's
    # -rss_limit_mb: that reads ru_maxrss, which a child inherits across fork + exec from its parent (pytest, GBs
    # into the suite), so it reported an out-of-memory before the first input
    def cap_memory():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "fuzz" / "fuzz_package.py"), str(corpus), "-max_total_time=25",
                           "-timeout=10", "-rss_limit_mb=0", "-max_len=16384", "-seed=1", f"-artifact_prefix={tmp_path}/"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, preexec_fn=cap_memory,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    done = re.search(r"Done (\d+) runs in (\d+) second", proc.stderr)
    crash = re.search(r"(Uncaught Python exception|ERROR: libFuzzer.*|== ERROR.*)", proc.stderr)
    assert proc.returncode == 0 and done and not crash, proc.stderr[-3000:]
    runs, seconds = int(done.group(1)), int(done.group(2))
    print(f"\nfuzzed the package reader: {runs} inputs in {seconds} s, 0 crashes, corpus {len(list(corpus.iterdir()))} inputs")
    assert runs >= 1000
