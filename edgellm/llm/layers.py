"""The kernels of a language model that edgellm schedules itself: ``Linear`` (``qlinear.QuantLinear`` plus an optional
bias, Qwen2's), ``gather_rows`` (the embedding: rows of a layer's weight table, dequantized on the fly, so a model that
ties its embedding to its output head stores the table once), and the passes that schedule them, RMSNorm and attention."""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor

from edgellm.llm import qlinear
from edgellm.llm.qlinear import dequantize, pack  # noqa: F401  (the packing that goes with these layers)


class Linear(nn.Module):
    """y = x W^T (+ b), W stored by ``scheme`` (f32 / q8 / q4)."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group: int | None = None, bias: bool = False):
        self.scheme = scheme
        self.linear = qlinear.QuantLinear(in_features, out_features, scheme, group)
        self.bias = nn.Parameter((out_features,), "float32") if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)
        return y + self.bias if self.bias is not None else y


def gather_rows(layer: Linear, ids: Tensor) -> Tensor:
    """Rows ``ids`` of the layer's weight table, dequantized: float32 ``[len(ids), in_features]``."""
    return layer.linear.gather(ids)


def schedule_passes(target, rope_theta: float | None = None) -> list:
    """Passes that put the linear kernels' own schedules in place before edgellm's generic rules."""
    from edgellm.backends.tvm_cpu.apply import ApplyVerifiedSchedule
    from edgellm.llm import attention, rope
    from edgellm.llm.norm import RMSNormRule

    # TVM's CPU attention kernels of the paged KV cache are scalar loops: attention.py puts vectorized,
    # parallel flash-attention bodies in their place (same parameters, same results); rope.py does the same for its
    # RoPE kernel (the cache's theta: ``rope_theta``), which evaluated pow, cos and sin for every element
    return [attention.schedule_pass(target), *([rope.schedule_pass(rope_theta)] if rope_theta else []),
            ApplyVerifiedSchedule(*qlinear.schedule_rules(), RMSNormRule())]
