"""The linear layers of a language model, by weight scheme: ``Linear`` (an optional bias on top of
``qlinear.QuantLinear``) and ``gather_rows`` (the embedding: rows of a linear layer's table, dequantized)."""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op


class Linear(nn.Module):
    """y = x W^T (+ b) with W stored by ``scheme``. (interim: f32 only)"""

    def __init__(self, in_features: int, out_features: int, scheme: str, group: int | None = None, bias: bool = False):
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.weight = nn.Parameter((out_features, in_features), "float32")
        self.bias = nn.Parameter((out_features,), "float32") if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = op.matmul(x, op.permute_dims(self.weight))
        return y + self.bias if self.bias is not None else y


def gather_rows(linear: Linear, ids: Tensor) -> Tensor:
    """Rows ``ids`` of the layer's weight table, float32 ``[len(ids), in_features]``."""
    return op.take(linear.weight, ids, axis=0)


def pack(scheme: str, w=None, *, group=None, gguf_type=None, gguf_raw=None) -> dict:
    """(interim) the layer's parameters for ``scheme``."""
    assert scheme == "f32"
    return {"weight": w.astype("float32")}


def dequantize(scheme: str, arrays: dict):
    assert scheme == "f32"
    return arrays["weight"]


def schedule_passes(target) -> list:
    """(interim) passes that schedule the linear kernels before edgellm's generic rules."""
    return []
