"""bf16 for edgellm's TVM CPU backend: matmuls and convs with constant weights on AVX512-BF16.

    mod, info = rewrite(mod, tvm_target)     # tvm.py, for --precision bf16 --backend tvm

Each ``y = op(x, W)`` (``relax.matmul`` with a constant 2-D weight, NHWC 1x1 ``conv2d``) becomes::

    a = reshape(to_bf16(x), [M, K])                  # fp32 -> bf16 bits (uint16), round to nearest even
    y = reshape(call_tir(dense_bf16, a, W_packed)[:, :N], shape(y))   # fp32 out

and a kxk (or strided) conv, groups 1, the same dense over its patches: ``to_bf16`` + pad (one fused
kernel, channels padded so a patch row is whole k pairs), int8's ``im2col`` kernel on the bf16 bits, a free
view to ``[M, kh*kw*Cp]``; only while the patch matrix stays under ``IM2COL_MAX_BYTES``.

``W_packed`` is ``[N/16, K/2, 16, 2]`` bf16 (one zmm register's 16 lanes x 2 values a k step), made at
compile time. The dense accumulates in fp32: ``vdpbf16ps`` multiplies bf16 pairs exactly and adds
them into 16 fp32 lanes. The schedule is the int8 dense's (``tvm_int8/schedule.py``: register tile,
panels, fused epilogue) with 2 k values a lane instead of 4. Everything else (bias, activations,
softmax, layer norms, attention's activation x activation matmuls, depthwise convs) stays fp32.

bf16 is carried as ``uint16`` bits in TIR: TVM's own bf16 (``BF16ComputeLegalize``) turns every bf16
expression back into fp32 arithmetic on LLVM targets, and LLVM >= 17 declares ``vdpbf16ps`` on
``<32 x bfloat>``, which TIR cannot spell. So the instruction comes from a three-line LLVM function
(``_LL``: bitcasts + the intrinsic, ``alwaysinline``) that TVM links into the module
(``pragma_import_llvm``) and that the tensor intrinsic calls.

On targets with AMX (x86_64-amx) the same dense runs on tiles (``tvm_amx``: ``tdpbf16ps``), and only the
layers that fit them are rewritten: on those Intel cores ``vdpbf16ps`` issues on one port where fp32 FMAs
take two, so the rest is faster in fp32. Elsewhere (Zen 4 / Zen 5) every such layer goes to ``vdpbf16ps``.
There, too, attention's activation x activation matmuls become batched bf16 denses on tiles
(``attention_to_tiles``, for int8 and bf16 packages): the right operand is packed at run time.

Checked on Bochs's emulated Sapphire Rapids where this CPU lacks AVX512-BF16 (tests/x86_emulator.py).
"""

from __future__ import annotations

import numpy as np

ATTR = "edgellm.bf16_dense"
#: largest bf16 patch matrix a kxk conv is turned into (im2col + dense); bigger ones stay fp32 direct convs
IM2COL_MAX_BYTES = 8 << 20
LANES = 16  # fp32 lanes of a zmm register: output channels per weight panel row
K_GROUP = 2  # bf16 values a lane takes per k step

_LL = r"""
define linkonce_odr <16 x float> @edgellm_dpbf16ps_512(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b) alwaysinline {
  %x = bitcast <16 x i32> %a to <32 x bfloat>
  %y = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %x, <32 x bfloat> %y)
  ret <16 x float> %r
}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
"""

_BF16_CPUS = ("cooperlake", "sapphirerapids", "emeraldrapids", "graniterapids", "graniterapids-d", "diamondrapids",
              "znver4", "znver5")


def has_avx512_bf16(target) -> bool:
    """True when the llvm target may use ``vdpbf16ps`` (AVX512-BF16: Cooper Lake, Sapphire Rapids on, Zen 4 on)."""
    from edgellm.backends.tvm_cpu.target_info import _attrs

    if target is None or target.kind.name != "llvm":
        return False
    mcpu, mattr, mtriple = _attrs(target)
    if not mtriple.startswith("x86_64") or "-avx512bf16" in mattr:
        return False
    return "+avx512bf16" in mattr or mcpu in _BF16_CPUS


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (uint16), round to nearest even (as ``vcvtneps2bf16`` and ``to_bf16_te``)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def pack_weight(w_nk_bits: np.ndarray) -> np.ndarray:
    """bf16 bits ``[N, K]`` (N a multiple of 16, K even) -> ``[N/16, K/2, 16, 2]``."""
    n, k = w_nk_bits.shape
    assert n % LANES == 0 and k % K_GROUP == 0, (n, k)
    return np.ascontiguousarray(w_nk_bits.reshape(n // LANES, LANES, k // K_GROUP, K_GROUP).transpose(0, 2, 1, 3))


def _f32(bits):
    """bf16 bits (a uint16 TIR value) -> the fp32 value it stands for: the bits are fp32's upper half."""
    from tvm import tirx

    return tirx.reinterpret("float32", bits.astype("uint32") << tirx.const(16, "uint32"))


def _bits(value):
    """fp32 TIR value -> its bf16 bits (uint16), rounded to nearest even."""
    from tvm import tirx

    u = tirx.reinterpret("uint32", value)
    return ((u + tirx.const(0x7FFF, "uint32") + ((u >> tirx.const(16, "uint32")) & tirx.const(1, "uint32")))
            >> tirx.const(16, "uint32")).astype("uint16")


def to_bf16_te(x, name: str = "to_bf16"):
    """TE: fp32 tensor -> bf16 bits, round to nearest even (elementwise: fuses into its producer)."""
    from tvm import te

    return te.compute(x.shape, lambda *i: _bits(x(*i)), name=name)


def dense_bf16_te(A, W, name: str = "dense_bf16"):
    """``C[m, n] (fp32) = sum_k f32(A[m, k]) * f32(W[n // 16, k // 2, n % 16, k % 2])``; A ``[M, K]`` and
    W bf16 bits (uint16)."""
    from tvm import te

    M, K = A.shape
    NB = W.shape[0]
    k = te.reduce_axis((0, K), name="k")
    return te.compute((M, NB * LANES),
                      lambda m, n: te.sum(_f32(A[m, k]) * _f32(W[n // LANES, k // K_GROUP, n % LANES, k % K_GROUP]), axis=k),
                      name=name)


def batched_dense_bf16_te(A, W, name: str = "batched_dense_bf16"):
    """``C[b, m, n] (fp32) = sum_k f32(A[b, m, k]) * f32(W[b, n // 16, k // 2, n % 16, k % 2])``: a packed dense per
    batch entry, for activation x activation matmuls (attention's ``Q K^T`` and ``P V``)."""
    from tvm import te

    B, M, K = A.shape
    NB = W.shape[1]
    k = te.reduce_axis((0, K), name="k")
    return te.compute((B, M, NB * LANES),
                      lambda b, m, n: te.sum(_f32(A[b, m, k]) * _f32(W[b, n // LANES, k // K_GROUP, n % LANES, k % K_GROUP]),
                                             axis=k),
                      name=name)


def pack_bf16_te(x, name: str = "pack_bf16"):
    """TE: fp32 ``[B, K, N]`` -> bf16 bits ``[B, N/16, K/2, 16, 2]`` (the packed weight layout, made at run time for an
    operand that is an activation), rounded to nearest even; injective, so it fuses with the producer's transpose."""
    from tvm import te

    B, K, N = x.shape
    return te.compute((B, N // LANES, K // K_GROUP, LANES, K_GROUP),
                      lambda b, nb, kb, nl, kl: _bits(x[b, kb * K_GROUP + kl, nb * LANES + nl]), name=name)


def dense_bf16_primfunc(M: int, K: int, N: int):
    """A standalone PrimFunc (A, W) -> C of the packed bf16 dense, for kernels and tests."""
    from tvm import te

    A = te.placeholder((M, K), "uint16", name="A")
    W = te.placeholder((N // LANES, K // K_GROUP, LANES, K_GROUP), "uint16", name="W")
    return te.create_prim_func([A, W, dense_bf16_te(A, W)]).with_attr(ATTR, True)


#: why a layer stays fp32 on an AMX target
NOT_TILES = "does not fit AMX tiles (rows whole 16-row tiles, K whole 32-value rows); fp32 FMAs beat vdpbf16ps on these cores"
INTRIN = "edgellm_dot_16x2_bf16_f32_local"
_REGISTERED: set = set()


def _register_intrinsic() -> None:
    """[16 lanes x 2 k] bf16 dot product into a ``local`` fp32 accumulator: one ``vdpbf16ps``."""
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    if _REGISTERED:
        return

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((2,), "uint16", offset_factor=1), B: T.Buffer((16, 2), "uint16", offset_factor=1),
             C: T.Buffer((16,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.reinterpret("float32", T.shift_left(T.Cast("uint32", A[vk]), T.uint32(16))) \
                            * T.reinterpret("float32", T.shift_left(T.Cast("uint32", B[vi, vk]), T.uint32(16)))

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), "uint16", offset_factor=1), B: T.Buffer((16, 2), "uint16", offset_factor=1),
             C: T.Buffer((16,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            with T.attr(0, "pragma_import_llvm", _LL):
                C[T.ramp(T.int32(0), 1, 16)] = T.call_pure_extern(
                    "float32x16", "edgellm_dpbf16ps_512", C.vload([0], dtype="float32x16"),
                    T.broadcast(T.reinterpret(A.vload([0], "uint16x2"), dtype="int32"), 16),
                    T.reinterpret(B.vload([0, 0], dtype="uint16x32"), dtype="int32x16"))

    TensorIntrin.register(INTRIN, desc, impl, override=True)
    _REGISTERED.add(True)


def match_dense(sch):
    """The main block info of the packed bf16 dense in ``sch`` (``dense_bf16_te`` + fused epilogue), else NotApplicable."""
    from edgellm.backends.tvm_cpu._common import NotApplicable
    from edgellm.backends.tvm_cpu.matmul import find_single_reduction

    _, main = find_single_reduction(sch)
    stmt = sch.get(main.block_rv)
    if len(stmt.writes) != 1 or str(stmt.writes[0].source.dtype) != "float32":
        raise NotApplicable("not an fp32 accumulation")
    kinds = "".join(i.kind for i in main.iters)
    if kinds not in ("SSR", "SR", "SSSR"):
        raise NotApplicable("not [m, n, k] or [b, m, n, k]")
    batch = int(kinds == "SSSR")
    srcs = [r.source for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]
    act = [b for b in srcs if len(b.shape) == 2 + batch and str(b.dtype) == "uint16"]
    wgt = [b for b in srcs if len(b.shape) == 4 + batch and str(b.dtype) == "uint16"
           and int(b.shape[-2]) == LANES and int(b.shape[-1]) == K_GROUP]
    if len(act) != 1 or len(wgt) != 1:
        raise NotApplicable("operands are not [M, K] bf16 activations and [N/16, K/2, 16, 2] bf16 weights (each with a "
                            "batch dim in front for a batched dense)")
    return main


def _rule_class():
    from edgellm.backends.tvm_cpu._common import NotApplicable, SafeRule
    from edgellm.backends.tvm_int8.schedule import schedule_packed_dense
    from edgellm.backends.tvm_int8.x86 import PARALLEL_MIN_MACS

    class PackedDenseBF16(SafeRule):
        """The packed bf16 dense on AVX512-BF16: ``vdpbf16ps`` zmm, 24 fp32 accumulators in registers."""

        def schedule(self, sch, func, target):
            if not has_avx512_bf16(target):
                raise NotApplicable("not an AVX512-BF16 target")
            main = match_dense(sch)
            if len(main.iters) == 4:
                raise NotApplicable("a batched dense: AMX tiles only (attention_to_tiles rewrites on AMX targets)")
            _register_intrinsic()
            return schedule_packed_dense(sch, main, LANES, INTRIN, 24, k_group=K_GROUP, parallel_min_macs=PARALLEL_MIN_MACS)

    return PackedDenseBF16


def bf16_rules() -> list:
    """AMX tiles where the target has them (``tvm_amx``), else / for what does not fit them ``vdpbf16ps``."""
    from edgellm.backends.tvm_amx import BF16, amx_rules

    return [*amx_rules(BF16, match_dense), _rule_class()()]


def rewrite(mod, tvm_target):
    """(bf16 module, manifest info) for ``--precision bf16`` on an AVX512-BF16 llvm target."""
    import collections

    import tvm
    from tvm import relax

    from edgellm.backends import tvm_amx

    from edgellm.backends.tvm_cpu.relax_passes import layout_passes
    from edgellm.backends.tvm_int8.compute import im2col_primfunc, pad_codes_te
    from edgellm.backends.tvm_int8.rewrite import (_CONST, _const_np, _dtype, _is_im2col, _shape, candidate,
                                                   sink_reshapes)
    from edgellm.errors import EdgeError

    with tvm_target:
        mod = layout_passes(mod)

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.done = 0
            self.why_not = ""
            self.left = collections.Counter()

        def visit_var_binding_(self, binding):
            value = binding.value
            if isinstance(value, relax.Call):
                kind, w_nk, why = candidate(value, k_multiple=K_GROUP)
                new = None
                if kind and w_nk is not None and not _is_im2col(value):
                    if _on_tiles(int(np.prod(_shape(value)[:-1])), *w_nk.shape):
                        new = self._dense(self.visit_expr(value), w_nk)
                    else:
                        why = NOT_TILES
                elif kind == "conv2d":
                    hwio = _kxk_weight(value)
                    if hwio is not None:
                        new = self._conv(self.visit_expr(value), hwio)
                        why = why if new is not None else self.why_not
                if new is not None:
                    emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
                    self.set_var_remap(binding.var, emit(new, name_hint=binding.var.name))
                    self.done += 1
                    return
                if kind:  # int8's reasons, in bf16's terms: its kxk convs (im2col) are not bf16's
                    why = f"{why.split(' (')[0] if ' conv (' in why else 'kxk conv'} (bf16 takes matmuls and 1x1 convs)" \
                        if not why or " conv (" in why else why
                    self.left[f"{kind}: {why}"] += 1
            super().visit_var_binding_(binding)

        def _dense(self, call, w_nk, a=None):
            """``a``: the activations already as bf16 patches [M, K] (a kxk conv's im2col)."""
            bb = self.builder_
            out_shape = _shape(call)
            n, k = w_nk.shape
            m = int(np.prod(out_shape[:-1]))
            n_pad = -n % LANES
            packed = pack_weight(to_bf16_bits(np.pad(w_nk, ((0, n_pad), (0, 0)))))
            if a is None:
                a = bb.emit(bb.call_te(to_bf16_te, call.args[0], primfunc_name_hint="to_bf16"))
                a = bb.emit(relax.op.reshape(a, [m, k]))
            m_pad = tvm_amx.row_padding(tvm_amx.BF16, tvm_target, m, n, k)
            if m_pad:  # zero rows up to whole 16-row tiles; their outputs are sliced off
                a = bb.emit(relax.op.nn.pad(a, [0, m_pad, 0, 0]))
            y = bb.emit(bb.call_te(dense_bf16_te, a, relax.const(packed), primfunc_name_hint="dense_bf16"))
            if n_pad or m_pad:
                y = bb.emit(relax.op.strided_slice(y, axes=[0, 1], begin=[0, 0], end=[m, n]))
            return relax.op.reshape(y, out_shape)

        def _conv(self, call, hwio):
            """kxk conv (NHWC / HWIO) -> bf16 + pad (one fused kernel) -> im2col -> packed bf16 dense; None when
            the patch matrix would be over ``IM2COL_MAX_BYTES``."""
            bb, at = self.builder_, call.attrs
            kh, kw, cin, cout = hwio.shape
            cp = cin + (kw * cin) % K_GROUP  # a patch row (kw * cp values) splits into whole k groups
            b, oh, ow, _ = _shape(call)
            if b * oh * ow * kh * kw * cp * 2 > IM2COL_MAX_BYTES:
                self.why_not = f"patches over {IM2COL_MAX_BYTES >> 20} MB"
                return None
            if not _on_tiles(b * oh * ow, cout, kh * kw * cp):
                self.why_not = NOT_TILES
                return None
            x = bb.emit(bb.call_te(to_bf16_te, call.args[0], primfunc_name_hint="to_bf16"))
            p = bb.emit(bb.call_te(pad_codes_te, x, [int(v) for v in at.padding], cp, 0, primfunc_name_hint="pad_bf16"))
            gv = bb.add_func(im2col_primfunc(_shape(p), "uint16", kh, kw, [int(v) for v in at.strides]), "im2col")
            cols = bb.emit(relax.call_tir(gv, [p], relax.TensorType((b * oh, ow, kh, kw * cp), "uint16")))
            cols = bb.emit(relax.op.reshape(cols, [b * oh * ow, kh * kw * cp]))
            w_nk = np.pad(hwio, ((0, 0), (0, 0), (0, cp - cin), (0, 0))).reshape(kh * kw * cp, cout).T
            return self._dense(call, np.ascontiguousarray(w_nk), cols)

    def _kxk_weight(call):
        """The HWIO weights of a groups=1, undilated NHWC kxk conv with constant weights, else None."""
        at = call.attrs
        w = call.args[1]
        if not isinstance(w, _CONST) or str(at.data_layout) != "NHWC" or str(at.kernel_layout) != "HWIO" \
                or int(at.groups) != 1 or any(int(d) != 1 for d in at.dilation) or _shape(call) is None \
                or _shape(call.args[0]) is None or _dtype(call.args[0]) != "float32":
            return None
        hwio = _const_np(w)
        return hwio if hwio.dtype == np.float32 and hwio.ndim == 4 else None

    amx = tvm_amx.has_amx(tvm_target)

    def _on_tiles(m, n, k):
        """False where the target has AMX and this dense does not fit its tiles, even with zero rows added: on those
        Intel cores ``vdpbf16ps`` issues on one port where fp32 FMAs take two (MiniLM all on vdpbf16ps: 14.1 ms vs
        fp32's 9.5), so such a layer is faster left fp32."""
        return not amx or tvm_amx.plan(tvm_amx.BF16, m + tvm_amx.row_padding(tvm_amx.BF16, tvm_target, m, n, k),
                                       n + (-n % LANES), k) is not None

    rw = _Rewriter(mod)
    gv = mod.get_global_var("main")
    rw.builder_.update_func(gv, rw.visit_expr(mod[gv]))
    out = sink_reshapes(relax.transform.DeadCodeElimination()(rw.builder_.get()))
    if not rw.done:
        what = "no matmul or conv with constant weights" + (" that fits AMX tiles" if amx else "")
        raise EdgeError(f"no layer of this model can run in bf16 with TVM ({what})",
                        "build fp32, or use --backend openvino for --precision bf16")
    isa = tvm_amx.describe(tvm_amx.BF16, tvm_target, "avx512-bf16 vdpbf16ps")
    info = {
        "compute": f"bf16 x bf16 -> fp32 ({isa}) in matmuls and convs with constant weights; the rest fp32",
        "weights": "bf16 (round to nearest even)",
        "activations": "bf16 into those layers, rounded to nearest even in the producer's kernel",
        "layers_bf16": rw.done,
        "layers_fp32": dict(rw.left),
    }
    return out, info


def attention_to_tiles(mod, tvm_target):
    """(module, count): on an AMX target, each fp32 ``matmul`` of two activations ``[..., M, K] x [..., K, N]`` (the same
    batch dims in front: attention's ``Q K^T`` and ``P V``) whose shape fits the tiles becomes a batched bf16 dense on
    them: both operands rounded to bf16 in their producers' kernels (the right one packed as a weight, its transpose
    fused in), fp32 accumulation, the scale after it fused into the write-back. For ``--precision int8`` and ``bf16``
    packages: in MiniLM these matmuls took as long as the int8 denses once those were on tiles. Elsewhere the module
    is unchanged."""
    from tvm import relax

    from edgellm.backends import tvm_amx
    from edgellm.backends.tvm_int8.rewrite import _CONST, _dtype, _shape

    if not tvm_amx.has_amx(tvm_target):
        return mod, 0

    def fits(call):
        a, b = call.args
        sa, sb = _shape(a), _shape(b)
        if isinstance(a, _CONST) or isinstance(b, _CONST) or sa is None or sb is None or len(sa) < 3 \
                or len(sb) != len(sa) or sa[:-2] != sb[:-2] or sa[-1] != sb[-2] or _dtype(a) != "float32" \
                or _dtype(b) != "float32" or _dtype(call) != "float32":
            return False
        return tvm_amx.plan(tvm_amx.BF16, sa[-2], sb[-1], sa[-1]) is not None

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.done = 0

        def visit_var_binding_(self, binding):
            value = binding.value
            if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.matmul" and fits(value):
                bb = self.builder_
                call = self.visit_expr(value)
                (*lead, m, _), n = _shape(call.args[0]), _shape(call.args[1])[-1]
                x, y = (bb.emit(relax.op.reshape(v, [int(np.prod(lead)), *_shape(v)[-2:]])) if len(lead) > 1 else v
                        for v in call.args)
                a = bb.emit(bb.call_te(to_bf16_te, x, primfunc_name_hint="to_bf16"))
                w = bb.emit(bb.call_te(pack_bf16_te, y, primfunc_name_hint="pack_bf16"))
                new = bb.call_te(batched_dense_bf16_te, a, w, primfunc_name_hint="batched_dense_bf16")
                if len(lead) > 1:
                    new = relax.op.reshape(bb.emit(new), [*lead, m, n])
                emit = bb.emit if isinstance(binding.var, relax.DataflowVar) else bb.emit_output
                self.set_var_remap(binding.var, emit(new, name_hint=binding.var.name))
                self.done += 1
                return
            super().visit_var_binding_(binding)

    rw = _Rewriter(mod)
    gv = mod.get_global_var("main")
    rw.builder_.update_func(gv, rw.visit_expr(mod[gv]))
    return relax.transform.DeadCodeElimination()(rw.builder_.get()), rw.done


def note_attention_on_tiles(info: dict, count: int) -> None:
    """Record in an int8 / bf16 manifest entry that ``count`` attention matmuls run in bf16 on tiles (they leave its
    ``layers_fp32``, where the rewrite before listed them)."""
    info["attention_matmuls"] = f"{count} activation x activation matmuls in bf16 x bf16 -> fp32 on AMX tdpbf16ps tiles"
    left = info.get("layers_fp32", {})
    for key in [k for k in left if "activation x activation" in k]:
        taken = min(count, left[key])
        left[key] -= taken
        count -= taken
        if not left[key]:
            del left[key]
