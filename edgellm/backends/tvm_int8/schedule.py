"""The one register-tiled schedule of the packed int8 dense (``compute.py``), for every ISA.

x86 (``x86.py``: 16 lanes, ``vpdpbusd``) and arm64 (``arm.py``: 4 lanes, ``sdot`` or NEON
``smull``/``saddlp``) differ in lanes, tensor intrinsic, register budget and tile preference only:

    parallel tiles -> k/4 -> mr rows -> nv column vectors -> [lanes n x 4 k] tensorized

(and the bf16 dense of ``tvm_bf16.py``: 2 k values a lane, ``vdpbf16ps``)

with the int32 accumulator tile in registers (``cache_write`` to ``local``), the fused epilogue
(dequantize, bias, activation, requantize) inlined into the vectorized write-back, and producers
(the activation quantize) scheduled as their own parallel loops.
"""

from __future__ import annotations

from edgellm.backends.tvm_cpu._common import (
    NotApplicable,
    SafeRule,
    accumulate_in_registers,
    schedule_injective,
    split_around_reduction,
    static_extent,
    vectorize_by,
)


def choose_tile(m: int, n_vectors: int, max_acc: int, max_mr: int = 8, max_nv: int = 4, square: bool = False):
    """(mr, nv): rows and column vectors per register tile, mr | M and nv | N/lanes, at most ``max_acc``
    accumulators. The most accumulators win (independent dot-product chains); ties go to the widest tile,
    or with ``square`` to the squarest (each k step loads mr activation broadcasts + nv weight vectors)."""
    best = None
    for nv in range(min(max_nv, n_vectors), 0, -1):
        if n_vectors % nv:
            continue
        for mr in range(min(max_mr, m), 0, -1):
            if m % mr or mr * nv > max_acc:
                continue
            key = (mr * nv, -abs(mr - nv) if square else nv)
            if best is None or key > best[0]:
                best = (key, mr, nv)
    return best[1], best[2]


def schedule_packed_dense(sch, main, lanes: int, intrin: str, max_acc: int, *, max_nv_gemv: int = 4,
                          square: bool = False, parallel_min_macs: int = 0, k_group: int = 4):
    """Schedule the matched dense block ``main`` (normalized info) and its fused producers / epilogue.

    ``max_nv_gemv``: column vectors per tile when M == 1 (more independent accumulators for a GEMV);
    ``parallel_min_macs``: below this many multiply-adds the dense stays on one thread;
    ``k_group``: k values one lane reduces per instruction (int8: 4; bf16's ``vdpbf16ps``: 2)."""
    block = main.block_rv
    loops = sch.get_loops(block)
    if len(loops) not in (2, 3):
        raise NotApplicable("expected loops (m,) n, k")
    lm, ln, lk = loops if len(loops) == 3 else [None, *loops]  # M == 1: the unit row loop is gone
    M = static_extent(sch, lm) if lm is not None else 1
    N, K = static_extent(sch, ln), static_extent(sch, lk)
    if N % lanes or K % k_group:
        raise NotApplicable("N or K not padded")
    mr, nv = choose_tile(M, N // lanes, max_acc, max_nv=max_nv_gemv if M == 1 else 4, square=square)

    producers, remaining = split_around_reduction(sch, block)  # intermediate epilogues inlined

    mo, mi = sch.split(lm, factors=[None, mr]) if lm is not None else (None, None)
    no, ni = sch.split(ln, factors=[None, lanes])
    nvo, nvi = sch.split(no, factors=[None, nv])
    ko, ki = sch.split(lk, factors=[None, k_group])
    if mo is None:
        tiles = [nvo]
    else:  # weights larger than the activations: column panels outermost, so a panel stays in cache
        tiles = [nvo, mo] if N * K >= M * K and N // (lanes * nv) > 1 else [mo, nvo]
    sch.reorder(*tiles, ko, *([mi] if mi is not None else []), nvi, ni, ki)

    # accumulator tile in registers; the epilogue on the vectorized write-back
    wb, leftover = accumulate_in_registers(sch, block, tiles[-1], remaining)
    wb_loops = sch.get_loops(wb)[len(tiles):]
    if wb_loops:
        vectorize_by(sch, wb_loops[-1], lanes)

    # annotations and parallel before decompose_reduction (0.27), tensorize last
    if mi is not None and mr > 1:
        sch.unroll(mi)
    if nv > 1:
        sch.unroll(nvi)
    par = sch.fuse(*tiles) if len(tiles) > 1 else tiles[0]
    # a GEMV (M == 1) streams its weights once: worth both cores at a quarter of the MACs
    if static_extent(sch, par) > 1 and M * N * K * (4 if M == 1 else 1) >= parallel_min_macs:
        sch.parallel(par)
    init = sch.decompose_reduction(block, ko)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(ni, intrin)

    # producers (activation quantize, padding) and unmergeable consumers: their own parallel loops
    for b in producers + leftover:
        schedule_injective(sch, b, lanes)
    return sch


#: an im2col smaller than this many bytes is copied on one thread (kws-cnn's 20 KB stem patches)
IM2COL_PARALLEL_MIN_BYTES = 64 * 1024


class Im2col(SafeRule):
    """``compute.im2col_primfunc`` (loops [B*OH, OW, kh, kw*Cp]): each patch row ``kw*Cp`` bytes is
    contiguous in the padded input (``(ow*sw + s)*Cp + c``), so it is one vector load + store, the
    kh rows unrolled; the generic injective schedule treats the short inner dim as a transpose
    (unrolled byte copies: kws-cnn's 20 KB took ~3 us). Parallel over output pixels when large."""

    def schedule(self, sch, func, target):
        from .compute import ATTR_IM2COL

        if func.attrs is None or ATTR_IM2COL not in func.attrs:
            return None
        block = sch.get_sblock("im2col")
        loops = sch.get_loops(block)
        if len(loops) != 4:
            raise NotApplicable("expected loops [B*OH, OW, kh, kw*Cp]")
        exts = [static_extent(sch, lp) for lp in loops]
        if exts[3] <= 64:
            sch.vectorize(loops[3])
        sch.unroll(loops[2])
        total = exts[0] * exts[1] * exts[2] * exts[3]
        if total >= IM2COL_PARALLEL_MIN_BYTES:
            sch.parallel(sch.fuse(loops[0], loops[1]))
        return sch
