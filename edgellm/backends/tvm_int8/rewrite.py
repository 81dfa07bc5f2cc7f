"""Relax rewrite: conv2d 1x1 (NHWC) / matmul with constant weights -> packed int8 dense.

Runs on the fp32 module after edgellm's layout passes (BN folded, NHWC/HWIO convs, weights
constants). Each candidate ``y = op(x, W)`` becomes::

    q   = reshape(quantize(x), [M, K])                  # uint8 (x86) / int8 (arm)
    acc = call_tir(dense_int8, q, W_packed)             # int32, compute.py
    y   = reshape(float(acc[:, :N]) * s_x * s_w[n] - zp * colsum(Wq)[n] * s_x * s_w[n], shape(y))

``quantize`` is ``static`` (per-tensor scale / zero point from calibration: asymmetric over
the observed [min, max], so ReLU outputs use all 256 codes) or ``dynamic`` (per row, at
run time: ``s = max|x_row| / 127``, symmetric, code offset 128 on uint8). Weights are int8,
symmetric per output channel (``s_w[n] = max|W[n, :]| / 127``; ``/ 63`` on x86 without VNNI,
``compute.packing``), packed at compile time.
The dequantize / bias / activation / next layer's quantize are elementwise and FuseOps
fuses them into the dense's PrimFunc.

A depthwise conv (NHWC) fed, through bias / ReLU only, by an int8 dense (MobileNet's expand
conv, DS-CNN's pointwise conv) reads that dense's output as 8-bit codes, quantized in the
dense's epilogue (static scale from calibration): ``compute.depthwise_dq_te`` decodes them
while padding and multiplies with int8 per-channel weights converted in the loop; the
arithmetic is f32 (no 4-byte groups to reduce over for a dot-product instruction), the gain
is memory traffic on the expanded tensors (MobileNet-V2: ~17% of the int8 model's time) and
0.19 MB of weights.

Reshapes: the dense works on [M, K]; ``sink_reshapes`` moves the reshape back to N-D below
the elementwise epilogue, so FuseOps keeps the epilogue (and the next layer's quantize) in
the dense's PrimFunc.

A kxk conv is an int8 dense too -- on x86 any whose patch matrix is at most
``IM2COL_MAX_BYTES`` (a ResNet's 3x3 convs), on arm64 one with a small patch
(``kh*kw*Cin <= IM2COL_MAX_K``: a stem): quantize + pad (one fused kernel, channels padded so a
patch row is a multiple of 4 bytes), ``compute.im2col_primfunc`` (an opaque kernel, so the quantize is not
recomputed per patch), a free view to ``[M, kh*kw*Cp]``, the packed dense.

Epilogues: ``fold_requantize`` turns each elementwise chain ending in a cast to (u)int8
(dequantize, bias, ReLU6, the next layer's quantize) into one multiply-add and a clamp, with no
round on uint8 (see there).

Left fp32 (and said so in the report): depthwise convs not fed by an int8 dense or an fp32
conv, grouped convs, kxk convs with larger patches (see above), layers with K % 4 != 0, activation x
activation matmuls (attention).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from edgellm.backends import tvm_amx

from . import depthwise as dw_int
from .compute import dense_int8_te, depthwise_dq_te, im2col_channels, im2col_primfunc, pack_weight, pad_codes_te

_CONST = tuple(c for c in (getattr(tvm.ir, "GenericConst", None), getattr(relax, "Constant", None)) if c is not None)


def _const_np(expr):
    data = getattr(expr, "data", None)
    if data is None:
        data = expr.value
    return data.numpy()


def _shape(expr):
    ty = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return [int(d) for d in ty.shape]
    except (TypeError, ValueError):
        return None


def _dtype(expr):
    ty = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    return getattr(ty, "dtype", None)


def candidate(call, k_multiple: int = 4, target=None) -> tuple[str, np.ndarray | None, str]:
    """(kind, W as float [N, K], why-not) for a call; W None when the op stays fp32. ``k_multiple``: what K
    (Cin of a 1x1 conv) must be a multiple of (int8's dot products take 4 bytes a lane; bf16's 2 values).
    ``target``: the int8 build's TVM target; on x86 every kxk conv whose patch matrix is at most
    ``IM2COL_MAX_BYTES`` is taken (``_kxk_im2col``), elsewhere only stems (``kh*kw*Cin <= IM2COL_MAX_K``)."""
    if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
        return "", None, ""
    name = call.op.name
    if name not in ("relax.nn.conv2d", "relax.matmul"):
        return "", None, ""
    x, w = call.args[0], call.args[1]
    if name == "relax.matmul":
        if not isinstance(w, _CONST):
            return "matmul", None, "activation x activation (attention)"
        wt = _const_np(w)
        xs = _shape(x)
        if wt.ndim != 2 or xs is None or _dtype(x) != "float32" or wt.dtype != np.float32:
            return "matmul", None, "not a 2-D float32 weight"
        if wt.shape[0] % k_multiple:
            return "matmul", None, f"K={wt.shape[0]} not a multiple of {k_multiple}"
        return "matmul", np.ascontiguousarray(wt.T), ""
    a = call.attrs
    if not isinstance(w, _CONST):
        return "conv2d", None, "weights not constant"
    if str(a.data_layout) != "NHWC" or str(a.kernel_layout) != "HWIO":
        return "conv2d", None, "not NHWC/HWIO"
    wt = _const_np(w)
    kh, kw, cin, cout = wt.shape
    if int(a.groups) != 1:
        return "conv2d", None, "depthwise" if int(a.groups) == cout else "grouped"
    if not _is_pointwise(a, kh, kw):
        # a kxk conv runs as im2col + int8 dense: a stem's small patch anywhere, any that fits on x86
        if all(int(d) == 1 for d in a.dilation) and _dtype(x) == "float32" and _shape(x) is not None \
                and (kh * kw * cin <= IM2COL_MAX_K or _kxk_im2col(call, wt.shape, target)):
            return "conv2d", np.ascontiguousarray(wt.reshape(kh * kw * cin, cout).T), ""
        return "conv2d", None, f"{kh}x{kw} conv (int8 dense: 1x1 stride-1 convs, and kxk convs with " + (
            f"patches <= {IM2COL_MAX_BYTES >> 20} MB)" if _is_x86(target) else f"kh*kw*Cin <= {IM2COL_MAX_K})")
    if cin % k_multiple:
        return "conv2d", None, f"Cin={cin} not a multiple of {k_multiple}"
    if _dtype(x) != "float32" or _shape(x) is None:
        return "conv2d", None, "input not static float32"
    return "conv2d", np.ascontiguousarray(wt[0, 0].T), ""


#: largest kh*kw*Cin of a kxk conv rewritten as im2col + int8 dense on arm64 (a stem's); x86 takes any kxk conv
#: whose patch matrix is at most IM2COL_MAX_BYTES
IM2COL_MAX_K = 160


#: largest patch matrix (bytes: rows x kh*kw*Cp codes) of a kxk conv that goes int8 on x86 (ResNet-18's largest:
#: 3136 x 576); a VGG-style 3x3x64 conv at 224x224 (29 MB) stays fp32
IM2COL_MAX_BYTES = 8 << 20


def _is_x86(target) -> bool:
    from edgellm.backends.tvm_cpu.target_info import _attrs

    return target is not None and target.kind.name == "llvm" and _attrs(target)[2].startswith("x86_64")


def _kxk_im2col(call, hwio_shape, target) -> bool:
    """True when a kxk conv (beyond a stem) goes int8 as im2col + int8 dense: on x86, when its patch matrix is at most
    ``IM2COL_MAX_BYTES``. The integer dense outruns the patches' extra memory pass by far (ResNet-18, 16 of its
    3x3 convs fp32 before, 2 threads: AVX2 21.9 -> 10.4 ms, AVX-512 VNNI 14.0 -> 3.95, AMX 13.0 -> 2.48). arm64 keeps
    stems only: not measured there."""
    if not _is_x86(target) or _shape(call) is None:
        return False
    kh, kw, cin, _ = hwio_shape
    return int(np.prod(_shape(call)[:-1])) * kh * kw * im2col_channels(cin, kw) <= IM2COL_MAX_BYTES


def _is_pointwise(attrs, kh: int, kw: int) -> bool:
    """A 1x1 stride-1 unpadded conv: a plain dense over the pixels."""
    return (kh, kw) == (1, 1) and all(int(s) == 1 for s in attrs.strides) and all(int(p) == 0 for p in attrs.padding)


def _is_im2col(call) -> bool:
    """A conv candidate that is not pointwise (``candidate`` took it as im2col)."""
    if call.op.name != "relax.nn.conv2d":
        return False
    kh, kw = (int(d) for d in _shape(call.args[1])[:2])
    return not _is_pointwise(call.attrs, kh, kw)


_ELEMENTWISE = ("relax.add", "relax.subtract", "relax.multiply", "relax.maximum", "relax.minimum", "relax.nn.relu",
                "relax.clip", "relax.divide")


def depthwise_after(func: relax.Function, keys_int8: set[str]) -> list[str]:
    """Keys of the NHWC depthwise convs whose input comes, through elementwise ops only (bias,
    ReLU / ReLU6), from one of the int8 dense bindings ``keys_int8`` or from a (non-grouped) fp32
    conv such as a network's stem: the producer writes 8-bit codes in its epilogue."""
    values, keys = {}, binding_keys(func)
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                values[b.var] = b.value
    out = []
    for var, value in values.items():
        kind, _, why = candidate(value)
        if kind != "conv2d" or why != "depthwise" or str(value.attrs.data_layout) != "NHWC" \
                or str(value.attrs.kernel_layout) != "HWIO" or _dtype(value.args[0]) != "float32":
            continue
        x = value.args[0]
        for _ in range(16):
            if not isinstance(x, relax.Var) or x not in values:
                break
            v = values[x]
            # an fp32 conv (a stem kxk conv) quantizes its output in its epilogue just as well
            stem = isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name == "relax.nn.conv2d" \
                and int(v.attrs.groups) == 1
            if keys.get(x) in keys_int8 or stem:
                out.append(keys[var])
                break
            if not (isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op) and v.op.name in _ELEMENTWISE):
                break
            x = next((a for a in v.args if isinstance(a, relax.Var)), None)
    return out


def binding_keys(func: relax.Function) -> dict:
    """{binding var: "index:name"}: the key of each binding of ``func`` (names alone repeat)."""
    keys, i = {}, 0
    for block in func.body.blocks:
        for b in block.bindings:
            keys[b.var] = f"{i}:{b.var.name}"
            i += 1
    return keys


def activation_inputs(func: relax.Function):
    """Bindings in order -> list of (binding key, call) for every conv2d / matmul."""
    keys = binding_keys(func)
    out = []
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding) and isinstance(b.value, relax.Call):
                kind, _, _ = candidate(b.value)
                if kind:
                    out.append((keys[b.var], b.value))
    return out


def quantize_weight(w_nk: np.ndarray, weight_max: int = 127):
    """int8 [N, K], per-channel scale [N] (symmetric in [-weight_max, weight_max]: 127, or 63 where the
    kernel's int16 pair sums must not saturate, ``compute.packing``)."""
    absmax = np.abs(w_nk).max(axis=1)
    scale = np.where(absmax > 0, absmax / float(weight_max), 1.0).astype(np.float32)
    q = np.clip(np.round(w_nk / scale[:, None]), -weight_max, weight_max).astype(np.int8)
    return q, scale


def act_params(lo: float, hi: float, act_dtype: str):
    """(scale, zero point) mapping [lo, hi] (widened to include 0) onto the dtype's codes."""
    qmin, qmax = (0, 255) if act_dtype == "uint8" else (-128, 127)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
    zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return float(scale), zp


@relax.expr_functor.mutator
class _Int8Rewriter(relax.PyExprMutator):
    def _depthwise(self, call, spec):
        """depthwise conv(x) -> depthwise_dq(quantize(x)): the int8 dense before it writes 8-bit codes
        (quantize fuses into its epilogue), the conv decodes them while padding (compute.depthwise_dq_te)."""
        a = call.attrs
        if any(int(d) != 1 for d in a.dilation):
            return None
        bb, dt, f32 = self.builder_, self.act_dtype, "float32"
        sx, zp = act_params(spec["lo"], spec["hi"], dt)
        qmin, qmax = (0.0, 255.0) if dt == "uint8" else (-128.0, 127.0)
        t = relax.op.round(relax.op.multiply(call.args[0], relax.const(1.0 / sx, f32)))
        if zp:
            t = relax.op.add(t, relax.const(float(zp), f32))
        t = relax.op.minimum(relax.op.maximum(t, relax.const(qmin, f32)), relax.const(qmax, f32))
        q = bb.emit(relax.op.astype(t, dt))
        w = _const_np(call.args[1])  # [kh, kw, 1, C]: int8 per channel, its scale (times the input's) after the sum
        absmax = np.abs(w).max(axis=(0, 1, 2))
        sw = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
        wq = np.clip(np.round(w / sw), -127, 127).astype(np.int8)
        kh, kw, _, c = wq.shape
        if dt == "uint8" and self.int_depthwise and dw_int.supported(kw, c, a.dilation):
            # integer arithmetic (vpdpbusd over tap quads, depthwise.py): exact int32 sums
            acc = bb.emit(bb.call_te(dw_int.depthwise_u8_te, q, relax.const(dw_int.pack_dw_weight(wq)),
                                     [int(v) for v in a.strides], [int(v) for v in a.padding], kw, zp,
                                     primfunc_name_hint="depthwise_u8"))
            self.int_depthwise_done += 1
            y = relax.op.astype(acc, f32)
        else:
            # codes convert to f32 as they are (border: zp, the code of 0)
            y = bb.emit(bb.call_te(depthwise_dq_te, q, relax.const(wq), [int(v) for v in a.strides],
                                   [int(v) for v in a.padding], 1.0, 0, pad_value=float(zp),
                                   primfunc_name_hint="depthwise_conv2d_u8"))
        # either way y = sum(code * w): zp * sum(w) comes off, then the scales (fold_requantize merges both
        # with the bias and the next quantize)
        if zp:
            corr = (float(zp) * wq.astype(np.float64).sum(axis=(0, 1, 2))).astype(np.float32)
            y = relax.op.subtract(y, relax.const(corr))
        return relax.op.multiply(y, relax.const((sw * sx).astype(np.float32)))

    def _im2col(self, q, call, zp: int):
        """codes [B, H, W, C] -> patches [M, kh*kw*Cp]: pad (fuses with the quantize), im2col, view."""
        bb, a = self.builder_, call.attrs
        kh, kw, cin, _ = _shape(call.args[1])
        cp = im2col_channels(cin, kw)
        p = bb.emit(bb.call_te(pad_codes_te, q, [int(v) for v in a.padding], cp, zp, primfunc_name_hint="pad_codes"))
        ps = _shape(p)
        f = im2col_primfunc(ps, self.act_dtype, kh, kw, [int(v) for v in a.strides])
        gv = bb.add_func(f, "im2col")
        b, oh, ow, _ = _shape(call)
        cols = bb.emit(relax.call_tir(gv, [p], relax.TensorType((b * oh, ow, kh, kw * cp), self.act_dtype)))
        return bb.emit(relax.op.reshape(cols, [b * oh * ow, kh * kw * cp]))

    def __init__(self, mod, plan, lanes, act_dtype, int_depthwise=True, weight_max=127, tvm_target=None):
        super().__init__(mod)
        self.tvm_target = tvm_target  # x86: every kxk conv that fits (candidate); AMX: rows padded to tiles
        self.weight_max = weight_max
        self.int_depthwise = int_depthwise
        self.int_depthwise_done = 0  # depthwise convs rewritten to integer arithmetic
        # binding key ("index:name") -> {"mode": "static" | "depthwise_8bit_input", "lo", "hi"} | {"mode": "dynamic"}
        self.plan = plan
        self.lanes = lanes
        self.act_dtype = act_dtype
        self.done = []
        self.keys = {}

    def visit_var_binding_(self, binding):
        key = self.keys.get(binding.var)
        if key in self.plan and isinstance(binding.value, relax.Call):
            new_value = self._rewrite(self.visit_expr(binding.value), self.plan[key])
            if new_value is not None:
                emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
                self.set_var_remap(binding.var, emit(new_value, name_hint=binding.var.name))
                self.done.append(key)
                return
        super().visit_var_binding_(binding)

    def _rewrite(self, call, spec):
        if spec["mode"] == "depthwise_8bit_input":
            return self._depthwise(call, spec)
        _, w_nk, _ = candidate(call, target=self.tvm_target)
        if w_nk is None:
            return None
        bb, lanes, dt = self.builder_, self.lanes, self.act_dtype
        x = call.args[0]
        out_shape = _shape(call)
        n, k = w_nk.shape
        m = int(np.prod(out_shape[:-1]))
        wq, sw = quantize_weight(w_nk, self.weight_max)
        n_pad = -n % lanes
        im2col = _is_im2col(call)
        if im2col and spec["mode"] != "static":
            return None
        if im2col:  # K = (r, s, c) with c padded to Cp (compute.im2col_channels): zero weights there
            kh, kw, cin, _ = _shape(call.args[1])
            cp = im2col_channels(cin, kw)
            wq = np.pad(wq.reshape(n, kh, kw, cin), ((0, 0), (0, 0), (0, 0), (0, cp - cin))).reshape(n, -1)
            k = wq.shape[1]
        wq_p = np.pad(wq, ((0, n_pad), (0, 0)))
        colsum = wq.astype(np.int64).sum(axis=1)
        x2 = x  # quantized in its own N-D shape (so it fuses into its producer), then viewed as [M, K]
        f32 = "float32"
        qmin, qmax = (0.0, 255.0) if dt == "uint8" else (-128.0, 127.0)
        if spec["mode"] == "static":
            sx, zp = act_params(spec["lo"], spec["hi"], dt)
            t = relax.op.round(relax.op.multiply(x2, relax.const(1.0 / sx, f32)))
            if zp:
                t = relax.op.add(t, relax.const(float(zp), f32))
            t = relax.op.minimum(relax.op.maximum(t, relax.const(qmin, f32)), relax.const(qmax, f32))
            q = bb.emit(relax.op.astype(t, dt))
            row_scale = None
            col_scale = (sw * sx).astype(np.float32)
        else:  # dynamic: per-row symmetric, offset 128 on uint8
            zp = 128 if dt == "uint8" else 0
            # one kernel for max |x| along the rows: as relax abs + max, the reshapes moved between them left abs
            # a kernel (and a pass through memory) of its own
            amax = bb.emit(bb.call_te(row_absmax_te, x2, primfunc_name_hint="row_absmax"))
            row_scale = bb.emit(relax.op.multiply(relax.op.maximum(amax, relax.const(1e-8, f32)), relax.const(1.0 / 127.0, f32)))
            t = relax.op.round(relax.op.divide(x2, row_scale))
            if zp:
                t = relax.op.add(t, relax.const(float(zp), f32))
            q = bb.emit(relax.op.astype(t, dt))
            row_scale = bb.emit(relax.op.reshape(row_scale, [m, 1]))
            col_scale = sw
        if im2col:
            q = self._im2col(q, call, zp)
        else:
            q = bb.emit(relax.op.reshape(q, [m, k]))
        m_pad = tvm_amx.row_padding(tvm_amx.INT8, self.tvm_target, m, n, k)
        if m_pad:  # zero rows up to whole 16-row tiles (fused into the quantize when that is the producer), sliced off after
            q = bb.emit(relax.op.nn.pad(q, [0, m_pad, 0, 0], pad_value=float(zp)))
        acc = bb.emit(bb.call_te(dense_int8_te, q, relax.const(pack_weight(wq_p, lanes)), lanes, primfunc_name_hint="dense_int8"))
        if n_pad or m_pad:
            acc = bb.emit(relax.op.strided_slice(acc, axes=[0, 1], begin=[0, 0], end=[m, n]))
        y = relax.op.astype(acc, f32)
        if row_scale is None:  # static: acc * s[n] + (-zp * colsum[n] * s[n]); the offset later merges with the bias
            y = relax.op.multiply(y, relax.const(col_scale.astype(np.float32)))
            if zp:
                y = relax.op.add(y, relax.const((-zp * colsum * col_scale).astype(np.float32)))
        else:
            if zp:
                y = relax.op.subtract(y, relax.const((zp * colsum).astype(np.float32)))
            y = relax.op.multiply(relax.op.multiply(y, relax.const(col_scale.astype(np.float32))), row_scale)
        return relax.op.reshape(bb.emit(y), out_shape)


def row_absmax_te(x):
    """TE: ``max(|x|)`` over the last axis, keeping it (``[..., 1]``): dynamic int8's per-row scale."""
    from tvm import te

    *lead, k = x.shape
    r = te.reduce_axis((0, k), name="k")
    return te.compute((*lead, 1), lambda *i: te.max(te.abs(x[(*i[:-1], r)]), axis=r), name="row_absmax")


def rewrite(mod, plan: dict, lanes: int, act_dtype: str, int_depthwise: bool = True, stats: dict | None = None,
            weight_max: int = 127, tvm_target=None):
    """(new module, keys rewritten): ``plan`` maps binding keys (``binding_keys``) of candidate calls
    in ``main`` to their activation quantization (see ``_Int8Rewriter``). ``int_depthwise``: u8-input
    depthwise convs in integer arithmetic (x86 VNNI, ``depthwise.py``) instead of f32 (``stats``, when
    given, gets ``int_depthwise``: how many)."""
    rw = _Int8Rewriter(mod, plan, lanes, act_dtype, int_depthwise, weight_max, tvm_target)
    gv = mod.get_global_var("main")
    rw.keys = binding_keys(mod[gv])
    rw.builder_.update_func(gv, rw.visit_expr(mod[gv]))
    out = rw.builder_.get()
    out = relax.transform.DeadCodeElimination()(out)
    if stats is not None:
        stats["int_depthwise"] = rw.int_depthwise_done
    return fold_requantize(sink_reshapes(out)), rw.done


# ------------------------------------------------------------------ reshape sinking
# The int8 dense works on [M, K] -> [M, N]; the model around it is N-D (NHWC). A reshape
# right after the dense would end its fused function (FuseOps fuses only elementwise /
# broadcast ops into a reduction's epilogue, a reshape is "injective"), leaving dequantize,
# bias, activation and the next layer's quantize in separate kernels. So reshapes are
# moved down past elementwise ops whose other operand is a scalar / per-last-axis constant
# (or the same reshape of a same-shaped tensor), and reshape(reshape(a)) collapses: the
# whole epilogue stays 2-D and fuses; the reshape lands where an op needs N-D (a
# depthwise conv), where it is a free view.

_BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum")
_UNARY = ("relax.nn.relu", "relax.round", "relax.astype", "relax.abs", "relax.clip", "relax.sigmoid", "relax.tanh")


def _last_axis_const(c, n: int):
    """c as a scalar or [n] constant when it broadcasts only along the last axis, else None."""
    if not isinstance(c, _CONST):
        return None
    a = _const_np(c)
    if a.ndim == 0 or a.size == 1:
        return relax.const(a.reshape(()), str(a.dtype))
    if a.shape[-1] == n and a.size == n:
        return relax.const(np.ascontiguousarray(a.reshape(n)), str(a.dtype))
    return None


def _is_reshape(e):
    return isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.reshape"


@relax.expr_functor.mutator
class _SinkReshape(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.changed = 0
        self.bound = {}  # var -> its (rewritten) value, to look through bindings

    def _value(self, e):
        return self.bound.get(e, e) if isinstance(e, relax.Var) else e

    def visit_var_binding_(self, binding):
        value = self.visit_expr(binding.value)
        new = self._sink(value)
        if new is not None:
            self.changed += 1
            value = new
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        v = emit(value, name_hint=binding.var.name)
        self.bound[v] = value
        self.set_var_remap(binding.var, v)

    def _merge_adds(self, call):
        x, c2 = call.args
        if not isinstance(c2, _CONST):
            return None
        inner = self._value(x)
        if not (isinstance(inner, relax.Call) and isinstance(inner.op, tvm.ir.Op) and inner.op.name == "relax.add"):
            return None
        a, c1 = inner.args
        if not isinstance(c1, _CONST) or _shape(a) != _shape(call):
            return None
        v1, v2 = _const_np(c1), _const_np(c2)
        if v1.dtype != v2.dtype:
            return None
        try:
            total = v1 + v2
            if np.broadcast_shapes(total.shape, tuple(_shape(call))) != tuple(_shape(call)):
                return None
        except ValueError:
            return None
        return relax.op.add(a, relax.const(np.ascontiguousarray(total)))

    def _src(self, e):
        """(a, target shape) if e is (a var bound to) reshape(a, S) keeping the last axis."""
        r = self._value(e)
        if not _is_reshape(r):
            return None
        a = r.args[0]
        sa, so = _shape(a), _shape(r)
        if sa is None or so is None or not sa or not so or sa[-1] != so[-1]:
            return None
        return a, so

    def _sink(self, call):
        if not isinstance(call, relax.Call) or not isinstance(call.op, tvm.ir.Op):
            return None
        name = call.op.name
        bb = self.builder_
        if name == "relax.reshape":
            inner = self._value(call.args[0])
            if _is_reshape(inner):
                a = inner.args[0]
                if _shape(a) == _shape(call):
                    return a  # an alias binding; CanonicalizeBindings removes it
                return relax.op.reshape(a, _shape(call))
            if _shape(call.args[0]) == _shape(call):
                return call.args[0]
            return None
        if name in _UNARY:
            s = self._src(call.args[0])
            if s is None:
                return None
            a, shape = s
            inner = bb.emit(relax.Call(call.op, [a] + list(call.args[1:]), call.attrs))
            return relax.op.reshape(inner, shape)
        if name == "relax.add":  # add(add(a, c1), c2) -> add(a, c1 + c2): one per-channel constant, not two
            merged = self._merge_adds(call)
            if merged is not None:
                return merged
        if name in _BINARY:
            x, y = call.args
            sx, sy = self._src(x), self._src(y)
            if sx is not None and sy is not None and _shape(sx[0]) == _shape(sy[0]) and sx[1] == sy[1]:
                inner = bb.emit(relax.Call(call.op, [sx[0], sy[0]], call.attrs))
                return relax.op.reshape(inner, sx[1])
            for s, other, first in ((sx, y, True), (sy, x, False)):
                if s is None:
                    continue
                a, shape = s
                c = _last_axis_const(other, shape[-1])
                if c is None or _shape(call) != shape:
                    continue
                inner = bb.emit(relax.Call(call.op, [a, c] if first else [c, a], call.attrs))
                return relax.op.reshape(inner, shape)
        return None


def sink_reshapes(mod, rounds: int = 8):
    for _ in range(rounds):
        sk = _SinkReshape(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                sk.builder_.update_func(gv, sk.visit_expr(func))
        mod = sk.builder_.get()
        mod = relax.transform.CanonicalizeBindings()(mod)
        mod = relax.transform.DeadCodeElimination()(mod)
        if not sk.changed:
            break
    return mod



# ------------------------------------------------------------------ requantize folding
# After the rewrite, an int8 layer's epilogue is a chain of per-channel elementwise ops ending
# in the next layer's quantize, e.g. (MobileNet's expand conv)
#     astype(min(max(round(min(max(float(acc) * s + b, 0), 6) * (1/sx)), 0), 255), uint8)
# Every op is monotone with positive scales, so the chain is one affine map and one clamp:
#     clamp(round(A * x + B), lo, hi)
# (round(clamp(t, a, b)) == clamp(round(t), round(a), round(b)) since round is monotone). On
# uint8 (x86) the round goes too: with lo >= 0, trunc(clamp(t + 0.5, lo, hi)) is
# floor(t + 0.5) clamped, and the float -> uint8 cast truncates; this also keeps the epilogue in
# 512-bit registers (LLVM splits a 16-lane nearbyint into two 256-bit halves on x86-64-v4).

def _chain_const(c, n: int):
    """c as a float64 scalar or [n] array when it broadcasts only along the last axis, else None."""
    if not isinstance(c, _CONST):
        return None
    a = _const_np(c)
    if a.ndim == 0 or a.size == 1:
        return np.float64(a.reshape(()))
    if a.shape[-1] == n and a.size == n:
        return a.reshape(n).astype(np.float64)
    return None


@relax.expr_functor.mutator
class _FoldRequantize(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.bound = {}  # original var -> original value
        self.uses = {}  # original var -> how many times the function reads it
        self.changed = 0

    def visit_var_binding_(self, binding):
        self.bound[binding.var] = binding.value
        new = self._fold(binding.value)
        if new is None:
            return super().visit_var_binding_(binding)
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(self.visit_expr(new), name_hint=binding.var.name))
        self.changed += 1

    def _fold(self, call):
        if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.astype"):
            return None
        dt = str(call.attrs.dtype)
        if dt not in ("uint8", "int8") or _dtype(call.args[0]) != "float32":
            return None
        shape = _shape(call)
        if not shape:
            return None
        n = shape[-1]
        ops, x = [], call.args[0]
        # walk back through single-use bindings only: a value something else reads (a residual
        # branch's fp32 output) stays where it is, and the chain starts from it
        while isinstance(x, relax.Var) and x in self.bound and self.uses.get(x, 0) == 1:
            v = self.bound[x]
            if not (isinstance(v, relax.Call) and isinstance(v.op, tvm.ir.Op)) or _shape(v) != shape:
                break
            name = v.op.name
            if name in ("relax.round", "relax.nn.relu"):
                ops.append((name, None))
                x = v.args[0]
                continue
            if name not in ("relax.add", "relax.subtract", "relax.multiply", "relax.maximum", "relax.minimum"):
                break
            a, b = v.args
            c = _chain_const(b, n)
            if c is None and name != "relax.subtract":
                a, b = b, a
                c = _chain_const(b, n)
            if c is None or not isinstance(a, relax.Var) or _shape(a) != shape:
                break
            ops.append((name, c))
            x = a
        ops.reverse()
        if sum(o == "relax.round" for o, _ in ops) != 1 or len(ops) < 3:
            return None
        A, B, lo, hi, rounded = np.float64(1.0), np.float64(0.0), np.float64(-np.inf), np.float64(np.inf), False
        for name, c in ops:
            if name == "relax.multiply":
                if rounded or np.any(c <= 0):
                    return None
                A, B, lo, hi = A * c, B * c, lo * c, hi * c
            elif name in ("relax.add", "relax.subtract"):
                c = c if name == "relax.add" else -c
                if rounded and np.any(c != np.round(c)):
                    return None
                B, lo, hi = B + c, lo + c, hi + c
            elif name in ("relax.maximum", "relax.nn.relu"):
                c = np.float64(0.0) if c is None else c
                lo, hi = np.maximum(lo, c), np.maximum(hi, c)
            elif name == "relax.minimum":
                lo, hi = np.minimum(lo, c), np.minimum(hi, c)
            else:  # round
                lo, hi, rounded = np.round(lo), np.round(hi), True
        qmin, qmax = (0, 255) if dt == "uint8" else (-128, 127)
        if np.any(lo < qmin) or np.any(hi > qmax) or np.any(lo > hi):
            return None  # the cast would wrap: leave it as written
        f32 = "float32"

        def const(v):
            v = np.asarray(v, np.float32)
            return relax.const(v if v.ndim else v.reshape(()), f32)

        t = x if np.all(A == 1.0) else relax.op.multiply(x, const(A))
        trunc = dt == "uint8" and np.all(lo >= 0)
        if trunc:
            B = B + 0.5  # floor(t + 0.5) == round(t) up to ties; the cast truncates, lo >= 0
        if np.any(B != 0):
            t = relax.op.add(t, const(B))
        if not trunc:
            t = relax.op.round(t)
        lo_c = const(lo if np.ndim(lo) else float(lo))
        hi_c = const(hi if np.ndim(hi) else float(hi))
        t = relax.op.minimum(relax.op.maximum(t, lo_c), hi_c)
        return relax.op.astype(t, dt)


def _use_counts(func: relax.Function) -> dict:
    counts = {}

    def visit(e):
        if isinstance(e, relax.Var):
            counts[e] = counts.get(e, 0) + 1

    for block in func.body.blocks:
        for b in block.bindings:
            relax.analysis.post_order_visit(b.value, visit)
    relax.analysis.post_order_visit(func.body.body, visit)
    return counts


def fold_requantize(mod):
    """Fold each elementwise chain that ends in a cast to (u)int8 into multiply-add + clamp (+ round)."""
    fr = _FoldRequantize(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            fr.uses = _use_counts(func)
            fr.builder_.update_func(gv, fr.visit_expr(func))
    out = fr.builder_.get()
    return relax.transform.DeadCodeElimination()(out)
