"""What this machine is: architecture, CPU features, cores. Stdlib only."""

from __future__ import annotations

import os
import platform
from pathlib import Path


# Linux arm64 HWCAP / HWCAP2 bits (arch/arm64/include/uapi/asm/hwcap.h), named as /proc/cpuinfo names them
_ARM64_HWCAP = {"fp": 0, "asimd": 1, "aes": 3, "pmull": 4, "sha1": 5, "sha2": 6, "crc32": 7, "atomics": 8, "fphp": 9,
                "asimdhp": 10, "asimdrdm": 12, "lrcpc": 15, "sha3": 17, "asimddp": 20, "sha512": 21, "sve": 22}
_ARM64_HWCAP2 = {"sve2": 1, "i8mm": 13, "bf16": 14}


def _arm64_flags() -> set[str]:
    """From the auxiliary vector: what the kernel (or qemu-user, for an emulated core) says this CPU has."""
    import ctypes

    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return set()
    getauxval.restype = ctypes.c_ulong
    hwcap, hwcap2 = getauxval(16), getauxval(26)  # AT_HWCAP, AT_HWCAP2
    return {n for n, b in _ARM64_HWCAP.items() if hwcap >> b & 1} | {n for n, b in _ARM64_HWCAP2.items() if hwcap2 >> b & 1}


def cpu_flags() -> set[str]:
    """This CPU's feature flags as /proc/cpuinfo names them (empty where unknown)."""
    if platform.machine() == "aarch64":
        return _arm64_flags()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_count() -> int:
    """Cores this process may use (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe() -> dict:
    """A short description of this machine for reports."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("model name", "Model"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "machine": platform.machine(),
        "cpu": model or platform.processor(),
        "cores": cpu_count(),
        "python": platform.python_version(),
        "system": platform.system(),
    }
