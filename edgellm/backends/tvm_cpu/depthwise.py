"""NHWC depthwise convolution rule.

Matches one multiply-accumulate reduction block over ``(rh, rw)`` only, where the channel
(innermost output dim) is unit-stride in both the input and the weight
(``pad[n, h*s+rh, w*s+rw, c] * w[rh, rw, 0, c]``).

Schedule (``schedule_depthwise``)::

    parallel h x channel tiles               (both cores busy even at 7x7: H * C/16 units)
      pad rows h*s .. h*s+kh-1 of this channel tile into a small buffer [kh, Wp, nv*lanes]
        (vectorized, the zero border written here: no separate padded copy of the input)
      for w tiles of mr columns:
        acc[mr, nv*lanes] = 0                (registers)
        rh, rw fully unrolled, mr unrolled, nv unrolled, lanes vectorized: mr*nv FMAs per
          tap; the (mr-1)*s+kw input vectors of a tap row are loaded once (unrolled, LLVM
          reuses them across rw) and the kh*kw weight vectors stay in registers
        write-back with bias / ReLU / ReLU6 / residual inlined, vectorized

A function this does not fit (no W dim, channels not a multiple of 4...) falls back to the
generic register-tiled reduction schedule (``schedule_tiled_reduction``).
"""

from __future__ import annotations

from tvm import s_tir

from ._common import (
    PARALLEL_MIN_WORK,
    NotApplicable,
    SafeRule,
    TileInfo,
    _linear_coef,
    accumulate_in_registers,
    dtype_bits,
    largest_pow2_divisor,
    loop_work,
    parallel_if,
    schedule_injective,
    schedule_tiled_reduction,
    split_around_reduction,
    static_extent,
    uses_var,
    vectorize_by,
)
from .matmul import _is_multiply_accumulate, find_single_reduction
from .target_info import num_vector_registers, vector_bits


def _row_stride(tile) -> int:
    """Coefficient of the output-row (W) iter in the input access (the conv stride)."""
    if tile.row is None:
        return 1
    stride = 1
    for region in tile.reads:
        for r in region.region:
            if uses_var(r.min, tile.row.var):
                lc = _linear_coef(r.min, tile.row.var)
                if lc is not None:
                    stride = max(stride, lc[0])
    return stride


def _pick_mr(w: int, stride: int, taps: int, kw: int, nregs: int, max_mr: int = 8) -> int:
    """Output columns per tile: the largest divisor of W (<= max_mr) whose accumulators, one
    tap row of input vectors and the weights fit the register file (weights may spill)."""
    best = 1
    for mr in range(1, max_mr + 1):
        if w % mr:
            continue
        if mr + (mr - 1) * stride + kw <= nregs:
            best = mr
    return best


def _pick_rows(tile, channel_tiles: int, n_red: int, stride: int, row_bytes: int, threads: int = 2) -> int:
    """Output rows per parallel unit (the kh + (rows - 1) * stride padded input rows they read are
    written once per unit instead of kh times per output row): stride 1, the largest of 4, 2
    dividing H that leaves at least 8 units per thread; stride 2: 2 when those rows' pad buffer
    stays within 32 KB (L1), else 1. Measured (MobileNet-V2 int8, one thread): 56x56x144 110 -> 80
    us, 28x28x192 34 -> 25, 112x112x32 79 -> 66; stride 2 56->28x144 37 -> 30, but 112->56x96
    (a 72 KB buffer) 98 -> 136."""
    if n_red != 2 or not tile.outer:
        return 1
    kh = tile.reduce[0].dom
    h = tile.outer[-1].dom
    units = channel_tiles
    for o in tile.outer[:-1]:
        units *= o.dom
    for r in ((4, 2) if stride == 1 else (2,)):
        if stride > 1 and (kh + (r - 1) * stride) * row_bytes > 32 * 1024:
            continue
        if h % r == 0 and units * h // r >= 8 * threads:
            return r
    return 1


def schedule_depthwise(sch, func, target, main_info, tile: TileInfo):
    block = main_info.block_rv
    work = loop_work(sch, block)
    if tile.row is None or len(tile.reduce) > 2:
        raise NotApplicable("no W dim")
    lanes = max(vector_bits(target) // dtype_bits(tile.dtype), 1)
    nregs = num_vector_registers(target)
    c = tile.vec.dom
    vl = lanes if c % lanes == 0 else largest_pow2_divisor(c, lanes // 2, floor=4)
    if vl is None:
        raise NotApplicable("channels not a multiple of 4")
    w = tile.row.dom
    stride = _row_stride(tile)
    red_ext = [i.dom for i in tile.reduce]
    kw = red_ext[-1]
    taps = 1
    for e in red_ext:
        taps *= e
    if taps > 64:
        raise NotApplicable("large kernel")
    mr = _pick_mr(w, stride, taps, kw, nregs)
    nv = 1
    # few columns per tile (W prime, 1, 2, 3...): two channel vectors for more FMA chains
    if mr < 4 and (c // vl) % 2 == 0:
        nv = 2
    elif (c // vl) % 2 == 0 and 2 * mr + (mr - 1) * stride + kw <= nregs:
        # two channel vectors per tile: more independent FMA chains, half the tiles (each
        # with its pad and loop overhead); the weights then spill (FMA memory operands).
        # Measured (MobileNet-V2, Zen 4/5): 1.1-1.3x; three vectors was slower
        nv = 2

    producers, remaining = split_around_reduction(sch, block)

    loops = {i.var: i.loop_rv for i in main_info.iters}
    co, ci = sch.split(loops[tile.vec.var], factors=[None, nv * vl])
    cio, cii = sch.split(ci, factors=[nv, vl])
    wo, wi = sch.split(loops[tile.row.var], factors=[None, mr])
    outer = [loops[i.var] for i in tile.outer]
    red = [loops[i.var] for i in tile.reduce]
    rows = _pick_rows(tile, c // (nv * vl), len(red), stride, (w * stride + kw) * nv * vl * dtype_bits(tile.dtype) // 8)
    inner_rows = []
    if rows > 1:  # output rows per parallel unit: their padded input rows are written once, not kh times
        outer[-1], hi = sch.split(outer[-1], factors=[None, rows])
        inner_rows = [hi]
    sch.reorder(*outer, co, *inner_rows, wo, *red, wi, cio, cii)

    wb, leftover = accumulate_in_registers(sch, block, wo, remaining)
    vectorize_by(sch, sch.get_loops(wb)[-1], vl)

    par = sch.fuse(*outer, co) if outer else co
    at_par = []
    for b in reversed(producers):
        try:
            sch.compute_at(b, par, preserve_unit_loops=True)
            at_par.append(b)
        except Exception:  # pylint: disable=broad-except
            pass
    for b in at_par:
        p_loops = sch.get_loops(b)
        p_ext = static_extent(sch, p_loops[-1])
        if p_ext % vl == 0:
            if p_ext > vl:
                _, pv = sch.split(p_loops[-1], factors=[None, vl])
                sch.vectorize(pv)
            else:
                sch.vectorize(p_loops[-1])

    for r in red:
        sch.unroll(r)
    if mr > 1:
        sch.unroll(wi)
    if nv > 1:
        sch.unroll(cio)
    sch.vectorize(cii)
    parallel_if(sch, par, work >= PARALLEL_MIN_WORK)
    sch.decompose_reduction(block, red[0])
    for b in [p for p in producers if not any(p.same_as(a) for a in at_par)] + leftover:
        schedule_injective(sch, b, lanes)
    return sch


class DepthwiseNHWC(SafeRule):
    """Depthwise (groups == channels) NHWC convolution."""

    @staticmethod
    def _match(sch):
        _, main = find_single_reduction(sch)
        if not _is_multiply_accumulate(sch.get(main.block_rv)):
            return None, None
        tile = TileInfo(sch, main)
        if len(tile.reduce) < 1 or tile.vec_reads != 2:
            return None, None
        return main, tile

    def schedule(self, sch, func, target):
        main, tile = self._match(sch)
        if main is None:
            return None
        try:
            return schedule_depthwise(sch, func, target, main, tile)
        except NotApplicable:
            pass
        sch = s_tir.Schedule(func)
        main, tile = self._match(sch)
        # strided (downsampling) depthwise: pad per tile instead of a full padded copy of
        # the (4x larger) input; stride 1: a separate vectorized pad pass is faster
        return schedule_tiled_reduction(sch, func, target, main, tile, weight_outer=False,
                                        producers_at_tile=_row_stride(tile) > 1,
                                        unroll_reduction=False)
