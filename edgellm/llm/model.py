"""The Llama-family decoder in TVM's ``relax.frontend.nn``, over TVM's paged KV cache.

Four entry points go into the package's one module: ``prefill`` (a prompt chunk -> the last position's logits),
``prefill_logits`` (every position's logits: perplexity), ``decode`` (one token) and ``create_paged_kv_cache``.
Attention, RoPE and the cache are TVM's own (``TIRPagedKVCache``, whose CPU kernels the runtime library runs);
the linear layers are edgellm's weight-compressed kernels (``qlinear.QuantLinear``). The token embedding is a
gather from the output head's (possibly quantized) table when the model ties them, so the table is stored once.
"""

from __future__ import annotations

from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

from edgellm.llm.config import LMConfig
from edgellm.llm.layers import Linear as QuantLinear
from edgellm.llm.layers import gather_rows
from edgellm.llm.norm import RMSNorm
from edgellm.llm.weights import Scheme


class Attention(nn.Module):
    def __init__(self, c: LMConfig, scheme: Scheme):
        self.c = c
        self.qkv = QuantLinear(c.hidden, c.q_size + 2 * c.kv_size, scheme.kind, scheme.group, bias=c.qkv_bias)
        self.o = QuantLinear(c.q_size, c.hidden, scheme.kind, scheme.group)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_eps)

    def forward(self, x: Tensor, cache: PagedKVCache, layer: int) -> Tensor:
        c = self.c
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv(x), (b, s, c.heads + 2 * c.kv_heads, c.head_dim))
        if c.qk_norm:  # Qwen3 normalizes each head of q and k before RoPE (which the cache applies)
            q, k, v = op.split(qkv, [c.heads, c.heads + c.kv_heads], axis=2)
            qkv = op.concat([self.q_norm(q), self.k_norm(k), v], dim=2)
        o = cache.attention_with_fused_qkv(layer, qkv, c.heads, sm_scale=c.head_dim**-0.5)
        return self.o(op.reshape(o, (b, s, c.q_size)))


class MLP(nn.Module):
    def __init__(self, c: LMConfig, scheme: Scheme):
        self.intermediate = c.intermediate
        self.gate_up = QuantLinear(c.hidden, 2 * c.intermediate, scheme.kind, scheme.group)
        self.down = QuantLinear(c.intermediate, c.hidden, scheme.kind, scheme.group)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = op.split(self.gate_up(x), 2, axis=-1)
        return self.down(op.silu(gate) * up)


class Layer(nn.Module):
    def __init__(self, c: LMConfig, scheme: Scheme):
        self.attn = Attention(c, scheme)
        self.mlp = MLP(c, scheme)
        self.attn_norm = RMSNorm(c.hidden, c.rms_eps)
        self.ffn_norm = RMSNorm(c.hidden, c.rms_eps)

    def forward(self, x: Tensor, cache: PagedKVCache, layer: int) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cache, layer)
        return x + self.mlp(self.ffn_norm(x))


class CausalLM(nn.Module):
    """``schemes``: the weight scheme of the layers and of the output head (``f32`` / ``q8`` / ``q4``)."""

    def __init__(self, c: LMConfig, target, layer_scheme: Scheme, head_scheme: Scheme):
        self.c = c
        self.target = target
        self.layers = nn.ModuleList([Layer(c, layer_scheme) for _ in range(c.layers)])
        self.norm = RMSNorm(c.hidden, c.rms_eps)
        self.lm_head = QuantLinear(c.hidden, c.vocab, head_scheme.kind, head_scheme.group)
        if not c.tie_embeddings:  # a table of its own, stored like the head (a gather reads it; no matmul)
            self.embed = QuantLinear(c.hidden, c.vocab, head_scheme.kind, head_scheme.group)

    def _embed(self, ids: Tensor) -> Tensor:
        b, s = ids.shape
        table = self.lm_head if self.c.tie_embeddings else self.embed
        return op.reshape(gather_rows(table, op.reshape(ids, (b * s,))), (b, s, self.c.hidden))

    def _body(self, ids: Tensor, cache: PagedKVCache) -> Tensor:
        x = self._embed(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i)
        return self.norm(x)

    def prefill(self, input_ids: Tensor, paged_kv_cache: PagedKVCache):
        h = self._body(input_ids, paged_kv_cache)
        last = op.tensor_expr_op(lambda t: te.compute((1, 1, self.c.hidden), lambda b, _, j: t[b, t.shape[1] - 1, j], name="last"),
                                 "last_position", [h])
        return self.lm_head(last), paged_kv_cache

    def prefill_logits(self, input_ids: Tensor, paged_kv_cache: PagedKVCache):
        return self.lm_head(self._body(input_ids, paged_kv_cache)), paged_kv_cache

    def decode(self, input_ids: Tensor, paged_kv_cache: PagedKVCache):
        return self.lm_head(self._body(input_ids, paged_kv_cache)), paged_kv_cache

    def create_paged_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var, prefill_chunk_size: tirx.Var,
                              page_size: tirx.Var, support_sliding_window: tirx.Var) -> PagedKVCache:
        c = self.c
        return TIRPagedKVCache(
            attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size, page_size=page_size, support_sliding_window=support_sliding_window,
            layer_partition=relax.ShapeExpr([0, c.layers]), num_hidden_layers=c.layers, num_attention_heads=c.heads,
            num_key_value_heads=c.kv_heads, qk_head_dim=c.head_dim, v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0, mla_original_v_head_dim=0, rope_mode=RopeMode.NORMAL, rope_scale=1,
            rope_theta=c.rope_theta, rope_scaling={}, rope_ext_factors=relax.prim_value(0), rotary_dim=c.head_dim,
            enable_disaggregation=False, dtype="float32", target=self.target)

    def spec(self) -> dict:
        mode = {"param_mode": "packed", "effect_mode": "none"}
        cache = nn.spec.Object(object_type=PagedKVCache)
        return {
            "prefill": {"input_ids": nn.spec.Tensor([1, "seq_len"], "int32"), "paged_kv_cache": cache, "$": mode},
            "prefill_logits": {"input_ids": nn.spec.Tensor([1, "seq_len"], "int32"), "paged_kv_cache": cache, "$": mode},
            "decode": {"input_ids": nn.spec.Tensor([1, 1], "int32"), "paged_kv_cache": cache, "$": mode},
            "create_paged_kv_cache": {"max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int, "page_size": int,
                                      "support_sliding_window": int, "$": {"param_mode": "none", "effect_mode": "none"}},
        }
