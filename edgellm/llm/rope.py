"""RoPE for TVM's paged KV cache on CPU: the angles once per position, not once per element.

``TIRPagedKVCache`` (``RopeMode.NORMAL``) runs ``fused_rope`` (tvm/relax/frontend/nn/llm/position_embedding.py,
``llama_rope_with_position_map``) before each layer's attention: it splits the fused qkv projection into q, k, v and
rotates q and k. For every element of every q and k head it evaluates ``pos / pow(theta, 2i / d)`` and its cos and
sin -- three libm calls an element, the same angles for every head. SmolLM2-135M (12 rotated heads x 64): 2,304
calls a token a layer; each layer's attention call in decode went from ~53 to ~33 us without them (instrumented VM),
decode 1.16x, time to first token 0.85x.

``schedule_pass(theta)`` replaces that PrimFunc (default RoPE only, no ``rope_type`` scaling: the function must be
structurally equal to TVM's own for the cache's theta and shapes) by one with the same parameters and the same
arithmetic: per position, the ``d / 2`` angles by the very same expression (``pos / pow(theta, (2i % d) / d)``),
their cos and sin into a local table, then every head's rotation ``x[i] cos - x[i + d/2] sin``,
``x[i + d/2] cos + x[i] sin`` from the table, vectorized along the head dim; v copied. Positions in parallel (one
position: no pool launch).
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx
from tvm.script import tirx as T

NAME = "fused_rope"
PARAMS = ("qkv", "position_map", "q", "k", "v", "apply_rope")
PAR_MIN = 4  # positions below which the kernel stays on the calling thread (decode: 1)


def fast_rope_func(theta: float, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str = "float32"):
    """The replacement ``fused_rope`` PrimFunc (``RopeMode.NORMAL``, rotary_dim == head_dim, no scaling)."""
    fused = num_q_heads + 2 * num_kv_heads
    half = head_dim // 2
    rotated = num_q_heads + num_kv_heads

    @T.macro
    def _rotate(src, dst, src_head, dst_head, s, cos_t, sin_t):
        # no let-bound temporaries here: TVM 0.27's vectorizer evaluated them once, with the last lane's index
        for i in T.vectorized(half):
            dst[s, dst_head, i] = T.Cast(dtype, cos_t[i] * T.Cast("float32", src[s, src_head, i])
                                         + sin_t[i] * (T.Cast("float32", src[s, src_head, i + half]) * T.float32(-1.0)))
            dst[s, dst_head, i + half] = T.Cast(dtype, cos_t[i] * T.Cast("float32", src[s, src_head, i + half])
                                                + sin_t[i] * T.Cast("float32", src[s, src_head, i]))

    @T.macro
    def _position(qkv, position_map, q, k, v, apply_rope, s):
        cos_t = T.decl_buffer((half,), "float32", scope="local")
        sin_t = T.decl_buffer((half,), "float32", scope="local")
        if apply_rope > T.int64(0):
            for i in range(half):
                # TVM's rope_freq_default for element (s, d = i): the same expression, once per position
                freq: T.float32 = T.Cast("float32", position_map[s]) / T.pow(
                    T.float32(theta), T.Cast("float32", i * 2 % head_dim) / T.float32(head_dim))
                cos_t[i] = T.cos(freq)
                sin_t[i] = T.sin(freq)
            for h in range(num_q_heads):
                _rotate(qkv, q, h, h, s, cos_t, sin_t)
            for h in range(num_kv_heads):
                _rotate(qkv, k, num_q_heads + h, h, s, cos_t, sin_t)
        else:
            for h, d in T.grid(num_q_heads, head_dim):
                q[s, h, d] = qkv[s, h, d]
            for h, d in T.grid(num_kv_heads, head_dim):
                k[s, h, d] = qkv[s, num_q_heads + h, d]
        for h, d in T.grid(num_kv_heads, head_dim):
            v[s, h, d] = qkv[s, rotated + h, d]

    @T.prim_func(s_tir=True)
    def fused_rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle, var_v: T.handle,
                   apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int32()
        position_map_elem_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, fused, head_dim), dtype)
        q = T.match_buffer(var_q, (seq_len, num_q_heads, head_dim), dtype)
        k = T.match_buffer(var_k, (seq_len, num_kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (seq_len, num_kv_heads, head_dim), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=position_map_elem_offset)
        if seq_len < PAR_MIN:
            for s in range(seq_len):
                _position(qkv, position_map, q, k, v, apply_rope, s)
        else:
            for s in T.parallel(seq_len):
                _position(qkv, position_map, q, k, v, apply_rope, s)

    return fused_rope


def _shapes(func: tirx.PrimFunc):
    """(num_q_heads, num_kv_heads, head_dim, dtype) of a ``fused_rope`` PrimFunc, or None when it is not TVM's plain
    (non-longrope) one."""
    if tuple(p.name for p in func.params) != PARAMS:
        return None
    bufs = func.params[:5]  # TVM 0.27: a PrimFunc's buffer parameters are the buffers themselves
    if any(not hasattr(b, "shape") or len(b.shape) != (1 if i == 1 else 3) for i, b in enumerate(bufs)):
        return None
    qkv, _, q, k, v = bufs
    try:
        nq, nkv, d = int(q.shape[1]), int(k.shape[1]), int(q.shape[2])
    except TypeError:
        return None
    if int(qkv.shape[1]) != nq + 2 * nkv or int(qkv.shape[2]) != d or int(v.shape[1]) != nkv or d % 2:
        return None
    return nq, nkv, d, str(q.dtype)


def schedule_pass(theta: float) -> tvm.transform.Pass:
    """IRModule pass: TVM's ``fused_rope`` -> ``fast_rope_func``, only where it is exactly TVM's default-RoPE kernel for
    ``theta`` and its shapes (structurally equal to one made here); any other (another RoPE variant or theta, a
    different signature) is left as it is."""
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

    @tvm.transform.module_pass(opt_level=0, name="EdgeLLMRoPE")
    def _pass(mod: tvm.ir.IRModule, _ctx) -> tvm.ir.IRModule:
        for gv, func in list(mod.functions_items()):
            if gv.name_hint != NAME or not isinstance(func, tirx.PrimFunc):
                continue
            shapes = _shapes(func)
            if shapes is None:
                continue
            nq, nkv, d, dtype = shapes
            tvms = llama_rope_with_position_map(theta, 1.0, d, nq, nkv, dtype, {}, d)
            if not tvm_ffi.structural_equal(func.without_attr("global_symbol"), tvms.without_attr("global_symbol")):
                continue
            new = fast_rope_func(theta, nq, nkv, d, dtype)
            if func.attrs is not None and "global_symbol" in func.attrs:
                new = new.with_attr("global_symbol", func.attrs["global_symbol"])
            mod[gv] = new
        return mod

    return _pass
