"""Weight-compressed linear layers for causal LMs on edge CPUs (TVM 0.27 Relax, ``relax.frontend.nn``).

Decode is a GEMV that streams the weights once per token, so its speed is the weight bytes it reads;
prefill is a matmul. ``QuantLinear`` emits one fused dequantize+matmul call per layer (a plain TE
definition, correct on any target, marked with the PrimFunc attribute ``ATTR``); the schedule rule
``QLinearRule`` replaces a marked function by a hand-written kernel for the target (``kernel``).
One PrimFunc holds both paths and branches on the dynamic row count ``b*s``: below the matmul's
tile height MR (6 on AVX2) a GEMV (weights unpacked in registers, the group scale applied once per
group: sum_k x_k (q_k d + m) = d sum_k x_k q_k + m sum_k x_k), otherwise a matmul over a
dequantized ``K x NR`` weight panel per parallel task with an MR x NR register tile. On AVX2 the
q4 GEMV quantizes x per group of 32 and uses integer dot products (vpmaddubsw) instead of unpacking
nibbles to float (``INTDOT``: 15-bit x by default, near exact; 8-bit x like llama.cpp optionally).

Schemes and layouts (what ``pack`` returns and ``QuantLinear`` declares):

* ``f32``: ``weight`` float32 [N, K] (row-major; the GEMV reads rows with lanes along K: fp32 is
  memory-bound whatever the layout).
* ``q8``: ``qweight`` int8 [N/16, K, 16], ``scale`` float16 [N/16, K/G, 16]; w = q * d (GGUF Q8_0
  when G = 32, per output channel when G = K).
* ``q4``: ``qweight`` uint8 [N/16, K/2, 16], ``scale`` and ``zero`` float16 [N/16, K/32, 16];
  w = q * d + m. Along K a row keeps GGUF's Q4_0/Q4_1 block order (byte ``g*16 + i``: element
  ``g*32 + i`` in the low nibble, ``g*32 + 16 + i`` in the high one).

Quantized rows are interleaved by 16 (row ``n`` is lane ``n % 16`` of block ``n // 16``; N must be a
multiple of 16) so that the GEMV's lanes run along N: one 16-byte load feeds 16 rows, the scales
are vector loads, no horizontal sums -- unpacking, not memory, bounds a quantized GEMV on two cores
and this layout halves its instructions against row-major lanes along K. The matmul's dequantized
panels are then contiguous too. ``QuantLinear.gather`` reads rows back (a tied embedding).
"""

from __future__ import annotations

import os

import numpy as np
import tvm
from tvm import s_tir, te, tirx
from tvm.relax.frontend import nn
from tvm.script import tirx as T

from edgellm.backends.tvm_cpu._common import NotApplicable, SafeRule

__all__ = [
    "ATTR",
    "SCHEMES",
    "QLinearRule",
    "QuantLinear",
    "dequantize",
    "kernel",
    "pack",
    "schedule_pass",
    "schedule_rules",
]

SCHEMES = ("f32", "q8", "q4")
#: PrimFunc attribute marking a fused dequantize+matmul: "<scheme>:<group>"
ATTR = "edgellm.qlinear"
Q4_GROUP = 32
#: quantized rows interleaved per block
IL = 16
#: q4 decode GEMV on AVX2 with integer dot products (vpmaddubsw, u8 nibbles x s8 activations) on
#: the activations quantized per group of 32 (scale amax / qmax, exact float sum of the quantized
#: values per group, as GGUF's Q8_1): "i16" (default) rounds x to 15 bits split into two int8
#: parts (max error ~5e-5 of the largest output), "i8" to 8 bits like llama.cpp (~5e-3, a little
#: faster); "" / "0" keeps the float GEMV. Env EDGELLM_QLINEAR_INTDOT; other targets: float.
INTDOT = os.environ.get("EDGELLM_QLINEAR_INTDOT", "i16").strip().lower()

# GGUF: name -> (ggml_type id, bytes per 32-element block)
_GGUF_TYPES = {"Q4_0": (2, 18), "Q4_1": (3, 20), "Q8_0": (8, 34)}


# ----------------------------------------------------------------------------------------------
# packing (numpy)

def _default_group(scheme: str, k: int, group: int | None) -> int:
    if scheme == "f32":
        return k
    if scheme == "q4":
        if group not in (None, Q4_GROUP):
            raise ValueError("q4 uses groups of 32")
        group = Q4_GROUP
    group = k if group is None else int(group)
    if k % group or group % 4:
        raise ValueError(f"group {group} must divide K={k} and be a multiple of 4")
    return group


def param_specs(scheme: str, n: int, k: int, group: int | None = None) -> dict[str, tuple[tuple, str]]:
    """name -> (shape, dtype) of the arrays a scheme stores, in kernel argument order."""
    g = _default_group(scheme, k, group)
    if scheme == "f32":
        return {"weight": ((n, k), "float32")}
    if n % IL:
        raise ValueError(f"{scheme} needs N % {IL} == 0 (N={n})")
    if scheme == "q8":
        return {"qweight": ((n // IL, k, IL), "int8"), "scale": ((n // IL, k // g, IL), "float16")}
    if scheme == "q4":
        return {"qweight": ((n // IL, k // 2, IL), "uint8"), "scale": ((n // IL, k // g, IL), "float16"),
                "zero": ((n // IL, k // g, IL), "float16")}
    raise ValueError(f"unknown scheme {scheme!r}; one of {SCHEMES}")


def _nibbles_to_bytes(q: np.ndarray) -> np.ndarray:
    """[N, K] values 0..15 -> [N, K/2] uint8 in GGUF block order."""
    n, k = q.shape
    q = q.reshape(n, k // 32, 2, 16).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2)


def _interleave(a: np.ndarray) -> np.ndarray:
    """[N, C] -> [N/16, C, 16] (q4's row interleave)."""
    n, c = a.shape
    if n % IL:
        raise ValueError(f"N % {IL} != 0 (N={n})")
    return np.ascontiguousarray(a.reshape(n // IL, IL, c).transpose(0, 2, 1))


def _deinterleave(a: np.ndarray) -> np.ndarray:
    nb, c, il = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1)).reshape(nb * il, c)


def _q4_arrays(qbytes, d, m) -> dict[str, np.ndarray]:
    return {"qweight": _interleave(qbytes), "scale": _interleave(d), "zero": _interleave(m)}


def _bytes_to_nibbles(b: np.ndarray) -> np.ndarray:
    n, kh = b.shape
    b = b.reshape(n, kh // 16, 16)
    return np.stack([b & 15, b >> 4], axis=2).reshape(n, kh * 2)


def pack(scheme: str, w: np.ndarray | None = None, *, group: int | None = None,
         gguf_type: str | int | None = None, gguf_raw: np.ndarray | bytes | None = None,
         shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The arrays of ``QuantLinear(K, N, scheme, group)``, from a float32 weight [N, K] (quantized:
    q8 symmetric absmax/127 per group, q4 min/max per group like GGUF Q4_1) or from raw GGUF blocks
    (Q4_0 / Q4_1 -> q4, Q8_0 -> q8 with group 32) copied without re-quantizing. ``gguf_raw``: the
    tensor's bytes, [N, K/32 * block_bytes] or flat with ``shape=(N, K)``."""
    if gguf_raw is not None:
        return _pack_gguf(scheme, gguf_type, gguf_raw, shape)
    w = np.ascontiguousarray(w, dtype=np.float32)
    n, k = w.shape
    g = _default_group(scheme, k, group)
    if scheme == "f32":
        return {"weight": w}
    wg = w.reshape(n, k // g, g)
    if scheme == "q8":
        d = (np.abs(wg).max(axis=2) / 127.0).astype(np.float16)
        df = d.astype(np.float32)[:, :, None]
        inv = np.divide(1.0, df, out=np.zeros_like(df), where=df != 0)
        q = np.clip(np.rint(wg * inv), -127, 127).astype(np.int8)
        return {"qweight": _interleave(q.reshape(n, k)), "scale": _interleave(d)}
    if scheme == "q4":
        lo, hi = wg.min(axis=2), wg.max(axis=2)
        d = ((hi - lo) / 15.0).astype(np.float16)
        m = lo.astype(np.float16)
        df = d.astype(np.float32)[:, :, None]
        inv = np.divide(1.0, df, out=np.zeros_like(df), where=df != 0)
        q = np.clip(np.rint((wg - m.astype(np.float32)[:, :, None]) * inv), 0, 15)
        return _q4_arrays(_nibbles_to_bytes(q.reshape(n, k)), d, m)
    raise ValueError(f"unknown scheme {scheme!r}; one of {SCHEMES}")


def _pack_gguf(scheme, gguf_type, raw, shape) -> dict[str, np.ndarray]:
    names = {v[0]: k for k, v in _GGUF_TYPES.items()}
    tname = names.get(gguf_type, gguf_type) if not isinstance(gguf_type, str) else gguf_type.upper()
    tname = getattr(tname, "name", tname)  # a gguf.GGMLQuantizationType
    if tname not in _GGUF_TYPES:
        raise ValueError(f"GGUF type {gguf_type!r} not supported (Q4_0, Q4_1, Q8_0)")
    want = "q8" if tname == "Q8_0" else "q4"
    if scheme != want:
        raise ValueError(f"GGUF {tname} packs as {want!r}, not {scheme!r}")
    bsize = _GGUF_TYPES[tname][1]
    raw = np.frombuffer(raw, np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else np.asarray(raw)
    raw = raw.view(np.uint8)
    if shape is not None:
        n, k = shape
    else:
        n, k = raw.shape[0], raw.shape[1] // bsize * 32
    blocks = raw.reshape(n, k // 32, bsize)
    d = np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16)[:, :, 0]
    if tname == "Q8_0":
        q = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(n, k)
        return {"qweight": _interleave(q), "scale": _interleave(d)}
    if tname == "Q4_0":
        qs, m = blocks[:, :, 2:], (d.astype(np.float32) * -8.0).astype(np.float16)
        if not np.array_equal(m.astype(np.float32), d.astype(np.float32) * -8.0):
            raise ValueError("Q4_0 scale * -8 overflows float16")
    else:
        qs, m = blocks[:, :, 4:], np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16)[:, :, 0]
    return _q4_arrays(np.ascontiguousarray(qs).reshape(n, k // 2), d, m)


def dequantize(scheme: str, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The float32 weight [N, K] the kernels compute with (the exact reference)."""
    if scheme == "f32":
        return np.asarray(arrays["weight"], np.float32)
    q, d = arrays["qweight"], arrays["scale"].astype(np.float32)
    if scheme == "q8":
        q, d = _deinterleave(q), _deinterleave(d)
        n, k = q.shape
        g = k // d.shape[1]
        return (q.astype(np.float32).reshape(n, k // g, g) * d[:, :, None]).reshape(n, k)
    if scheme == "q4":
        q, d, m = _deinterleave(q), _deinterleave(d), _deinterleave(arrays["zero"].astype(np.float32))
        n, k = q.shape[0], q.shape[1] * 2
        qf = _bytes_to_nibbles(q).astype(np.float32).reshape(n, k // 32, 32)
        return (qf * d[:, :, None] + m[:, :, None]).reshape(n, k)
    raise ValueError(f"unknown scheme {scheme!r}")


# ----------------------------------------------------------------------------------------------
# the nn module and its compute definition

def _te_weight(scheme: str, g: int, ws):
    """w(j, k) -> the float32 weight element, as a TE expression over the stored arrays."""

    def w(j, kk):
        if scheme == "f32":
            return ws[0][j, kk]
        if scheme == "q8":
            return (ws[0][j // IL, kk, j % IL].astype("float32")
                    * ws[1][j // IL, kk // g, j % IL].astype("float32"))
        byte = ws[0][j // IL, (kk // 32) * 16 + kk % 16, j % IL].astype("int32")
        nib = tirx.Select(kk % 32 < 16, byte & 15, byte >> 4).astype("float32")
        gi = (j // IL, kk // 32, j % IL)
        return nib * ws[1][gi].astype("float32") + ws[2][gi].astype("float32")

    return w


def _te_qlinear(scheme: str, n: int, k: int, g: int):
    """The fused op as plain TE: the semantic reference any rule (or none) can schedule."""

    def f(x, *ws):
        r = te.reduce_axis((0, k), name="k")
        w = _te_weight(scheme, g, ws)
        return te.compute((x.shape[0], x.shape[1], n), lambda b, s, j: te.sum(x[b, s, r] * w(j, r), axis=r),
                          name="qlinear")

    return f


class QuantLinear(nn.Module):
    """y = x @ W.T without bias; W stored as ``scheme`` (see module doc), x [b, s, K] float32."""

    def __init__(self, in_features: int, out_features: int, scheme: str = "q4", group: int | None = None):
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.group = _default_group(scheme, in_features, group)
        for name, (shape, dtype) in param_specs(scheme, out_features, in_features, self.group).items():
            setattr(self, name, nn.Parameter(shape, dtype))
        self._names = list(param_specs(scheme, out_features, in_features, self.group))

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if x.dtype != "float32":
            x = x.astype("float32")
        fn = _te_qlinear(self.scheme, self.out_features, self.in_features, self.group)
        # op_pattern 8 (opaque): FuseOps leaves the call alone, so the rule finds it by its attribute
        return nn.op.tensor_expr_op(fn, "qlinear_" + self.scheme, [x] + self._params(),
                                    attrs={ATTR: f"{self.scheme}:{self.group}", "op_pattern": 8})

    def gather(self, ids: nn.Tensor) -> nn.Tensor:
        """Rows ``ids`` of W dequantized, float32 [len(ids), K]: a tied embedding reads the head's arrays."""

        def fn(idx, *ws):
            w = _te_weight(self.scheme, self.group, ws)
            return te.compute((idx.shape[0], self.in_features), lambda t, kk: w(idx[t], kk), name="gather_rows")

        return nn.op.tensor_expr_op(fn, "qlinear_gather_" + self.scheme, [ids] + self._params())

    def _params(self) -> list:
        return [getattr(self, a) for a in self._names]


# ----------------------------------------------------------------------------------------------
# the scheduled kernel

def _isa(target) -> tuple[int, int]:
    """(fp32 lanes, vector registers) of an llvm target."""
    from edgellm.backends.tvm_cpu.target_info import num_vector_registers, vector_lanes

    return vector_lanes(target), num_vector_registers(target)


def _has_avx2(target) -> bool:
    """True for an x86 llvm target with AVX2 (x86-64-v3 and up): the q4 decode GEMV's integer path."""
    from edgellm.backends.tvm_cpu.target_info import _AVX2_CPUS, _AVX512_CPUS, _attrs

    if target is None or target.kind.name != "llvm":
        return False
    mcpu, mattr, mtriple = _attrs(target)
    if mtriple and not mtriple.startswith(("x86_64", "i686", "i386", "amd64")):
        return False
    if "-avx2" in mattr:
        return False
    return "+avx2" in mattr or "+avx512f" in mattr or mcpu in _AVX2_CPUS or mcpu in _AVX512_CPUS


def _unroll_div(n: int, cap: int = 8) -> int:
    u = min(n, cap)
    while n % u:
        u -= 1
    return u


def kernel(scheme: str, n: int, k: int, group: int, target, b=None, s=None, rows: int | None = None,
           intdot: bool | None = None) -> tirx.PrimFunc:
    """The scheduled fused kernel (x [b, s, K], weights..., out [b, s, N]) for ``target``.
    ``b``/``s``: the ints or tirx.Vars of the call's shape (fresh vars when None); ``rows``: the
    f32 GEMV's rows per task (tuning); ``intdot``: the q4 decode GEMV's integer form, "i16",
    "i8" or False (float; None: ``INTDOT`` on AVX2 targets, float elsewhere; see ``INTDOT``)."""
    lanes, nregs = _isa(target)
    if intdot is None:
        intdot = INTDOT if _has_avx2(target) else False
    if intdot is True:
        intdot = "i16"
    if intdot in ("", "0", "off", "false", "none"):
        intdot = False
    if intdot not in (False, "i8", "i16"):
        raise ValueError(f"intdot {intdot!r}: 'i16', 'i8' or False")
    g = _default_group(scheme, k, group)
    L = lanes
    while L > 4 and (g % L or k % L):
        L //= 2
    if k % L or (scheme != "f32" and g % 4) or n % (8 if scheme == "f32" else IL):
        raise ValueError(f"unsupported shape N={n} K={k} group={g}")
    ng = k // g
    B = tirx.Var("b", "int64") if b is None else b
    S = tirx.Var("s", "int64") if s is None else s
    # f32 GEMV: R rows per task, lanes along K
    R = rows or 4
    # matmul: NR output columns (a multiple of the vector) x MR rows of accumulators in registers
    NR = 16 if lanes <= 8 else 32
    while n % NR:
        NR //= 2
    nv = max(NR // lanes, 1)
    MR = max(1, min(8, (nregs - nv - 1) // nv))
    TB = max(1, (1 << 20) // (MR * k * 4))          # matmul row tiles per x block
    CK = _unroll_div(k // L, 8)                     # f32 GEMV chunk unroll
    U8 = _unroll_div(g // 4, 2)                     # q8 GEMV: 4-k steps unrolled per iteration

    def q4w(Q, D, Z, blk, c, gi, j, high: bool):
        byte = T.Cast("int32", Q[blk, c, j])
        nib = (byte >> 4) if high else (byte & 15)
        return T.Cast("float32", nib) * T.Cast("float32", D[blk, gi, j]) + T.Cast("float32", Z[blk, gi, j])

    @T.macro
    def matmul(Xf, Of, M, dequant_panel):
        # M >= MR here. Tile t covers rows [r0, r0 + MR) with r0 = min(t * MR, M - MR): the last tile
        # overlaps its neighbour instead of running a slow remainder (shared rows get equal values).
        # Blocks of TB tiles (~1 MB of x) keep x in cache across the panels of a block.
        for mb in range((M + MR * TB - 1) // (MR * TB)):
            for nb in T.parallel(n // NR):
                wt = T.decl_buffer((k, NR), "float32")
                dequant_panel(wt, nb)
                acc = T.decl_buffer((MR, NR), "float32", scope="local")
                for t in range(mb * TB, T.min((M + MR - 1) // MR, mb * TB + TB)):
                    for mi in T.unroll(MR):
                        for j in T.vectorized(NR):
                            acc[mi, j] = T.float32(0)
                    for kk in range(k):
                        for mi in T.unroll(MR):
                            for j in T.vectorized(NR):
                                acc[mi, j] = acc[mi, j] + Xf[T.min(t * MR, M - MR) + mi, kk] * wt[kk, j]
                    for mi in T.unroll(MR):
                        for j in T.vectorized(NR):
                            Of[T.min(t * MR, M - MR) + mi, nb * NR + j] = acc[mi, j]

    @T.macro
    def hsum_store(Of, acc, m, row0):
        for r in T.unroll(R):
            tot = T.decl_buffer((1,), "float32", scope="local")
            tot[0] = T.float32(0)
            for j in T.unroll(L):
                tot[0] = tot[0] + acc[r, j]
            Of[m, row0 + r] = tot[0]

    if scheme == "f32":
        @T.macro
        def panel_f32(W, wt, nb):
            for r in range(NR):
                for kc in range(k // L):
                    for j in T.vectorized(L):
                        wt[kc * L + j, r] = W[nb * NR + r, kc * L + j]

        @T.prim_func(s_tir=True, private=True)
        def qlinear_f32(X: T.Buffer((B, S, k), "float32"), W: T.Buffer((n, k), "float32"),
                        O: T.Buffer((B, S, n), "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            Xf = T.decl_buffer((B * S, k), "float32", data=X.data)
            Of = T.decl_buffer((B * S, n), "float32", data=O.data)
            if B * S < MR:
                for nb in T.parallel(n // R):
                    acc = T.decl_buffer((R, L), "float32", scope="local")
                    for m in range(B * S):
                        for r in T.unroll(R):
                            for j in T.vectorized(L):
                                acc[r, j] = T.float32(0)
                        for co in range(k // (L * CK)):
                            for r in T.unroll(R):
                                for ci in T.unroll(CK):
                                    for j in T.vectorized(L):
                                        acc[r, j] = acc[r, j] + Xf[m, (co * CK + ci) * L + j] * W[nb * R + r, (co * CK + ci) * L + j]
                        hsum_store(Of, acc, m, nb * R)
            else:
                matmul(Xf, Of, B * S, lambda wt, nb: panel_f32(W, wt, nb))
        return qlinear_f32

    if scheme == "q8":
        @T.macro
        def panel_q8(Q, D, wt, nb):
            for sb in range(NR // IL):
                for kk in range(k):
                    for j in T.vectorized(IL):
                        wt[kk, sb * IL + j] = T.Cast("float32", Q[nb * (NR // IL) + sb, kk, j]) * T.Cast(
                            "float32", D[nb * (NR // IL) + sb, kk // g, j])

        @T.prim_func(s_tir=True, private=True)
        def qlinear_q8(X: T.Buffer((B, S, k), "float32"), Q: T.Buffer((n // IL, k, IL), "int8"),
                       D: T.Buffer((n // IL, ng, IL), "float16"), O: T.Buffer((B, S, n), "float32")):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            Xf = T.decl_buffer((B * S, k), "float32", data=X.data)
            Of = T.decl_buffer((B * S, n), "float32", data=O.data)
            if B * S < MR:
                # lanes along N, four partial sums per group to hide the FMA latency
                for nb in T.parallel(n // IL):
                    acc = T.decl_buffer((IL,), "float32", scope="local")
                    t = T.decl_buffer((4, IL), "float32", scope="local")
                    for m in range(B * S):
                        for j in T.vectorized(IL):
                            acc[j] = T.float32(0)
                        for gi in range(ng):
                            for p in T.unroll(4):
                                for j in T.vectorized(IL):
                                    t[p, j] = T.float32(0)
                            for kc in range(g // (4 * U8)):
                                for ku in T.unroll(U8):
                                    for e in T.unroll(4):
                                        for j in T.vectorized(IL):
                                            t[e, j] = t[e, j] + Xf[m, gi * g + (kc * U8 + ku) * 4 + e] * T.Cast(
                                                "float32", Q[nb, gi * g + (kc * U8 + ku) * 4 + e, j])
                            for j in T.vectorized(IL):
                                acc[j] = acc[j] + ((t[0, j] + t[1, j]) + (t[2, j] + t[3, j])) * T.Cast("float32", D[nb, gi, j])
                        for j in T.vectorized(IL):
                            Of[m, nb * IL + j] = acc[j]
            else:
                matmul(Xf, Of, B * S, lambda wt, nb: panel_q8(Q, D, wt, nb))
        return qlinear_q8

    @T.macro
    def panel_q4(Q, D, Z, wt, nb):
        for sb in range(NR // IL):
            for gi in range(ng):
                for i in range(16):
                    for j in T.vectorized(IL):
                        wt[gi * 32 + i, sb * IL + j] = q4w(Q, D, Z, nb * (NR // IL) + sb, gi * 16 + i, gi, j, False)
                    for j in T.vectorized(IL):
                        wt[gi * 32 + 16 + i, sb * IL + j] = q4w(Q, D, Z, nb * (NR // IL) + sb, gi * 16 + i, gi, j, True)

    def nib(Q, blk, c, j, high: bool):
        # the high nibble stays in place (16 q): a mask instead of shift + mask, scaled by 1/16 per group
        byte = T.Cast("int32", Q[blk, c, j])
        return T.Cast("float32", (byte & 240) if high else (byte & 15))

    @T.macro
    def gemv_q4_float(Xf, Of, Q, D, Z, M):
        # lanes along N; sum_k x_k (q_k d + m) = d * sum_k x_k q_k + m * sum_k x_k per group,
        # with four partial sums (low/high nibble x even/odd byte) to hide the FMA latency
        xs = T.decl_buffer((MR, ng), "float32")
        for m in range(M):
            for gi in range(ng):
                xs[m, gi] = T.float32(0)
                for i in range(32):
                    xs[m, gi] = xs[m, gi] + Xf[m, gi * 32 + i]
        for nb in T.parallel(n // IL):
            acc = T.decl_buffer((IL,), "float32", scope="local")
            t = T.decl_buffer((4, IL), "float32", scope="local")
            for m in range(M):
                for j in T.vectorized(IL):
                    acc[j] = T.float32(0)
                for gi in range(ng):
                    for p in T.unroll(4):
                        for j in T.vectorized(IL):
                            t[p, j] = T.float32(0)
                    for i2 in T.unroll(8):
                        for e in T.unroll(2):
                            for j in T.vectorized(IL):
                                t[e, j] = t[e, j] + Xf[m, gi * 32 + i2 * 2 + e] * nib(Q, nb, gi * 16 + i2 * 2 + e, j, False)
                            for j in T.vectorized(IL):
                                t[2 + e, j] = t[2 + e, j] + Xf[m, gi * 32 + 16 + i2 * 2 + e] * nib(Q, nb, gi * 16 + i2 * 2 + e, j, True)
                    for j in T.vectorized(IL):
                        acc[j] = acc[j] + ((t[0, j] + t[1, j]) + (t[2, j] + t[3, j]) * T.float32(0.0625)) * T.Cast("float32", D[nb, gi, j]) + T.Cast("float32", Z[nb, gi, j]) * xs[m, gi]
                for j in T.vectorized(IL):
                    Of[m, nb * IL + j] = acc[j]

    # integer q4 GEMV (AVX2, ``INTDOT``): per group of 32, x -> xq = round(x / dx), dx = amax / qmax,
    # and sum_k x_k (q_k d + m) ~= d dx sum_k xq_k q_k + m dx sum_k xq_k (exact for x rounded to
    # xq dx). A 64-byte load holds byte columns c..c+3 of 16 rows; vpunpck{l,h}bw of its halves give
    # U0 = [rows 0-7 of (c, c+2) | rows 0-7 of (c+1, c+3)] (U1: rows 8-15), each 16-bit lane one row's
    # two bytes, so vpmaddubsw (u8 nibbles x s8 x, from a table of the matching 32-byte patterns
    # built once per call) sums two k per row into int16. A group's 8 products per lane stay within
    # 8 * 15 * 256 = 30720 (no saturation); then int32 (sign extension) and one float FMA per group.
    def _u_idx(u):
        return [T.int32(((lane + 2 * e) * 16) + u * 8 + r) for lane in range(2) for r in range(8) for e in range(2)]

    def _half(u):
        return [T.int32(u * 8 + i) for i in range(8)]

    def pmadd(a, bx):
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"), a, bx,
                                       dtype="int16x16")

    # x parts per k: "i8" one (xq = round(x / dx), dx = amax / 127); "i16" two, xq = round(x / dx) with
    # dx = amax / 16383 split as 128 * xh + xl (xh in [-128, 127], xl in [0, 127]): twice the
    # vpmaddubsw, error ~1/128 of i8's
    XP = 2 if intdot == "i16" else 1
    QMAX = 16383.0 if XP == 2 else 127.0

    def xpart(v, p):
        if XP == 1:
            return T.Cast("int8", v)
        return T.Cast("int8", T.Select(p == 0, v >> 7, v & 127))

    def itot(sacc, u):
        def isum(p):
            return T.Cast("int32x8", T.Shuffle([sacc.vload([(u * XP + p) * 16], "int16x16")], _half(0))) + T.Cast(
                "int32x8", T.Shuffle([sacc.vload([(u * XP + p) * 16], "int16x16")], _half(1)))
        return isum(0) if XP == 1 else isum(0) * T.broadcast(T.int32(128), 8) + isum(1)

    @T.macro
    def gemv_q4_int(Xf, Of, Q, D, Z, M):
        xs = T.decl_buffer((MR, ng), "float32")
        xd = T.decl_buffer((MR, ng), "float32")
        xt = T.decl_buffer((MR * k * 8 * XP,), "int8")
        for m in range(M):
            for gi in range(ng):
                st = T.decl_buffer((3,), "float32", scope="local")
                st[0] = T.float32(0)
                st[1] = T.float32(0)
                for i in range(32):
                    st[1] = T.max(st[1], T.abs(Xf[m, gi * 32 + i]))
                xd[m, gi] = st[1] * T.float32(1.0 / QMAX)
                st[2] = T.if_then_else(st[1] > T.float32(0), T.float32(QMAX) / st[1], T.float32(0))
                # the sum of the quantized x (as GGUF's Q8_1): the result is then the exact product
                # with x rounded to xq * dx, whose error scales with |w|, not with |q d|
                for i in range(32):
                    st[0] = st[0] + T.round(Xf[m, gi * 32 + i] * st[2])
                xs[m, gi] = st[0] * xd[m, gi]
                for qd in range(4):
                    for h in range(2):
                        for p in range(XP):
                            for lane in range(2):
                                for r in range(8):
                                    for e in range(2):
                                        xt[m * k * 8 * XP + (((gi * 4 + qd) * 2 + h) * XP + p) * 32 + lane * 16 + r * 2 + e] = xpart(
                                            T.Cast("int32", T.round(Xf[m, gi * 32 + h * 16 + qd * 4 + lane + 2 * e] * st[2])), p)
        Qf = T.decl_buffer((n * k // 2,), "uint8", data=Q.data)
        for nb in T.parallel(n // IL):
            acc = T.decl_buffer((IL,), "float32", scope="local")
            sacc = T.decl_buffer((32 * XP,), "int16", scope="local")
            for m in range(M):
                for j in T.vectorized(IL):
                    acc[j] = T.float32(0)
                for gi in range(ng):
                    for j in T.vectorized(32 * XP):
                        sacc[j] = T.int16(0)
                    for qd in T.unroll(4):
                        for u in T.unroll(2):
                            for p in T.unroll(XP):
                                sacc[T.ramp((u * XP + p) * 16, 1, 16)] = sacc.vload([(u * XP + p) * 16], "int16x16") + pmadd(
                                    T.Shuffle([Qf.vload([(nb * (k // 2) + gi * 16 + qd * 4) * 16], "uint8x64")], _u_idx(u))
                                    & T.broadcast(T.uint8(15), 32),
                                    xt.vload([m * k * 8 * XP + (((gi * 4 + qd) * 2) * XP + p) * 32], "int8x32")) + pmadd(
                                    T.Shuffle([Qf.vload([(nb * (k // 2) + gi * 16 + qd * 4) * 16], "uint8x64")], _u_idx(u))
                                    >> T.broadcast(T.uint8(4), 32),
                                    xt.vload([m * k * 8 * XP + (((gi * 4 + qd) * 2 + 1) * XP + p) * 32], "int8x32"))
                    for u in T.unroll(2):
                        acc[T.ramp(u * 8, 1, 8)] = acc.vload([u * 8], "float32x8") + T.Cast("float32x8", itot(sacc, u)) * (
                            T.Cast("float32x8", D.vload([nb, gi, u * 8], "float16x8")) * T.broadcast(xd[m, gi], 8)) + T.Cast(
                            "float32x8", Z.vload([nb, gi, u * 8], "float16x8")) * T.broadcast(xs[m, gi], 8)
                for j in T.vectorized(IL):
                    Of[m, nb * IL + j] = acc[j]

    gemv_q4 = gemv_q4_int if intdot else gemv_q4_float

    @T.prim_func(s_tir=True, private=True)
    def qlinear_q4(X: T.Buffer((B, S, k), "float32"), Q: T.Buffer((n // IL, k // 2, IL), "uint8"),
                   D: T.Buffer((n // IL, ng, IL), "float16"), Z: T.Buffer((n // IL, ng, IL), "float16"),
                   O: T.Buffer((B, S, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        Xf = T.decl_buffer((B * S, k), "float32", data=X.data)
        Of = T.decl_buffer((B * S, n), "float32", data=O.data)
        if B * S < MR:
            gemv_q4(Xf, Of, Q, D, Z, B * S)
        else:
            matmul(Xf, Of, B * S, lambda wt, nb: panel_q4(Q, D, Z, wt, nb))
    return qlinear_q4


# ----------------------------------------------------------------------------------------------
# the schedule rule

class QLinearRule(SafeRule):
    """Replaces a function marked ``ATTR`` by ``kernel(...)`` for the target (None for anything else)."""

    def schedule(self, sch, func, target):
        tag = func.attrs.get(ATTR, None) if func.attrs else None
        if tag is None:
            raise NotApplicable("not a qlinear")
        scheme, group = str(tag).split(":")
        bufs = [func.buffer_map[p] for p in func.params] if getattr(func, "buffer_map", None) else list(func.params)
        x, out = bufs[0], bufs[-1]
        k, n = int(x.shape[2]), int(out.shape[2])
        specs = param_specs(scheme, n, k, int(group))
        if len(bufs) != len(specs) + 2 or len(x.shape) != 3:
            raise NotApplicable("unexpected signature")
        for buf, (shape, dtype) in zip(bufs[1:-1], specs.values()):
            if tuple(int(v) for v in buf.shape) != shape or str(buf.dtype) != dtype:
                raise NotApplicable("unexpected weight buffer")
        new = kernel(scheme, n, k, int(group), target, b=x.shape[0], s=x.shape[1])
        new = new.with_attr(ATTR, str(tag))
        for key in ("global_symbol", "target"):
            if func.attrs and key in func.attrs:
                new = new.with_attr(key, func.attrs[key])
        return s_tir.Schedule(new)


def schedule_rules() -> list:
    """Rules to run before edgellm's generic ones."""
    return [QLinearRule()]


def schedule_pass(target=None) -> tvm.transform.Pass:
    """``schedule_rules()`` as one module pass (for ``pipeline(target, before_rules=[...])``); it
    takes the target from each function or the enclosing ``with target:``."""
    from edgellm.backends.tvm_cpu.apply import ApplyVerifiedSchedule

    return ApplyVerifiedSchedule(*schedule_rules())
