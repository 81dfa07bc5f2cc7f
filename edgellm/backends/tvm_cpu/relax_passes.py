"""Relax-level rewrites run before legalization.

* BatchNorm folding into the preceding conv2d's constant weights, in numpy (then
  decomposition of any BatchNorm left for inference).
* ``clip(x, lo, hi)`` -> ``minimum(maximum(x, lo), hi)``: ConvertLayout has no layout
  rule for ``clip`` (ReLU6) and would wrap every ReLU6 in two transposes.
* gelu decomposition + ``FastMathTransform``: fast (polynomial, vectorizable) exp, erf,
  tanh, softmax instead of scalar libm calls; sigmoid as ``1 / (1 + exp(-x))`` the same way,
  after ConvertLayout (so that SiLU stays in the conv's epilogue).
* softmax over a non-last axis moved last; a one-hot embedding matmul as a ``take``.
* NHWC/HWIO conv2d via ``ConvertLayout`` + ``FoldConstant`` (weights are constants, so
  the HWIO transpose is folded at compile time); a kernel == stride conv2d_transpose as a
  matmul + depth-to-space; then 1x1 stride-1 convs as ``matmul(x[N, H, W, C], w[C, O])``
  (no zero-width pad copy); conv / matmul output channels padded to whole vectors.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import TupleGetItemPattern, is_const, is_op, rewrite_call, wildcard


def _scalar(value):
    """Python float of a prim-value argument (FloatImm / IntImm, or wrapped), else None."""
    for cand in (value, getattr(value, "value", None)):
        v = getattr(cand, "value", None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _rewrite_clip(func):
    x = wildcard()
    pattern = is_op("relax.clip")(x, wildcard(), wildcard())

    def rewriter(expr, matches):
        sinfo = getattr(expr, "ty", None)
        if not isinstance(sinfo, relax.TensorType) or sinfo.dtype not in ("float32", "float16"):
            return expr
        _, lo, hi = expr.args
        lo_v, hi_v = _scalar(lo), _scalar(hi)
        if lo_v is None or hi_v is None:
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


def _decompose_f32(op_name, expand):
    """A function rewrite: ``op_name(x)`` on float32 -> ``expand(x)``, written with exp / erf so that FastMath reaches
    them (TVM lowers the op itself to a scalar libm call per lane)."""

    def rewrite(func):
        x = wildcard()

        def rewriter(expr, matches):
            sinfo = getattr(expr, "ty", None)
            if not isinstance(sinfo, relax.TensorType) or sinfo.dtype != "float32":
                return expr
            return expand(matches[x])

        return rewrite_call(is_op(op_name)(x), rewriter, func)

    return rewrite


def _gelu_with_erf(x):
    """gelu(x) = x * (0.5 + 0.5 * erf(x / sqrt 2))."""
    half = relax.const(0.5, "float32")
    erf = relax.op.erf(relax.op.multiply(x, relax.const(0.7071067811865476, "float32")))
    return relax.op.multiply(x, relax.op.add(half, relax.op.multiply(erf, half)))


def _sigmoid_with_exp(x):
    """sigmoid(x) = 1 / (1 + exp(-x)): a scalar ``expf`` per lane was ~5 ns / element, 2/3 of YOLOv8n's 1x1-conv
    kernels with their SiLU epilogue."""
    one = relax.const(1.0, "float32")
    return relax.op.divide(one, relax.op.add(one, relax.op.exp(relax.op.negative(x))))


def _rewrite_softmax_axis(func):
    """softmax over a non-last axis of extent >= 8 -> permute it last, softmax, permute back (the permutes often
    cancel against ConvertLayout's). The row-reduction rule vectorizes rows only: YOLOv8's DFL softmax over 16 bins
    at axis 1 of [1, 16, 4, 2100] ran serially, 3 ms of nudenet-320n."""
    x = wildcard()
    pattern = is_op("relax.nn.softmax")(x)

    def rewriter(expr, matches):
        xs = getattr(matches[x], "ty", None)
        if not isinstance(xs, relax.TensorType) or xs.dtype != "float32" or xs.ndim < 2:
            return expr
        axis = int(expr.attrs["axis"]) % xs.ndim
        try:
            extent = int(xs.shape[axis])
        except (TypeError, ValueError):
            return expr
        if axis == xs.ndim - 1 or extent < 8:
            return expr
        perm = [d for d in range(xs.ndim) if d != axis] + [axis]
        back = [perm.index(d) for d in range(xs.ndim)]
        return relax.op.permute_dims(relax.op.nn.softmax(relax.op.permute_dims(matches[x], perm), axis=-1), back)

    return rewrite_call(pattern, rewriter, func)


def _const_np(expr):
    data = getattr(expr, "data", None)  # relax.Constant before 0.27
    if data is None:
        data = expr.value  # 0.27: tvm.ir.GenericConst
    return data.numpy()


def _fold_bn_numpy(func):
    """conv2d(x, W) -> batch_norm(., g, b, m, v)[0]  ==>  conv2d(x, W * s) + (b - m * s).

    Computed with numpy (``FoldBatchnormToConv2D`` + ``FoldConstant`` compiles a kernel
    per folded op: ~15 s for MobileNet-V2).
    """
    x, w = wildcard(), is_const()
    conv = is_op("relax.nn.conv2d")(x, w)
    g, b, m, v = is_const(), is_const(), is_const(), is_const()
    bn = is_op("relax.nn.batch_norm")(conv, g, b, m, v)
    pattern = TupleGetItemPattern(bn, 0)

    def rewriter(expr, matches):
        conv_call, bn_call = matches[conv], matches[bn]
        if conv_call.attrs["kernel_layout"] != "OIHW" or int(bn_call.attrs["axis"]) != 1:
            return expr
        if conv_call.attrs["data_layout"] != "NCHW":
            return expr
        weight = _const_np(matches[w])
        if str(weight.dtype) != "float32":
            return expr
        scale = _const_np(matches[g]) / np.sqrt(_const_np(matches[v]) + float(bn_call.attrs["epsilon"]))
        bias = _const_np(matches[b]) - _const_np(matches[m]) * scale
        new_w = (weight * scale.reshape(-1, 1, 1, 1)).astype(weight.dtype)
        new_b = bias.reshape(1, -1, 1, 1).astype(weight.dtype)
        new_conv = relax.Call(conv_call.op, (matches[x], relax.const(new_w)), conv_call.attrs)
        return relax.op.add(new_conv, relax.const(new_b))

    return rewrite_call(pattern, rewriter, func)


def _fold_permute_numpy(func):
    """permute_dims(constant) -> constant (the HWIO weights after ConvertLayout)."""
    c = is_const()
    pattern = is_op("relax.permute_dims")(c)

    def rewriter(expr, matches):
        data = _const_np(matches[c])
        axes = expr.attrs["axes"]
        axes = None if axes is None else [int(a) for a in axes]
        return relax.const(np.ascontiguousarray(np.transpose(data, axes)))

    return rewrite_call(pattern, rewriter, func)


def _function_pass(rewrite, name):
    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gv] = rewrite(func)
        return mod

    return _pass


def _rewrite_pointwise_conv(func):
    """NHWC/HWIO 1x1 conv2d (stride 1, no padding, groups 1, constant fp32 weights) ->
    ``matmul(x[N, H, W, C], w[C, O])`` (output [N, H, W, O], same layout).

    Same sum over C per output (float reassociation at most); legalized, the conv is a
    zero-width ``pad`` copy of the input (a full memory pass and a parallel launch) plus the
    reduction, the matmul is the reduction alone, tiled by the Matmul rule over H*W rows."""
    x, w = wildcard(), is_const()
    pattern = is_op("relax.nn.conv2d")(x, w)

    def rewriter(expr, matches):
        a = expr.attrs
        if (str(a["data_layout"]) != "NHWC" or str(a["kernel_layout"]) != "HWIO"
                or str(a["out_layout"]) not in ("NHWC", "")):
            return expr
        if int(a["groups"]) != 1 or any(int(v) != 1 for v in a["strides"]) or any(int(v) != 0 for v in a["padding"]):
            return expr
        xs = getattr(matches[x], "ty", None)
        if not isinstance(xs, relax.TensorType) or xs.dtype != "float32" or xs.ndim != 4:
            return expr
        weight = _const_np(matches[w])
        if weight.ndim != 4 or weight.shape[:2] != (1, 1) or str(weight.dtype) != "float32":
            return expr
        out_dtype = str(a["out_dtype"]) if a["out_dtype"] is not None else ""
        if out_dtype not in ("", "void", "float32"):
            return expr
        return relax.op.matmul(matches[x], relax.const(np.ascontiguousarray(weight.reshape(weight.shape[2:]))))

    return rewrite_call(pattern, rewriter, func)


def _rewrite_conv_nhwc_local(func):
    """NCHW/OIHW conv2d (constant weights) -> ``permute(conv2d_nhwc(permute(x), w_hwio))``, conv by conv.

    The fallback for a module that ``ConvertLayout`` cannot take (TVM 0.27 fails on some graphs, e.g. Magika's
    reduction after a squeeze): the rules schedule NHWC convs only, and an NCHW one falls to the scalar fallback
    (Magika's 0.33 GMAC conv: 560 ms). Two transposes per conv are cheap beside that."""
    x, w = wildcard(), is_const()
    pattern = is_op("relax.nn.conv2d")(x, w)

    def rewriter(expr, matches):
        a = expr.attrs
        if str(a["data_layout"]) != "NCHW" or str(a["kernel_layout"]) != "OIHW" or str(a["out_layout"]) not in ("NCHW", ""):
            return expr
        xs = getattr(matches[x], "ty", None)
        if not isinstance(xs, relax.TensorType) or xs.dtype != "float32" or xs.ndim != 4:
            return expr
        weight = _const_np(matches[w])
        if weight.ndim != 4 or str(weight.dtype) != "float32":
            return expr
        nhwc = relax.op.permute_dims(matches[x], [0, 2, 3, 1])
        hwio = relax.const(np.ascontiguousarray(weight.transpose(2, 3, 1, 0)))
        conv = relax.op.nn.conv2d(nhwc, hwio, strides=a["strides"], padding=a["padding"], dilation=a["dilation"],
                                  groups=int(a["groups"]), data_layout="NHWC", kernel_layout="HWIO", out_layout="NHWC",
                                  out_dtype=a["out_dtype"])
        return relax.op.permute_dims(conv, [0, 3, 1, 2])

    return rewrite_call(pattern, rewriter, func)


def _rewrite_conv1d(func):
    """NCW/OIW conv1d (constant fp32 weights) -> ``squeeze(conv2d(x[N, C, 1, L], w[O, I, 1, K]))``.

    The rules schedule NHWC conv2d only, and ConvertLayout leaves conv1d alone: each silero-vad conv1d ran on the
    scalar fallback. As a conv2d it goes NHWC like the others, L on the W axis (the rule's register tile)."""
    x, w = wildcard(), is_const()
    pattern = is_op("relax.nn.conv1d")(x, w)

    def rewriter(expr, matches):
        a = expr.attrs
        if str(a["data_layout"]) != "NCW" or str(a["kernel_layout"]) != "OIW" or str(a["out_layout"]) not in ("NCW", ""):
            return expr
        xs = getattr(matches[x], "ty", None)
        if not isinstance(xs, relax.TensorType) or xs.dtype != "float32" or xs.ndim != 3:
            return expr
        weight = _const_np(matches[w])
        if weight.ndim != 3 or str(weight.dtype) != "float32":
            return expr
        (pl, pr), (s,), (d,) = [int(v) for v in a["padding"]], [int(v) for v in a["strides"]], [int(v) for v in a["dilation"]]
        conv = relax.op.nn.conv2d(relax.op.expand_dims(matches[x], [2]), relax.const(np.ascontiguousarray(weight[:, :, None, :])),
                                  strides=[1, s], padding=[0, pl, 0, pr], dilation=[1, d], groups=int(a["groups"]),
                                  out_dtype=a["out_dtype"])
        return relax.op.squeeze(conv, [2])

    return rewrite_call(pattern, rewriter, func)


def _rewrite_one_hot_matmul(func):
    """``matmul(astype(equal(i[..., 1], arange(K)), f32), W[K, N])`` (a one-hot embedding) -> ``take(W', i)``,
    W' = W with a zero row K where out-of-range indices go (the one-hot row is all zeros there).

    magika embeds 2048 bytes this way: a 2048 x 257 one-hot tensor and a 257-deep matmul, 2 ms of its 11."""
    a, c, w = wildcard(), is_const(), is_const()
    pattern = is_op("relax.matmul")(is_op("relax.astype")(is_op("relax.equal")(a, c)), w)

    def rewriter(expr, matches):
        at, ys = getattr(matches[a], "ty", None), getattr(expr, "ty", None)
        if not isinstance(at, relax.TensorType) or not isinstance(ys, relax.TensorType) or ys.dtype != "float32" \
                or not str(at.dtype).startswith("int") or at.ndim < 1:
            return expr
        classes, weight = _const_np(matches[c]), _const_np(matches[w])
        if weight.ndim != 2 or str(weight.dtype) != "float32" or classes.ndim != at.ndim:
            return expr
        k = weight.shape[0]
        if classes.shape[-1] != k or classes.size != k or not np.array_equal(classes.reshape(-1), np.arange(k)):
            return expr
        try:
            if int(at.shape[at.ndim - 1]) != 1:
                return expr
        except (TypeError, ValueError):
            return expr
        idx = relax.op.squeeze(matches[a], [at.ndim - 1])
        ok = relax.op.logical_and(relax.op.greater_equal(idx, relax.const(0, at.dtype)), relax.op.less(idx, relax.const(k, at.dtype)))
        idx = relax.op.where(ok, idx, relax.const(k, at.dtype))
        padded = np.concatenate([weight, np.zeros((1, weight.shape[1]), np.float32)])
        return relax.op.take(relax.const(padded), idx, axis=0)

    return rewrite_call(pattern, rewriter, func)


def _rewrite_patch_conv_transpose(func):
    """NCHW/IOHW conv2d_transpose whose kernel equals its stride (no overlap, no padding: DBNet's 2x2 stride-2
    upsampling) -> ``matmul(x_nhwc, w[C, kh*kw*O])`` and a depth-to-space reshape/transpose, back to NCHW.

    TVM lowers conv2d_transpose as a conv over the zero-dilated input, in NCHW: 4x the work, unvectorized (ppocr-det's
    two took 21 ms of 37). As a matmul it gets the matmul rule; the permutes cancel against ConvertLayout's."""
    x, w = wildcard(), is_const()
    pattern = is_op("relax.nn.conv2d_transpose")(x, w)

    def rewriter(expr, matches):
        a = expr.attrs
        xs = getattr(matches[x], "ty", None)
        if not isinstance(xs, relax.TensorType) or xs.dtype != "float32" or getattr(expr.ty, "dtype", None) != "float32":
            return expr
        if (str(a["data_layout"]), str(a["kernel_layout"]), str(a["out_layout"])) != ("NCHW", "IOHW", "NCHW") \
                or int(a["groups"]) != 1:
            return expr
        weight = _const_np(matches[w])
        if weight.ndim != 4 or str(weight.dtype) != "float32":
            return expr
        cin, out, kh, kw = weight.shape
        if [int(v) for v in a["strides"]] != [kh, kw] or any(int(v) for v in a["padding"]) \
                or any(int(v) for v in a["output_padding"]) or [int(v) for v in a["dilation"]] != [1, 1]:
            return expr
        try:
            n, _, h, wd = [int(d) for d in xs.shape]
        except (TypeError, ValueError):
            return expr
        wm = np.ascontiguousarray(weight.transpose(0, 2, 3, 1).reshape(cin, kh * kw * out))
        y = relax.op.matmul(relax.op.permute_dims(matches[x], [0, 2, 3, 1]), relax.const(wm))
        y = relax.op.reshape(y, [n, h, wd, kh, kw, out])
        y = relax.op.reshape(relax.op.permute_dims(y, [0, 1, 3, 2, 4, 5]), [n, h * kh, wd * kw, out])
        return relax.op.permute_dims(y, [0, 3, 1, 2])

    return rewrite_call(pattern, rewriter, func)


def _rewrite_pad_out_channels(func, lanes: int):
    """NHWC/HWIO conv2d (groups 1) whose output channels are not a multiple of the vector width -> the conv with
    zero weights padded up to one, then a slice of the real channels.

    The conv rule vectorizes over output channels, whole vectors only: silero-vad's STFT conv (258 = 2 x 129 channels)
    ran scalar, 60% of the model's time. The padding costs < 1 vector of channels per pixel."""
    x, w = wildcard(), is_const()
    pattern = is_op("relax.nn.conv2d")(x, w)

    def rewriter(expr, matches):
        a = expr.attrs
        if str(a["data_layout"]) != "NHWC" or str(a["kernel_layout"]) != "HWIO" or int(a["groups"]) != 1:
            return expr
        if str(a["out_layout"]) not in ("NHWC", "") or getattr(expr.ty, "dtype", None) != "float32":
            return expr
        weight = _const_np(matches[w])
        out = weight.shape[-1]
        if weight.ndim != 4 or str(weight.dtype) != "float32" or out < lanes or out % lanes == 0:
            return expr
        padded = np.zeros(weight.shape[:3] + (-(-out // lanes) * lanes,), np.float32)
        padded[..., :out] = weight
        conv = relax.Call(expr.op, (matches[x], relax.const(padded)), a)
        return relax.op.strided_slice(conv, axes=[3], begin=[0], end=[out])

    func = rewrite_call(pattern, rewriter, func)
    pattern_mm = is_op("relax.matmul")(x, w)

    def rewriter_mm(expr, matches):
        """The same for ``matmul(x, w[K, N])`` (1x1 convs after ``pointwise_conv_to_matmul``): YOLOv8's 18-class
        heads (N = 18) were left to the scalar row-reduction rule, 1.5 ms of nudenet-320n."""
        if getattr(expr.ty, "dtype", None) != "float32" or getattr(expr.ty, "ndim", -1) < 2:
            return expr
        weight = _const_np(matches[w])
        out = weight.shape[-1]
        if weight.ndim != 2 or str(weight.dtype) != "float32" or out < lanes // 2 or out % lanes == 0:
            return expr
        padded = np.zeros((weight.shape[0], -(-out // lanes) * lanes), np.float32)
        padded[:, :out] = weight
        mm = relax.Call(expr.op, (matches[x], relax.const(padded)), expr.attrs)
        return relax.op.strided_slice(mm, axes=[expr.ty.ndim - 1], begin=[0], end=[out])

    return rewrite_call(pattern_mm, rewriter_mm, func)


@tvm.transform.module_pass(opt_level=0, name="EdgePadConvOutChannels")
def pad_out_channels(mod, _ctx):
    from .target_info import vector_lanes  # pylint: disable=import-outside-toplevel

    target = tvm.target.Target.current(allow_none=True)
    if target is None:
        return mod
    lanes = vector_lanes(target)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = _rewrite_pad_out_channels(func, lanes)
    return mod


def _compose_permutes(func):
    """permute_dims(permute_dims(x, p), q) -> permute_dims(x, p[q]), or x where that is the identity."""
    x = wildcard()
    inner = is_op("relax.permute_dims")(x)
    pattern = is_op("relax.permute_dims")(inner)

    def rewriter(expr, matches):
        p, q = matches[inner].attrs["axes"], expr.attrs["axes"]
        xs = getattr(matches[x], "ty", None)
        if p is None or q is None or not isinstance(xs, relax.TensorType):
            return expr
        axes = [int(p[int(i)]) for i in q]
        return matches[x] if axes == list(range(len(axes))) else relax.op.permute_dims(matches[x], axes)

    return rewrite_call(pattern, rewriter, func)


fold_bn_numpy = _function_pass(_fold_bn_numpy, "EdgeFoldBatchNorm")
decompose_gelu = _function_pass(_decompose_f32("relax.nn.gelu", _gelu_with_erf), "EdgeDecomposeGelu")
decompose_sigmoid = _function_pass(_decompose_f32("relax.sigmoid", _sigmoid_with_exp), "EdgeDecomposeSigmoid")
patch_conv_transpose = _function_pass(_rewrite_patch_conv_transpose, "EdgePatchConvTranspose")
softmax_axis_last = _function_pass(_rewrite_softmax_axis, "EdgeSoftmaxAxisLast")
one_hot_matmul_to_take = _function_pass(_rewrite_one_hot_matmul, "EdgeOneHotMatmulToTake")
conv1d_to_conv2d = _function_pass(_rewrite_conv1d, "EdgeConv1dToConv2d")
conv_nhwc_local = _function_pass(_rewrite_conv_nhwc_local, "EdgeConvNHWCLocal")
compose_permutes = _function_pass(_compose_permutes, "EdgeComposePermutes")
pointwise_conv_to_matmul = _function_pass(_rewrite_pointwise_conv, "EdgePointwiseConvToMatmul")
fold_permute_numpy = _function_pass(_fold_permute_numpy, "EdgeFoldConstPermute")


def _has_op(mod, name: str) -> bool:
    found = []

    def fvisit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == name:
            found.append(expr)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, fvisit)
    return bool(found)


# Ops that do not survive NHWC in TVM 0.27: ConvertLayout would carry the conv's NHWC into them, and nothing lowers
# an NHWC conv2d_transpose (VM codegen: "cannot emit this Relax operator"); they stay in the layout they came in,
# with a transpose on each side. resize2d lowers in NHWC (tests/backends/test_wild_onnx.py builds Conv -> Resize).
KEEP_LAYOUT = {
    "relax.nn.conv2d_transpose": ["NCHW", "IOHW"],
    "relax.nn.conv1d_transpose": ["NCW", "IOW"],
}


@tvm.transform.module_pass(opt_level=0, name="EdgeLayoutPasses")
def layout_passes(mod, _ctx):
    """BN folding, clip rewrite, NHWC conv layout; each step guarded."""
    return _layout(mod)


@tvm.transform.module_pass(opt_level=0, name="EdgeLayoutPassesFP16")
def layout_passes_fp16(mod, _ctx):
    """BN folding and the clip rewrite in fp32, then TVM's ToMixedPrecision (fp16 arithmetic, fp32 accumulation in
    conv / matmul, fp32 in and out), then ``layout_passes``. The gelu decomposition and FastMath come after it:
    ToMixedPrecision cannot read FastMath's call_tir kernels, and a decomposed gelu's erf in fp16 cost MiniLM
    cosine 0.9945 (after: 0.999999)."""
    for step in _FOLDS:
        try:
            mod = step(mod)
        except Exception:  # pylint: disable=broad-except
            pass
    return _layout(relax.transform.ToMixedPrecision(out_dtype="float32")(mod))


_FOLDS = (fold_bn_numpy, relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
          relax.transform.FoldConstant(), clip_to_min_max)


def _layout(mod):
    steps = [
        *_FOLDS,
        # vectorizable polynomial exp / erf / tanh (softmax, gelu): the llvm intrinsics
        # become scalar libm calls (~7 ns / element)
        decompose_gelu,
        softmax_axis_last,
        relax.transform.FastMathTransform(),
        one_hot_matmul_to_take,
        conv1d_to_conv2d,
    ]
    for step in steps:
        try:
            mod = step(mod)
        except Exception:  # pylint: disable=broad-except
            pass
    if _has_op(mod, "relax.nn.conv2d"):
        try:
            new = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"], **KEEP_LAYOUT})(mod)
            new = fold_permute_numpy(new)
            new = relax.transform.FoldConstant()(new)
            new = relax.transform.CanonicalizeBindings()(new)
            mod = new
        except Exception:  # pylint: disable=broad-except
            try:  # ConvertLayout failed on some other op: NHWC conv by conv, transposes around each
                mod = relax.transform.CanonicalizeBindings()(compose_permutes(conv_nhwc_local(mod)))
            except Exception:  # pylint: disable=broad-except
                pass
        try:
            mod = relax.transform.CanonicalizeBindings()(compose_permutes(patch_conv_transpose(mod)))
        except Exception:  # pylint: disable=broad-except
            pass
        try:
            mod = pointwise_conv_to_matmul(mod)
        except Exception:  # pylint: disable=broad-except
            pass
        try:
            mod = pad_out_channels(mod)
        except Exception:  # pylint: disable=broad-except
            pass
    try:  # after ConvertLayout: FastMath's fast_exp is a call_tir that ConvertLayout would wrap in transposes
        mod = relax.transform.FastMathTransform()(decompose_sigmoid(mod))
    except Exception:  # pylint: disable=broad-except
        pass
    return mod
