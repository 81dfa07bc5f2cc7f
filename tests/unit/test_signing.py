"""Signed packages: keygen writes a usable pair, signing adds one member and changes nothing else, and a loader given
trusted keys refuses unsigned, foreign-signed and altered packages with one line."""

from __future__ import annotations

import json
import os
import platform
import stat
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from edgellm.cli import main
from edgellm.errors import EdgeError
from edgellm.package import npz_bytes, write_package
from edgellm.runtime.package import SIGNATURE, TRUSTED_KEYS_ENV, PackageError, fingerprint, read_package, read_signature
from edgellm.signing import keygen, sign_package

MEMBERS = {"model.so": b"\x7fELF" + bytes(range(256)) * 4, "reference.npz": npz_bytes({"input.x": np.ones((1, 4), np.float16)})}


@pytest.fixture
def pkg(tmp_path):
    path = tmp_path / "m.edgepkg"
    write_package(path, {"target": {"name": "t", "arch": platform.machine(), "has": [], "description": "here"}, "backend": {"name": "tvm", "module": "model.so"},
                         "inputs": [{"name": "x", "shape": [1, 4], "dtype": "float32"}],
                         "outputs": [{"name": "y", "shape": [1, 2], "dtype": "float32"}],
                         # what `edgellm inspect` prints
                         "model": {"name": "m", "weights": None}, "source": {"kind": "onnx", "ref": "m.onnx", "sha256": "0" * 64},
                         "verification": {"status": "skipped"}, "created": "today", "edgellm_version": "0.1.0"}, MEMBERS)
    return path


@pytest.fixture
def key(tmp_path):
    return keygen(tmp_path / "release")


@pytest.fixture
def other(tmp_path):
    return keygen(tmp_path / "other")


@pytest.fixture(autouse=True)
def _no_policy(monkeypatch):
    monkeypatch.delenv(TRUSTED_KEYS_ENV, raising=False)


def refused(path, keys, match):
    with pytest.raises(PackageError, match=match) as e:
        read_package(path, keys)
    assert "\n" not in str(e.value)


def test_keygen_writes_a_private_pem_0600_and_a_hex_public_key(tmp_path, key):
    private, public = tmp_path / "release", tmp_path / "release.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8
    hex_key = public.read_text().strip()
    assert len(hex_key) == 64 and bytes.fromhex(hex_key).hex() == hex_key == key["key"]
    assert key["fingerprint"] == fingerprint(bytes.fromhex(hex_key))
    with pytest.raises(EdgeError, match="exists"):
        keygen(tmp_path / "release")  # never over a key
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_signing_adds_one_member_and_changes_nothing_else(pkg, key):
    before = pkg.read_bytes()
    with zipfile.ZipFile(pkg) as z:
        old = {i.filename: (i.header_offset, i.compress_size, i.CRC, z.read(i.filename)) for i in z.infolist()}
        directory = z.start_dir  # where the members end
    result = sign_package(pkg, key["private"])
    after = pkg.read_bytes()
    assert after[:directory] == before[:directory]  # every member, local header and compressed bytes, byte for byte
    with zipfile.ZipFile(pkg) as z:
        assert z.namelist() == [*old, SIGNATURE]
        assert {n: (z.getinfo(n).header_offset, z.getinfo(n).compress_size, z.getinfo(n).CRC, z.read(n)) for n in old} == old
        sig = json.loads(z.read(SIGNATURE))
    assert sig["key_fingerprint"] == result["key_fingerprint"] == key["fingerprint"]
    assert read_signature(pkg) == sig
    assert read_package(pkg)[1] == MEMBERS  # a signed package still reads without keys
    assert stat.S_IMODE(pkg.stat().st_mode) == 0o644 and [p.name for p in pkg.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_signed_package_verifies_with_its_key_given_any_way(pkg, key, other, monkeypatch):
    sign_package(pkg, key["private"])
    assert read_package(pkg, [key["public"]])[1] == MEMBERS  # a .pub path
    assert read_package(pkg, [key["key"]])[1] == MEMBERS  # the 64 hex digits
    assert read_package(pkg, key["public"])[1] == MEMBERS  # one key, not in a list
    monkeypatch.setenv(TRUSTED_KEYS_ENV, os.pathsep.join([other["public"], key["key"]]))
    assert read_package(pkg)[1] == MEMBERS  # the variable alone: a list of .pub paths and keys


def test_unsigned_package_is_refused_when_keys_are_trusted(pkg, key, monkeypatch):
    refused(pkg, [key["public"]], r"is unsigned and trusted keys are set \(1\).*edgellm sign")
    monkeypatch.setenv(TRUSTED_KEYS_ENV, key["public"])
    refused(pkg, None, "is unsigned")
    refused(pkg, [], "is unsigned")  # code cannot lift the device's policy by passing no keys


def test_package_signed_by_another_key_is_refused(pkg, key, other):
    sign_package(pkg, other["private"])
    refused(pkg, [key["public"]], f"is signed by key {other['fingerprint'][:16]}, which is not among the 1 trusted key")
    assert read_package(pkg, [key["public"], other["public"]])[1] == MEMBERS


def _rewrite(path, edit):
    with zipfile.ZipFile(path) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w") as z:
        for info, data in items:
            z.writestr(info, edit(info.filename, data))


def test_member_changed_after_signing_is_refused(pkg, key):
    sign_package(pkg, key["private"])
    _rewrite(pkg, lambda n, d: d.replace(b"ELF", b"EVL") if n == "model.so" else d)
    refused(pkg, [key["public"]], "member model.so fails its sha256 check")


def test_manifest_changed_after_signing_is_refused(pkg, key):
    """The attacker rewrites the manifest to match a new model.so: the signature over the manifest no longer verifies."""
    sign_package(pkg, key["private"])
    evil = b"\x7fELF evil"

    def edit(name, data):
        if name == "model.so":
            return evil
        if name == "manifest.json":
            m = json.loads(data)
            m["files"]["model.so"] = {"size": len(evil), "sha256": __import__("hashlib").sha256(evil).hexdigest()}
            return json.dumps(m, indent=2)
        return data

    _rewrite(pkg, edit)
    assert read_package(pkg)[1]["model.so"] == evil  # consistent: only the signature catches it
    refused(pkg, [key["public"]], f"the signature by key {key['fingerprint'][:16]} does not verify")


def test_malformed_signature_member_is_refused(pkg, key):
    sign_package(pkg, key["private"])
    _rewrite(pkg, lambda n, d: b'{"format": "edgellm-signature/1", "signature": 5}' if n == SIGNATURE else d)
    refused(pkg, [key["public"]], f"{SIGNATURE} is malformed")
    refused(pkg, None, f"{SIGNATURE} is malformed")


def test_bad_key_files_are_one_line(pkg, key, tmp_path):
    (tmp_path / "junk.pub").write_text("not a key\n")
    with pytest.raises(EdgeError, match="trusted key .*nope.pub is neither a key file nor 64 hex digits"):
        read_package(pkg, [tmp_path / "nope.pub"])
    with pytest.raises(EdgeError, match="junk.pub is not an Ed25519 public key"):
        read_package(pkg, [tmp_path / "junk.pub"])
    with pytest.raises(EdgeError, match="key file .*missing does not exist.*edgellm keygen"):
        sign_package(pkg, tmp_path / "missing")
    with pytest.raises(EdgeError, match="not an unencrypted Ed25519 private key in PEM; that is the public half"):
        sign_package(pkg, key["public"])
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    (tmp_path / "ec.pem").write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(EdgeError, match="ec.pem is not an unencrypted Ed25519 private key"):
        sign_package(pkg, tmp_path / "ec.pem")
    assert read_signature(pkg) is None  # nothing half-written


def test_a_pem_public_key_is_trusted_too(pkg, key, tmp_path):
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key((tmp_path / "release").read_bytes(), None)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "release.pem").write_bytes(pem)
    sign_package(pkg, key["private"])
    assert read_package(pkg, [tmp_path / "release.pem"])[1] == MEMBERS


def test_signing_twice_or_a_broken_package_is_refused(pkg, key, other, tmp_path):
    sign_package(pkg, key["private"])
    with pytest.raises(EdgeError, match=f"already signed by key {key['fingerprint'][:16]}"):
        sign_package(pkg, other["private"])
    broken = tmp_path / "broken.edgepkg"
    broken.write_bytes(pkg.read_bytes()[:300])
    with pytest.raises(PackageError, match="not a readable"):
        sign_package(broken, key["private"])


def test_cli_keygen_sign_inspect_round_trip(pkg, tmp_path):
    runner = CliRunner()
    made = runner.invoke(main, ["keygen", "-o", str(tmp_path / "ci"), "--json"])
    assert made.exit_code == 0, made.output
    made = json.loads(made.output)
    unsigned = json.loads(runner.invoke(main, ["inspect", str(pkg), "--json"]).output)
    assert unsigned["package"]["signature"] is None
    signed = runner.invoke(main, ["sign", str(pkg), "--key", made["private"], "--json"])
    assert signed.exit_code == 0, signed.output
    assert json.loads(signed.output)["key_fingerprint"] == made["fingerprint"]
    shown = json.loads(runner.invoke(main, ["inspect", str(pkg), "--json", "--trusted-key", made["public"]]).output)
    assert shown["package"]["signature"] == {"algorithm": "ed25519", "key_fingerprint": made["fingerprint"], "verified": True}
    human = runner.invoke(main, ["inspect", str(pkg)]).output
    assert f"signed    by key {made['fingerprint'][:16]}" in human
    keygen(tmp_path / "stranger")
    wrong = runner.invoke(main, ["inspect", str(pkg), "--trusted-key", str(tmp_path / "stranger.pub")])
    assert wrong.exit_code == 2 and wrong.output.startswith("error: ") and wrong.output.count("\n") == 1
    again = runner.invoke(main, ["sign", str(pkg), "--key", str(tmp_path / "nokey")])
    assert again.exit_code == 2 and again.output == f"error: key file {tmp_path / 'nokey'} does not exist (make a key pair with " \
                                                     "`edgellm keygen -o NAME` and sign with NAME)\n"
    exists = runner.invoke(main, ["keygen", "-o", made["private"]])
    assert exists.exit_code == 2 and "exists" in exists.output


def test_sign_to_another_file_leaves_the_original(pkg, key, tmp_path):
    out = tmp_path / "signed.edgepkg"
    before = pkg.read_bytes()
    sign_package(pkg, key["private"], out)
    assert pkg.read_bytes() == before and read_signature(pkg) is None
    assert read_package(out, [key["public"]])[1] == MEMBERS
