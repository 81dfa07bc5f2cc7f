"""edgellm.llm.attention: the fast CPU attention kernels that replace TVM's scalar ones.

* kernel level: each replaced PrimFunc (ragged prefill, paged-prefix prefill, decode) against
  numpy attention and against TVM's original kernel, for several GQA group sizes, causal and
  not, several sequences in a batch, and ``rotary_mode == 1`` (runs the original body);
* end to end: a 2-layer Llama in ``tvm.relax.frontend.nn`` with TVM's paged KV cache, built
  with edgellm's pipeline with and without ``schedule_pass``: prefill logits (prompt lengths
  1, 7, 40 and a chunked 16+16+8 prefill, which runs the paged-prefix kernel) and decode
  steps agree;
* aarch64 (NEON): the kernels compile.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm.relax.frontend.nn.llm import kv_cache as kvc

from edgellm.llm.attention import fast_attention_func, schedule_pass

X86 = {"kind": "llvm", "mcpu": "x86-64-v3"}
ARM = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon"]}


def _target(t):
    return tvm.target.Target(t)


def _kernels(h_kv, h_q, d, page_size=16):
    return {"ragged": kvc._attention_prefill_ragged_cpu(h_kv, h_q, d, d, "float32", {}),
            "prefill": kvc._attention_prefill_cpu(h_kv, h_q, d, "float32", False, {}, page_size=page_size),
            "decode": kvc._attention_decode_cpu(h_kv, h_q, d, "float32", False, {}, page_size=page_size)}


def _build(func, target):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def _ref(q, k, v, causal, sm):
    """numpy attention, GQA; returns output [n, hq, d] and lse in log2 units [n, hq]."""
    n, hq, _ = q.shape
    m, hkv, _ = k.shape
    g = hq // hkv
    kk, vv = np.repeat(k, g, 1).astype(np.float64), np.repeat(v, g, 1).astype(np.float64)
    s = np.einsum("nhd,mhd->hnm", q.astype(np.float64), kk) * sm
    if causal:
        mask = np.arange(m)[None, :] < (m - n + np.arange(n)[:, None] + 1)
        s = np.where(mask[None], s, -np.inf)
    mx = s.max(-1, keepdims=True)
    p = np.exp(s - mx)
    den = p.sum(-1, keepdims=True)
    out = np.einsum("hnm,mhd->nhd", p / den, vv)
    return out.astype(np.float32), ((mx[..., 0] + np.log(den[..., 0])) / math.log(2)).T.astype(np.float32)


class _Seqs:
    """Random sequences (q rows, k/v rows) and the kernels' argument lists for them."""

    def __init__(self, rng, h_kv, h_q, d, q_lens, kv_lens, page_size=16):
        self.q = [rng.standard_normal((n, h_q, d)).astype("float32") for n in q_lens]
        self.k = [rng.standard_normal((m, h_kv, d)).astype("float32") for m in kv_lens]
        self.v = [rng.standard_normal((m, h_kv, d)).astype("float32") for m in kv_lens]
        self.q_indptr = np.cumsum([0] + list(q_lens)).astype("int32")
        self.kv_indptr = np.cumsum([0] + list(kv_lens)).astype("int32")
        npages = [(m + page_size - 1) // page_size for m in kv_lens]
        max_pages = sum(npages) + 3
        perm = rng.permutation(max_pages).astype("int32")
        # unused page slots hold garbage, as in a real cache
        self.pages = (rng.standard_normal((max_pages, 2, h_kv, page_size, d)) * 100).astype("float32")
        self.page_indptr = np.cumsum([0] + npages).astype("int32")
        self.page_values = perm[: sum(npages)]
        self.last = np.array([m - (p - 1) * page_size if p else 0 for m, p in zip(kv_lens, npages)], "int32")
        for s, m in enumerate(kv_lens):
            for i in range(m):
                page = self.page_values[self.page_indptr[s] + i // page_size]
                self.pages[page, 0, :, i % page_size] = self.k[s][i]
                self.pages[page, 1, :, i % page_size] = self.v[s][i]

    def run(self, kind, f, causal, sm, rotary_mode=0):
        b = len(self.q)
        q = np.concatenate(self.q)
        out, lse = _t(np.zeros_like(q)), _t(np.zeros(q.shape[:2], "float32"))
        zeros_b = _t(np.zeros(b, "int32"))
        q_pos = _t(np.concatenate([np.arange(len(x), dtype="int32") + 3 for x in self.q]))
        if kind == "ragged":
            f(_t(q), _t(self.q_indptr), _t(np.concatenate(self.k)), _t(np.concatenate(self.v)), _t(self.kv_indptr),
              q_pos, zeros_b, out, lse, causal, rotary_mode, 1.0, 10000.0, sm)
        elif kind == "prefill":
            f(_t(q), _t(self.q_indptr), _t(self.pages), _t(self.page_indptr), _t(self.page_values), _t(self.last),
              zeros_b, q_pos, out, lse, causal, rotary_mode, 1.0, 10000.0, sm)
        else:
            f(_t(q), _t(self.pages), _t(self.page_indptr), _t(self.page_values), _t(self.last), zeros_b,
              _t(np.arange(b, dtype="int32") + 5), out, lse, rotary_mode, 1.0, 10000.0, sm)
        return out.numpy(), lse.numpy()

    def ref(self, causal, sm):
        res = [_ref(q, k, v, causal, sm) for q, k, v in zip(self.q, self.k, self.v)]
        return np.concatenate([r[0] for r in res]), np.concatenate([r[1] for r in res])


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


_HEADS = [(2, 4, 32), (1, 3, 16)]  # (kv heads, q heads, head dim): GQA groups 2 and 3 (SmolLM2's)


@pytest.fixture(scope="module")
def kernel_builds():
    """{heads: {(kind, "fast"|"orig"): packed function}}, one compile per head configuration."""
    target = _target(X86)
    out = {}
    for heads in _HEADS:
        funcs = {}
        for kind, func in _kernels(*heads).items():
            if heads == _HEADS[0]:  # TVM's own kernels: for one configuration (the e2e test compares more)
                funcs[f"{kind}_orig"] = func.with_attr("global_symbol", f"{kind}_orig")
            # decode: the first configuration always takes the multi-threaded path, the others stay serial
            par_min = 0 if heads == _HEADS[0] else 1 << 40
            funcs[f"{kind}_fast"] = fast_attention_func(kind, func, 8, par_min=par_min).with_attr("global_symbol", f"{kind}_fast")
        ex = tvm.compile(tvm.IRModule(funcs), target=target)
        out[heads] = {tuple(name.split("_")): ex[name] for name in funcs}
    return out


_CASES = {
    "ragged": [((1,), (1,), 1), ((7,), (7,), 1), ((40,), (40,), 1), ((40,), (40,), 0), ((9, 20), (9, 20), 1),
               ((100,), (100,), 1)],
    "prefill": [((1,), (16,), 0), ((7,), (23,), 1), ((40,), (33,), 0), ((40,), (56,), 1), ((5, 12), (17, 40), 0)],
    "decode": [((1,), (1,), 0), ((1,), (40,), 0), ((1, 1, 1), (17, 3, 70), 0)],
}


@pytest.mark.parametrize("heads", _HEADS)
@pytest.mark.parametrize("kind", ["ragged", "prefill", "decode"])
def test_kernels_match_numpy_and_original(kernel_builds, heads, kind):
    h_kv, h_q, d = heads
    rng = np.random.default_rng(h_q * 100 + d)
    sm = d ** -0.5
    fast, orig = kernel_builds[heads][(kind, "fast")], kernel_builds[heads].get((kind, "orig"))
    for q_lens, kv_lens, causal in _CASES[kind]:
        seqs = _Seqs(rng, h_kv, h_q, d, q_lens, kv_lens)
        o_fast, l_fast = seqs.run(kind, fast, causal, sm)
        o_ref, l_ref = seqs.ref(causal, sm)
        where = (q_lens, kv_lens, causal)
        assert _rel(o_fast, o_ref) < 2e-6, where
        assert _rel(l_fast, l_ref) < 2e-6, where
        if orig is not None:
            o_orig, l_orig = seqs.run(kind, orig, causal, sm)
            assert _rel(o_fast, o_orig) < 2e-6, where
            assert _rel(l_fast, l_orig) < 2e-6, where


def test_causal_rows_without_visible_keys_match_original(kernel_builds):
    """kv_len < q_len, causal: the first rows see no key; TVM's ragged kernel then averages v over
    all keys (every score is the same masked value) -- so does the replacement."""
    h_kv, h_q, d = heads = _HEADS[0]
    fast, orig = kernel_builds[heads][("ragged", "fast")], kernel_builds[heads][("ragged", "orig")]
    seqs = _Seqs(np.random.default_rng(3), h_kv, h_q, d, (21,), (6,))
    a, b = seqs.run("ragged", fast, 1, d ** -0.5), seqs.run("ragged", orig, 1, d ** -0.5)
    assert _rel(a[0], b[0]) < 2e-6 and _rel(a[1], b[1]) < 2e-6


@pytest.mark.parametrize("kind", ["ragged", "prefill", "decode"])
def test_rotary_mode_inline_runs_original_body(kernel_builds, kind):
    h_kv, h_q, d = heads = _HEADS[0]
    fast, orig = kernel_builds[heads][(kind, "fast")], kernel_builds[heads][(kind, "orig")]
    seqs = _Seqs(np.random.default_rng(7), h_kv, h_q, d, (1,) if kind == "decode" else (6,),
                 (6,) if kind == "ragged" else (20,))
    a = seqs.run(kind, fast, 1, 0.25, rotary_mode=1)
    b = seqs.run(kind, orig, 1, 0.25, rotary_mode=1)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], seqs.run(kind, fast, 1, 0.25, rotary_mode=0)[0])  # RoPE did something


def test_kernels_compile_for_aarch64():
    target = _target(ARM)
    from edgellm.backends.tvm_cpu import vector_lanes

    assert vector_lanes(target) == 4
    funcs = {kind: fast_attention_func(kind, func, 4).with_attr("global_symbol", kind)
             for kind, func in _kernels(3, 9, 64).items() if kind != "prefill"}  # SmolLM2-135M's attention
    # (the paged prefill kernel is the ragged one with another K/V addressing)
    tvm.compile(tvm.IRModule(funcs), target=target)


# ----------------------------------------------------------------------------- end to end
def _lm_class(**cfg):
    """A Llama-style LM (fused qkv, TVM's paged KV cache with RoPE applied on append); ``cfg``
    overrides the tiny default sizes."""
    from tvm import relax, tirx
    from tvm.relax.frontend import nn
    from tvm.relax.frontend.nn import Tensor, op
    from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

    class Cfg:
        hidden, layers, heads, kv_heads, head_dim, vocab, inter, eps = 128, 2, 4, 2, 32, 64, 128, 1e-5

    for key, value in cfg.items():
        setattr(Cfg, key, value)

    class Attn(nn.Module):
        def __init__(self, c):
            self.c = c
            self.qkv_proj = nn.Linear(c.hidden, (c.heads + 2 * c.kv_heads) * c.head_dim, bias=False)
            self.o_proj = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)

        def forward(self, x, cache, layer_id):
            c = self.c
            b, s, _ = x.shape
            qkv = op.reshape(self.qkv_proj(x), (b, s, c.heads + 2 * c.kv_heads, c.head_dim))
            o = cache.attention_with_fused_qkv(layer_id, qkv, c.heads, sm_scale=c.head_dim ** -0.5)
            return self.o_proj(op.reshape(o, (b, s, c.heads * c.head_dim)))

    class Layer(nn.Module):
        def __init__(self, c):
            self.self_attn = Attn(c)
            self.gate_up = nn.Linear(c.hidden, 2 * c.inter, bias=False)
            self.down = nn.Linear(c.inter, c.hidden, bias=False)
            self.ln1 = nn.RMSNorm(c.hidden, -1, c.eps, bias=False)
            self.ln2 = nn.RMSNorm(c.hidden, -1, c.eps, bias=False)

        def forward(self, x, cache, layer_id):
            x = x + self.self_attn(self.ln1(x), cache, layer_id)
            g, u = op.split(self.gate_up(self.ln2(x)), 2, axis=-1)
            return x + self.down(op.silu(g) * u)

    class LM(nn.Module):
        def __init__(self, target):
            c = self.c = Cfg()
            self.target = target
            self.embed_tokens = nn.Embedding(c.vocab, c.hidden)
            self.layers = nn.ModuleList([Layer(c) for _ in range(c.layers)])
            self.norm = nn.RMSNorm(c.hidden, -1, c.eps, bias=False)
            self.lm_head = nn.Linear(c.hidden, c.vocab, bias=False)

        def _run(self, x, cache):
            for i, layer in enumerate(self.layers):
                x = layer(x, cache, i)
            return self.lm_head(self.norm(x)), cache

        def forward_ids(self, input_ids: Tensor, paged_kv_cache: PagedKVCache):
            x = op.reshape(self.embed_tokens(input_ids), (1, input_ids.shape[0], self.c.hidden))
            return self._run(x, paged_kv_cache)

        def create_paged_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var,
                                  prefill_chunk_size: tirx.Var, page_size: tirx.Var,
                                  support_sliding_window: tirx.Var) -> PagedKVCache:
            c = self.c
            return TIRPagedKVCache(
                attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
                prefill_chunk_size=prefill_chunk_size, page_size=page_size,
                support_sliding_window=support_sliding_window,
                layer_partition=relax.ShapeExpr([0, c.layers]), num_hidden_layers=c.layers,
                num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
                qk_head_dim=c.head_dim, v_head_dim=c.head_dim,
                mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
                rope_mode=RopeMode.NORMAL, rope_scale=1, rope_theta=10000.0, rope_scaling={},
                rope_ext_factors=relax.prim_value(0), rotary_dim=c.head_dim,
                enable_disaggregation=False, dtype="float32", target=self.target)

        def spec(self):
            return {
                "forward_ids": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"),
                                "paged_kv_cache": nn.spec.Object(object_type=PagedKVCache),
                                "$": {"param_mode": "packed", "effect_mode": "none"}},
                "create_paged_kv_cache": {"max_batch_size": int, "max_total_seq_len": int,
                                          "prefill_chunk_size": int, "page_size": int,
                                          "support_sliding_window": int,
                                          "$": {"param_mode": "none", "effect_mode": "none"}},
            }

    return LM


@pytest.fixture(scope="module")
def lm_builds():
    from tvm import relax, tirx

    from edgellm.backends.tvm_cpu import pipeline

    target = _target(X86)
    lm = _lm_class()(target)
    mod, named_params = lm.export_tvm(spec=lm.spec())
    replaced = {}

    @tvm.transform.module_pass(opt_level=0, name="RecordFastAttention")
    def record(m, _ctx):
        for gv, f in m.functions_items():
            if isinstance(f, tirx.PrimFunc):
                replaced[gv.name_hint] = "edgellm.fast_attention" in (f.attrs or {})
        return m

    builds = {}
    # par_min=0: the tiny model's decode calls take the multi-threaded path
    for name, before in (("orig", []), ("fast", [schedule_pass(target, par_min=0), record])):
        ex = tvm.compile(mod, target, relax_pipeline=pipeline(target, before_rules=before))
        builds[name] = relax.VirtualMachine(ex, tvm.cpu())
    rng = np.random.default_rng(0)
    params = [_t((rng.standard_normal([int(s) for s in p.shape]) * (0.2 if len(p.shape) > 1 else 0.1)
                  + (1.0 if len(p.shape) == 1 else 0.0)).astype("float32")) for _, p in named_params]
    return builds, params, replaced


def _session(vm, params):
    from tvm_ffi import Shape

    f_add = tvm.get_global_func("vm.builtin.kv_state_add_sequence")
    f_begin = tvm.get_global_func("vm.builtin.kv_state_begin_forward")
    f_end = tvm.get_global_func("vm.builtin.kv_state_end_forward")
    kv = vm["create_paged_kv_cache"](Shape([1]), Shape([256]), Shape([64]), Shape([16]), Shape([0]))
    f_add(kv, 0)

    def step(ids):
        f_begin(kv, Shape([0]), Shape([len(ids)]))
        out = vm["forward_ids"](_t(np.asarray(ids, "int32")), kv, params)
        f_end(kv)
        return out[0].numpy()[0]

    return step


@pytest.mark.parametrize("chunks", [[1], [7], [40], [16, 16, 8]])
def test_lm_with_fast_attention_matches_stock_kernels(lm_builds, chunks):
    builds, params, _ = lm_builds
    prompt = np.random.default_rng(len(chunks) * 100 + chunks[0]).integers(0, 64, sum(chunks)).tolist()
    steps = {name: _session(vm, params) for name, vm in builds.items()}
    logits = {name: [] for name in builds}
    for name, step in steps.items():
        pos = 0
        for c in chunks:
            logits[name].append(step(prompt[pos:pos + c]))
            pos += c
    prefill = {name: np.concatenate(v) for name, v in logits.items()}
    assert prefill["fast"].shape == (len(prompt), 64)
    assert _rel(prefill["fast"], prefill["orig"]) < 1e-5
    token = int(prefill["orig"][-1].argmax())
    for _ in range(4):  # decode steps (the decode kernel), same tokens for both
        out = {name: step([token]) for name, step in steps.items()}
        assert _rel(out["fast"], out["orig"]) < 1e-5
        token = int(out["orig"][-1].argmax())


def test_schedule_pass_replaces_only_the_cpu_attention_kernels(lm_builds):
    replaced = lm_builds[2]
    changed = sorted(name for name, fast in replaced.items() if fast)
    assert changed == ["batch_decode_paged_kv_cpu", "batch_prefill_paged_kv_cpu", "batch_prefill_ragged_kv"], changed
    sliding = [name for name in replaced if "sliding_window" in name]
    assert sliding and not any(replaced[name] for name in sliding)  # present, left alone
