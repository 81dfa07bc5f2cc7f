"""NHWC convolution rule (after Relax ``ConvertLayout`` to NHWC/HWIO).

Matches one multiply-accumulate reduction block with >= 2 reduction iters
(``rh, rw, rc``) whose output channel (innermost output dim) is unit-stride in the
weight and absent from the input (``pad[n, h*s+rh, w*s+rw, rc]``).  The padding producer
stays a separate parallel+vectorized pass (inlining it puts an ``if_then_else`` in the
inner loop).  Register tile: ``mr`` output columns (W) x ``nv*lanes`` output channels;
BN/bias/ReLU/clip/residual epilogues inlined into the vectorized write-back.
"""

from __future__ import annotations


from ._common import SafeRule, TileInfo, inline_identity_copies, schedule_tiled_reduction
from .matmul import _is_multiply_accumulate, find_single_reduction


class ConvNHWC(SafeRule):
    """Dense (groups=1) NHWC convolution."""

    def schedule(self, sch, func, target):
        _, main = find_single_reduction(sch)
        if not _is_multiply_accumulate(sch.get(main.block_rv)):
            return None
        if inline_identity_copies(sch):  # the zero-width pad of a 1x1 conv
            _, main = find_single_reduction(sch)
        if not _is_multiply_accumulate(sch.get(main.block_rv)):
            return None
        tile = TileInfo(sch, main)
        if len(tile.reduce) < 2 or tile.vec_reads != 1:
            return None
        return schedule_tiled_reduction(sch, func, target, main, tile,
                                        # one output-channel tile: no reuse of a padded
                                        # input across tiles -> pad per tile, in cache
                                        producers_at_tile="single_vector_tile", pack=True)
