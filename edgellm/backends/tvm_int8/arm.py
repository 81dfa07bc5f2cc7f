"""aarch64 schedule rule for the packed int8 dense (``compute.py``), with fused epilogue.

Matches a PrimFunc with exactly one reduction block ::

    C[m, n] (int32) += int32(A[m, k]) * int32(W[n // 4, k // 4, n % 4, k % 4])

(A int8 ``[M, K]``, W int8 ``[N/4, K/4, 4, 4]``, C int32) plus injective producers and
consumers (activation quantize, zero-point correction, dequantize, bias, relu, requantize:
what FuseOps/FuseTIR put in the same PrimFunc), on an aarch64 llvm target only.

Schedule (``schedule.py``, shared with x86): parallel(row tiles x column tiles) -> k / 4 -> ``mr`` rows (unrolled) -> ``nv``
column vectors of 4 int32 (unrolled) -> [4 lanes x 4 bytes] tensorized.  One tensorized
step multiplies 4 consecutive int8 of a row of ``A`` (broadcast to every 32-bit lane) with
a 16-byte 4x4 weight tile (4 output channels x 4 k, contiguous thanks to the packing) and
adds into an int32x4 accumulator:

* targets with the Armv8.2 dot product (``+dotprod``: rpi5 / Cortex-A76, Jetson Orin's
  Cortex-A78AE): one ``sdot`` (``llvm.aarch64.neon.sdot``), TVM's ``ARM_DOT_4x4_i8_SDOT``;
* plain NEON (arm64 baseline = Cortex-A53, rpi4 = Cortex-A72): ``smull`` x2 + ``saddlp`` x2
  + ``addp`` (TVM's ``ARM_DOT_4x4_i8_NEON``), so nothing the core lacks is emitted.

The accumulator tile (``cache_write`` local, ``mr x nv`` int32x4 registers) stays in
registers; the epilogue runs vectorized on its write-back.

The tensor intrinsics are edgellm's copies of TVM's two (same instruction sequences) with
the accumulator in a ``local`` buffer, registered on first use: importing
``tvm.s_tir.tensor_intrin`` registers every TVM intrinsic, CUDA's included (~25-40 s), and
TVM's take a ``global`` accumulator, which does not match a register tile.
"""

from __future__ import annotations

from tvm import ir, tirx

from edgellm.backends.tvm_cpu._common import NotApplicable, SafeRule
from edgellm.backends.tvm_cpu.matmul import find_single_reduction

from .compute import has_dotprod, is_aarch64
from .schedule import schedule_packed_dense

#: int32 lanes of a NEON register = output channels per weight tile
LANES = 4

INTRIN_SDOT = "edgellm_dot_4x4_i8i8s32_sdot_local"
INTRIN_NEON = "edgellm_dot_4x4_i8i8s32_neon_local"

#: int32x4 accumulators kept in registers (32 NEON registers; the rest hold the weight tiles,
#: the broadcast activation and, on the NEON path, the smull/saddlp temporaries)
MAX_ACC_SDOT = 24
MAX_ACC_NEON = 16

_REGISTERED: set = set()

#: a buffer load (``tirx.BufferLoad`` is a constructor in 0.27; loads are ``ir.TensorLoad``
#: whose ``source`` is the buffer)
_Load = ir.expr.TensorLoad


def _register_intrinsics() -> None:
    """Register the two 4x4 int8 dot-product intrinsics (accumulator in ``local``), once."""
    if INTRIN_SDOT in _REGISTERED:
        return
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((4, 4), "int8", offset_factor=1),
             C: T.Buffer((4,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            for i in T.serial(0, 4):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def sdot(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((4, 4), "int8", offset_factor=1),
             C: T.Buffer((4,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            # the 4 bytes of A in every 32-bit lane; lane i of the result += dot(A, B[i, :])
            vec_a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4),
                                  dtype="int8x16")
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C.vload([0], dtype="int32x4"), vec_a, B.vload([0, 0], dtype="int8x16"), dtype="int32x4")

    @T.prim_func(s_tir=True)
    def neon(A: T.Buffer((4,), "int8", offset_factor=1), B: T.Buffer((4, 4), "int8", offset_factor=1),
             C: T.Buffer((4,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            # A's 4 bytes twice (8 x int8); B's rows 0-1 (low half) and 2-3 (high half)
            vec_a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 2),
                                  dtype="int8x8")
            vec_b = B.vload([0, 0], dtype="int8x16")
            lo = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
                T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"),
                                        vec_a, T.vectorlow(vec_b, dtype="int8x8"), dtype="int16x8"),
                dtype="int32x4")
            hi = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
                T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"),
                                        vec_a, T.vectorhigh(vec_b, dtype="int8x8"), dtype="int16x8"),
                dtype="int32x4")
            C[T.ramp(T.int32(0), 1, 4)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v4i32"), lo, hi, dtype="int32x4")

    TensorIntrin.register(INTRIN_SDOT, desc, sdot, override=True)
    TensorIntrin.register(INTRIN_NEON, desc, neon, override=True)
    _REGISTERED.add(INTRIN_SDOT)


def intrin_name(target) -> str:
    """The tensor intrinsic for ``target``: ``sdot`` with the dot product, plain NEON otherwise."""
    _register_intrinsics()
    return INTRIN_SDOT if has_dotprod(target) else INTRIN_NEON


def _mod_of(expr, var, modulus: int) -> bool:
    return (isinstance(expr, tirx.FloorMod) and isinstance(expr.a, tirx.Var) and expr.a.same_as(var)
            and isinstance(expr.b, tirx.IntImm) and int(expr.b) == modulus)


def _div_of(expr, var, divisor: int) -> bool:
    return (isinstance(expr, tirx.FloorDiv) and isinstance(expr.a, tirx.Var) and expr.a.same_as(var)
            and isinstance(expr.b, tirx.IntImm) and int(expr.b) == divisor)


def _cast_load(expr):
    """The BufferLoad under ``int32(load)``, else None."""
    if isinstance(expr, tirx.Cast) and str(expr.ty) == "int32" and isinstance(expr.value, _Load):
        return expr.value
    return None


def _is_zero(expr) -> bool:
    return isinstance(expr, tirx.IntImm) and int(expr) == 0


def match_packed_dense(sch):
    """The packed s8 x s8 -> s32 dense block (normalized info), else NotApplicable.

    Checks the block body exactly: ``C[m, n] = C[m, n] + int32(A[m, k]) * int32(W[n // 4, k // 4,
    n % 4, k % 4])`` with A, W int8 and C int32; M, N, K static, N and K multiples of 4.  With M = 1
    normalization drops the unit iter: then the body is ``C[0, n] += int32(A[0, k]) * ...``."""
    _, main = find_single_reduction(sch)
    kinds = "".join(i.kind for i in main.iters)
    if kinds not in ("SSR", "SR") or not all(isinstance(i.dom, int) for i in main.iters):
        raise NotApplicable(f"iters {kinds}: want static (m, n, k) or (n, k)")
    iters = [i.var for i in main.iters]
    im, in_, ik = iters if kinds == "SSR" else [None, *iters]

    def is_row(expr) -> bool:  # the m index, or 0 when M = 1
        return expr.same_as(im) if im is not None else _is_zero(expr)

    stmt = sch.get(main.block_rv)
    body = stmt.body
    if len(stmt.writes) != 1 or not isinstance(body, tirx.BufferStore) or str(body.buffer.dtype) != "int32":
        raise NotApplicable("not an int32 accumulation")
    if len(body.indices) != 2 or not is_row(body.indices[0]) or not body.indices[1].same_as(in_):
        raise NotApplicable("output not C[m, n]")
    v = body.value
    if not (isinstance(v, tirx.Add) and isinstance(v.a, _Load) and v.a.source.same_as(body.buffer)
            and isinstance(v.b, tirx.Mul)):
        raise NotApplicable("not C + a * b")
    a, w = _cast_load(v.b.a), _cast_load(v.b.b)
    if a is None or w is None:
        raise NotApplicable("operands are not int32 casts of loads")
    if len(a.indices) == 4:  # the weight on the left
        a, w = w, a
    if str(a.source.dtype) != "int8" or str(w.source.dtype) != "int8":
        raise NotApplicable("operands are not s8 x s8 (sdot is signed x signed)")
    ai, wi = list(a.indices), list(w.indices)
    if len(ai) != 2 or not is_row(ai[0]) or not ai[1].same_as(ik):
        raise NotApplicable("activation not A[m, k]")
    if not (len(wi) == 4 and _div_of(wi[0], in_, LANES) and _div_of(wi[1], ik, 4) and _mod_of(wi[2], in_, LANES)
            and _mod_of(wi[3], ik, 4)):
        raise NotApplicable("weight not W[n // 4, k // 4, n % 4, k % 4]")
    if [int(x) for x in w.source.shape[2:]] != [LANES, 4]:
        raise NotApplicable("weight not packed in 4x4 tiles")
    n_ext, k_ext = main.iters[-2].dom, main.iters[-1].dom
    if n_ext % LANES or k_ext % 4:
        raise NotApplicable("N or K not a multiple of 4")
    return main


class PackedDenseArm(SafeRule):
    """s8 x s8 -> s32 packed dense on aarch64: ``sdot`` with +dotprod, smull/saddlp otherwise."""

    def schedule(self, sch, func, target):
        if not is_aarch64(target):
            raise NotApplicable("not an aarch64 target")
        main = match_packed_dense(sch)
        max_acc = MAX_ACC_SDOT if has_dotprod(target) else MAX_ACC_NEON
        # one output row (GEMV-like, e.g. a classifier FC): more column vectors per tile, so that
        # enough independent accumulators hide the dot-product latency
        return schedule_packed_dense(sch, main, LANES, intrin_name(target), max_acc, max_nv_gemv=8, square=True)


def arm_rules() -> list:
    """The aarch64 int8 schedule rules, in priority order (each returns None off aarch64)."""
    return [PackedDenseArm()]
