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

from tvm.s_tir.dlight.analysis import normalize_prim_func

from edgellm.backends.tvm_cpu._common import (
    NotApplicable,
    SafeRule,
    func_output_buffers,
    is_spatial_block,
    root_blocks,
    schedule_injective,
    static_extent,
)

from .compute import has_vnni, packing

LANES = 16
#: rows x column-vectors of int32 accumulators kept in zmm registers (32 architectural)
MAX_ACC = 24
#: below this many multiply-adds the dense runs on one thread: waking the pool costs more
#: than it saves (kws-cnn's 500x64x64: 9.8 us on one thread, 15 us on two)
PARALLEL_MIN_MACS = int(os.environ.get("EDGELLM_INT8_PARALLEL_MIN_MACS", str(1 << 22)))


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
            A_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            A_u8x64 = T.reinterpret(T.broadcast(A_i32, 16), dtype="uint8x64")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"), A_u8x64, B.vload([0, 0], dtype="int8x64"), dtype="int32x16")

    @T.prim_func(s_tir=True)
    def avx512(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
               C: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            A_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            A_u8x64 = T.reinterpret(T.broadcast(A_i32, 16), dtype="uint8x64")
            red = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddubs.w.512"),
                                          A_u8x64, B.vload([0, 0], dtype="int8x64"), dtype="int16x32")
            C[T.ramp(T.int32(0), 1, 16)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.pmaddw.d.512"), red, T.int16x32(1), dtype="int32x16")

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
    infos = normalize_prim_func(sch)
    if infos is None:
        raise NotApplicable("not normalizable")
    reds = [i for i in infos if i.is_reduction()]
    if len(reds) != 1:
        raise NotApplicable("need exactly one reduction block")
    main = reds[0]
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


def choose_tile(m: int, n_vectors: int, max_acc: int = MAX_ACC, max_mr: int = 8, max_nv: int = 4):
    """(mr, nv): rows and 16-lane column vectors per register tile (mr | M, nv | N/16)."""
    best = None
    for nv in range(min(max_nv, n_vectors), 0, -1):
        if n_vectors % nv:
            continue
        for mr in range(min(max_mr, m), 0, -1):
            if m % mr or mr * nv > max_acc:
                continue
            key = (mr * nv, nv)
            if best is None or key > best[0]:
                best = (key, mr, nv)
    return best[1], best[2]


def schedule_packed_dense(sch, func, target, main, lanes: int, intrin: str, max_acc: int = MAX_ACC):
    """Register-tiled, tensorized schedule of the packed dense (shared by x86 and, with its
    own lanes / intrinsic, usable by other ISAs)."""
    block = main.block_rv
    loops = sch.get_loops(block)
    if len(loops) == 2:  # M == 1
        lm, (ln, lk) = None, loops
        M = 1
    elif len(loops) == 3:
        lm, ln, lk = loops
        M = static_extent(sch, lm)
    else:
        raise NotApplicable("expected loops m, n, k")
    N, K = static_extent(sch, ln), static_extent(sch, lk)
    if N % lanes or K % 4:
        raise NotApplicable("N or K not padded")
    mr, nv = choose_tile(M, N // lanes, max_acc)

    outputs = func_output_buffers(sch.mod["main"])
    blocks = root_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    pos = names.index(sch.get(block).name_hint)
    producers, consumers = blocks[:pos], blocks[pos + 1:]
    for b in producers + consumers:
        if not is_spatial_block(sch, b):
            raise NotApplicable("more than one reduction block")
    remaining = []
    for b in consumers:
        stmt = sch.get(b)
        if stmt.writes and stmt.writes[0].source not in outputs:
            try:
                sch.compute_inline(b)
                continue
            except Exception:  # pylint: disable=broad-except
                pass
        remaining.append(b)

    no, ni = sch.split(ln, factors=[None, lanes])
    nvo, nvi = sch.split(no, factors=[None, nv])
    ko, ki = sch.split(lk, factors=[None, 4])
    if lm is None:
        mi = None
        tiles = [nvo]
        sch.reorder(nvo, ko, nvi, ni, ki)
    else:
        mo, mi = sch.split(lm, factors=[None, mr])
        # weights larger than the activations: column panels outermost, so a panel stays in cache
        tiles = [nvo, mo] if N * K > M * K and N // (lanes * nv) > 1 else [mo, nvo]
        sch.reorder(*tiles, ko, mi, nvi, ni, ki)

    wb = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(wb, tiles[-1], preserve_unit_loops=True)
    leftover = []
    for b in remaining:
        try:
            sch.reverse_compute_inline(b)
        except Exception:  # pylint: disable=broad-except
            leftover.append(b)
    wb_loops = sch.get_loops(wb)[len(tiles):]
    if wb_loops:
        ext = static_extent(sch, wb_loops[-1])
        if ext % lanes == 0 and ext > lanes:
            _, wv = sch.split(wb_loops[-1], factors=[None, lanes])
            sch.vectorize(wv)
        elif ext == lanes:
            sch.vectorize(wb_loops[-1])

    if mi is not None and mr > 1:
        sch.unroll(mi)
    if nv > 1:
        sch.unroll(nvi)
    par = sch.fuse(*tiles) if len(tiles) > 1 else tiles[0]
    if M * N * K >= PARALLEL_MIN_MACS:
        sch.parallel(par)
    init = sch.decompose_reduction(block, ko)
    init_loops = sch.get_loops(init)
    sch.vectorize(init_loops[-1])
    sch.tensorize(ni, intrin)
    for b in producers + leftover:
        schedule_injective(sch, b, lanes)
    return sch


class PackedDenseX86(SafeRule):
    """u8 x s8 -> s32 packed dense on AVX-512 (VNNI when the target has it)."""

    def schedule(self, sch, func, target):
        pk = packing(target)
        if pk is None or pk[0] != LANES or pk[1] != "uint8":
            raise NotApplicable("not an AVX-512 x86 target")
        _, main = match_packed_dense(sch, LANES, ("uint8",))
        return schedule_packed_dense(sch, func, target, main, LANES, _intrin_name(target))

