"""What the schedule rules need to know about the target CPU core: ``core_info(target)``.

Vector width / register count come from the target's ``mcpu`` / ``mattr`` / ``mtriple`` (LLVM's own
query, ``tvm.target.codegen.llvm_get_vector_width``, reports 512 bits for ``x86-64-v3``, which is
AVX2).  FMA throughput/latency and cache sizes are data per known ``mcpu`` (``_CORES``); a generic
``mcpu`` (``x86-64-v3``, an Arm triple without one) gets conservative figures that hold on every core
it may run on; ``mcpu`` ``native`` / ``host`` reads this machine's caches from sysfs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import tvm

_AVX512_CPUS = (
    "x86-64-v4", "skylake-avx512", "cascadelake", "cooperlake", "cannonlake", "icelake",
    "icelake-client", "icelake-server", "tigerlake", "rocketlake", "sapphirerapids",
    "graniterapids", "emeraldrapids", "znver4", "znver5", "knl", "knm",
)
_AVX2_CPUS = (
    "x86-64-v3", "haswell", "broadwell", "skylake", "alderlake", "raptorlake", "meteorlake",
    "znver1", "znver2", "znver3", "bdver4", "arrowlake", "lunarlake",
)

KIB = 1024


@dataclass(frozen=True)
class CoreInfo:
    """One core, as the tiling needs it (sizes in bytes, per core)."""

    vector_bits: int = 128
    vector_registers: int = 16
    fma_units: int = 2        # vector FMAs issued per cycle
    fma_latency: int = 4      # cycles; units x latency independent accumulators keep them busy
    l1d: int = 32 * KIB
    l2: int = 256 * KIB

    @property
    def min_accumulators(self) -> int:
        """Independent FMA chains needed to hide the FMA latency at full throughput."""
        return self.fma_units * self.fma_latency


# mcpu -> (fma_units, fma_latency, L1d KiB, L2 KiB per core); generic ISA levels take the smallest
# caches of the cores they cover (x86-64-v3: Haswell's 256 KiB L2, v4: Skylake-SP's 1 MiB)
_CORES = {
    "x86-64-v3": (2, 5, 32, 256), "haswell": (2, 5, 32, 256), "broadwell": (2, 4, 32, 256),
    "skylake": (2, 4, 32, 256), "alderlake": (2, 4, 48, 1280), "raptorlake": (2, 4, 48, 2048),
    "znver1": (2, 5, 32, 512), "znver2": (2, 5, 32, 512), "znver3": (2, 4, 32, 512),
    "x86-64-v4": (2, 4, 32, 1024), "skylake-avx512": (2, 4, 32, 1024), "cascadelake": (2, 4, 32, 1024),
    "icelake-server": (2, 4, 48, 1280), "sapphirerapids": (2, 4, 48, 2048), "znver4": (2, 4, 32, 1024),
    "znver5": (2, 4, 48, 1024),
    "cortex-a72": (2, 7, 32, 512), "cortex-a76": (2, 4, 64, 256), "neoverse-n1": (2, 4, 64, 1024),
}


def _attrs(target: tvm.target.Target):
    mcpu = str(target.attrs.get("mcpu", "") or "").lower()
    mattr = [str(a).lower() for a in (target.attrs.get("mattr", None) or [])]
    mtriple = str(target.attrs.get("mtriple", "") or "").lower()
    return mcpu, mattr, mtriple


def vector_bits(target: tvm.target.Target) -> int:
    """SIMD register width in bits (AVX-512: 512, AVX2: 256, NEON/SSE/unknown: 128)."""
    mcpu, mattr, mtriple = _attrs(target)
    if "-avx512f" not in mattr and ("+avx512f" in mattr or mcpu in _AVX512_CPUS):
        return 512
    if "-avx2" not in mattr and ("+avx2" in mattr or "+avx" in mattr or mcpu in _AVX2_CPUS):
        return 256
    return 128


def vector_lanes(target: tvm.target.Target, dtype_bits: int = 32) -> int:
    """Number of lanes of ``dtype_bits``-wide elements in one SIMD register."""
    return max(vector_bits(target) // dtype_bits, 1)


def num_vector_registers(target: tvm.target.Target) -> int:
    """Architectural SIMD registers: 32 on AVX-512 and AArch64, 16 on AVX2/SSE."""
    mcpu, mattr, mtriple = _attrs(target)
    if vector_bits(target) == 512 or mtriple.startswith(("aarch64", "arm64")):
        return 32
    return 16


def _sysfs_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": KIB, "M": KIB * KIB}.get(text[-1:], 1)
    return int(text.rstrip("KM")) * mult


@functools.lru_cache(maxsize=1)
def host_caches() -> tuple[int | None, int | None]:
    """(L1d, L2) bytes of cpu0 from /sys/devices/system/cpu/cpu0/cache, None where unreadable."""
    l1d = l2 = None
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (d / "level").read_text().strip(), (d / "type").read_text().strip()
            size = _sysfs_size((d / "size").read_text())
        except (OSError, ValueError):
            continue
        if level == "1" and kind in ("Data", "Unified"):
            l1d = size
        elif level == "2":
            l2 = size
    return l1d, l2


def core_info(target: tvm.target.Target) -> CoreInfo:
    """The core description the tile / block sizes are derived from (see module docstring)."""
    mcpu, _, _ = _attrs(target)
    units, latency, l1d, l2 = _CORES.get(mcpu, (2, 4, 32, 256))
    core = CoreInfo(vector_bits(target), num_vector_registers(target), units, latency, l1d * KIB, l2 * KIB)
    if mcpu in ("native", "host"):
        h1, h2 = host_caches()
        core = replace(core, l1d=h1 or core.l1d, l2=h2 or core.l2)
    return core
