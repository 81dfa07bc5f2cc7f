"""Fuzz the package reader (edgellm/runtime/package.py) with atheris: any exception but PackageError, a hang or a
runaway allocation is a crash.

    python tests/fuzz/fuzz_package.py CORPUS_DIR -max_total_time=30 -timeout=10 -rss_limit_mb=2048

CORPUS_DIR gets the seeds when it is empty. An input's first byte picks what the rest is:
  0  a whole .edgepkg file (seeds: a small valid package, signed and unsigned, and known-bad ones);
  1  its manifest.json, 2  its reference.npz, 3  its signature.ed25519 -- each packed into an otherwise valid package
     (hashes and signature made afresh for 2), so mutations get past the zip checks into the JSON, .npz and signature
     parsing instead of dying on a CRC.
tests/unit/test_package_hardening.py runs it for a fixed time and reads libFuzzer's run count.
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import tempfile
import zipfile as _unused  # noqa: F401  (atheris imports zipfile; it is re-imported instrumented below)
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.pop("EDGELLM_TRUSTED_KEYS", None)
sys.modules.pop("zipfile")  # the zip parsing is under test too: load it again, instrumented
with atheris.instrument_imports(include=["edgellm.runtime.package", "zipfile", "json"]):
    import zipfile

    from edgellm.runtime import package

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # fixed: runs are reproducible
PUBLIC = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
WHOLE, MANIFEST, NPZ, SIGNATURE = b"\0", b"\1", b"\2", b"\3"
MODEL = b"\x7fELF" + bytes(range(256)) * 2


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


REFERENCE = npz(**{"input.x": np.arange(8, dtype=np.float16).reshape(1, 8), "output.y": np.ones((1, 2), np.float32)})


def manifest(members: dict[str, bytes]) -> bytes:
    return json.dumps({
        "format": "edgepkg", "format_version": 1, "kind": "model", "model": {"name": "fuzz"},
        "target": {"name": "host", "arch": platform.machine(), "has": []}, "backend": {"name": "tvm", "module": "model.so"},
        "inputs": [{"name": "x", "shape": [1, 8], "dtype": "float32"}], "outputs": [{"name": "y", "shape": [1, 2], "dtype": "float32"}],
        "verification": {"tolerance": 1e-4},
        "files": {n: {"size": len(d), "sha256": package.sha256_bytes(d)} for n, d in members.items()},
    }, indent=2).encode()


def signature(manifest_bytes: bytes) -> bytes:
    return json.dumps({"format": package.SIGNATURE_FORMAT, "algorithm": "ed25519", "signed": package.MANIFEST,
                       "key_fingerprint": package.fingerprint(PUBLIC), "signature": KEY.sign(manifest_bytes).hex()}).encode()


def pack(manifest_bytes: bytes, members: dict[str, bytes], sig: bytes | None, method=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as z:
        z.writestr(package.MANIFEST, manifest_bytes)
        for name, data in members.items():
            z.writestr(name, data)
        if sig is not None:
            z.writestr(package.SIGNATURE, sig)
    return buffer.getvalue()


MEMBERS = {"model.so": MODEL, "reference.npz": REFERENCE}
MANIFEST_BYTES = manifest(MEMBERS)
SIGNATURE_BYTES = signature(MANIFEST_BYTES)


def seeds() -> dict[str, bytes]:
    signed = pack(MANIFEST_BYTES, MEMBERS, SIGNATURE_BYTES, zipfile.ZIP_DEFLATED)
    bomb = {"model.so": bytes(4 << 20), "reference.npz": REFERENCE}  # 4 MB of zeros: deflates to 4 kB
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    compressed = io.BytesIO()
    np.savez_compressed(compressed, x=np.zeros(1000))
    pickled = io.BytesIO()
    with zipfile.ZipFile(pickled, "w") as z:
        z.writestr("input.x.npy", buffer.getvalue())
    return {
        "signed": WHOLE + signed,
        "unsigned": WHOLE + pack(MANIFEST_BYTES, MEMBERS, None, zipfile.ZIP_DEFLATED),
        "bomb": WHOLE + pack(manifest(bomb), bomb, None, zipfile.ZIP_DEFLATED),
        "truncated": WHOLE + signed[: len(signed) * 2 // 3],
        "manifest": MANIFEST + MANIFEST_BYTES,
        "npz": NPZ + REFERENCE,
        "npz-compressed": NPZ + compressed.getvalue(),
        "npz-pickle": NPZ + pickled.getvalue(),
        "signature": SIGNATURE + SIGNATURE_BYTES,
    }


def package_bytes(data: bytes) -> bytes:
    kind, rest = data[:1], data[1:]
    if kind == MANIFEST:
        return pack(rest, MEMBERS, SIGNATURE_BYTES)
    if kind == NPZ:
        members = {"model.so": MODEL, "reference.npz": rest}
        m = manifest(members)
        return pack(m, members, signature(m))
    if kind == SIGNATURE:
        return pack(MANIFEST_BYTES, MEMBERS, rest)
    return rest


def main() -> None:
    corpus = next((Path(a) for a in sys.argv[1:] if not a.startswith("-")), None)
    if corpus is not None and corpus.is_dir() and not any(corpus.iterdir()):
        for name, data in seeds().items():
            (corpus / name).write_bytes(data)
    folder = tempfile.mkdtemp(prefix="edgellm-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    path = Path(folder) / "fuzz.edgepkg"
    trusted = [PUBLIC.hex()]

    def one_input(data: bytes) -> None:
        path.write_bytes(package_bytes(data))
        for keys in (None, trusted):
            try:
                manifest, members = package.read_package(path, keys)
                package.check_device(manifest, {"avx2"})
                for name, blob in members.items():
                    if name.endswith(".npz"):
                        package.load_npz(blob, name)
            except package.PackageError:
                pass
        for read in (package.read_manifest, package.read_signature):
            try:
                read(path)
            except package.PackageError:
                pass

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
