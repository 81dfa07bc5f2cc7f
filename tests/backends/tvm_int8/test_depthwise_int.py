"""Integer depthwise conv (u8 codes x int8 weights, vpdpbusd over tap quads) and the im2col schedule.

Tolerances: both kernels are integer arithmetic / byte copies, compared for exact equality with numpy
(int64 for the conv). Model-level accuracy of kws-cnn / MobileNet-V2 with these kernels in:
test_models.py (top-1 and cosine vs fp32). On a CPU without AVX-512 VNNI the kernels run on Bochs's
emulated Sapphire Rapids (tests/x86_emulator.py).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from edgellm import targets
from edgellm.backends.tvm_int8 import depthwise as dw
from edgellm.backends.tvm_int8.compute import im2col_primfunc
from edgellm.backends.tvm_int8.schedule import Im2col
from edgellm.runtime import device
from tests import x86_emulator

CAN_RUN = {"avx512f", "avx512_vnni"} <= set(device.cpu_flags()) if hasattr(device, "cpu_flags") else False


def _target(name="x86_64-avx512"):
    return tvm.target.Target(targets.resolve(name).tvm)


def _build(shape, kh, kw, strides, padding, zp):
    from tvm import te

    q = te.placeholder(shape, "uint8", name="Q")
    w = te.placeholder((kh, shape[3], 4), "int8", name="W")
    out = dw.depthwise_u8_te(q, w, strides, padding, kw, zp)
    f = te.create_prim_func([q, w, out])
    sch = dw.DepthwiseU8X86().apply(f, _target(), False)
    assert sch is not None, "the integer depthwise rule did not schedule its own compute"
    return tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), _target()), [int(d) for d in out.shape]


def test_weight_packing_puts_taps_in_lanes_and_zeroes_the_spare_tap():
    w = np.arange(3 * 3 * 16, dtype=np.int64).reshape(3, 3, 1, 16).astype(np.int8)
    w4 = dw.pack_dw_weight(w)
    assert w4.shape == (3, 16, 4)
    np.testing.assert_array_equal(w4[:, :, :3], w[:, :, 0, :].transpose(0, 2, 1))
    assert not w4[:, :, 3].any()


def test_reference_matches_a_float_convolution():
    """The numpy reference itself: a direct loop over taps, checked against a float conv of (q - zp)."""
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, (1, 6, 5, 16)).astype(np.uint8)
    w = rng.integers(-127, 128, (3, 3, 1, 16)).astype(np.int8)
    zp = 100
    ref = dw.reference(q, dw.pack_dw_weight(w), (1, 1), (1, 1, 1, 1), 3, zp)
    x = np.pad(q.astype(np.float64) - zp, ((0, 0), (1, 1), (1, 1), (0, 0)))
    direct = sum(x[:, r:r + 6, s:s + 5, :] * w[r, s, 0].astype(np.float64) for r in range(3) for s in range(3))
    np.testing.assert_array_equal(ref - zp * w.astype(np.int64).sum(axis=(0, 1, 2)), direct.astype(np.int64))


@pytest.mark.parametrize("shape,kh,kw,strides,padding,zp", [
    ((1, 25, 20, 64), 3, 3, (1, 1), (1, 1, 1, 1), 128),   # kws-cnn's depthwise convs
    ((1, 14, 14, 32), 3, 3, (2, 2), (0, 0, 1, 1), 7),     # MobileNet-style stride 2, asymmetric pad
    ((1, 7, 7, 48), 3, 3, (1, 1), (1, 1, 1, 1), 0),
    ((2, 5, 9, 16), 2, 4, (1, 1), (0, 1, 1, 2), 255),     # batch 2, kw = 4 (no spare tap)
])
def test_integer_depthwise_is_exact_and_uses_vpdpbusd(shape, kh, kw, strides, padding, zp):
    lib, out_shape = _build(shape, kh, kw, strides, padding, zp)
    asm = lib.mod.inspect_source("asm")
    assert re.search(r"vpdpbusd\s+.*zmm", asm), "no 512-bit vpdpbusd in the generated code"
    rng = np.random.default_rng(1)
    q = rng.integers(0, 256, shape).astype(np.uint8)
    # extreme codes too: all-255 input against -128 / 127 weights must not overflow or saturate
    q[0, 0] = 255
    w = rng.integers(-128, 128, (kh, kw, 1, shape[3])).astype(np.int8)
    w[0, 0, 0, :8] = -128
    w4 = dw.pack_dw_weight(w)
    if CAN_RUN:
        dev = tvm.cpu()
        out = tvm.runtime.tensor(np.zeros(out_shape, np.int32), dev)
        lib["main"](tvm.runtime.tensor(q, dev), tvm.runtime.tensor(w4, dev), out)
        out = out.numpy()
    else:
        out = x86_emulator.run_primfunc(lib, [q, w4, np.zeros(out_shape, np.int32)], "sapphire_rapids")[2]
    np.testing.assert_array_equal(out, dw.reference(q, w4, strides, padding, kw, zp))


def test_rule_declines_targets_without_vnni_and_float_convs():
    from tvm import te

    q = te.placeholder((1, 6, 6, 16), "uint8", name="Q")
    w = te.placeholder((3, 16, 4), "int8", name="W")
    f = te.create_prim_func([q, w, dw.depthwise_u8_te(q, w, (1, 1), (1, 1, 1, 1), 3, 0)])
    no_vnni = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4"})
    assert dw.DepthwiseU8X86().apply(f, no_vnni, False) is None
    x = te.placeholder((1, 8, 8, 16), "float32", name="X")
    k = te.placeholder((3, 3, 1, 16), "float32", name="K")
    rh, rw = te.reduce_axis((0, 3), "rh"), te.reduce_axis((0, 3), "rw")
    c = te.compute((1, 6, 6, 16), lambda b, h, ww, ch: te.sum(x[b, h + rh, ww + rw, ch] * k[rh, rw, 0, ch], axis=[rh, rw]))
    assert dw.DepthwiseU8X86().apply(te.create_prim_func([x, k, c]), _target(), False) is None


def test_supported_shapes():
    assert dw.supported(3, 64) and dw.supported(4, 16)
    assert not dw.supported(5, 64)        # more than 4 taps a row
    assert not dw.supported(3, 24)        # channels not a multiple of 16
    assert not dw.supported(3, 64, (2, 2))


@pytest.mark.parametrize("shape,kh,kw,strides", [((1, 58, 23, 1), 10, 4, (2, 2)), ((1, 9, 9, 4), 3, 3, (2, 2))])
def test_im2col_rule_vectorizes_and_copies_exactly(shape, kh, kw, strides):
    f = im2col_primfunc(shape, "uint8", kh, kw, strides)
    sch = Im2col().apply(f.with_attr("global_symbol", "main"), _target(), False)
    assert sch is not None
    assert "T.vectorized" in sch.mod.script()
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), _target())
    b, hp, wp, cp = shape
    oh, ow = (hp - kh) // strides[0] + 1, (wp - kw) // strides[1] + 1
    p = np.random.default_rng(2).integers(0, 256, shape).astype(np.uint8)
    if CAN_RUN:
        dev = tvm.cpu()
        out = tvm.runtime.tensor(np.zeros((b * oh, ow, kh, kw * cp), np.uint8), dev)
        lib["main"](tvm.runtime.tensor(p, dev), out)
        out = out.numpy()
    else:
        out = x86_emulator.run_primfunc(lib, [p, np.zeros((b * oh, ow, kh, kw * cp), np.uint8)], "sapphire_rapids")[1]
    ref = np.stack([np.stack([p[0, i * strides[0]:i * strides[0] + kh, j * strides[1]:j * strides[1] + kw, :].reshape(kh, kw * cp)
                              for j in range(ow)]) for i in range(oh)])
    np.testing.assert_array_equal(out, ref)
