"""x86 AVX-512 schedule rule for the packed int8 dense (``compute.py``), with fused epilogue.

Matches a PrimFunc with exactly one reduction block
``C[m, n] += int32(A[m, k]) * int32(W[n // 16, k // 4, n % 16, k % 4])`` (A uint8, W int8,
C int32) plus injective producers / consumers (zero-point correction, dequantize, bias,
activation, requantize of the next layer's input: all fused by FuseOps).

Schedule: parallel(row tiles x column tiles) -> k / 4 -> mr rows (unrolled) -> nv column
vectors (unrolled) -> [16 lanes x 4 bytes] tensorized with a copy of TVM's ``dot_16x4_vnni``
(``llvm.x86.avx512.vpdpbusd.512``: 64 u8 x s8 products into 16 int32 lanes per
instruction; TVM's own passes <16 x i32> operands, which LLVM 18+ rejects, and accumulates
into a global buffer). The accumulator tile lives in registers (``cache_write`` local); the
epilogue runs on the 16-lane write-back. Outer tiles run in parallel when the dense has at
least ``PARALLEL_MIN_MACS`` multiply-adds.

Measured (Zen 4, 2 threads, 1024^3): 780 GOP/s, vs 134 GFLOP/s for the fp32 rule and 611
GOP/s for ONNX Runtime's MatMulInteger (benchmarks/kernels.py --only-int8).

The AVX-512BW form (``vpmaddubsw`` + ``vpmaddwd``) is registered too but not selected:
``compute.packing`` offers no int8 on x86 without VNNI (its int16 pair sums saturate).
"""

from __future__ import annotations

import os


from edgellm.backends.tvm_cpu._common import NotApplicable, SafeRule
from edgellm.backends.tvm_cpu.matmul import find_single_reduction

from .compute import has_vnni, packing
from .schedule import schedule_packed_dense

LANES = 16
#: rows x column-vectors of int32 accumulators kept in zmm registers (32 architectural)
MAX_ACC = 24
#: below this many multiply-adds the dense runs on one thread: waking the pool costs more
#: than it saves (kws-cnn's 500x64x64: 9.8 us on one thread, 15 us on two); a GEMV counts 4x
#: (MobileNet's 1280x1000 classifier: 11.1 us on one thread, 5.5 on two; its 784x144x32
#: project conv 7.9 -> 6.4 us, 196x192x64 5.2 -> 4.3 us)
PARALLEL_MIN_MACS = int(os.environ.get("EDGELLM_INT8_PARALLEL_MIN_MACS", str(1 << 20)))


def _register_intrinsics() -> None:
    """edgellm's copies of TVM's dot_16x4_vnni / dot_16x4_avx512 with the accumulator in a
    ``local`` buffer (the register tile); TVM's own take a global C. Registered once.
    (Importing tvm.s_tir.tensor_intrin would register all of TVM's, CUDA's included: ~40 s.)"""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    if INTRIN_VNNI in _REGISTERED:
        return

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def vnni(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            # LLVM >= 18 declares vpdpbusd.512 as (<16 x i32>, <64 x i8>, <64 x i8>); TVM's own
            # dot_16x4_vnni still passes <16 x i32> operands and fails LLVM's verifier
            # one expression, no named temporaries: TVMScript turns those into local buffers, which
            # lower to a TVMBackendAllocWorkspace / Free pair per call (per register tile in the
            # parallel loop), not registers
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype="uint8x64"),
                B.vload([0, 0], dtype="int8x64"), dtype="int32x16")

    @T.prim_func(s_tir=True)
    def avx512(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
               C: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddw.d.512"),
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddubs.w.512"),
                    T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype="uint8x64"),
                    B.vload([0, 0], dtype="int8x64"), dtype="int16x32"),
                T.int16x32(1), dtype="int32x16")

    TensorIntrin.register(INTRIN_VNNI, desc, vnni, override=True)
    TensorIntrin.register(INTRIN_AVX512, desc, avx512, override=True)
    _REGISTERED.add(INTRIN_VNNI)


INTRIN_VNNI = "edgellm_dot_16x4_u8i8i32_vnni_local"
INTRIN_AVX512 = "edgellm_dot_16x4_u8i8i32_avx512_local"
_REGISTERED: set = set()


def _intrin_name(target) -> str:
    _register_intrinsics()
    return INTRIN_VNNI if has_vnni(target) else INTRIN_AVX512


def match_packed_dense(sch, lanes: int, act_dtypes: tuple[str, ...]):
    """(infos, main block info) of the packed int8 dense in ``sch``, else NotApplicable."""
    infos, main = find_single_reduction(sch)
    stmt = sch.get(main.block_rv)
    if len(stmt.writes) != 1 or str(stmt.writes[0].source.dtype) != "int32":
        raise NotApplicable("not an int32 accumulation")
    kinds = "".join(i.kind for i in main.iters)
    if kinds not in ("SSR", "SR"):  # "SR": M == 1, the unit row loop normalized away (GEMV)
        raise NotApplicable(f"iters {kinds}, want SSR")
    srcs = [r.source for r in stmt.reads if r.source.same_as(stmt.writes[0].source) is False]
    act = [b for b in srcs if len(b.shape) == 2 and str(b.dtype) in act_dtypes]
    wgt = [b for b in srcs if len(b.shape) == 4 and str(b.dtype) == "int8"]
    if len(act) != 1 or len(wgt) != 1:
        raise NotApplicable("operands are not [M, K] activations and packed [N/L, K/4, L, 4] int8 weights")
    w = wgt[0]
    if int(w.shape[2]) != lanes or int(w.shape[3]) != 4:
        raise NotApplicable("weights not packed for this lane count")
    return infos, main


class PackedDenseX86(SafeRule):
    """u8 x s8 -> s32 packed dense on AVX-512 (VNNI when the target has it)."""

    def schedule(self, sch, func, target):
        pk = packing(target)
        if pk is None or pk[0] != LANES or pk[1] != "uint8":
            raise NotApplicable("not an AVX-512 x86 target")
        _, main = match_packed_dense(sch, LANES, ("uint8",))
        return schedule_packed_dense(sch, main, LANES, _intrin_name(target), MAX_ACC, parallel_min_macs=PARALLEL_MIN_MACS)

