"""The int8 epilogue and stem pieces: requantize chains folded to one multiply-add + clamp (no
round on uint8), the stem as im2col + int8 dense, the VNNI intrinsic without per-call buffers.

Tolerances: the folded chain equals the written one except at rounding ties (round half to even
vs floor(t + 0.5), and float reassociation): at most 1 code, on under 1% of the values.
im2col and the padded codes are pure data movement: exact. The stem conv through the int8
rewrite: within 2% of the output range of the fp32 conv (8-bit input and weights).
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from edgellm import targets  # noqa: E402
from edgellm.backends.tvm_int8.compute import im2col_channels, im2col_primfunc, pad_codes_te  # noqa: E402
from edgellm.backends.tvm_int8.rewrite import fold_requantize  # noqa: E402

HOST = tvm.target.Target(targets.host().tvm)


def _chain_module(dt: str, c: int = 48):
    """x [64, c] -> dequantize-style affine -> ReLU6 -> quantize to dt, as the rewrite writes it."""
    rng = np.random.default_rng(0)
    scale = (rng.random(c) * 0.02 + 0.001).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    inv, zp = np.float32(40.0), 0.0 if dt == "uint8" else -128.0
    qmin, qmax = (0.0, 255.0) if dt == "uint8" else (-128.0, 127.0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((64, c), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t = bb.emit(relax.op.add(relax.op.multiply(x, relax.const(scale)), relax.const(bias)))
            t = bb.emit(relax.op.minimum(relax.op.maximum(t, relax.const(0.0)), relax.const(6.0)))
            t = bb.emit(relax.op.round(relax.op.multiply(t, relax.const(inv))))
            if zp:
                t = bb.emit(relax.op.add(t, relax.const(zp)))
            t = bb.emit(relax.op.minimum(relax.op.maximum(t, relax.const(qmin)), relax.const(qmax)))
            out = bb.emit_output(relax.op.astype(t, dt))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, x):
    ex = tvm.compile(mod, HOST)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _ops(mod):
    names = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            names.append(e.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


@pytest.mark.parametrize("dt", ["uint8", "int8"])
def test_requantize_chain_folds_to_multiply_add_clamp(dt):
    mod = _chain_module(dt)
    folded = fold_requantize(mod)
    ops = _ops(folded)
    assert ops.count("relax.multiply") == 1 and ops.count("relax.maximum") == 1 and ops.count("relax.minimum") == 1
    # uint8 (x86): no round at all (trunc of t + 0.5 >= 0); int8 (arm64) keeps one round
    assert ops.count("relax.round") == (0 if dt == "uint8" else 1)
    x = (np.random.default_rng(1).standard_normal((64, 48)) * 300).astype(np.float32)
    a, b = _run(mod, x).astype(np.int32), _run(folded, x).astype(np.int32)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
    assert a.min() != a.max()  # both clamps and the middle were exercised
    assert (a == (0 if dt == "uint8" else -128)).any()


def test_fold_leaves_a_chain_through_a_shared_value_alone():
    """A value read twice (a residual branch) is not recomputed inside the folded chain."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.add(relax.op.multiply(x, relax.const(np.float32(2.0))), relax.const(np.float32(1.0))))
            q = bb.emit(relax.op.astype(relax.op.minimum(relax.op.maximum(
                relax.op.round(relax.op.multiply(y, relax.const(np.float32(3.0)))), relax.const(0.0)), relax.const(255.0)), "uint8"))
            out = bb.emit_output(relax.Tuple([q, y]))
        bb.emit_func_output(out)
    folded = fold_requantize(bb.get())
    # y's own multiply + add stay, the quantize of y becomes one multiply-add + clamp on y
    assert _ops(folded).count("relax.multiply") == 2 and "relax.round" not in _ops(folded)


def test_im2col_and_padded_codes_are_exact():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, (1, 9, 11, 3)).astype(np.uint8)
    kh = kw = 3
    cp = im2col_channels(3, kw)
    assert cp == 4 and im2col_channels(1, 4) == 1
    from tvm import te

    Q = te.placeholder(q.shape, "uint8", name="Q")
    P = pad_codes_te(Q, [1, 1, 1, 1], cp, 7)
    pad = te.create_prim_func([Q, P])
    col = im2col_primfunc([int(d) for d in P.shape], "uint8", kh, kw, [2, 2])
    dev = tvm.cpu()
    p_out = tvm.runtime.tensor(np.zeros([int(d) for d in P.shape], np.uint8), dev)
    tvm.compile(tvm.IRModule({"main": pad}), HOST)["main"](tvm.runtime.tensor(q, dev), p_out)
    want_p = np.pad(q, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=7)
    want_p = np.concatenate([want_p, np.zeros(want_p.shape[:3] + (1,), np.uint8)], axis=-1)
    np.testing.assert_array_equal(p_out.numpy(), want_p)
    oh, ow = (11 - 3) // 2 + 1, (13 - 3) // 2 + 1
    c_out = tvm.runtime.tensor(np.zeros((oh, ow, kh, kw * cp), np.uint8), dev)
    tvm.compile(tvm.IRModule({"main": col.with_attr("global_symbol", "main")}), HOST)["main"](p_out, c_out)
    want = np.stack([np.stack([want_p[0, i * 2:i * 2 + 3, j * 2:j * 2 + 3, :].reshape(3, 3 * cp) for j in range(ow)])
                     for i in range(oh)])
    np.testing.assert_array_equal(c_out.numpy(), want)


def test_stem_conv_runs_as_im2col_int8_dense_close_to_fp32():
    """A 3x3 stride-2 Cin=3 conv (MobileNet's stem) through the whole int8 rewrite and pipeline."""
    from edgellm.backends import tvm_int8, tvm_pipelines
    from edgellm.backends.tvm_int8.compute import packing

    pk = packing(HOST)
    if pk is None:
        pytest.skip("the host has no int8 kernel (needs AVX-512 VNNI or arm64)")
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((32, 3, 3, 3)) * 0.3).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32) * 0.1
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 32, 32), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=2, padding=1))
            y = bb.emit(relax.op.add(y, relax.const(bias.reshape(1, 32, 1, 1))))
            out = bb.emit_output(relax.op.nn.relu(y))
        bb.emit_func_output(out)
    mod = bb.get()
    samples = [{"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(8)]
    qmod, info = tvm_int8.quantize(mod, HOST, {"quantize": "int8", "calibration": samples}, ["x"])
    assert info["layers_int8"] == 1 and not info["layers_fp32"]
    assert any(gv.name_hint == "im2col" for gv in qmod.get_global_vars())
    pipe = tvm_pipelines.get("edgellm", HOST)
    run = {}
    for k, m in (("fp32", mod), ("int8", qmod)):
        vm = relax.VirtualMachine(tvm.compile(m, HOST, relax_pipeline=pipe), tvm.cpu())
        run[k] = vm
    xs = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    a = run["fp32"]["main"](tvm.runtime.tensor(xs)).numpy()
    b = run["int8"]["main"](tvm.runtime.tensor(xs)).numpy()
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 0.02 * (a.max() - a.min())


def test_vnni_intrinsic_has_no_per_call_buffers():
    """The tensorized dense keeps the broadcast activation in a register: no local buffers (each
    would be a TVMBackendAllocWorkspace / Free pair per register tile)."""
    from edgellm.backends.tvm_int8.compute import dense_int8_primfunc
    from edgellm.backends.tvm_int8.x86 import PackedDenseX86

    target = tvm.target.Target(targets.resolve("x86_64-avx512").tvm)
    sch = PackedDenseX86().apply(dense_int8_primfunc(64, 64, 48, 16, "uint8"), target, False)
    script = sch.mod["main"].script()
    assert "vpdpbusd" in script and "alloc_local" not in script
