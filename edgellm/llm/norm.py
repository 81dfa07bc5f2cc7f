"""RMSNorm as one kernel with its own schedule: a row per task, the sum of squares kept in a register.

The generic route (``nn.RMSNorm`` -> legalized ``rms_norm`` -> the first generic rule that takes it) scheduled the
decode-time norm ([1, 1, 576]) with a parallel loop over the hidden dimension that recomputed the whole row's sum
in every iteration: 0.4 ms a call, 60 calls a token, more than all the linear layers together. Here the kernel
is marked (``ATTR``) and opaque to fusion, and ``RMSNormRule`` schedules it: rows in parallel only when there
are many (prefill), the reduction and the scaling vectorized along the hidden dimension.
"""

from __future__ import annotations

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor

from edgellm.backends.tvm_cpu._common import NotApplicable, SafeRule
from edgellm.backends.tvm_cpu.target_info import vector_lanes

ATTR = "edgellm.rms_norm"
PARALLEL_ROWS = 16  # fewer rows than this run on one thread: a parallel launch costs more than the work


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (the parameter is ``weight``, as nn.RMSNorm's)."""

    def __init__(self, hidden: int, eps: float):
        self.eps = eps
        self.weight = nn.Parameter((hidden,), "float32")

    def forward(self, x: Tensor) -> Tensor:
        eps = self.eps

        def compute(x, w):
            *lead, h = x.shape
            k = te.reduce_axis((0, h), name="k")
            ss = te.compute(tuple(lead), lambda *i: te.sum(x[(*i, k)] * x[(*i, k)], axis=k), name="sum_squares")
            return te.compute(tuple(x.shape), lambda *i: x[i] * tirx.rsqrt(ss[i[:-1]] / tirx.const(int(h), "float32") + eps) * w[i[-1]],
                              name="rms_norm")

        return nn.op.tensor_expr_op(compute, "rms_norm", [x, self.weight], attrs={ATTR: 1, "op_pattern": 8})


class RMSNormRule(SafeRule):
    def schedule(self, sch, func, target):
        if not func.attrs or ATTR not in func.attrs:
            raise NotApplicable("not an edgellm rms_norm")
        lanes = vector_lanes(target)
        norm, sums = sch.get_sblock("rms_norm"), sch.get_sblock("sum_squares")
        hidden = int(sch.get(sch.get_loops(norm)[-1]).extent)
        rf = None
        if hidden % lanes == 0:  # lanes partial sums in a vector, added once at the end
            _, ki = sch.split(sch.get_loops(sums)[-1], [None, lanes])
            rf = sch.rfactor(ki, 0)
        *lead, col = sch.get_loops(norm)
        row = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        rows = sch.get(row).extent
        if not isinstance(rows, tirx.IntImm) or int(rows) >= PARALLEL_ROWS:
            sch.parallel(row)
        sch.compute_at(sums, row)
        if rf is not None:
            sch.compute_at(rf, row)
            lane_loop, outer = sch.get_loops(rf)[-2:]  # compute_at lays out the spatial lane loop first
            sch.reorder(outer, lane_loop)
            sch.vectorize(lane_loop)
            _, inner = sch.split(col, [None, lanes])
            sch.vectorize(inner)
        return sch
