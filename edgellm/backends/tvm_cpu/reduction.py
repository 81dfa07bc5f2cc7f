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

from ._common import debug_exception, NotApplicable, TileInfo, schedule_tiled_reduction
from .matmul import _is_multiply_accumulate, find_single_reduction


class Pooling(CPUScheduleRule):
    """Reductions vectorizable over their innermost output dim (pooling, NHWC mean)."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            sch = s_tir.Schedule(func)
            _, main = find_single_reduction(sch)
            if _is_multiply_accumulate(sch.get(main.block_rv)):
                return None
            tile = TileInfo(sch, main)
            if tile.vec_reads < 1:
                return None
            return schedule_tiled_reduction(sch, func, target, main, tile, max_nv=2,
                                            weight_outer=False)
        except NotApplicable:
            return None
        except Exception:  # pylint: disable=broad-except
            debug_exception(type(self).__name__, func)
            return None


class RowReduction(CPUScheduleRule):
    """Softmax / layer norm: dlight's CPU reduction rule, guarded."""

    def __init__(self):
        self._inner = _DlightReduction()

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            return self._inner.apply(func, target, tunable)
        except Exception:  # pylint: disable=broad-except
            debug_exception(type(self).__name__, func)
            return None
