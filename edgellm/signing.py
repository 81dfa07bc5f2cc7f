"""Ed25519 keys and package signatures: a device that trusts a key loads only packages that key signed.

Keys (``edgellm keygen -o NAME``): NAME holds the private key (PEM, PKCS8, unencrypted, mode 0600); NAME.pub the
public key as 64 hex digits on one line, short enough for $EDGELLM_TRUSTED_KEYS or a command line.

A signature (``edgellm sign PKG --key NAME``) is over the exact bytes of the package's manifest.json, which holds
every member's sha256, so it covers the whole package. It goes into one extra member, ``signature.ed25519`` (JSON:
key fingerprint and signature in hex), appended to a copy of the zip that is then renamed over the original: every
other member stays byte-identical. The reader checks it (edgellm/runtime/package.py) before any code is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from edgellm.errors import EdgeError
from edgellm.package import check_output
from edgellm.runtime.package import MANIFEST, SIGNATURE, SIGNATURE_FORMAT, ed25519_modules, fingerprint, read_package, read_signature


def keygen(name: str | Path) -> dict:
    """Write a new key pair NAME (private) and NAME.pub (public); never over an existing file."""
    serialization, ed25519 = ed25519_modules()
    private, public = Path(name), Path(f"{name}.pub")
    parent = private.parent if str(private.parent) else Path(".")
    if not parent.is_dir():
        raise EdgeError(f"cannot write {private}: folder {parent} does not exist", f"mkdir -p {parent}")
    for path in (private, public):
        if path.exists():
            raise EdgeError(f"{path} exists", "choose another name: keygen never overwrites a key")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    try:
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # private from the first byte
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.chmod(private, 0o600)
        public.write_text(raw.hex() + "\n")
    except OSError as e:
        private.unlink(missing_ok=True)
        raise EdgeError(f"cannot write {private}: {e.strerror}") from None
    except BaseException:
        private.unlink(missing_ok=True)
        public.unlink(missing_ok=True)
        raise
    return {"private": str(private), "public": str(public), "key": raw.hex(), "fingerprint": fingerprint(raw)}


def load_private_key(path: str | Path):
    """The Ed25519 private key in ``path`` (a PEM from keygen), or one error line saying what it is instead."""
    serialization, ed25519 = ed25519_modules()
    path = Path(path)
    if not path.is_file():
        raise EdgeError(f"key file {path} does not exist", "make a key pair with `edgellm keygen -o NAME` and sign with NAME")
    try:
        with open(path, "rb") as f:
            data = f.read(65536)
    except OSError as e:
        raise EdgeError(f"cannot read key file {path}: {e.strerror}") from None
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # not a PEM private key, one with a passphrase, an unknown kind
        key = None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        hint = "; that is the public half: sign with NAME, not NAME.pub" if path.suffix == ".pub" else ""
        raise EdgeError(f"{path} is not an unencrypted Ed25519 private key in PEM{hint}", "give the NAME written by `edgellm keygen -o NAME`")
    return key


def sign_package(path: str | Path, key: str | Path, output: str | Path | None = None) -> dict:
    """Sign the package at ``path`` with the private key file ``key``, in place or into ``output``."""
    path = Path(path)
    private = load_private_key(key)
    read_package(path, env=False)  # sign only an intact package; trusted-key policy is for loading, not signing
    existing = read_signature(path)
    if existing is not None:
        raise EdgeError(f"{path} is already signed by key {existing['key_fingerprint'][:16]}", "sign the package as built: build it again")
    out = check_output(output or path)
    with zipfile.ZipFile(path) as archive:
        manifest = archive.read(MANIFEST)
    serialization, _ = ed25519_modules()
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    member = {"format": SIGNATURE_FORMAT, "algorithm": "ed25519", "signed": MANIFEST, "key_fingerprint": fingerprint(public),
              "signature": private.sign(manifest).hex()}
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f, open(path, "rb") as src:
            shutil.copyfileobj(src, f)
        with zipfile.ZipFile(tmp, "a", zipfile.ZIP_DEFLATED) as archive:  # appends: the members before it are untouched
            archive.writestr(SIGNATURE, json.dumps(member, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"package": str(out), "key_fingerprint": member["key_fingerprint"], "member": SIGNATURE}
