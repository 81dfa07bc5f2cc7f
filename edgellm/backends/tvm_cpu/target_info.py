"""Vector width / register file size of an llvm CPU target.

Derived from the target's ``mcpu`` / ``mattr`` / ``mtriple`` only (LLVM's own
query, ``tvm.target.codegen.llvm_get_vector_width``, reports 512 bits for
``x86-64-v3``, which is AVX2).
"""

from __future__ import annotations

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
