"""Targets are data: one TOML file per device class in this folder.

A target says which instruction set to compile for (the TVM target dict), which CPU
features the device has and lacks (the runtime refuses a package whose features the CPU
lacks, instead of dying of SIGILL), how many cores it has, and the backends it allows in
order of preference. ``--target`` takes a name from this folder, a path to such a file,
or ``host`` (the best known target this machine can run).
"""

from __future__ import annotations

import json
import platform
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgellm.errors import EdgeError
from edgellm.runtime.device import cpu_flags

TARGETS_DIR = Path(__file__).parent
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
            raise EdgeError(f"target file {origin} has {what}", "see edgellm/targets/x86_64.toml for the format")
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


def all_targets() -> dict[str, Target]:
    """Every bundled target, by name."""
    targets = {}
    for path in sorted(TARGETS_DIR.glob("*.toml")):
        target = _read(path)
        if target.name != path.stem:
            raise EdgeError(f"target file {path.name} names itself {target.name!r}", "the name must equal the file name")
        targets[target.name] = target
    return targets


def host() -> Target:
    """The most capable bundled CPU target this machine can run (GPU targets are never implied)."""
    arch, flags = platform.machine(), cpu_flags()
    fits = [t for t in all_targets().values() if t.arch == arch and t.tvm.get("kind") == "llvm" and set(t.has) <= flags]
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
