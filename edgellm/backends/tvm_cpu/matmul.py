"""Dense / batched matmul rule (bias, activation and residual epilogues fused).

Matches a PrimFunc with exactly one reduction block ``C[..., i, j] += A[..., i, k] * B[..., k, j]``
(any operand that carries ``j`` must carry it unit-stride in its innermost dimension, so
``B`` may be a constant weight ``[K, N]`` or an attention operand already transposed by a
preceding fused transpose), plus injective producers/consumers.  Schedule: see
``_common.schedule_tiled_reduction`` (mr x nv*lanes register tile, local accumulator,
epilogue in the vectorized write-back, parallel outer tiles).
"""

from __future__ import annotations

from tvm import tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func

from ._common import SafeRule, NotApplicable, TileInfo, schedule_tiled_reduction


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


class Matmul(SafeRule):
    """Dense and batched matmul (spatial dims ``[..., M, N]``, one reduction ``K``)."""

    def schedule(self, sch, func, target):
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
        return schedule_tiled_reduction(sch, func, target, main, tile, pack=True)
