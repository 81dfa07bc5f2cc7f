"""Pooling and row-reduction rules.

* ``Pooling``: one non-multiply reduction (max / sum) whose innermost output dim is
  unit-stride in its input -- NHWC max/avg pooling, global average pooling (``mean``
  over H, W of NHWC), reductions over non-innermost axes.  Register-tiled like the conv
  (vectorized over the innermost dim, parallel over the outer output dims).
* ``RowReduction``: softmax / layer norm / RMS norm style functions (reductions over the
  innermost axis followed by injective blocks): ``tvm.s_tir.dlight.cpu.Reduction``
  (rows in parallel, injective blocks vectorized), guarded so that a failure leaves the
  function untouched.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu import Reduction as _DlightReduction
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent

from ._common import (SafeRule, TileInfo, _linear_coef, debug_exception, dtype_bits, is_spatial_block,
                      largest_pow2_divisor, root_blocks, schedule_tiled_reduction, uses_var)
from .target_info import vector_bits
from .matmul import _is_multiply_accumulate, find_single_reduction


class Pooling(SafeRule):
    """Reductions vectorizable over their innermost output dim (pooling, NHWC mean)."""

    def schedule(self, sch, func, target):
        _, main = find_single_reduction(sch)
        if _is_multiply_accumulate(sch.get(main.block_rv)):
            return None
        from .elementwise import inline_all  # pylint: disable=import-outside-toplevel

        # the pad is inlined into the window reads (a bounds test per vector): computed per tile into a full-size
        # buffer it cost ResNet-18's 3x3 stride-2 max pool over 112x112x64 a write pass (67 -> 55 us)
        inline_all(sch, func)
        _, main = find_single_reduction(sch)
        tile = TileInfo(sch, main)
        if tile.vec_reads < 1:
            return None
        from .depthwise import _row_stride  # pylint: disable=import-outside-toplevel

        return schedule_tiled_reduction(sch, func, target, main, tile, max_nv=2,
                                        weight_outer=False,
                                        producers_at_tile=_row_stride(tile) > 1)


def _leading_s(kind: str) -> int:
    return len(kind) - len(kind.lstrip("S"))


def _vectorize_inner(sch, block, lanes):
    loops = sch.get_loops(block)
    if not loops:
        return
    ext = get_extent(sch, loops[-1])
    if not isinstance(ext, int) or ext < 2:
        return
    if ext % lanes == 0 and ext > lanes:
        _, v = sch.split(loops[-1], factors=[None, lanes])
        sch.vectorize(v)
    elif ext <= lanes:
        sch.vectorize(loops[-1])


def _inner_reduction_contiguous(sch, info, unit_tail: bool = False) -> bool:
    """Single reduction iter, innermost, unit-stride innermost in every read using it (``unit_tail``: or followed
    only by extent-1 dims, e.g. [1, C, L, 1])."""
    kinds = info.dom_kind()
    if kinds.count("R") != 1 or not kinds.endswith("R"):
        return False
    k = info.iters[-1].var
    for region in sch.get(info.block_rv).reads:
        idx = [r.min for r in region.region]
        for d, e in enumerate(idx):
            if not uses_var(e, k):
                continue
            tail = [int(x) for x in region.source.shape[d + 1:]] if unit_tail else [0]
            if d != len(idx) - 1 and any(x != 1 for x in tail):
                return False
            lc = _linear_coef(e, k)
            if lc is None or lc[0] != 1:
                return False
    return True


class RowReduction(CPUScheduleRule):
    """Softmax / layer norm / RMS norm: rows in parallel, every block vectorized.

    Reductions over the innermost axis are split by the vector width and ``rfactor``-ed,
    so that the per-lane partial max / sum is a vector loop; the final horizontal
    reduction over ``lanes`` partials is scalar.  Falls back to dlight's CPU ``Reduction``
    rule (scalar reductions) when that does not apply.
    """

    def __init__(self):
        self._fallback = _DlightReduction()

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            sch = self._vector_rows(func, target)
            if sch is not None:
                return sch
        except Exception:  # pylint: disable=broad-except
            debug_exception(type(self).__name__, func)
        try:
            return self._fallback.apply(func, target, tunable)
        except Exception:  # pylint: disable=broad-except
            debug_exception(type(self).__name__ + "(dlight)", func)
            return None

    @staticmethod
    def _vector_rows(func, target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 2:
            return None
        if not any(i.is_reduction() for i in infos) or not infos[-1].is_injective():
            return None
        kinds = [i.dom_kind() for i in infos]
        if any(not k or k[0] != "S" for k in kinds):
            return None
        nlead = min(_leading_s(k) for k in kinds)
        stmt = sch.get(infos[-1].block_rv)
        lanes = max(vector_bits(target) // dtype_bits(stmt.writes[0].source.dtype), 1)

        rf_blocks = []
        for info in infos:
            if not info.is_reduction() or not _inner_reduction_contiguous(sch, info):
                continue
            k_ext = info.iters[-1].dom
            if not isinstance(k_ext, int) or k_ext % lanes or k_ext < 2 * lanes:
                continue
            loops = sch.get_loops(info.block_rv)
            _, ki = sch.split(loops[-1], factors=[None, lanes])
            ndim = len(sch.get(info.block_rv).writes[0].region)
            rf_blocks.append(sch.rfactor(ki, factor_axis=ndim))

        last = infos[-1].block_rv
        loops = sch.get_loops(last)
        row = sch.fuse(*loops[:nlead]) if nlead > 1 else loops[0]
        _vectorize_inner(sch, last, lanes)
        for block in reversed(root_blocks(sch)[:-1]):
            sch.compute_at(block, row, preserve_unit_loops=True)
        rf_names = {sch.get(b).name_hint for b in rf_blocks}
        for block in sch.get_child_blocks(row):
            name = sch.get(block).name_hint
            if name in rf_names:
                # loops under the row: (ko, ki) -> reorder ki innermost and vectorize it
                lps = sch.get_loops(block)
                ki = [l for l in lps if get_extent(sch, l) == lanes]
                if ki:
                    ko = lps[-1] if not ki[-1].same_as(lps[-1]) else None
                    if ko is not None:
                        sch.reorder(ko, ki[-1])
                    sch.vectorize(ki[-1])
            elif is_spatial_block(sch, block):
                _vectorize_inner(sch, block, lanes)
        sch.parallel(row)
        return sch


class InlinedRowReduction(SafeRule):
    """Injective blocks feeding one reduction over the innermost, contiguous axis (an activation then a global max /
    sum over a sequence): the producers inlined, rows in parallel, the reduction split by the vector width and
    ``rfactor``-ed into a vector loop. ParallelFallback left each producer a separate full pass through memory
    (magika's 14-block gelu + max over 508 steps: 0.8 ms, now a vector loop)."""

    def schedule(self, sch, func, target):
        from .elementwise import inline_all  # pylint: disable=import-outside-toplevel

        blocks = root_blocks(sch)
        if not blocks or not all(is_spatial_block(sch, b) for b in blocks[:-1]):
            return None
        inline_all(sch, func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) != 1 or not infos[0].is_reduction():
            return None
        info = infos[0]
        kinds = info.dom_kind()
        if not kinds.startswith("S") or not _inner_reduction_contiguous(sch, info, unit_tail=True):
            return None
        lanes = max(vector_bits(target) // dtype_bits(sch.get(info.block_rv).writes[0].source.dtype), 1)
        k_ext = info.iters[-1].dom
        if not isinstance(k_ext, int) or k_ext < 2 * lanes:
            return None
        loops = sch.get_loops(info.block_rv)
        row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        width = largest_pow2_divisor(k_ext, lanes, floor=4)  # a tail predicate would scalarize the vector loop
        if width is None:
            return None
        _, ki = sch.split(sch.get_loops(info.block_rv)[-1], factors=[None, width])
        rf = sch.rfactor(ki, factor_axis=len(sch.get(info.block_rv).writes[0].region))
        # rf: [row, ko, ki] (ki a spatial lane of the partial-result buffer): ki innermost, vectorized
        sch.vectorize(sch.get_loops(rf)[-1])
        sch.reverse_compute_at(info.block_rv, sch.get_loops(rf)[0], preserve_unit_loops=True)
        sch.parallel(sch.get_loops(rf)[0])
        return sch
