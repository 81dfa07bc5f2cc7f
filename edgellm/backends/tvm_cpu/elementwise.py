"""Generic injective rule and a last-resort parallelizing rule.

* ``Elementwise``: functions made only of spatial blocks (elementwise, broadcast,
  reshape/transpose, padding, layout transforms).  Intermediate blocks are inlined into
  their consumers; each remaining block is vectorized on its innermost dimension (or on
  the fused loop nest when that is not divisible) and its outer loops fused and
  parallelized (above ``PARALLEL_MIN_ELEMS`` elements).
* ``ParallelFallback``: anything no other rule took: parallelize the outermost spatial loop
  of each root block and vectorize spatial-only blocks, so nothing runs single-threaded.
"""

from __future__ import annotations

import tvm
from tvm import tirx

from ._common import (SafeRule, PARALLEL_MIN_ELEMS, dtype_bits, func_output_buffers, is_spatial_block, prod,
                      root_blocks, schedule_injective, static_extent, uses_var)
from .target_info import vector_bits


def _block_lanes(sch, block, target):
    stmt = sch.get(block)
    bits = dtype_bits(stmt.writes[0].source.dtype) if stmt.writes else 32
    return max(vector_bits(target) // bits, 1)


def inline_all(sch, func):
    outputs = func_output_buffers(sch.mod["main"])
    changed = True
    while changed:
        changed = False
        for b in root_blocks(sch):
            stmt = sch.get(b)
            if not stmt.writes or stmt.writes[0].source in outputs:
                continue
            try:
                sch.compute_inline(b)
                changed = True
            except Exception:  # pylint: disable=broad-except
                continue


class Elementwise(SafeRule):
    """All-spatial functions: inline, vectorize, parallelize."""

    def schedule(self, sch, func, target):
        blocks = root_blocks(sch)
        if not blocks or not all(is_spatial_block(sch, b) for b in blocks):
            return None
        for b in blocks:  # every block must be a plain loop nest
            if len(sch.get_child_blocks(b)) != 0:
                return None
        inline_all(sch, func)
        for b in root_blocks(sch):
            schedule_injective(sch, b, _block_lanes(sch, b, target))
        return sch


_get_realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")


def _loop_is_spatial(sch, block, loop) -> bool:
    """True if ``loop`` only feeds data-parallel block iters (safe to parallelize)."""
    loop_var = sch.get(loop).loop_var
    realize = _get_realize(sch, block)
    used = False
    for iv, val in zip(realize.block.iter_vars, realize.iter_values):
        if uses_var(val, loop_var):
            used = True
            if iv.iter_type != tirx.IterVar.DataPar:
                return False
    return used


class ParallelFallback(SafeRule):
    """Parallelize the outermost spatial loop of every root block (last resort)."""

    def schedule(self, sch, func, target):
        done = False
        for b in root_blocks(sch):
            loops = sch.get_loops(b)
            if not loops:
                continue
            if is_spatial_block(sch, b):
                try:
                    schedule_injective(sch, b, _block_lanes(sch, b, target))
                    done = True
                    continue
                except Exception:  # pylint: disable=broad-except
                    pass
            if not _loop_is_spatial(sch, b, loops[0]):
                continue
            total = prod(static_extent(sch, l) for l in loops)
            if static_extent(sch, loops[0]) > 1 and total >= PARALLEL_MIN_ELEMS:
                sch.parallel(loops[0])
                done = True
        return sch if done else None
