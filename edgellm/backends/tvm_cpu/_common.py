"""Shared analysis and scheduling helpers for the CPU schedule rules.

Everything here works on an ``s_tir.Schedule`` of a single PrimFunc produced by
Relax legalization + FuseOps/FuseTIR.  Helpers raise on failure; the rules wrap
them so that a function they cannot handle is left untouched (rule returns None).
"""

from __future__ import annotations

import functools
import os
import operator

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import get_extent
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.sym.pattern import detect_linear_equation

from .target_info import core_info

#: below this many output elements an injective loop nest is not parallelized
#: (a TVM parallel region costs a few microseconds to launch).
PARALLEL_MIN_ELEMS = 8192

#: below this many multiply-adds a conv / matmul kernel runs on one thread: ~20 us of work,
#: where waking the pool costs a few us on an idle machine and, when another process holds a core, can wait a
#: scheduler slice (ms) for the second thread (silero-vad: ~20 kernels of 10-200 k MACs, 0.2 ms in all).
PARALLEL_MIN_WORK = 1 << 18


def debug_exception(rule: str, func) -> None:
    """Print the traceback of a failed rule when EDGELLM_TVM_DEBUG is set."""
    if os.environ.get("EDGELLM_TVM_DEBUG"):
        import traceback  # pylint: disable=import-outside-toplevel

        print(f"[edgellm.tvm_cpu] rule {rule} failed:")
        traceback.print_exc()


class NotApplicable(Exception):
    """Raised by a matcher when a rule does not apply."""


class SafeRule(CPUScheduleRule):
    """A CPU rule that can never break a build.

    Subclasses implement ``schedule(sch, func, target) -> Schedule | None``; raising
    NotApplicable, or failing in any other way, leaves the function untouched (the
    failure is printed under EDGELLM_TVM_DEBUG) so the next rule gets its turn.
    """

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            return self.schedule(s_tir.Schedule(func), func, target)
        except NotApplicable:
            return None
        except Exception:  # pylint: disable=broad-except
            debug_exception(type(self).__name__, func)
            return None

    def schedule(self, sch, func, target):
        raise NotImplementedError


def prod(xs):
    return functools.reduce(operator.mul, xs, 1)


def static_extent(sch, loop) -> int:
    ext = get_extent(sch, loop)
    if not isinstance(ext, int):
        raise NotApplicable("dynamic extent")
    return ext


def dtype_bits(dtype) -> int:
    s = str(dtype)
    digits = "".join(ch for ch in s if ch.isdigit())
    return int(digits) if digits else 32


def func_output_buffers(func: tirx.PrimFunc):
    """The PrimFunc's parameter buffers (in 0.27 the params are the buffers)."""
    params = list(func.params)
    bmap = getattr(func, "buffer_map", None)
    if bmap is not None:
        params = [bmap[p] for p in params if p in bmap]
    return _BufferSet(params)


class _BufferSet:
    def __init__(self, bufs):
        self.bufs = list(bufs)

    def __contains__(self, buf):
        return any(b.same_as(buf) for b in self.bufs)


def root_blocks(sch):
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def block_vars(expr):
    return list(tirx.analysis.undefined_vars(expr))


def uses_var(expr, var) -> bool:
    return any(v.same_as(var) for v in block_vars(expr))


def largest_pow2_divisor(n: int, cap: int, floor: int = 2) -> int | None:
    v = cap
    while v >= floor:
        if n % v == 0:
            return v
        v //= 2
    return None


def loop_work(sch, block) -> int:
    """Iterations of the block's loop nest (spatial x reduction): its multiply-adds for a conv / matmul."""
    return prod(static_extent(sch, l) for l in sch.get_loops(block))


def parallel_if(sch, loop, parallel: bool) -> None:
    """``sch.parallel(loop)`` when ``parallel``; else the same call on a copy, only for its check: a rule whose loop
    cannot go parallel (not data-parallel after its compute_at's) must still fail, as it did when every loop went."""
    (sch if parallel else sch.copy()).parallel(loop)


def schedule_injective(sch, block, lanes: int, parallel_min: int = PARALLEL_MIN_ELEMS):
    """Vectorize the innermost dimension and parallelize the fused outer loops."""
    loops = sch.get_loops(block)
    if not loops:
        return
    exts = [get_extent(sch, l) for l in loops]
    if not all(isinstance(e, int) for e in exts):
        sch.parallel(loops[0])
        return
    total = prod(exts)
    vec = None
    if exts[-1] % lanes and exts[-1] < lanes and len(loops) >= 3 and not _is_elementwise(sch, block):
        # small innermost dim of a transpose / gather (e.g. NCHW -> NHWC of a 3-channel
        # image): vectorizing the fused nest turns every lane into index arithmetic + gather
        # (15x slower); unroll the small dim, keep the next loop serial for LLVM, parallel rest
        sch.unroll(loops[-1])
        if total >= parallel_min:
            outer = loops[:-2]
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        return
    inner_v = largest_pow2_divisor(exts[-1], lanes, floor=4)
    if exts[-1] % lanes == 0 or (inner_v is not None and not _is_elementwise(sch, block)):
        # whole vectors along the innermost dim; a gather / slice / reshape keeps that dim apart even when it is not
        # whole 16-lane vectors, so its index arithmetic simplifies (MobileNet-V2's [3136, 32] -> [1, 56, 56, 24]
        # slice + bias: 100 us fused and gathered 16 lanes at a time, vs 8-lane contiguous rows)
        outer_last, vec = sch.split(loops[-1], factors=[None, inner_v])  # lanes itself where the dim is whole vectors
        outer = list(loops[:-1]) + [outer_last]
    else:
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        v = largest_pow2_divisor(total, lanes)
        if v is not None:
            o, vec = sch.split(fused, factors=[None, v])
            outer = [o]
        else:
            outer = [fused]
    if vec is not None:
        sch.vectorize(vec)
    if total >= parallel_min:
        po = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(po)


def _is_elementwise(sch, block) -> bool:
    """Every read indexes its buffer exactly like the write (no transpose / broadcast)."""
    stmt = sch.get(block)
    if len(stmt.writes) != 1:
        return False
    w_idx = [r.min for r in stmt.writes[0].region]
    for region in stmt.reads:
        r_idx = [r.min for r in region.region]
        if len(r_idx) != len(w_idx) or any(not a.same_as(b) for a, b in zip(r_idx, w_idx)):
            return False
    return True


def is_spatial_block(sch, block) -> bool:
    stmt = sch.get(block)
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in stmt.iter_vars)


def _linear_coef(expr, var):
    """(coef, base) of expr = coef*var + base, or None if not linear in var."""
    res = detect_linear_equation(expr, [var])
    if len(res) != 2:
        return None
    coef, base = res
    if not isinstance(coef, tirx.IntImm) or uses_var(base, var):
        return None
    return int(coef), base


class TileInfo:
    """Analysis of a reduction block that can be register-tiled over its output."""

    def __init__(self, sch, info):
        self.info = info
        block = info.block_rv
        stmt = sch.get(block)
        if len(stmt.writes) != 1 or stmt.init is None:
            raise NotApplicable("not a single-output reduction")
        self.out_buffer = stmt.writes[0].source
        self.dtype = str(self.out_buffer.dtype)
        if not self.dtype.startswith("float"):
            raise NotApplicable("non-float output")
        iters = info.iters
        if any(i.kind not in "SR" for i in iters):
            raise NotApplicable("opaque iter")
        if not all(isinstance(i.dom, int) for i in iters):
            raise NotApplicable("dynamic shape")
        var2iter = {}
        for i in iters:
            var2iter[i.var] = i
        w_idx = [r.min for r in stmt.writes[0].region]
        out_iters = []
        unit_vars = [iv.var for iv in stmt.iter_vars
                     if isinstance(iv.dom.extent, tirx.IntImm) and int(iv.dom.extent) == 1]
        for e in w_idx:
            if isinstance(e, tirx.IntImm) or (
                    isinstance(e, tirx.Var) and any(u.same_as(e) for u in unit_vars)):
                continue  # unit dimension (dropped by normalization)
            if not isinstance(e, tirx.Var):
                raise NotApplicable("non-trivial output index")
            it = next((i for i in iters if i.var.same_as(e)), None)
            if it is None or it.kind != "S":
                raise NotApplicable("output index not a spatial iter")
            out_iters.append(it)
        spatial = [i for i in iters if i.kind == "S"]
        if len(spatial) != len(out_iters):
            raise NotApplicable("spatial iters not all in output")
        self.reduce = [i for i in iters if i.kind == "R"]
        if not self.reduce:
            raise NotApplicable("no reduction")
        self.vec = out_iters[-1]
        # the vector iter must be unit-stride in the last dim of every read that uses it
        self.vec_reads = 0
        for region in stmt.reads:
            idx = [r.min for r in region.region]
            if any(not isinstance(r.extent, tirx.IntImm) or int(r.extent) != 1 for r in region.region):
                raise NotApplicable("non-point read")
            for d, e in enumerate(idx):
                if not uses_var(e, self.vec.var):
                    continue
                if d != len(idx) - 1:
                    raise NotApplicable("vector iter in non-innermost read dim")
                lc = _linear_coef(e, self.vec.var)
                if lc is None or lc[0] != 1:
                    raise NotApplicable("vector iter not unit stride")
                self.vec_reads += 1
        # the row iter: the closest output dim before the vector dim with extent > 1
        self.row = None
        for it in reversed(out_iters[:-1]):
            if it.dom > 1:
                self.row = it
                break
        self.outer = [i for i in out_iters[:-1] if i is not self.row]
        self.out_iters = out_iters
        self.reads = list(stmt.reads)


def choose_tile(n: int, m: int, lanes: int, nregs: int, max_mr: int = 8, max_nv: int = 4):
    """Pick (vl, nv, mr): vector lanes, vectors per tile row, rows per tile.

    Most accumulators that fit the register file (mr*nv + nv B vectors + 1 broadcast), then the
    fewest loads per FMA (mr + nv); between transposed shapes (4x2 / 2x4) more rows: the B panel
    streams from L2 while the A element is a broadcast, so rows cost fewer bytes per FMA."""
    vl = lanes if n % lanes == 0 else largest_pow2_divisor(n, lanes // 2, floor=4)
    if vl is None:
        raise NotApplicable("vector extent not divisible")
    best = None
    for nv in range(max_nv, 0, -1):
        if (n // vl) % nv:
            continue
        for mr in range(max_mr, 0, -1):
            if m % mr or mr * nv + nv + 1 > nregs:
                continue
            key = (mr * nv, -(mr + nv), mr)
            if best is None or key > best[0]:
                best = (key, nv, mr)
    if best is None:
        raise NotApplicable("no tile")
    return vl, best[1], best[2]


#: a packed panel must be shared by at least this many row tiles: packing reads the panel once
#: (strided) and writes it once, about two row tiles' worth of the unpacked kernel's traffic; a
#: GEMV (1 row tile) never packs. ResNet-18's layer4 (7x7 output, 7 row tiles a panel): 1.9x.
PACK_MIN_REUSE = 4


def pack_vector_operand(sch, block, tile: TileInfo, core, n: int, m: int, width: int, mr: int):
    """Copy the one operand indexed by the vector dim (the weight) into contiguous column panels
    ``[n / width, ..., width]`` (a parallel pass before the kernel), so that the inner loop reads
    ``width`` floats a step from one stream instead of a row ``n`` floats apart: a 4 KiB stride for
    ``n = 1024`` aliases L1 sets and touches a new page each step (GotoBLAS's packed B).

    Only when it pays: more than one column panel, a panel too big to stay in L1 unpacked (half
    of L1d, the other half for A and C), and >= PACK_MIN_REUSE row tiles sharing each panel
    (a GEMV reads its weight once: packing would double its memory traffic). Returns the pack
    block or None."""
    stmt = sch.get(block)
    idx = [i for i, r in enumerate(stmt.reads) if any(uses_var(x.min, tile.vec.var) for x in r.region)]
    if len(idx) != 1 or n <= width:
        return None
    region = stmt.reads[idx[0]]
    buf = region.source
    shape = [int(x) for x in buf.shape]
    panel_bytes = prod(shape) // n * width * dtype_bits(buf.dtype) // 8
    reuse = m // mr * prod(o.dom for o in tile.outer
                           if not any(uses_var(r.min, o.var) for r in region.region))
    if panel_bytes <= core.l1d // 2 or reuse < PACK_MIN_REUSE:
        return None
    packed = sch.cache_read(block, idx[0], "global")
    ndim = len(shape)
    sch.transform_layout(packed, ("write", 0), tirx.IndexMap.from_func(
        lambda *ix: (ix[-1] // width, *ix[:-1], ix[-1] % width), ndim=ndim))
    if buf in func_output_buffers(sch.mod["main"]):
        # a parameter (a weight, when the model binds its weights as constants): Relax's
        # SplitLayoutRewritePreproc moves this block into a function of its own, which FoldConstant
        # then runs at compile time (see ``weight_prepack_passes``)
        sch.annotate(packed, "meta_schedule.layout_rewrite_preproc", True)
    return packed


def split_around_reduction(sch, block):
    """(producers, consumers left) of the one reduction ``block``: the root blocks before it, and the
    blocks after it minus the intermediate epilogue blocks, which are inlined into their consumers
    (what is left writes a function output, or could not be inlined). NotApplicable when another
    block is a reduction too."""
    outputs = func_output_buffers(sch.mod["main"])
    blocks = root_blocks(sch)
    pos = [sch.get(b).name_hint for b in blocks].index(sch.get(block).name_hint)
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
    return producers, remaining


def accumulate_in_registers(sch, block, at_loop, epilogues):
    """(write-back block, epilogues left): ``block`` accumulates into a local tile written back under
    ``at_loop``, with the ``epilogues`` (bias, activation, requantize) inlined into that write-back;
    those that cannot be inlined are returned, to get loop nests of their own."""
    wb = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(wb, at_loop, preserve_unit_loops=True)
    leftover = []
    for b in epilogues:
        try:
            sch.reverse_compute_inline(b)
        except Exception:  # pylint: disable=broad-except
            leftover.append(b)
    return wb, leftover


def vectorize_by(sch, loop, lanes: int) -> None:
    """Vectorize ``loop`` ``lanes`` wide when its extent is a multiple of ``lanes`` (split first when longer)."""
    ext = static_extent(sch, loop)
    if ext % lanes == 0 and ext > lanes:
        _, loop = sch.split(loop, factors=[None, lanes])
    elif ext != lanes:
        return
    sch.vectorize(loop)


def schedule_tiled_reduction(sch, func, target, main_info, tile: TileInfo, *, max_mr=8, max_nv=4,
                             weight_outer=None, producers_at_tile=False,
                             unroll_reduction=False, pack=False):
    """Register-tiled schedule of a reduction whose innermost output dim is vectorizable.

    Layout of the result: parallel(fused outer spatial x row tiles x vector tiles)
    -> reduction loops -> mr (unrolled) -> nv (unrolled) -> lanes (vectorized),
    accumulating into a local tile; epilogues are inlined into the vectorized write-back.
    ``pack``: may copy the weight into contiguous column panels first (``pack_vector_operand``).
    """
    block = main_info.block_rv
    work = loop_work(sch, block)
    core = core_info(target)
    lanes = max(core.vector_bits // dtype_bits(tile.dtype), 1)
    nregs = core.vector_registers
    n = tile.vec.dom
    m = tile.row.dom if tile.row is not None else 1
    # a single output row (GEMV-like, e.g. the classifier FC): more vectors per tile, so that
    # enough independent accumulator chains hide the FMA latency
    vl, nv, mr = choose_tile(n, m, lanes, nregs, max_mr=max_mr,
                             max_nv=max(max_nv, core.min_accumulators) if m == 1 else max_nv)

    # 1. inline intermediate epilogue blocks into their consumers
    producers, remaining = split_around_reduction(sch, block)

    # 2. tile the main block
    loops = {i.var: i.loop_rv for i in main_info.iters}
    vo, vi = sch.split(loops[tile.vec.var], factors=[None, nv * vl])
    vio, vii = sch.split(vi, factors=[nv, vl])
    if tile.row is not None:
        ro, ri = sch.split(loops[tile.row.var], factors=[None, mr])
    else:
        ro = ri = None
    outer = [loops[i.var] for i in tile.outer]
    red = [loops[i.var] for i in tile.reduce]
    if weight_outer is None:
        # put the vector (output-channel) tiles outermost when the operands indexed by the
        # vector dim are larger than the others: a panel then stays in cache across rows
        vec_bytes = other_bytes = 0
        for region in tile.reads:
            size = prod(int(x) for x in region.source.shape)
            if any(uses_var(r.min, tile.vec.var) for r in region.region):
                vec_bytes += size
            else:
                other_bytes += size
        weight_outer = vec_bytes >= other_bytes and n // (nv * vl) > 1
    tile_loops = ([vo] + outer + ([ro] if ro is not None else [])) if weight_outer else (
        outer + ([ro] if ro is not None else []) + [vo])
    inner = ([ri] if ri is not None else []) + [vio, vii]
    sch.reorder(*tile_loops, *red, *inner)

    # 3. local accumulator + write-back with inlined epilogues
    wb, leftover = accumulate_in_registers(sch, block, tile_loops[-1], remaining)
    wb_loops = sch.get_loops(wb)[len(tile_loops):]
    if wb_loops:
        vectorize_by(sch, wb_loops[-1], vl)

    # producers (padding) computed per tile: only for ops without reuse across tiles
    # (depthwise), where materializing the whole padded input costs a full memory pass
    at_tile = []
    if producers_at_tile == "single_vector_tile":
        producers_at_tile = n == nv * vl
    if producers_at_tile:
        for b in reversed(producers):
            try:
                sch.compute_at(b, tile_loops[-1], preserve_unit_loops=True)
                at_tile.append(b)
            except Exception:  # pylint: disable=broad-except
                pass
        for b in at_tile:
            p_loops = sch.get_loops(b)[len(tile_loops):]
            if p_loops:
                ext = get_extent(sch, p_loops[-1])
                if isinstance(ext, int) and ext % vl == 0:
                    if ext > vl:
                        _, pv = sch.split(p_loops[-1], factors=[None, vl])
                        sch.vectorize(pv)
                    else:
                        sch.vectorize(p_loops[-1])

    packed = pack_vector_operand(sch, block, tile, core, n, m, nv * vl, mr) if pack else None

    # 4. annotations, then parallel, then decompose (order matters in 0.27)
    if unroll_reduction:
        for r in red:
            sch.unroll(r)
    if ri is not None and mr > 1:
        sch.unroll(ri)
    if nv > 1:
        sch.unroll(vio)
    sch.vectorize(vii)
    par = sch.fuse(*tile_loops) if len(tile_loops) > 1 else tile_loops[0]
    parallel_if(sch, par, work >= PARALLEL_MIN_WORK)
    sch.decompose_reduction(block, red[0])

    # 5. everything else at root: separate parallel + vectorized loop nests
    for b in [p for p in producers if not any(p.same_as(a) for a in at_tile)] + leftover + (
            [packed] if packed is not None else []):
        schedule_injective(sch, b, lanes)
    return sch


def _is_identity_copy(sch, block) -> bool:
    """``B[i..] = A[i..]`` with the same index expressions (e.g. a zero-width ``pad``)."""
    stmt = sch.get(block)
    body = stmt.body
    if len(stmt.writes) != 1 or len(stmt.reads) != 1 or not isinstance(body, tirx.BufferStore):
        return False
    value = body.value
    # a buffer load (0.27 calls the node TensorLoad; tirx.BufferLoad is a factory function)
    if not (hasattr(value, "indices") and (hasattr(value, "buffer") or hasattr(value, "source"))) \
            or len(value.indices) != len(body.indices):
        return False
    return all(a.same_as(b) or (isinstance(a, tirx.IntImm) and isinstance(b, tirx.IntImm) and int(a) == int(b))
               for a, b in zip(value.indices, body.indices))


def inline_identity_copies(sch) -> int:
    """Inline spatial root blocks that only copy a buffer element-wise (a ``pad`` of width 0
    left by legalization before a 1x1 conv): a whole extra memory pass and a parallel launch."""
    outputs = func_output_buffers(sch.mod["main"])
    done = 0
    for b in root_blocks(sch):
        stmt = sch.get(b)
        if not is_spatial_block(sch, b) or stmt.writes[0].source in outputs:
            continue
        if _is_identity_copy(sch, b):
            try:
                sch.compute_inline(b)
                done += 1
            except Exception:  # pylint: disable=broad-except
                pass
    return done
