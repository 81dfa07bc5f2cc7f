"""edgellm/llm/rope.py: the RoPE kernel that replaces TVM's ``fused_rope`` computes what it computes."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map  # noqa: E402

from edgellm import targets  # noqa: E402
from edgellm.llm import rope  # noqa: E402

HOST = tvm.target.Target(targets.host().tvm)


def _run(func, qkv, positions, apply_rope, nq, nkv, d):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), HOST)
    s = qkv.shape[0]
    outs = [tvm.runtime.tensor(np.zeros((s, n, d), "float32")) for n in (nq, nkv, nkv)]
    lib["main"](tvm.runtime.tensor(qkv), tvm.runtime.tensor(positions), *outs, apply_rope)
    return [o.numpy() for o in outs]


@pytest.mark.parametrize("nq,nkv,d,theta", [(9, 3, 64, 100000.0), (14, 2, 64, 1000000.0), (4, 4, 128, 10000.0)])
@pytest.mark.parametrize("seq_len", [1, 37])
@pytest.mark.parametrize("apply_rope", [1, 0])
def test_fast_rope_matches_tvms_kernel(nq, nkv, d, theta, seq_len, apply_rope):
    """SmolLM2's, Qwen2-0.5B's and a 128-wide head: one decode position and a prefill chunk at scattered positions,
    rotated (q, k) and not: q, k and v within 1e-6 of TVM's own kernel (the same angle expression, evaluated once per
    position instead of once per element; only the FMA contraction of the rotation may differ)."""
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((seq_len, nq + 2 * nkv, d)).astype("float32")
    positions = rng.integers(0, 4096, seq_len).astype("int32")
    orig = llama_rope_with_position_map(theta, 1.0, d, nq, nkv, "float32", {}, d)
    mod = rope.schedule_pass(theta)(tvm.IRModule({rope.NAME: orig}))
    fast = mod[rope.NAME]
    assert "T.parallel" in fast.script() and fast.script().count("T.sin(") == 2  # the angles once per position
    want = _run(orig, qkv, positions, apply_rope, nq, nkv, d)
    got = _run(fast, qkv, positions, apply_rope, nq, nkv, d)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * max(1.0, float(np.abs(w).max())))


def test_other_rope_kernels_are_left_alone():
    """A different theta than the cache's (or another RoPE variant) is not replaced."""
    orig = llama_rope_with_position_map(10000.0, 1.0, 64, 9, 3, "float32", {}, 64)
    mod = rope.schedule_pass(500000.0)(tvm.IRModule({rope.NAME: orig}))
    assert mod[rope.NAME].same_as(orig)
    gptj = llama_rope_with_position_map(10000.0, 1.0, 64, 9, 3, "float32", {"rope_type": "gptj"}, 64)
    assert rope.schedule_pass(10000.0)(tvm.IRModule({rope.NAME: gptj}))[rope.NAME].same_as(gptj)
