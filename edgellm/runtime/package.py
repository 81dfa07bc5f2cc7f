"""Reading and verifying an .edgepkg: the one file a device receives.

An .edgepkg is a zip archive (deflated members) holding ``manifest.json`` plus the
members it lists, each with its sha256. The writer lives on the compiler side (edgellm/package.py); the format
constants live here so the runtime never needs the compiler to read a package.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import zipfile
from pathlib import Path

from edgellm.errors import EdgeError

FORMAT = "edgepkg"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SUFFIX = ".edgepkg"


class PackageError(EdgeError):
    """The package cannot be used as it is: corrupt, altered, too new, or for another device."""


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
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise PackageError(f"{path} is not a readable .edgepkg ({e})", "it is truncated or not a package: copy or build it again") from None


def _manifest(archive: zipfile.ZipFile, path: Path) -> dict:
    try:
        manifest = json.loads(archive.read(MANIFEST))
    except KeyError:
        raise PackageError(f"{path} has no {MANIFEST}", "it is not an edgellm package") from None
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise PackageError(f"{path}: {MANIFEST} is unreadable ({e})", "copy or build the package again") from None
    if manifest.get("format") != FORMAT:
        raise PackageError(f"{path} is not an edgellm package (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PackageError(
            f"{path} uses package format {version}, newer than this runtime reads ({FORMAT_VERSION})",
            "upgrade edgellm on this device",
        )
    return manifest


def read_manifest(path: str | Path) -> dict:
    """The manifest alone, without verifying members (for ``inspect``)."""
    path = Path(path)
    with _open(path) as archive:
        return _manifest(archive, path)


def read_package(path: str | Path) -> tuple[dict, dict[str, bytes]]:
    """Manifest and every member, each checked against its sha256 and size."""
    path = Path(path)
    with _open(path) as archive:
        manifest = _manifest(archive, path)
        members = {}
        for name, meta in manifest["files"].items():
            try:
                data = archive.read(name)
            except KeyError:
                raise PackageError(f"{path} lacks member {name}", "copy or build the package again") from None
            except (zipfile.BadZipFile, OSError) as e:
                raise PackageError(f"{path}: member {name} is unreadable ({e})", "copy or build the package again") from None
            if len(data) != meta["size"] or sha256_bytes(data) != meta["sha256"]:
                raise PackageError(
                    f"{path}: member {name} fails its sha256 check (altered or corrupt)",
                    "copy or build the package again",
                )
            members[name] = data
        extra = set(archive.namelist()) - set(manifest["files"]) - {MANIFEST}
        if extra:
            raise PackageError(f"{path} holds members the manifest does not list: {sorted(extra)}", "the package was altered")
    return manifest, members


def check_device(manifest: dict, cpu_flags: set[str] | None = None, machine: str | None = None) -> None:
    """Refuse a package this machine (or the remote device ``machine`` with ``cpu_flags``) cannot run, before loading any code from it."""
    target = manifest["target"]
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


def load_npz(data: bytes) -> dict:
    import numpy as np

    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}
