"""Relax-level rewrites run before legalization.

* BatchNorm folding into the preceding conv2d's constant weights (then decomposition of
  any BatchNorm left for inference).
* ``clip(x, lo, hi)`` -> ``minimum(maximum(x, lo), hi)``: ConvertLayout has no layout
  rule for ``clip`` (ReLU6) and would wrap every ReLU6 in two transposes.
* NHWC/HWIO conv2d via ``ConvertLayout`` + ``FoldConstant`` (weights are constants, so
  the HWIO transpose is folded at compile time).
"""

from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.dpl import is_op, rewrite_call, wildcard


def _rewrite_clip(func):
    x = wildcard()
    pattern = is_op("relax.clip")(x, wildcard(), wildcard())

    def rewriter(expr, matches):
        sinfo = expr.struct_info
        if not isinstance(sinfo, relax.TensorStructInfo) or sinfo.dtype not in ("float32", "float16"):
            return expr
        _, lo, hi = expr.args
        if not isinstance(lo, relax.PrimValue) or not isinstance(hi, relax.PrimValue):
            return expr
        try:
            lo_v, hi_v = float(lo.value.value), float(hi.value.value)
        except Exception:  # pylint: disable=broad-except
            return expr
        dt = sinfo.dtype
        return relax.op.minimum(relax.op.maximum(matches[x], relax.const(lo_v, dt)),
                                relax.const(hi_v, dt))

    return rewrite_call(pattern, rewriter, func)


@tvm.transform.module_pass(opt_level=0, name="EdgeClipToMinMax")
def clip_to_min_max(mod, _ctx):
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = _rewrite_clip(func)
    return mod


def _has_op(mod, name: str) -> bool:
    found = []

    def fvisit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name:
            found.append(expr)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, fvisit)
    return bool(found)


@tvm.transform.module_pass(opt_level=0, name="EdgeLayoutPasses")
def layout_passes(mod, _ctx):
    """BN folding, clip rewrite, NHWC conv layout; each step guarded."""
    steps = [
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        relax.transform.FoldConstant(),
        clip_to_min_max,
    ]
    for step in steps:
        try:
            mod = step(mod)
        except Exception:  # pylint: disable=broad-except
            pass
    if _has_op(mod, "relax.nn.conv2d"):
        try:
            new = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)
            new = relax.transform.FoldConstant()(new)
            new = relax.transform.CanonicalizeBindings()(new)
            mod = new
        except Exception:  # pylint: disable=broad-except
            pass
    return mod
