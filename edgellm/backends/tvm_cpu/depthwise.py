"""NHWC depthwise convolution rule.

Matches one multiply-accumulate reduction block over ``(rh, rw)`` only, where the channel
(innermost output dim) is unit-stride in both the input and the weight
(``pad[n, h*s+rh, w*s+rw, c] * w[rh, rw, 0, c]``).  Same register-tiled schedule as
the dense conv: ``mr`` columns x ``nv*lanes`` channels, parallel over (h, tiles).
"""

from __future__ import annotations


from ._common import (SafeRule, TileInfo, _linear_coef, schedule_tiled_reduction, uses_var)
from .matmul import _is_multiply_accumulate, find_single_reduction


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


class DepthwiseNHWC(SafeRule):
    """Depthwise (groups == channels) NHWC convolution."""

    def schedule(self, sch, func, target):
        _, main = find_single_reduction(sch)
        if not _is_multiply_accumulate(sch.get(main.block_rv)):
            return None
        tile = TileInfo(sch, main)
        if len(tile.reduce) < 1 or tile.vec_reads != 2:
            return None
        # strided (downsampling) depthwise: pad per tile instead of a full padded copy of
        # the (4x larger) input; stride 1: a separate vectorized pad pass is faster
        return schedule_tiled_reduction(sch, func, target, main, tile, weight_outer=False,
                                        producers_at_tile=_row_stride(tile) > 1,
                                        unroll_reduction=False)
