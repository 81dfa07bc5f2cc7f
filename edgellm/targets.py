"""Targets are data: one TOML file per device class, in the top-level ``targets/`` folder.

A target says which instruction set to compile for (the TVM target dict), which CPU
features the device has and lacks (the runtime refuses a package whose features the CPU
lacks, instead of dying of SIGILL), how many cores it has, and the backends it allows in
order of preference. ``--target`` takes a known name, a path to such a file, inline JSON,
or ``host`` (the best bundled target this machine can run).

Known names come from the folders in ``EDGELLM_TARGETS`` (os.pathsep-separated, searched first: a
user's file of a bundled name replaces it) and then the bundled ``targets/`` folder, which the wheel
ships as ``edgellm/_targets`` (pyproject's build config maps it there).
"""

from __future__ import annotations

import json
import os
import platform
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgellm.errors import EdgeError
from edgellm.runtime.device import cpu_flags

ENV = "EDGELLM_TARGETS"
BUNDLED = "bundled"
ARCHES = ("x86_64", "aarch64")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str  # as platform.machine() says it on the device: x86_64 | aarch64
    tvm: dict  # the TVM target, e.g. {"kind": "llvm", "mtriple": ..., "mcpu": ...}
    backends: list[str]
    has: list[str] = field(default_factory=list)  # CPU flags, /proc/cpuinfo names
    lacks: list[str] = field(default_factory=list)
    cores: int = 1
    vector_bits: int = 128
    cpu: str = ""  # the core, for reports, e.g. cortex-a72
    qemu_cpu: str = ""  # the core qemu-user emulates for `edgellm verify` (QEMU_CPU)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, origin: str) -> Target:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        missing = sorted({"name", "description", "arch", "tvm", "backends"} - set(data))
        if unknown or missing:
            what = f"unknown keys {unknown}" if unknown else f"missing keys {missing}"
            raise EdgeError(f"target file {origin} has {what}", "see targets/x86_64.toml for the format")
        if data["arch"] not in ARCHES:
            raise EdgeError(f"target {origin}: arch must be one of {', '.join(ARCHES)}, not {data['arch']!r}")
        if not data["backends"]:
            raise EdgeError(f"target {origin} allows no backend", "list at least one, e.g. backends = [\"tvm\"]")
        clash = sorted(set(data.get("has", [])) & set(data.get("lacks", [])))
        if clash:
            raise EdgeError(f"target {origin} both has and lacks {clash}")
        return cls(**data)


def _read(path: Path) -> Target:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise EdgeError(f"cannot read target file {path}: {e}") from None
    return Target.from_dict(data, str(path))


def bundled_dir() -> Path:
    """The bundled targets: edgellm/_targets in an installed wheel, else the checkout's top-level targets/."""
    here = Path(__file__).resolve().parent
    installed = here / "_targets"
    return installed if installed.is_dir() else here.parent / "targets"


def user_dirs() -> list[Path]:
    """The folders named by EDGELLM_TARGETS, in order."""
    return [Path(d).expanduser() for d in os.environ.get(ENV, "").split(os.pathsep) if d.strip()]


def _scan(folder: Path) -> dict[str, Target]:
    targets = {}
    for path in sorted(folder.glob("*.toml")):
        target = _read(path)
        if target.name != path.stem:
            raise EdgeError(f"target file {path} names itself {target.name!r}", "the name must equal the file name")
        targets[target.name] = target
    return targets


def found() -> dict[str, tuple[Target, str]]:
    """Every known target by name, with where it came from: ``bundled`` or ``EDGELLM_TARGETS:<folder>``."""
    known = {name: (t, BUNDLED) for name, t in _scan(bundled_dir()).items()}
    for folder in reversed(user_dirs()):  # the first folder wins, as on PATH
        if not folder.is_dir():
            raise EdgeError(f"{ENV} names {folder}, which is not a folder", f"create it, or fix {ENV} (folders separated by {os.pathsep!r})")
        known.update({name: (t, f"{ENV}:{folder}") for name, t in _scan(folder).items()})
    return dict(sorted(known.items()))


def all_targets() -> dict[str, Target]:
    """Every known target (EDGELLM_TARGETS folders, then the bundled ones), by name."""
    return {name: t for name, (t, _) in found().items()}


def host() -> Target:
    """The most capable bundled CPU target this machine can run (GPU targets and user files are never implied)."""
    arch, flags = platform.machine(), cpu_flags()
    fits = [t for t in _scan(bundled_dir()).values() if t.arch == arch and t.tvm.get("kind") == "llvm" and set(t.has) <= flags]
    if not fits:
        raise EdgeError(f"no bundled target runs on this {arch} machine", "pass --target NAME or a target file")
    return max(fits, key=lambda t: (len(t.has), t.vector_bits))


def resolve(spec: str | Target) -> Target:
    """A target from a name, ``host``, a .toml path, or inline JSON."""
    if isinstance(spec, Target):
        return spec
    if spec == "host":
        return host()
    if spec.lstrip().startswith("{"):
        try:
            return Target.from_dict(json.loads(spec), "(inline JSON)")
        except json.JSONDecodeError as e:
            raise EdgeError(f"--target is not valid JSON: {e}") from None
    if spec.endswith(".toml") or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise EdgeError(f"target file {spec} does not exist")
        return _read(path)
    targets = all_targets()
    if spec not in targets:
        raise EdgeError(f"unknown target {spec!r}", f"known targets: {', '.join(['host', *targets])}")
    return targets[spec]
