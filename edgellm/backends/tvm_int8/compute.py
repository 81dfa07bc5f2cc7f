"""The int8 compute definitions edgellm's TVM int8 path emits (shared by the x86 and arm rules).

Keep this form stable: the schedule rules (``x86.py``: AVX-512 VNNI ``vpdpbusd``;
``arm.py``: NEON ``sdot``) match exactly this reduction.

Packed dense, int32 accumulate::

    C[m, n] (int32) = sum_k int32(A[m, k]) * int32(W[n // L, k // 4, n % L, k % 4])

* ``A``: ``[M, K]`` activations, ``uint8`` on x86 (``vpdpbusd`` is u8 x s8) or ``int8`` on
  arm64 (``sdot`` is s8 x s8); ``K`` is a multiple of 4 (the rewrite zero-pads).
* ``W``: ``[N // L, K // 4, L, 4]`` int8 weights, pre-packed at compile time (a constant):
  one register's worth (``L`` int32 lanes x 4 bytes) is 64 contiguous bytes on AVX-512
  (L = 16) and 16 bytes on NEON (L = 4). ``N`` is a multiple of ``L`` (zero-padded).
* ``C``: ``[M, N]`` int32.

Everything around it (quantize the activation, zero-point correction, dequantize,
bias, activation, requantize for the next layer) is ordinary Relax arithmetic that
FuseOps fuses into the same PrimFunc as prologue-free epilogue (see ``rewrite.py``).

``packing(target)`` says which (L, activation dtype) a target gets.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: the PrimFunc attribute that marks the packed int8 dense for the schedule rules
ATTR = "edgellm.int8_dense"
#: the PrimFunc attribute of ``im2col_primfunc`` (``schedule.Im2col`` schedules it)
ATTR_IM2COL = "edgellm.im2col"


def dense_int8_te(A, W, lanes: int, name: str = "dense_int8"):
    """TE compute of the packed dense above (``A``: te placeholder [M, K]; ``W``: [N//L, K//4, L, 4])."""
    from tvm import te

    M, K = A.shape
    NB, _, L, four = W.shape
    assert int(L) == lanes and int(four) == 4
    k = te.reduce_axis((0, K), name="k")
    return te.compute(
        (M, NB * L),
        lambda m, n: te.sum(
            A[m, k].astype("int32") * W[n // lanes, k // 4, n % lanes, k % 4].astype("int32"), axis=k),
        name=name,
    )


def dense_int8_primfunc(M: int, K: int, N: int, lanes: int, act_dtype: str):
    """A standalone PrimFunc (A, W) -> C of the packed dense, for kernels and tests."""
    from tvm import te

    A = te.placeholder((M, K), act_dtype, name="A")
    W = te.placeholder((N // lanes, K // 4, lanes, 4), "int8", name="W")
    C = dense_int8_te(A, W, lanes)
    return te.create_prim_func([A, W, C]).with_attr(ATTR, True)


def pack_weight(w_nk: np.ndarray, lanes: int) -> np.ndarray:
    """int8 ``[N, K]`` (N, K already multiples of lanes / 4) -> ``[N // L, K // 4, L, 4]``."""
    n, k = w_nk.shape
    assert n % lanes == 0 and k % 4 == 0, (n, k, lanes)
    return np.ascontiguousarray(w_nk.reshape(n // lanes, lanes, k // 4, 4).transpose(0, 2, 1, 3))


class Int8Kernel(NamedTuple):
    """What the packed dense looks like on a target: ``compute.packing``."""

    lanes: int       # int32 accumulator lanes of one vector register = output channels per weight panel row
    act_dtype: str   # "uint8" (x86: u8 x s8 instructions) or "int8" (arm64: s8 x s8)
    weight_max: int  # weights are symmetric in [-weight_max, weight_max]
    isa: str         # the instructions, for the manifest


def packing(target) -> Int8Kernel | None:
    """The int8 kernel edgellm has for an llvm target, or None.

    * x86 with AVX-512 VNNI: 16 lanes, ``vpdpbusd`` zmm; with AVX-VNNI (Alder Lake, Gracemont,
      Arrow Lake...): 8 lanes, ``vpdpbusd`` ymm. Exact u8 x s8 -> s32, full 8-bit weights.
    * x86 with AVX-512BW or AVX2 and no VNNI: ``vpmaddubsw`` (u8 x s8 pairs summed in *saturating*
      int16) + ``vpmaddwd`` with ones. Exact only while 2 * 255 * |w| <= 32767, so the weights are
      7-bit (|w| <= 63), as ONNX Runtime's ``reduce_range`` does for the same instructions
      (per-channel scales keep the loss small; its default instead lets the pair sums saturate).
    * aarch64: 4 lanes, s8 x s8 ``sdot`` (or NEON smull/sadalp without the dot-product extension).
    """
    from edgellm.backends.tvm_cpu.target_info import _attrs, vector_bits

    _, _, mtriple = _attrs(target)
    if mtriple.startswith(("aarch64", "arm64")):
        return Int8Kernel(4, "int8", 127, "arm64 sdot (dot-product extension)" if has_dotprod(target)
                          else "arm64 NEON smull/sadalp (no dot-product extension)")
    bits = vector_bits(target)
    if bits == 512:
        if has_vnni(target):
            return Int8Kernel(16, "uint8", 127, "avx512-vnni vpdpbusd")
        return Int8Kernel(16, "uint8", 63, "avx512bw vpmaddubsw + vpmaddwd (7-bit weights)")
    if bits == 256 and has_avx2(target):
        if has_avx_vnni(target):
            return Int8Kernel(8, "uint8", 127, "avx-vnni vpdpbusd")
        return Int8Kernel(8, "uint8", 63, "avx2 vpmaddubsw + vpmaddwd (7-bit weights)")
    return None


def is_aarch64(target) -> bool:
    from edgellm.backends.tvm_cpu.target_info import _attrs

    if target is None or target.kind.name != "llvm":
        return False
    return _attrs(target)[2].startswith(("aarch64", "arm64"))


def has_dotprod(target) -> bool:
    """True when the aarch64 target may use ``sdot`` (FEAT_DotProd).

    Taken from TVM's ``feature.has_dotprod``, which LLVM derives from ``mcpu`` + ``mattr``
    (``+dotprod``, a dot-product core such as cortex-a76 / neoverse-n1, ``+v8.4a``; ``-dotprod``
    wins).  It must never be wrong the other way: LLVM aborts the process on an ``sdot`` it
    cannot select, and a core without the extension dies of SIGILL."""
    if not is_aarch64(target):
        return False
    feature = target.attrs.get("feature.has_dotprod", None)
    if feature is not None:
        return bool(feature)
    from edgellm.backends.tvm_cpu.target_info import _attrs

    mattr = _attrs(target)[1]
    return "+dotprod" in mattr and "-dotprod" not in mattr


def has_vnni(target) -> bool:
    """AVX-512 VNNI (zmm ``vpdpbusd``)."""
    from edgellm.backends.tvm_cpu.target_info import _attrs

    mcpu, mattr, _ = _attrs(target)
    if "-avx512vnni" in mattr:
        return False
    return "+avx512vnni" in mattr or mcpu in (
        "cascadelake", "cooperlake", "icelake", "icelake-client", "icelake-server", "tigerlake",
        "rocketlake", "sapphirerapids", "graniterapids", "emeraldrapids", "znver4", "znver5")


def has_avx_vnni(target) -> bool:
    """AVX-VNNI: the VEX-encoded ymm ``vpdpbusd`` of cores without AVX-512 (Alder Lake's, Gracemont)."""
    from edgellm.backends.tvm_cpu.target_info import _attrs

    mcpu, mattr, _ = _attrs(target)
    if "-avxvnni" in mattr:
        return False
    return "+avxvnni" in mattr or mcpu in (
        "alderlake", "raptorlake", "meteorlake", "arrowlake", "arrowlake-s", "lunarlake", "gracemont",
        "sierraforest", "grandridge", "clearwaterforest", "pantherlake")


def has_avx2(target) -> bool:
    from edgellm.backends.tvm_cpu.target_info import _AVX2_CPUS, _attrs

    mcpu, mattr, _ = _attrs(target)
    return "-avx2" not in mattr and ("+avx2" in mattr or mcpu in _AVX2_CPUS)


def depthwise_dq_te(Q, W, strides, padding, scale: float, zero_point: int, name: str = "depthwise_conv2d_nhwc",
                    pad_value: float = 0.0):
    """NHWC depthwise conv reading 8-bit codes: ``pad_temp`` decodes ``(q - zp) * scale`` to f32
    (0 in the border), then the usual f32 multiply-accumulate with ``W [kh, kw, 1, C]`` (f32, or
    int8 codes converted in the loop; then the per-channel weight scale goes in the epilogue).
    ``pad_value``: the border value; the rewrite passes ``zero_point=0, pad_value=zp`` (the border
    is the code of real 0) and subtracts ``zp * sum(W)`` per channel in the epilogue: the decode is
    then a bare u8 -> f32 convert, and the f32 sums stay exact integers (|sum| < 2^24).

    The same two blocks as Relax's legalized depthwise conv (pad + reduction), so the fp32
    depthwise schedule rule takes it; the activations cross memory as 8 bits, not 32."""
    from tvm import te, tirx

    B, H, Wd, C = (int(d) for d in Q.shape)
    KH, KW = int(W.shape[0]), int(W.shape[1])
    pt, pl, pb, pr = padding
    sh, sw = strides
    Hp, Wp = H + pt + pb, Wd + pl + pr
    pad = te.compute(
        (B, Hp, Wp, C),
        lambda b, h, w, c: tirx.if_then_else(
            tirx.all(h >= pt, h < H + pt, w >= pl, w < Wd + pl),
            (Q[b, h - pt, w - pl, c].astype("float32") - float(zero_point)) * float(scale),
            tirx.const(pad_value, "float32")),
        name="pad_temp")
    OH, OW = (Hp - KH) // sh + 1, (Wp - KW) // sw + 1
    rh = te.reduce_axis((0, KH), name="rh")
    rw = te.reduce_axis((0, KW), name="rw")
    return te.compute(
        (B, OH, OW, C),
        lambda b, h, w, c: te.sum(pad[b, h * sh + rh, w * sw + rw, c] * W[rh, rw, 0, c].astype("float32"), axis=[rh, rw]),
        name=name)




def im2col_channels(c: int, kw: int) -> int:
    """Channels a stem's input is padded to so that one patch row (kw * Cp bytes) is a multiple
    of 4 (the dense's K groups): 3 -> 4 for a 3x3 RGB stem, 1 stays 1 for a 10x4 mono stem."""
    cp = c
    while (kw * cp) % 4:
        cp += 1
    return cp


def pad_codes_te(Q, padding, cp: int, pad_code: int, name: str = "pad_codes"):
    """``[B, H, W, C]`` codes -> ``[B, H + pt + pb, W + pl + pr, cp]``: ``pad_code`` (real 0) in the
    spatial border, 0 in the extra channels (their weights are 0)."""
    from tvm import te, tirx

    B, H, W, C = (int(d) for d in Q.shape)
    pt, pl, pb, pr = padding
    return te.compute(
        (B, H + pt + pb, W + pl + pr, cp),
        lambda b, h, w, c: tirx.if_then_else(
            c < C,
            tirx.if_then_else(tirx.all(h >= pt, h < H + pt, w >= pl, w < W + pl), Q[b, h - pt, w - pl, tirx.min(c, C - 1)],
                              tirx.const(pad_code, Q.dtype)),
            tirx.const(0, Q.dtype)),
        name=name)


def im2col_primfunc(shape, dtype: str, kh: int, kw: int, strides):
    """PrimFunc (P, out) of the patches of the padded codes ``P [B, Hp, Wp, Cp]``:
    ``out[b*OH + oh, ow, r, s*Cp + c] = P[b, oh*sh + r, ow*sw + s, c]``, viewed by the caller as
    ``[B*OH*OW, kh*kw*Cp]`` (the dense's A). Marked opaque so that FuseOps keeps the (recomputing)
    quantize / pad producers out of it: each code is read by kh*kw/(sh*sw) patches."""
    from tvm import te

    B, Hp, Wp, Cp = shape
    sh, sw = strides
    OH, OW = (Hp - kh) // sh + 1, (Wp - kw) // sw + 1
    P = te.placeholder((B, Hp, Wp, Cp), dtype, name="P")
    out = te.compute(
        (B * OH, OW, kh, kw * Cp),
        lambda bo, ow, r, sc: P[bo // OH, (bo % OH) * sh + r, ow * sw + sc // Cp, sc % Cp],
        name="im2col")
    f = te.create_prim_func([P, out]).with_attr("op_pattern", 8).with_attr(ATTR_IM2COL, True)  # kOpaque
    return f.without_attr("global_symbol") if hasattr(f, "without_attr") else f.with_attr("global_symbol", "im2col")
