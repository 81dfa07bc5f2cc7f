"""Reading and verifying an .edgepkg: the one file a device receives.

An .edgepkg is a zip archive (deflated members) holding ``manifest.json`` plus the
members it lists, each with its sha256, and optionally ``signature.ed25519``: an Ed25519
signature over the exact bytes of manifest.json (which holds every member's sha256).
The writer and the signer live on the compiler side (edgellm/package.py, edgellm/signing.py);
the format constants and the verification live here so the runtime never needs the compiler
to read a package.

A package is untrusted input: every malformed one is refused with a PackageError, never another
exception, and nothing is inflated beyond the size the manifest declares (tests/fuzz/fuzz_package.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import re
import struct
import zipfile
import zlib
from pathlib import Path

from edgellm.errors import EdgeError

FORMAT = "edgepkg"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "signature.ed25519"  # the one member the manifest does not list: it signs the manifest
SIGNATURE_FORMAT = "edgellm-signature/1"
SUFFIX = ".edgepkg"
TRUSTED_KEYS_ENV = "EDGELLM_TRUSTED_KEYS"

MAX_MANIFEST_BYTES = 1 << 20  # a language model's manifest is 6 kB
MAX_SIGNATURE_BYTES = 4096
MAX_RATIO = 1032  # deflate cannot honestly shrink data more than ~1032:1 (10 MB of zeros: 1028:1)
CHUNK = 1 << 20
AGAIN = "copy or build the package again"
ALTERED = "the package is corrupt or was altered: copy or build it again"
# what a broken zip or deflate stream raises from zipfile, zlib and struct: each becomes a PackageError
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError,
               RuntimeError, struct.error, OverflowError, MemoryError)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # a plain file name: lm.py writes the module into a temp folder by it
_HEX64 = re.compile(r"[0-9a-f]{64}")
# the members each engine reads: backend.<key>, else the default (engines/tvm.py reads model.so, openvino.py model.xml / .bin)
ENGINE_MEMBERS = {"tvm": {"module": "model.so"}, "openvino": {"model": "model.xml", "weights": "model.bin"}}


class PackageError(EdgeError):
    """The package cannot be used as it is: corrupt, altered, too new, unsigned, or for another device."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _open(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise PackageError(f"package {path} does not exist")
    if path.is_dir():
        raise PackageError(f"{path} is a directory, not an .edgepkg file")
    try:
        archive = zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise PackageError(f"{path} is not a readable .edgepkg ({_short(e)})", "it is truncated or not a package: copy or build it again") from None
    names = archive.namelist()
    if len(names) != len(set(names)):  # zipfile reads the last of two same-named members, other readers the first
        archive.close()
        raise PackageError(f"{path} holds two members with the same name", ALTERED)
    return archive


def _short(e: BaseException) -> str:
    """An exception as a few words on one line."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _inflate(archive: zipfile.ZipFile, name: str, where: Path, limit: int, declared: int | None = None) -> tuple[bytes, str]:
    """(member ``name``, its sha256), read and hashed in chunks, never past ``limit`` bytes (or ``declared``, the manifest's size).

    Refused before any inflating: a compression method other than stored / deflated, a size in the zip
    other than the manifest's, a ratio deflate cannot make (a zip bomb)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise PackageError(f"{where} lacks member {name}", AGAIN) from None
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise PackageError(f"{where}: member {name} uses zip compression method {info.compress_type}, not deflate", ALTERED)
    if declared is not None and info.file_size != declared:
        raise PackageError(f"{where}: member {name} is {info.file_size} bytes in the zip, the manifest says {declared}", ALTERED)
    if info.file_size > limit:
        raise PackageError(f"{where}: member {name} is {info.file_size} bytes, more than the {limit} allowed", ALTERED)
    honest = info.compress_size if info.compress_type == zipfile.ZIP_STORED else MAX_RATIO * info.compress_size
    if info.file_size > honest:
        raise PackageError(f"{where}: member {name} claims {info.file_size} bytes from {info.compress_size} (a zip bomb)", ALTERED)
    chunks, got, digest = [], 0, hashlib.sha256()
    try:
        with archive.open(info) as f:
            while chunk := f.read(min(CHUNK, info.file_size - got + 1)):
                got += len(chunk)
                if got > info.file_size:
                    raise PackageError(f"{where}: member {name} inflates past its {info.file_size} bytes", ALTERED)
                chunks.append(chunk)
                digest.update(chunk)
    except _ZIP_ERRORS as e:
        raise PackageError(f"{where}: member {name} is unreadable ({_short(e)})", AGAIN) from None
    if got != info.file_size:
        raise PackageError(f"{where}: member {name} is truncated ({got} of {info.file_size} bytes)", AGAIN)
    return b"".join(chunks), digest.hexdigest()


def _want(ok: bool, where: Path, field: str, expected: str) -> None:
    if not ok:
        raise PackageError(f"{where}: {MANIFEST} field {field} is missing or not {expected}", ALTERED)


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_specs(manifest: dict, key: str, where: Path) -> None:
    specs = manifest.get(key)
    _want(isinstance(specs, list), where, key, "a list of tensors")
    for i, spec in enumerate(specs):
        field = f"{key}[{i}]"
        _want(isinstance(spec, dict) and isinstance(spec.get("name"), str), where, f"{field}.name", "a string")
        _want(isinstance(spec.get("shape"), list) and all(_is_int(d) for d in spec["shape"]), where, f"{field}.shape",
              "a list of sizes")
        _want(isinstance(spec.get("dtype"), str) and re.fullmatch(r"[a-z][a-z0-9_]{0,15}", spec["dtype"]) is not None, where,
              f"{field}.dtype", "a dtype name")


def _check_manifest(manifest, where: Path) -> dict:
    """The fields the loader reads, of the types it reads them as: a bad shape is a PackageError, not a KeyError later."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        shown = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise PackageError(f"{where} is not an edgellm package (format {shown!r})")
    version = manifest.get("format_version")
    _want(_is_int(version, 1), where, "format_version", "a positive integer")
    if version > FORMAT_VERSION:
        raise PackageError(
            f"{where} uses package format {version}, newer than this runtime reads ({FORMAT_VERSION})",
            "upgrade edgellm on this device",
        )
    files = manifest.get("files")
    _want(isinstance(files, dict), where, "files", "an object")
    for name, meta in files.items():
        _want(_NAME.fullmatch(name) is not None and name not in (MANIFEST, SIGNATURE), where, f"files[{name[:40]!r}]",
              "a plain file name")
        _want(isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and _HEX64.fullmatch(meta["sha256"]) is not None,
              where, f"files.{name}.sha256", "64 hex digits")
        _want(_is_int(meta.get("size")), where, f"files.{name}.size", "a size in bytes")
    target = manifest.get("target")
    _want(isinstance(target, dict) and isinstance(target.get("name"), str) and isinstance(target.get("arch"), str), where,
          "target", "an object with name and arch")
    _want(isinstance(target.get("has", []), list) and all(isinstance(f, str) for f in target.get("has", [])), where,
          "target.has", "a list of CPU features")
    backend = manifest.get("backend")
    _want(isinstance(backend, dict) and isinstance(backend.get("name"), str) and re.fullmatch(r"[a-z][a-z0-9_]{0,31}", backend["name"])
          is not None, where, "backend.name", "a backend name")
    for key, default in ENGINE_MEMBERS.get(backend["name"], {}).items():  # the members an engine reads by name
        _want(isinstance(backend.get(key, default), str) and backend.get(key, default) in files, where, f"backend.{key}",
              f"a member the manifest lists (default {default})")
    if backend["name"] == "tvm" and manifest.get("kind") != "llm":  # engines/tvm.py reads model.so whatever backend.module says
        _want("model.so" in files, where, "files", "an object listing model.so")
    for key in ("inputs", "outputs"):
        _check_specs(manifest, key, where)
    for key in ("kind", "edgellm_version", "created"):
        _want(isinstance(manifest.get(key, ""), str), where, key, "a string")
    for key in ("model", "source", "recipe", "verification", "build", "llm", "compression"):
        _want(isinstance(manifest.get(key, {}), dict), where, key, "an object")
    verification = manifest.get("verification", {})
    for key in ("tolerance", "min_cosine"):
        _want(isinstance(verification.get(key, 0.0), (int, float)), where, f"verification.{key}", "a number")
    if manifest.get("kind") == "llm":
        lm = manifest.get("llm")
        _want(isinstance(lm, dict) and isinstance(lm.get("config"), dict), where, "llm.config", "an object")
        for key in ("max_seq_len", "prefill_chunk"):
            _want(_is_int(lm.get(key), 1), where, f"llm.{key}", "a positive integer")
        _want(isinstance(lm.get("params"), list) and all(isinstance(p, dict) and isinstance(p.get("name"), str) for p in lm["params"]),
              where, "llm.params", "a list of named parameters")
        _want(isinstance(lm.get("weights"), str), where, "llm.weights", "a string")
        _want("module" in backend, where, "backend.module", "a member the manifest lists")
    return manifest


def _manifest(archive: zipfile.ZipFile, path: Path) -> tuple[dict, bytes]:
    """(manifest, its exact bytes: what a signature signs)."""
    if MANIFEST not in archive.NameToInfo:
        raise PackageError(f"{path} has no {MANIFEST}", "it is not an edgellm package")
    raw, _ = _inflate(archive, MANIFEST, path, MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested past the parser
        raise PackageError(f"{path}: {MANIFEST} is unreadable ({_short(e)})", AGAIN) from None
    return _check_manifest(manifest, path), raw


def read_manifest(path: str | Path) -> dict:
    """The manifest alone, without verifying members or a signature (for ``inspect``)."""
    path = Path(path)
    with _open(path) as archive:
        return _manifest(archive, path)[0]


def read_package(path: str | Path, trusted_keys=None, *, env: bool = True) -> tuple[dict, dict[str, bytes]]:
    """Manifest and every member, each checked against its sha256 and size.

    With trusted keys (``trusted_keys``: .pub paths or hex keys, plus those in $EDGELLM_TRUSTED_KEYS unless ``env``
    is False) the package must carry a signature by one of them over its manifest: checked here, before any code in
    it can be loaded."""
    path = Path(path)
    keys = trusted(trusted_keys, env=env)
    with _open(path) as archive:
        manifest, raw = _manifest(archive, path)
        signature = _signature(archive, path)
        if keys:
            verify_signature(raw, signature, keys, path)
        extra = set(archive.namelist()) - set(manifest["files"]) - {MANIFEST, SIGNATURE}
        if extra:
            shown = sorted(extra)[:5]
            raise PackageError(f"{path} holds members the manifest does not list: {shown}", "the package was altered")
        members = {}
        for name, meta in manifest["files"].items():
            data, sha256 = _inflate(archive, name, path, meta["size"], declared=meta["size"])
            if sha256 != meta["sha256"]:
                raise PackageError(f"{path}: member {name} fails its sha256 check (altered or corrupt)", AGAIN)
            if name.endswith(".npz"):
                _npz_arrays(data, f"{path}: member {name}", load=False)
            members[name] = data
    return manifest, members


def check_device(manifest: dict, cpu_flags: set[str] | None = None, machine: str | None = None) -> None:
    """Refuse a package this machine (or the remote device ``machine`` with ``cpu_flags``) cannot run, before loading any code from it."""
    target = manifest["target"]
    local = machine is None
    machine = machine or platform.machine()
    if target["arch"] != machine:
        raise PackageError(
            f"package is for {target['arch']} (target {target['name']}), this machine is {machine}",
            f"run it on a {target['arch']} device or build it with --target host",
        )
    if cpu_flags:  # unknown flags (no /proc/cpuinfo) are not a reason to refuse
        missing = sorted(set(target.get("has", [])) - cpu_flags)
        if missing:
            raise PackageError(
                f"package needs CPU features this CPU lacks: {', '.join(missing)} (target {target['name']})",
                "build it for a target this CPU has, e.g. --target host",
            )
    if local and "amx_tile" in target.get("has", []):
        from .device import request_amx_tiles

        refused = request_amx_tiles()
        if refused:
            raise PackageError(f"package uses AMX tiles (target {target['name']}) and {refused}",
                               "run it on a newer kernel, or build it for --target x86_64-avx512")


# ---------------------------------------------------------------- .npz members: a zip inside the zip


def _npz_arrays(data: bytes, where: str, load: bool = True) -> dict:
    """The arrays of an .npz (``load`` False: only checked), refusing what np.load would trust.

    Entries must be stored, as np.savez writes them (the package deflates the whole member), so a nested zip
    bomb cannot exist; each .npy header must be plain (no pickle, no object or structured dtype) and describe
    exactly the bytes that follow it, so a header cannot make numpy allocate more than the member holds."""
    import numpy as np
    from numpy.lib import format as npy

    arrays = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            if len({i.filename for i in infos}) != len(infos):
                raise PackageError(f"{where} holds two arrays with the same name", ALTERED)
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size or info.file_size > len(data):
                    raise PackageError(f"{where}: entry {info.filename[:40]!r} is compressed or oversized (packages store arrays "
                                       "as np.savez does)", ALTERED)
                if not info.filename.endswith(".npy"):
                    raise PackageError(f"{where}: entry {info.filename[:40]!r} is not an .npy array", ALTERED)
                with archive.open(info) as f:
                    version = npy.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = npy.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran, dtype = npy.read_array_header_2_0(f)
                    else:
                        raise PackageError(f"{where}: entry {info.filename[:40]!r} has .npy version {version}", ALTERED)
                    if dtype.hasobject or dtype.names is not None or dtype.subdtype is not None or dtype.itemsize == 0:
                        raise PackageError(f"{where}: array {info.filename[:40]!r} has dtype {str(dtype)[:40]} (objects and "
                                           "records are refused: they would need pickle)", ALTERED)
                    count = math.prod(shape)
                    if count * dtype.itemsize != info.file_size - f.tell():
                        raise PackageError(f"{where}: array {info.filename[:40]!r} declares {count} x {dtype.itemsize} bytes, "
                                           f"the entry holds {info.file_size - f.tell()}", ALTERED)
                    if load:
                        array = np.empty(count, dtype)
                        view = memoryview(array).cast("B") if count else b""
                        got = 0
                        while got < len(view):
                            n = f.readinto(view[got:])
                            if not n:
                                raise PackageError(f"{where}: array {info.filename[:40]!r} is truncated", ALTERED)
                            got += n
                        array = array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)
                        arrays[info.filename[: -len(".npy")]] = array
    except PackageError:
        raise
    except (*_ZIP_ERRORS, TypeError, SyntaxError) as e:  # numpy's header parser: ValueError; literal_eval: SyntaxError
        raise PackageError(f"{where} is not a readable .npz ({_short(e)})", ALTERED) from None
    return arrays


def load_npz(data: bytes, name: str = "reference.npz") -> dict:
    """The arrays of an .npz member, never with pickle (see _npz_arrays)."""
    return _npz_arrays(data, f"member {name}")


# ---------------------------------------------------------------- signatures (made by edgellm/signing.py)


def fingerprint(public_key: bytes) -> str:
    """What names a key: the sha256 of its 32 raw bytes, in hex."""
    return sha256_bytes(public_key)


def public_key_bytes(text: str, where: str) -> bytes:
    """The 32 raw bytes of an Ed25519 public key given as 64 hex digits (a .pub from `edgellm keygen`) or a PEM."""
    text = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    if text.startswith("-----BEGIN PUBLIC KEY-----"):
        serialization, ed25519 = ed25519_modules()
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError:
            key = None
        if isinstance(key, ed25519.Ed25519PublicKey):
            return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raise EdgeError(f"{where} is not an Ed25519 public key", "give a NAME.pub written by `edgellm keygen` (64 hex digits) or a PEM public key")


def trusted(keys=None, env: bool = True) -> list[bytes]:
    """The trusted public keys: ``keys`` (.pub paths or key strings) plus the os.pathsep-separated list in
    $EDGELLM_TRUSTED_KEYS. The variable adds to what code passes and is never overridden by it: a device's policy."""
    if isinstance(keys, (str, Path)):  # one key given bare
        keys = [keys]
    items = [str(k) for k in (keys or [])]
    if env:
        items += [k for k in os.environ.get(TRUSTED_KEYS_ENV, "").split(os.pathsep) if k.strip()]
    found = []
    for item in items:
        if re.fullmatch(r"\s*[0-9a-fA-F]{64}\s*", item):
            found.append(bytes.fromhex(item.strip()))
            continue
        path = Path(item)
        if not path.is_file():
            raise EdgeError(f"trusted key {item} is neither a key file nor 64 hex digits",
                            f"give NAME.pub from `edgellm keygen`; check --trusted-key and {TRUSTED_KEYS_ENV}")
        try:
            with open(path, "rb") as f:
                text = f.read(65536).decode()
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeError(f"cannot read trusted key {path} ({_short(e)})", "give NAME.pub from `edgellm keygen`") from None
        found.append(public_key_bytes(text, f"trusted key {path}"))
    return found


def ed25519_modules():
    """cryptography's serialization and ed25519 modules, imported only when a key is used: the runtime loads without them."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise EdgeError("signed packages need the cryptography library", "pip install 'cryptography>=42'") from None
    return serialization, ed25519


def _signature(archive: zipfile.ZipFile, path: Path) -> dict | None:
    """The package's signature member, checked for shape (not verified), or None when it is unsigned."""
    if SIGNATURE not in archive.NameToInfo:
        return None
    raw, _ = _inflate(archive, SIGNATURE, path, MAX_SIGNATURE_BYTES)
    try:
        sig = json.loads(raw)
    except (ValueError, RecursionError):
        sig = None
    ok = (isinstance(sig, dict) and sig.get("format") == SIGNATURE_FORMAT and sig.get("algorithm") == "ed25519"
          and sig.get("signed") == MANIFEST and isinstance(sig.get("key_fingerprint"), str)
          and _HEX64.fullmatch(sig["key_fingerprint"]) is not None
          and isinstance(sig.get("signature"), str) and re.fullmatch(r"[0-9a-f]{128}", sig["signature"]) is not None)
    if not ok:
        raise PackageError(f"{path}: {SIGNATURE} is malformed", "sign the package again with `edgellm sign`")
    return sig


def read_signature(path: str | Path) -> dict | None:
    """The signature a package carries, unverified ({format, algorithm, signed, key_fingerprint, signature}), or None."""
    path = Path(path)
    with _open(path) as archive:
        return _signature(archive, path)


def verify_signature(manifest_bytes: bytes, signature: dict | None, keys: list[bytes], path: Path) -> str:
    """The fingerprint of the trusted key that signed these manifest bytes; PackageError when none did."""
    if signature is None:
        raise PackageError(f"{path} is unsigned and trusted keys are set ({len(keys)})",
                           "sign it with `edgellm sign PKG --key KEY`, or load it without trusted keys")
    match = [k for k in keys if fingerprint(k) == signature["key_fingerprint"]]
    if not match:
        raise PackageError(f"{path} is signed by key {signature['key_fingerprint'][:16]}, which is not among the {len(keys)} trusted key(s)",
                           f"sign it with a trusted key, or trust its .pub with --trusted-key or {TRUSTED_KEYS_ENV}")
    _, ed25519 = ed25519_modules()
    from cryptography.exceptions import InvalidSignature

    try:
        ed25519.Ed25519PublicKey.from_public_bytes(match[0]).verify(bytes.fromhex(signature["signature"]), manifest_bytes)
    except InvalidSignature:
        raise PackageError(f"{path}: the signature by key {signature['key_fingerprint'][:16]} does not verify (the manifest was altered "
                           "after signing)", "copy the package again from its source, or sign it again") from None
    return signature["key_fingerprint"]
