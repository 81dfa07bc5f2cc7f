"""Fast CPU attention kernels for TVM's paged KV cache (``TIRPagedKVCache`` on llvm targets).

TVM 0.27 brings, for llvm targets, scalar single-threaded attention kernels
(``tvm/relax/frontend/nn/llm/_prefill_kernels.py`` / ``_decode_kernels.py``):

* ``_attention_prefill_ragged_cpu`` -- global symbol ``batch_prefill_ragged_kv``
  (Relax name ``tir_attention_prefill_ragged_cpu``): a prefill chunk attending to itself;
* ``_attention_prefill_cpu`` -- ``batch_prefill_paged_kv_cpu`` (``tir_attention_prefill_cpu``):
  a prefill chunk attending to the paged prefix of its sequence;
* ``_attention_decode_cpu`` -- ``batch_decode_paged_kv_cpu`` (``tir_attention_decode_cpu``):
  one query token per sequence attending to its pages.

``schedule_pass(target)`` replaces each of them (the ``_sliding_window`` variants are left
untouched) with a PrimFunc that has the *same parameters* (the very same parameter objects)
and the same semantics:

* output = softmax(q k^T * sm_scale) v with the kernels' causal mask, lse in log2 units
  (``m + log2(d)``), the same initial softmax state (m = -5e4, d = 1) and the same masked-score
  values as the originals (masked keys contribute exp2(masked - m), which is 0 in fp32);
* ``rotary_mode == 1`` (RoPE applied inside attention, ``RopeMode.INLINE``) runs the original
  kernel body unchanged: the new body is ``if rotary_mode == 1: <original> else: <fast>``.
  ``RopeMode.NORMAL`` / ``NONE`` caches pass rotary_mode 0.

The fast bodies are flash-attention style (online softmax over key tiles):

* prefill (ragged and paged prefix): one parallel task per (KV head, block of ``lanes`` query
  positions); the task's rows are the ``lanes * group`` (query position, query head) pairs
  of the block, all sharing one KV head (GQA: K/V are read once per group).  Q is held
  transposed (``QT[d, rows]``), so both GEMMs vectorize along the rows:
  ``S[j, rows] += k[j, dd] * QT[dd, rows]`` and ``OT[dd, rows] += v[j, dd] * P[j, rows]``
  (a broadcast of one K/V element times ``group`` vectors).  Causal: key tiles wholly above
  the block's diagonal are skipped.  Tasks are ordered so that static chunking over threads
  gets equal causal work.
  q.k uses JB keys and p.v DB head_dim columns per pass (register blocking, ``_blocking``).
  exp2 is a vectorizable polynomial (``_exp2``, rel. error ~2e-7) instead of libm calls.
  A paged prefill with an empty prefix (every first chunk) just writes the empty result.
* decode: one task per (sequence, query head); the q.k dot products vectorize along head_dim
  (4 keys at a time, ``lanes`` partial sums, horizontal add), p.v along head_dim; one key tile
  per KV page.  Runs on one thread below ``PAR_MIN`` keys x heads (short contexts), else parallel.

Vector width from ``edgellm.backends.tvm_cpu.target_info.vector_lanes`` (AVX-512 16,
AVX2 8, NEON 4).
"""

from __future__ import annotations

import math

import tvm
from tvm import tirx
from tvm.script import tirx as T

from edgellm.backends.tvm_cpu.target_info import num_vector_registers, vector_lanes

__all__ = ["KERNELS", "fast_attention_func", "schedule_pass"]

LOG2E = math.log2(math.exp(1))
# decode: (keys x query heads) below which the kernel runs on one thread. Measured on SmolLM2-135M (9 query heads,
# Intel AMX Xeon, 2 threads, side by side): 16384 (until stop 18) kept every context under 1,820 keys on one thread
# -- decode at a 720-token context 103 -> 129 tok/s with 2048, at 176 tokens 158 -> 174 with 1024, equal below
PAR_MIN = 1024
EXCLUDED = -1.0e30  # score of a key outside the processed range: exp2(EXCLUDED - m) == 0 exactly

# which kernel a PrimFunc is: by Relax function name or by global symbol
KERNELS = {
    "ragged": ("tir_attention_prefill_ragged_cpu", ("batch_prefill_ragged_kv", "batch_prefill_ragged_kv_cpu")),
    "prefill": ("tir_attention_prefill_cpu", ("batch_prefill_paged_kv_cpu",)),
    "decode": ("tir_attention_decode_cpu", ("batch_decode_paged_kv_cpu",)),
}
_PARAM_NAMES = {
    "ragged": ("q", "q_indptr", "k", "v", "kv_indptr", "q_rope_position", "k_rope_pos_offset", "output", "lse",
               "causal", "rotary_mode", "rope_scale", "rope_theta", "sm_scale"),
    "prefill": ("q", "q_indptr", "pages", "page_indptr", "page_values", "length_info", "k_rope_pos_offset",
                "q_rope_position", "output", "lse", "causal", "rotary_mode", "rope_scale", "rope_theta", "sm_scale"),
    "decode": ("Q", "pages", "page_table_indptr", "page_table_values", "length_info", "k_rope_pos_offset",
               "q_rope_position", "output", "lse", "rotary_mode", "rope_scale", "rope_theta", "sm_scale"),
}


def _kind(name: str, func) -> str | None:
    if not isinstance(func, tirx.PrimFunc):
        return None
    symbol = str(func.attrs.get("global_symbol", "")) if func.attrs is not None else ""
    for kind, (relax_name, symbols) in KERNELS.items():
        if name == relax_name or symbol in symbols:
            names = tuple(p.name for p in func.params)
            return kind if names == _PARAM_NAMES[kind] else None
    return None



def _exp2(x):
    """2**x for x <= 0 (float32), vectorizable: Cephes exp2f's polynomial (relative error
    <= 2e-7) times 2**round(x) built from the exponent bits; 0 below 2**-126 (LLVM would
    call libm's exp2f once per lane instead)."""
    x = T.max(x, T.float32(-127.0))
    fx = T.floor(x + T.float32(0.5))
    f = x - fx
    p = T.float32(1.535336188319500e-4)
    for c in (1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
              2.402264791363012e-1, 6.931472028550421e-1):
        p = p * f + T.float32(c)
    p = p * f + T.float32(1.0)
    scale = T.reinterpret("float32", T.shift_left(T.Cast("int32", fx) + 127, 23))
    return p * scale


def _blocking(group: int, nregs: int, tile: int, d_v: int) -> tuple[int, int]:
    """Register blocking of the prefill GEMMs: JB keys (q.k) / DB head_dim columns (p.v) per
    pass over the ``group`` row vectors; JB * group accumulators + group operands + 1 broadcast
    must fit in the ``nregs`` SIMD registers."""
    jb = 1
    while jb < 4 and (2 * jb) * group + group + 1 <= nregs and tile % (2 * jb) == 0:
        jb *= 2
    db = jb
    while d_v % db:
        db //= 2
    return jb, db


# --------------------------------------------------------------------------- ragged prefill
def _ragged_body(params, lanes: int, nregs: int, par_min: int):
    (q, q_indptr, k, v, kv_indptr, _qrp, _krp, output, lse, causal, _rm, _rs, _rt, sm_scale) = params
    _, h_q, d_qk = q.shape
    _, h_kv, d_v = v.shape
    h_q, d_qk, h_kv, d_v = int(h_q), int(d_qk), int(h_kv), int(d_v)
    batch_size = k_rope_pos_offset_len = _krp.shape[0]  # noqa: F841  (a Var)
    G = h_q // h_kv
    QB = lanes
    R = QB * G
    L = lanes
    RV = G
    TK = 16
    JB, DB = _blocking(G, nregs, TK, d_v)

    @T.macro
    def task_body(task, b, q_start, q_len, kv_start, kv_len, n_qb):
        with T.sblock("attn_task"):
            QT = T.sblock_alloc_buffer((d_qk, R), "float32")
            OT = T.sblock_alloc_buffer((d_v, R), "float32")
            ST = T.sblock_alloc_buffer((TK, R), "float32")
            acc = T.sblock_alloc_buffer((max(JB, DB) * R,), "float32")
            m = T.sblock_alloc_buffer((R,), "float32")
            mt = T.sblock_alloc_buffer((R,), "float32")
            alpha = T.sblock_alloc_buffer((R,), "float32")
            ls = T.sblock_alloc_buffer((R,), "float32")
            lim = T.sblock_alloc_buffer((R,), "int32")
            kidx = T.sblock_alloc_buffer((TK,), "int32")
            kvh: T.let[T.int32] = task % h_kv
            p: T.let[T.int32] = task // h_kv
            qb: T.let[T.int32] = T.Select(p % 2 == 0, p // 2, n_qb - 1 - p // 2)
            q0: T.let[T.int32] = qb * QB
            n_rows: T.let[T.int32] = T.min(QB, q_len - q0)
            # keys the block needs: causal rows see col < kv_len - q_len + row + 1; a row that sees
            # no key at all (kv_len < q_len) gets, as in TVM's kernel, the masked scores of all keys
            kv_lim: T.let[T.int32] = T.Select(T.And(causal > 0, kv_len - q_len + q0 + 1 > 0),
                                              T.min(kv_len, kv_len - q_len + q0 + n_rows), kv_len)
            for r in T.serial(R):
                lim[r] = T.Select(causal > 0, kv_len - q_len + q0 + r // G + 1, kv_len)
            for dd, r in T.grid(d_qk, R):
                QT[dd, r] = T.if_then_else(q0 + r // G < q_len,
                                           T.Cast("float32", q[q_start + T.min(q0 + r // G, q_len - 1), kvh * G + r % G, dd]),
                                           T.float32(0))
            for rv in T.unroll(RV):
                for rl in T.vectorized(L):
                    m[rv * L + rl] = T.float32(-5e4)
                    ls[rv * L + rl] = T.float32(1.0)
            for dd in T.serial(d_v):
                for rv in T.unroll(RV):
                    for rl in T.vectorized(L):
                        OT[dd, rv * L + rl] = T.float32(0)
            for t in T.serial((kv_lim + TK - 1) // TK):
                for j in T.serial(TK):
                    kidx[j] = kv_start + T.min(t * TK + j, kv_lim - 1)
                # S = K Q^T
                for j0 in T.serial(TK // JB):
                    for u in T.unroll(JB * RV):
                        for rl in T.vectorized(L):
                            acc[u * L + rl] = T.float32(0)
                    for dd in T.serial(d_qk):
                        for u in T.unroll(JB * RV):
                            for rl in T.vectorized(L):
                                acc[u * L + rl] = acc[u * L + rl] + T.Cast("float32", k[kidx[j0 * JB + u // RV], kvh, dd]) * QT[dd, (u % RV) * L + rl]
                    for u in T.unroll(JB * RV):
                        for rl in T.vectorized(L):
                            ST[j0 * JB + u // RV, (u % RV) * L + rl] = acc[u * L + rl]
                # mask, scale, running max
                for rv in T.unroll(RV):
                    for rl in T.vectorized(L):
                        mt[rv * L + rl] = m[rv * L + rl]
                for j in T.serial(TK):
                    for rv in T.unroll(RV):
                        for rl in T.vectorized(L):
                            ST[j, rv * L + rl] = T.Select(t * TK + j < kv_lim,
                                                T.Select(t * TK + j < lim[rv * L + rl],
                                                         ST[j, rv * L + rl] * (sm_scale * LOG2E),
                                                         T.float32(-5e4 * LOG2E) * sm_scale),
                                                T.float32(EXCLUDED))
                            mt[rv * L + rl] = T.max(mt[rv * L + rl], ST[j, rv * L + rl])
                for rv in T.unroll(RV):
                    for rl in T.vectorized(L):
                        alpha[rv * L + rl] = _exp2(m[rv * L + rl] - mt[rv * L + rl])
                        ls[rv * L + rl] = ls[rv * L + rl] * alpha[rv * L + rl]
                        m[rv * L + rl] = mt[rv * L + rl]
                for j in T.serial(TK):
                    for rv in T.unroll(RV):
                        for rl in T.vectorized(L):
                            ST[j, rv * L + rl] = _exp2(ST[j, rv * L + rl] - m[rv * L + rl])
                            ls[rv * L + rl] = ls[rv * L + rl] + ST[j, rv * L + rl]
                # O = O * alpha + P V
                for dd0 in T.serial(d_v // DB):
                    for u in T.unroll(DB * RV):
                        for rl in T.vectorized(L):
                            acc[u * L + rl] = OT[dd0 * DB + u // RV, (u % RV) * L + rl] * alpha[(u % RV) * L + rl]
                    for j in T.serial(TK):
                        for u in T.unroll(DB * RV):
                            for rl in T.vectorized(L):
                                acc[u * L + rl] = acc[u * L + rl] + T.Cast("float32", v[kidx[j], kvh, dd0 * DB + u // RV]) * ST[j, (u % RV) * L + rl]
                    for u in T.unroll(DB * RV):
                        for rl in T.vectorized(L):
                            OT[dd0 * DB + u // RV, (u % RV) * L + rl] = acc[u * L + rl]
            for r in T.serial(R):
                if q0 + r // G < q_len:
                    for dd in T.serial(d_v):
                        output[q_start + q0 + r // G, kvh * G + r % G, dd] = T.Cast(output.dtype, OT[dd, r] / ls[r])
                    lse[q_start + q0 + r // G, kvh * G + r % G] = m[r] + T.log2(ls[r])

    @T.prim_func(s_tir=True, check_well_formed=False)
    def fast():
        for b in T.serial(batch_size):
            with T.sblock("attn_seq"):
                q_start: T.let[T.int32] = q_indptr[b]
                q_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                kv_start: T.let[T.int32] = kv_indptr[b]
                kv_len: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                n_qb: T.let[T.int32] = (q_len + QB - 1) // QB
                for task in T.parallel(h_kv * n_qb):
                    task_body(task, b, q_start, q_len, kv_start, kv_len, n_qb)

    return fast.body


# --------------------------------------------------------------------------- paged prefill (prefix)
def _paged_prefill_body(params, lanes: int, nregs: int, par_min: int):
    (q, q_indptr, pages, page_indptr, page_values, length_info, _krp, _qrp, output, lse,
     causal, _rm, _rs, _rt, sm_scale) = params
    _, h_q, d = q.shape
    _, _, h_kv, page_size, _ = pages.shape
    h_q, d, h_kv, page_size = int(h_q), int(d), int(h_kv), int(page_size)
    batch_size = _krp.shape[0]
    G = h_q // h_kv
    QB = lanes
    R = QB * G
    L = lanes
    RV = G
    TK = page_size
    JB, DB = _blocking(G, nregs, TK, d)

    @T.macro
    def task_body(task, b, q_start, q_len, pg_begin, pg_end, kv_len, n_qb):
        with T.sblock("attn_task"):
            QT = T.sblock_alloc_buffer((d, R), "float32")
            OT = T.sblock_alloc_buffer((d, R), "float32")
            ST = T.sblock_alloc_buffer((TK, R), "float32")
            acc = T.sblock_alloc_buffer((max(JB, DB) * R,), "float32")
            m = T.sblock_alloc_buffer((R,), "float32")
            mt = T.sblock_alloc_buffer((R,), "float32")
            alpha = T.sblock_alloc_buffer((R,), "float32")
            ls = T.sblock_alloc_buffer((R,), "float32")
            lim = T.sblock_alloc_buffer((R,), "int32")
            kpg = T.sblock_alloc_buffer((TK,), "int32")
            koff = T.sblock_alloc_buffer((TK,), "int32")
            kvh: T.let[T.int32] = task % h_kv
            p: T.let[T.int32] = task // h_kv
            qb: T.let[T.int32] = T.Select(p % 2 == 0, p // 2, n_qb - 1 - p // 2)
            q0: T.let[T.int32] = qb * QB
            n_rows: T.let[T.int32] = T.min(QB, q_len - q0)
            # keys the block needs: causal rows see col < kv_len - q_len + row + 1; a row that sees
            # no key at all (kv_len < q_len) gets, as in TVM's kernel, the masked scores of all keys
            kv_lim: T.let[T.int32] = T.Select(T.And(causal > 0, kv_len - q_len + q0 + 1 > 0),
                                              T.min(kv_len, kv_len - q_len + q0 + n_rows), kv_len)
            for r in T.serial(R):
                lim[r] = T.Select(causal > 0, kv_len - q_len + q0 + r // G + 1, kv_len)
            for dd, r in T.grid(d, R):
                QT[dd, r] = T.if_then_else(q0 + r // G < q_len,
                                           T.Cast("float32", q[q_start + T.min(q0 + r // G, q_len - 1), kvh * G + r % G, dd]),
                                           T.float32(0))
            for rv in T.unroll(RV):
                for rl in T.vectorized(L):
                    m[rv * L + rl] = T.float32(-5e4)
                    ls[rv * L + rl] = T.float32(1.0)
            for dd in T.serial(d):
                for rv in T.unroll(RV):
                    for rl in T.vectorized(L):
                        OT[dd, rv * L + rl] = T.float32(0)
            for t in T.serial((kv_lim + TK - 1) // TK):
                for j in T.serial(TK):
                    kpg[j] = page_values[pg_begin + T.min(t * TK + j, kv_lim - 1) // page_size]
                    koff[j] = T.min(t * TK + j, kv_lim - 1) % page_size
                for j0 in T.serial(TK // JB):
                    for u in T.unroll(JB * RV):
                        for rl in T.vectorized(L):
                            acc[u * L + rl] = T.float32(0)
                    for dd in T.serial(d):
                        for u in T.unroll(JB * RV):
                            for rl in T.vectorized(L):
                                acc[u * L + rl] = acc[u * L + rl] + T.Cast("float32", pages[kpg[j0 * JB + u // RV], 0, kvh, koff[j0 * JB + u // RV], dd]) * QT[dd, (u % RV) * L + rl]
                    for u in T.unroll(JB * RV):
                        for rl in T.vectorized(L):
                            ST[j0 * JB + u // RV, (u % RV) * L + rl] = acc[u * L + rl]
                for rv in T.unroll(RV):
                    for rl in T.vectorized(L):
                        mt[rv * L + rl] = m[rv * L + rl]
                for j in T.serial(TK):
                    for rv in T.unroll(RV):
                        for rl in T.vectorized(L):
                            ST[j, rv * L + rl] = T.Select(t * TK + j < kv_lim,
                                                T.Select(t * TK + j < lim[rv * L + rl],
                                                         ST[j, rv * L + rl] * (sm_scale * LOG2E),
                                                         T.float32(-5e4)),
                                                T.float32(EXCLUDED))
                            mt[rv * L + rl] = T.max(mt[rv * L + rl], ST[j, rv * L + rl])
                for rv in T.unroll(RV):
                    for rl in T.vectorized(L):
                        alpha[rv * L + rl] = _exp2(m[rv * L + rl] - mt[rv * L + rl])
                        ls[rv * L + rl] = ls[rv * L + rl] * alpha[rv * L + rl]
                        m[rv * L + rl] = mt[rv * L + rl]
                for j in T.serial(TK):
                    for rv in T.unroll(RV):
                        for rl in T.vectorized(L):
                            ST[j, rv * L + rl] = _exp2(ST[j, rv * L + rl] - m[rv * L + rl])
                            ls[rv * L + rl] = ls[rv * L + rl] + ST[j, rv * L + rl]
                for dd0 in T.serial(d // DB):
                    for u in T.unroll(DB * RV):
                        for rl in T.vectorized(L):
                            acc[u * L + rl] = OT[dd0 * DB + u // RV, (u % RV) * L + rl] * alpha[(u % RV) * L + rl]
                    for j in T.serial(TK):
                        for u in T.unroll(DB * RV):
                            for rl in T.vectorized(L):
                                acc[u * L + rl] = acc[u * L + rl] + T.Cast("float32", pages[kpg[j], 1, kvh, koff[j], dd0 * DB + u // RV]) * ST[j, (u % RV) * L + rl]
                    for u in T.unroll(DB * RV):
                        for rl in T.vectorized(L):
                            OT[dd0 * DB + u // RV, (u % RV) * L + rl] = acc[u * L + rl]
            for r in T.serial(R):
                if q0 + r // G < q_len:
                    for dd in T.serial(d):
                        output[q_start + q0 + r // G, kvh * G + r % G, dd] = T.Cast(output.dtype, OT[dd, r] / ls[r])
                    lse[q_start + q0 + r // G, kvh * G + r % G] = m[r] + T.log2(ls[r])

    @T.prim_func(s_tir=True, check_well_formed=False)
    def fast():
        for b in T.serial(batch_size):
            with T.sblock("attn_seq"):
                q_start: T.let[T.int32] = q_indptr[b]
                q_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                pg_begin: T.let[T.int32] = page_indptr[b]
                pg_end: T.let[T.int32] = page_indptr[b + 1]
                kv_len: T.let[T.int32] = T.if_then_else(pg_begin != pg_end,
                                                         (pg_end - pg_begin - 1) * page_size + length_info[b], 0)
                n_qb: T.let[T.int32] = (q_len + QB - 1) // QB
                if kv_len == 0:  # no prefix (every first prefill chunk): what the general path gives, on one thread
                    for i, hh in T.grid(q_len, h_q):
                        for dd in T.serial(d):
                            output[q_start + i, hh, dd] = T.Cast(output.dtype, T.float32(0))
                        lse[q_start + i, hh] = T.float32(-5e4)
                else:
                    for task in T.parallel(h_kv * n_qb):
                        task_body(task, b, q_start, q_len, pg_begin, pg_end, kv_len, n_qb)

    return fast.body


# --------------------------------------------------------------------------- decode
def _decode_body(params, lanes: int, nregs: int, par_min: int):
    (Q, pages, page_table_indptr, page_table_values, length_info, _krp, _qrp, output, lse,
     _rm, _rs, _rt, sm_scale) = params
    B, h_q, d = Q.shape
    _, _, h_kv, page_size, _ = pages.shape
    h_q, d, h_kv, page_size = int(h_q), int(d), int(h_kv), int(page_size)
    G = h_q // h_kv
    L = lanes if d % lanes == 0 else 1
    NC = d // L
    TK = page_size
    KB = 4 if TK % 4 == 0 else 1

    @T.macro
    def task_body(task):
        with T.sblock("attn_task"):
            QL = T.sblock_alloc_buffer((d,), "float32")
            OL = T.sblock_alloc_buffer((d,), "float32")
            S = T.sblock_alloc_buffer((TK,), "float32")
            acc = T.sblock_alloc_buffer((KB * L,), "float32")
            st = T.sblock_alloc_buffer((4,), "float32")  # m, l, tile max, alpha
            b: T.let[T.int32] = task // h_q
            h: T.let[T.int32] = task % h_q
            pg_begin: T.let[T.int32] = page_table_indptr[b]
            pg_end: T.let[T.int32] = page_table_indptr[b + 1]
            kv_len: T.let[T.int32] = T.if_then_else(pg_begin != pg_end,
                                                     (pg_end - pg_begin - 1) * page_size + length_info[b], 0)
            for c in T.unroll(NC):
                for vv in T.vectorized(L):
                    QL[c * L + vv] = T.Cast("float32", Q[b, h, c * L + vv])
                    OL[c * L + vv] = T.float32(0)
            st[0] = T.float32(-5e4)
            st[1] = T.float32(1.0)
            for t in T.serial((kv_len + TK - 1) // TK):
                page_no: T.let[T.int32] = page_table_values[pg_begin + t]
                n: T.let[T.int32] = T.min(TK, kv_len - t * TK)
                # q.k for all TK slots of the page, KB keys at a time (independent FMA chains);
                # slots past the sequence end (stale cache memory) are masked out below
                for j0 in T.serial(TK // KB):
                    for ji in T.unroll(KB):
                        for vv in T.vectorized(L):
                            acc[ji * L + vv] = T.float32(0)
                    for c in T.serial(NC):
                        for ji in T.unroll(KB):
                            for vv in T.vectorized(L):
                                acc[ji * L + vv] = acc[ji * L + vv] + QL[c * L + vv] * T.Cast("float32", pages[page_no, 0, h // G, j0 * KB + ji, c * L + vv])
                    for ji in T.unroll(KB):
                        S[j0 * KB + ji] = T.float32(0)
                        for vv in T.unroll(L):
                            S[j0 * KB + ji] = S[j0 * KB + ji] + acc[ji * L + vv]
                for j in T.vectorized(TK):
                    S[j] = T.Select(j < n, S[j] * (sm_scale * LOG2E), T.float32(EXCLUDED))
                st[2] = st[0]
                for j in T.serial(TK):
                    st[2] = T.max(st[2], S[j])
                st[3] = _exp2(st[0] - st[2])
                st[0] = st[2]
                st[1] = st[1] * st[3]
                for j in T.vectorized(TK):
                    S[j] = _exp2(S[j] - st[0])
                for j in T.serial(TK):
                    st[1] = st[1] + S[j]
                for c in T.unroll(NC):
                    for vv in T.vectorized(L):
                        OL[c * L + vv] = OL[c * L + vv] * st[3]
                for j in T.serial(n):
                    for c in T.unroll(NC):
                        for vv in T.vectorized(L):
                            OL[c * L + vv] = OL[c * L + vv] + S[j] * T.Cast("float32", pages[page_no, 1, h // G, j, c * L + vv])
            for dd in T.serial(d):
                output[b, h, dd] = T.Cast(output.dtype, OL[dd] / st[1])
            lse[b, h] = st[0] + T.log2(st[1])

    @T.prim_func(s_tir=True, check_well_formed=False)
    def fast():
        if T.Cast("int64", page_table_indptr[B] - page_table_indptr[0]) * page_size * h_q < par_min:  # little work: no thread-pool launch
            for task in T.serial(B * h_q):
                task_body(task)
        else:
            for task in T.parallel(B * h_q):
                task_body(task)

    return fast.body


_BODIES = {"ragged": _ragged_body, "prefill": _paged_prefill_body, "decode": _decode_body}


def fast_attention_func(kind: str, func: tirx.PrimFunc, lanes: int, nregs: int | None = None,
                        par_min: int = PAR_MIN) -> tirx.PrimFunc:
    """The replacement of one of TVM's CPU attention PrimFuncs (``kind`` in KERNELS): ``lanes``
    fp32 SIMD lanes, ``nregs`` SIMD registers (default: 16 for 8 lanes -- AVX2 --, else 32);
    decode calls with less work than ``par_min`` (keys x query heads, all sequences) stay on one
    thread (a thread-pool launch costs about as much as a short-context decode)."""
    params = list(func.params)
    nregs = nregs or (16 if lanes == 8 else 32)
    fast = _BODIES[kind](params, lanes, nregs, par_min)
    rotary_mode = params[_PARAM_NAMES[kind].index("rotary_mode")]
    body = tirx.IfThenElse(rotary_mode == 1, func.body, fast)
    new = tirx.PrimFunc(params, body, func.ret_type, func.attrs)
    return new.with_attr("tirx.is_scheduled", True)


def schedule_pass(target, kinds=tuple(KERNELS), par_min: int = PAR_MIN) -> tvm.transform.Pass:
    """IRModule pass: replace TVM's scalar CPU attention kernels (``kinds``: a subset of
    ``KERNELS``' keys) by the fast ones above (``par_min``: see fast_attention_func)."""
    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(target)
    lanes = max(vector_lanes(target), 1)
    nregs = num_vector_registers(target)

    @tvm.transform.module_pass(opt_level=0, name="EdgeLLMCPUAttention")
    def _pass(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        updated = {}
        for gv, func in mod.functions_items():
            kind = _kind(gv.name_hint, func)
            if kind is None or kind not in kinds or (func.attrs is not None and "edgellm.fast_attention" in func.attrs):
                continue
            updated[gv] = fast_attention_func(kind, func, lanes, nregs, par_min).with_attr("edgellm.fast_attention", True)
        for gv, func in mod.functions_items():
            # the cache's attention kernels read q / k / v / pages and write output and lse, separate arrays: noalias
            # is true of them, and without it TVM's codegen takes the alias information from the noalias kernels
            # compiled before them (backends/tvm_cpu/vm_passes.py, MarkSingleBufferNoAlias)
            func = updated.get(gv, func)
            if isinstance(func, tirx.PrimFunc) and {"output", "lse"} <= {p.name for p in func.params} \
                    and not (func.attrs is not None and func.attrs.get("tirx.noalias", False)):
                updated[gv] = func.with_attr("tirx.noalias", True)
        for gv, func in updated.items():
            mod[gv] = func
        return mod

    return _pass
