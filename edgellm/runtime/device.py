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


def request_amx_tiles() -> str | None:
    """Ask Linux for the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, process-wide; it is
    handed out only on request, and a tile instruction without it dies of SIGILL). None when granted, else why not.
    TVM's tile kernels ask too; asking here first turns a refusal into an error before any code runs."""
    import ctypes
    import errno

    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return "AMX tiles need Linux on x86_64"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(158, 0x1023, 18) == 0:  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
        return None
    code = ctypes.get_errno()
    return f"the kernel refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM: {errno.errorcode.get(code, code)}; Linux 5.16 or newer grants it)"


def cpu_count() -> int:
    """Cores this process may use (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_list(text: str) -> set[int]:
    """CPU numbers from the kernel's list format ("0-3,8,10-11")."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        low, _, high = part.partition("-")
        if low.strip().isdigit():
            cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def _quota_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Whole cores a cgroup v2 CPU quota grants ("150000 100000" -> 2, rounded up), None when unlimited or unknown."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):  # no file, "max", or a format this does not know
        return None


def physical_cores(sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores this process may use: CPUs in its affinity, SMT siblings counted once, capped by a cgroup v2
    quota. The default thread count: a second hardware thread on a busy core adds little to compute-bound kernels
    and contends for its caches. Falls back to :func:`cpu_count` where the topology is not readable."""
    allowed = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        try:
            siblings = _cpu_list((sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text())
        except OSError:
            cores = set()
            break
        cores.add(min(siblings) if siblings else cpu)
    count = len(cores) or cpu_count()
    quota = _quota_cores()
    return max(1, min(count, quota) if quota else count)


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7763 64-Core Processor"); on arm64 boards whose cpuinfo has none, the core's
    implementer and part numbers ("aarch64 0x41 0xd08": a Cortex-A72), so two different boards never look alike."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if fields.get("model name") or fields.get("Model"):
        return fields.get("model name") or fields["Model"]
    if "CPU part" in fields:
        return f"{platform.machine()} {fields.get('CPU implementer', '?')} {fields['CPU part']}"
    return platform.processor() or platform.machine()


def describe() -> dict:
    """A short description of this machine for reports."""
    return {
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cores": cpu_count(),
        "python": platform.python_version(),
        "system": platform.system(),
    }
