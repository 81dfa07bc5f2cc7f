"""Dense / batched matmul rule (bias, activation and residual epilogues fused).

Matches a PrimFunc with exactly one reduction block ``C[..., i, j] += A[..., i, k] * B[..., k, j]``
(any operand that carries ``j`` must carry it unit-stride in its innermost dimension, so
``B`` may be a constant weight ``[K, N]`` or an attention operand already transposed by a
preceding fused transpose), plus injective producers/consumers.  Schedule: see
``_common.schedule_tiled_reduction`` (mr x nv*lanes register tile, local accumulator,
epilogue in the vectorized write-back, parallel outer tiles).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

from ._common import debug_exception, NotApplicable, TileInfo, schedule_tiled_reduction


def find_single_reduction(sch):
    infos = normalize_prim_func(sch)
    if infos is None:
        raise NotApplicable("not normalizable")
    reds = [i for i in infos if i.is_reduction()]
    if len(reds) != 1:
        raise NotApplicable("need exactly one reduction block")
    return infos, reds[0]


def _is_multiply_accumulate(stmt) -> bool:
    body = stmt.body
    if not isinstance(body, tirx.BufferStore):
        return False
    v = body.value
    return isinstance(v, tirx.Add) and (isinstance(v.b, tirx.Mul) or isinstance(v.a, tirx.Mul))


class Matmul(CPUScheduleRule):
    """Dense and batched matmul (spatial dims ``[..., M, N]``, one reduction ``K``)."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            sch = s_tir.Schedule(func)
            _, main = find_single_reduction(sch)
            stmt = sch.get(main.block_rv)
            if not _is_multiply_accumulate(stmt):
                return None
            tile = TileInfo(sch, main)
            if len(tile.reduce) != 1:
                return None
            # exactly two operands; the left one must not carry the vector dim
            if len(tile.reads) < 2:
                return None
            return schedule_tiled_reduction(sch, func, target, main, tile)
        except NotApplicable:
            return None
        except Exception:  # pylint: disable=broad-except
            debug_exception(type(self).__name__, func)
            return None
