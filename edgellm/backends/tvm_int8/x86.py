"""x86 schedule rule for the packed int8 dense (``compute.py``), with fused epilogue.

Matches a PrimFunc with exactly one reduction block
``C[m, n] += int32(A[m, k]) * int32(W[n // L, k // 4, n % L, k % 4])`` (A uint8, W int8,
C int32; L = 16 on AVX-512, 8 on AVX2) plus injective producers / consumers (zero-point
correction, dequantize, bias, activation, requantize of the next layer's input: all fused by FuseOps).

Schedule: parallel(row tiles x column tiles) -> k / 4 -> mr rows (unrolled) -> nv column
vectors (unrolled) -> [L lanes x 4 bytes] tensorized with one of edgellm's dot products:

* VNNI (AVX-512 VNNI: zmm; AVX-VNNI: ymm): ``vpdpbusd``, 4L u8 x s8 products into L int32 lanes
  per instruction (TVM's own ``dot_16x4_vnni`` passes <16 x i32> operands, which LLVM 18+ rejects,
  and accumulates into a global buffer);
* no VNNI (AVX2, AVX-512BW): ``vpmaddubsw`` (pairs of u8 x s8 products, saturating int16) +
  ``vpmaddwd`` with ones + add; exact because ``compute.packing`` keeps these weights to 7 bits.

The accumulator tile lives in registers (``cache_write`` local); the epilogue runs on the
write-back. Outer tiles run in parallel when the dense has at least ``PARALLEL_MIN_MACS``
multiply-adds.

Measured (2 threads, 1024^3, benchmarks/kernels.py --only-int8): Zen 4 VNNI 780 GOP/s vs ONNX
Runtime's MatMulInteger 611; Zen 3 AVX2 222-292 GOP/s vs 270-300 (docs/tvm-int8.md).
"""

from __future__ import annotations

import os

from edgellm.backends.tvm_cpu._common import NotApplicable, SafeRule
from edgellm.backends.tvm_cpu.matmul import find_single_reduction

from .compute import has_avx_vnni, has_vnni, packing
from .schedule import schedule_packed_dense


def max_accumulators(lanes: int, vnni: bool) -> int:
    """int32 accumulator vectors of a register tile: 24 of AVX-512's 32 zmm registers; of AVX2's 16 ymm,
    what the weight vectors, the activation broadcast and (without VNNI) the vpmaddubsw temporaries
    and the vector of ones leave."""
    if lanes == 16:
        return 24
    return 12 if vnni else 8  # AVX2 without VNNI: 12 measured 222 GOP/s against 8's 238 (1024^3, Zen 3)
#: below this many multiply-adds the dense runs on one thread: waking the pool costs more
#: than it saves (kws-cnn's 500x64x64: 9.8 us on one thread, 15 us on two); a GEMV counts 4x
#: (MobileNet's 1280x1000 classifier: 11.1 us on one thread, 5.5 on two; its 784x144x32
#: project conv 7.9 -> 6.4 us, 196x192x64 5.2 -> 4.3 us)
PARALLEL_MIN_MACS = int(os.environ.get("EDGELLM_INT8_PARALLEL_MIN_MACS", str(1 << 20)))


def _register_intrinsics() -> None:
    """edgellm's u8 x s8 -> s32 dot products over [lanes x 4 bytes], the accumulator in a ``local``
    buffer (the register tile; TVM's own dot_16x4_vnni / dot_16x4_avx512 take a global C).
    Registered once. (Importing tvm.s_tir.tensor_intrin would register all of TVM's, CUDA's
    included: ~40 s.)"""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    if _REGISTERED:
        return

    def desc_for(lanes):
        @T.prim_func(s_tir=True)
        def desc(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
                 C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
                T.writes(C[0:lanes])
                for i in T.serial(0, lanes):
                    for k in T.serial(0, 4):
                        with T.sblock("update"):
                            vi, vk = T.axis.remap("SR", [i, k])
                            C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")
        return desc

    def impl_for(lanes, vnni):
        i32, u8, i8, i16 = f"int32x{lanes}", f"uint8x{lanes * 4}", f"int8x{lanes * 4}", f"int16x{lanes * 2}"
        bits = lanes * 32
        dpbusd = f"llvm.x86.avx512.vpdpbusd.{bits}"
        maddubs = "llvm.x86.avx512.pmaddubs.w.512" if bits == 512 else "llvm.x86.avx2.pmadd.ub.sw"
        maddwd = "llvm.x86.avx512.pmaddw.d.512" if bits == 512 else "llvm.x86.avx2.pmadd.wd"

        # one expression each, no named temporaries: TVMScript turns those into local buffers, which
        # lower to a TVMBackendAllocWorkspace / Free pair per call (per register tile in the parallel
        # loop), not registers. LLVM >= 18 declares vpdpbusd as (<L x i32>, <4L x i8>, <4L x i8>);
        # TVM's own dot_16x4_vnni passes <16 x i32> operands and fails LLVM's verifier.
        @T.prim_func(s_tir=True)
        def dot_vnni(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
                     C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
                T.writes(C[0:lanes])
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(dpbusd), C.vload([0], dtype=i32),
                    T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes), dtype=u8),
                    B.vload([0, 0], dtype=i8), dtype=i32)

        # vpmaddubsw adds two u8 x s8 products in saturating int16: exact while |w| <= 63
        # (2 * 255 * 63 < 32767; compute.packing's weight_max), then vpmaddwd with ones widens the pairs
        @T.prim_func(s_tir=True)
        def dot_madd(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
                     C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
                T.writes(C[0:lanes])
                C[T.ramp(T.int32(0), 1, lanes)] += T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(maddwd),
                    T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id(maddubs),
                        T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes), dtype=u8),
                        B.vload([0, 0], dtype=i8), dtype=i16),
                    T.broadcast(T.int16(1), lanes * 2), dtype=i32)

        return dot_vnni if vnni else dot_madd

    for lanes in (16, 8):
        for vnni in (True, False):
            TensorIntrin.register(intrin_name(lanes, vnni), desc_for(lanes), impl_for(lanes, vnni), override=True)
    _REGISTERED.add(True)


_REGISTERED: set = set()


def intrin_name(lanes: int, vnni: bool) -> str:
    return f"edgellm_dot_{lanes}x4_u8i8i32_{'vnni' if vnni else 'madd'}_local"


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
    """u8 x s8 -> s32 packed dense on x86: AVX-512 or AVX2, ``vpdpbusd`` where the core has VNNI."""

    def schedule(self, sch, func, target):
        pk = packing(target)
        if pk is None or pk.act_dtype != "uint8":
            raise NotApplicable("not an x86 int8 target")
        _, main = match_packed_dense(sch, pk.lanes, ("uint8",))
        vnni = has_vnni(target) if pk.lanes == 16 else has_avx_vnni(target)
        _register_intrinsics()
        return schedule_packed_dense(sch, main, pk.lanes, intrin_name(pk.lanes, vnni), max_accumulators(pk.lanes, vnni),
                                     parallel_min_macs=PARALLEL_MIN_MACS)
