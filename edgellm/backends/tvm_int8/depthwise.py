"""Integer depthwise conv on AVX-512 VNNI: u8 codes x int8 weights -> int32, ``vpdpbusd`` over tap quads.

``vpdpbusd`` adds, per int32 lane, 4 adjacent u8 x s8 products. For a depthwise conv the lane is the
channel and the 4 bytes are 4 horizontal taps ``(rh, ow*sw + j)``, j < 4 (kw <= 4; the taps past kw
get weight 0)::

    P[b, ct, h, w, ci]   u8  padded codes, channel-tiled (16 channels contiguous per column), the
                              border the code of real 0 (zero point), one or more spare columns so
                              that every output reads 4 columns
    out[b, oh, ow, c]    i32 = sum_{rh, j} P[b, c // 16, oh*sh + rh, ow*sw + j, c % 16] * W4[rh, c, j]

The 4 columns x 16 channels of P an output vector reads are 64 contiguous bytes: one load, one
byte shuffle (``vpermb``: to channel-major, 4 taps per lane) and one ``vpdpbusd`` per (rh, 16
outputs), vs kw f32 FMAs plus u8 -> f32 decodes. Sums are exact (|acc| <= kh*4*255*128 < 2^31); the
zero point and the scales go in the epilogue (``rewrite._depthwise``: one multiply-add with the
requantize of the next layer).

Schedule (``DepthwiseU8X86``): parallel (b, oh / rows, channel tiles) -> pad the kh + (rows-1)*sh
input rows of this unit (u8, 16 lanes) -> rows -> ow tiles of mr -> rh -> mr outputs (unrolled) ->
[16 channels x 4 taps] tensorized, int32 accumulators in registers, epilogue on the vectorized
write-back. kws-cnn's 25x20x64 (us, 1 / 2 threads): 1 row a unit 7.1 / 4.7, 5 rows 3.6 / 3.2 (f32
kernel with the u8 decode: 7.8 / 4.6).
"""

from __future__ import annotations

import os

import numpy as np

from edgellm.backends.tvm_cpu._common import (
    NotApplicable,
    SafeRule,
    accumulate_in_registers,
    schedule_injective,
    split_around_reduction,
    static_extent,
    vectorize_by,
)
from edgellm.backends.tvm_cpu.matmul import find_single_reduction

LANES = 16
INTRIN = "edgellm_dw_16x4_u8i8i32_vnni_local"
#: below this many multiply-adds the conv runs on one thread
PARALLEL_MIN_MACS = int(os.environ.get("EDGELLM_DW_INT8_PARALLEL_MIN_MACS", "0"))
_REGISTERED: set = set()


def supported(kw: int, channels: int, dilation=(1, 1)) -> bool:
    return kw <= 4 and channels % LANES == 0 and all(int(d) == 1 for d in dilation)


def pack_dw_weight(wq: np.ndarray) -> np.ndarray:
    """int8 ``[kh, kw, 1, C]`` -> ``[kh, C, 4]`` (taps past kw are 0)."""
    kh, kw, _, c = wq.shape
    assert kw <= 4
    w4 = np.zeros((kh, c, 4), np.int8)
    w4[:, :, :kw] = wq[:, :, 0, :].transpose(0, 2, 1)
    return w4


def depthwise_u8_te(Q, W4, strides, padding, kw: int, zero_point: int, name: str = "depthwise_u8"):
    """TE compute of the conv above (``Q``: [B, H, W, C] u8 codes; ``W4``: [kh, C, 4] int8)."""
    from tvm import te, tirx

    B, H, Wd, C = (int(d) for d in Q.shape)
    KH = int(W4.shape[0])
    pt, pl, pb, pr = (int(p) for p in padding)
    sh, sw = (int(s) for s in strides)
    Hp, Wp = H + pt + pb, Wd + pl + pr
    OH, OW = (Hp - KH) // sh + 1, (Wp - kw) // sw + 1
    Wp4 = max(Wp, (OW - 1) * sw + 4)
    L = LANES
    P = te.compute(
        (B, C // L, Hp, Wp4, L),
        lambda b, ct, h, w, ci: tirx.if_then_else(
            tirx.all(h >= pt, h < H + pt, w >= pl, w < Wd + pl),
            Q[b, h - pt, w - pl, ct * L + ci], tirx.const(zero_point, Q.dtype)),
        name="pad_u8")
    rh = te.reduce_axis((0, KH), name="rh")
    j = te.reduce_axis((0, 4), name="j")
    return te.compute(
        (B, OH, OW, C),
        lambda b, oh, ow, c: te.sum(
            P[b, c // L, oh * sh + rh, ow * sw + j, c % L].astype("int32") * W4[rh, c, j].astype("int32"), axis=[rh, j]),
        name=name)


def reference(q: np.ndarray, w4: np.ndarray, strides, padding, kw: int, zero_point: int) -> np.ndarray:
    """numpy int64 reference of ``depthwise_u8_te`` (for tests)."""
    pt, pl, pb, pr = padding
    sh, sw = strides
    kh = w4.shape[0]
    p = np.pad(q.astype(np.int64), ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=zero_point)
    oh = (p.shape[1] - kh) // sh + 1
    ow = (p.shape[2] - kw) // sw + 1
    out = np.zeros((q.shape[0], oh, ow, q.shape[3]), np.int64)
    for r in range(kh):
        for s in range(kw):
            out += p[:, r:r + (oh - 1) * sh + 1:sh, s:s + (ow - 1) * sw + 1:sw, :] * w4[r, :, s].astype(np.int64)
    return out


def _register() -> None:
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    if INTRIN in _REGISTERED:
        return

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4, 16), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4, 0:16], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk, vi], "int32") * T.cast(B[vi, vk], "int32")

    # byte i*4 + k of the shuffled vector <- byte k*16 + i of the 4 columns (channel-major, 4 taps a lane)
    idx = [k * 16 + i for i in range(16) for k in range(4)]

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4, 16), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4, 0:16], B[0:16, 0:4])
            T.writes(C[0:16])
            # one expression: named temporaries become local buffers (a workspace alloc per call)
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.Shuffle([A.vload([0, 0], dtype="uint8x64")], idx),
                B.vload([0, 0], dtype="int8x64"), dtype="int32x16")

    TensorIntrin.register(INTRIN, desc, impl, override=True)
    _REGISTERED.add(INTRIN)


def _pick_rows(oh: int, other_units: int, max_rows: int = 5,
               min_units: int = 8) -> int:
    """Output rows per parallel unit: the largest divisor of OH <= max_rows leaving >= min_units units."""
    best = 1
    for r in range(2, max_rows + 1):
        if oh % r == 0 and other_units * (oh // r) >= min_units:
            best = r
    return best


def _pick_mr(ow: int, max_mr: int = 8) -> int:
    return max(m for m in range(1, max_mr + 1) if ow % m == 0)


class DepthwiseU8X86(SafeRule):
    """``depthwise_u8_te`` (fused with its epilogue) on AVX-512 VNNI."""

    def schedule(self, sch, func, target):
        from .compute import has_vnni

        if not has_vnni(target):
            raise NotApplicable("no VNNI")
        _, main = find_single_reduction(sch)
        block = main.block_rv
        stmt = sch.get(block)
        if len(stmt.writes) != 1 or str(stmt.writes[0].source.dtype) != "int32":
            raise NotApplicable("not an int32 accumulation")
        srcs = [r.source for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]
        act = [b for b in srcs if len(b.shape) == 5 and str(b.dtype) == "uint8" and int(b.shape[4]) == LANES]
        wgt = [b for b in srcs if len(b.shape) == 3 and str(b.dtype) == "int8" and int(b.shape[2]) == 4]
        if len(act) != 1 or len(wgt) != 1:
            raise NotApplicable("not the channel-tiled u8 depthwise")
        loops = sch.get_loops(block)
        if len(loops) not in (5, 6):
            raise NotApplicable("expected loops (b,) oh, ow, c, rh, j")
        lb, loh, low, lc, lrh, lj = loops if len(loops) == 6 else [None, *loops]  # B == 1: normalized away
        exts = [static_extent(sch, lp) for lp in [loh, low, lc, lrh, lj]]
        exts = [1 if lb is None else static_extent(sch, lb), *exts]
        if exts[3] % LANES or exts[5] != 4:
            raise NotApplicable("channels not a multiple of 16")
        mr = _pick_mr(exts[2])
        producers, remaining = split_around_reduction(sch, block)

        ct, ci = sch.split(lc, factors=[None, LANES])
        owo, owi = sch.split(low, factors=[None, mr])
        rows = _pick_rows(exts[1], exts[0] * exts[3] // LANES)
        inner_rows = []
        if rows > 1:  # output rows per parallel unit: their kh + rows - 1 padded input rows are copied once
            loh, ohi = sch.split(loh, factors=[None, rows])
            inner_rows = [ohi]
        outer = [loh] if lb is None else [lb, loh]
        sch.reorder(*outer, ct, *inner_rows, owo, lrh, owi, ci, lj)
        wb, leftover = accumulate_in_registers(sch, block, owo, remaining)
        vectorize_by(sch, sch.get_loops(wb)[-1], LANES)

        par = sch.fuse(*outer, ct)
        # the padded copy per parallel unit (kh rows x Wp4 x 16 bytes: a workspace allocation per unit
        # above 1 KB, cheap). Measured (kws-cnn 25x20x64, 2 threads): 4.8 us; as a loop nest of its
        # own before the conv, 4.3 us on an idle machine but 11-12 us as soon as another process
        # shares the cores; per ow tile, 7.9 us on one thread (the conv's 64-byte loads hit the
        # 16-byte stores just made: store forwarding fails)
        at_par = []
        for b in producers:
            try:
                sch.compute_at(b, par, preserve_unit_loops=True)
            except Exception:  # noqa: BLE001 -- then the pad runs as its own loop nest (below)
                continue
            at_par.append(b)
            p_last = sch.get_loops(b)[-1]
            if static_extent(sch, p_last) == LANES:
                sch.vectorize(p_last)
        sch.unroll(lrh)
        if mr > 1:
            sch.unroll(owi)
        macs = exts[0] * exts[1] * exts[2] * exts[3] * exts[4] * exts[5]
        if macs >= PARALLEL_MIN_MACS:
            sch.parallel(par)
        init = sch.decompose_reduction(block, lrh)
        sch.vectorize(sch.get_loops(init)[-1])
        _register()
        sch.tensorize(ci, INTRIN)
        for b in producers:
            if any(b.same_as(a) for a in at_par):
                continue
            p_loops = sch.get_loops(b)
            if len(p_loops) >= 3 and static_extent(sch, p_loops[-1]) == LANES:
                sch.vectorize(p_loops[-1])
                outer_p = p_loops[:-2]
                sch.parallel(sch.fuse(*outer_p) if len(outer_p) > 1 else outer_p[0])
            else:
                schedule_injective(sch, b, LANES)
        for b in leftover:
            schedule_injective(sch, b, LANES)
        return sch
