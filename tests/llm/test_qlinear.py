"""QuantLinear: packing, GGUF block carry-over, and the scheduled kernels against numpy."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import relax
from tvm.relax.frontend import nn

from edgellm.llm import qlinear as ql

K, N = 128, 48
HOST = {"kind": "llvm", "mcpu": "x86-64-v3"}
CASES = [("f32", None), ("q8", 32), ("q8", None), ("q4", None)]


class _Tiny(nn.Module):
    def __init__(self, scheme, group):
        self.proj = ql.QuantLinear(K, N, scheme, group)

    def prefill(self, x: nn.Tensor):
        return self.proj(x)

    def decode(self, x: nn.Tensor):
        return self.proj(x)

    def embed(self, ids: nn.Tensor):
        return self.proj.gather(ids)


def _build(scheme, group, target=None, rules=True):
    from edgellm.backends.tvm_cpu import pipeline

    target = tvm.target.Target(target or HOST)
    spec = {"prefill": {"x": nn.spec.Tensor([1, "seq_len", K], "float32"), "$": {"param_mode": "packed"}},
            "decode": {"x": nn.spec.Tensor(["batch", 1, K], "float32"), "$": {"param_mode": "packed"}},
            "embed": {"ids": nn.spec.Tensor(["n"], "int32"), "$": {"param_mode": "packed"}}}
    mod, named = _Tiny(scheme, group).export_tvm(spec=spec)
    before = [ql.schedule_pass(target)] if rules else []
    return tvm.compile(mod, target=target, relax_pipeline=pipeline(target, before_rules=before)), named


@pytest.mark.parametrize("scheme,group,rules", [c + (True,) for c in CASES] + [("q4", None, False)])
def test_module_matches_numpy(scheme, group, rules):
    """Scheduled kernels (GEMV for b*s < MR, tiled matmul above); without the rules, the plain TE
    definition that edgellm's generic rules schedule."""
    rng = np.random.default_rng(0)
    arrays = ql.pack(scheme, rng.standard_normal((N, K)).astype(np.float32), group=group)
    ex, named = _build(scheme, group, rules=rules)
    assert [n.split(".")[-1] for n, _ in named] == list(arrays)
    for (_, p), a in zip(named, arrays.values()):
        assert tuple(int(v) for v in p.shape) == a.shape and p.dtype == str(a.dtype)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    params = [tvm.runtime.tensor(a) for a in arrays.values()]
    w = ql.dequantize(scheme, arrays)
    for fn, shape in [("decode", (1, 1)), ("decode", (3, 1)), ("prefill", (1, 1)), ("prefill", (1, 7)),
                      ("prefill", (1, 33))]:
        x = rng.standard_normal(shape + (K,)).astype(np.float32)
        got = vm[fn](tvm.runtime.tensor(x), params).numpy()
        ref = x @ w.T
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    ids = np.array([5, 0, N - 1, 17], np.int32)
    np.testing.assert_allclose(vm["embed"](tvm.runtime.tensor(ids), params).numpy(), w[ids], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("target", [HOST, {"kind": "llvm", "mcpu": "x86-64-v4"},
                                    {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}])
def test_rule_schedules_every_target(target):
    """The marked function is swapped for the scheduled kernel (which passed edgellm's lowering check)."""
    from edgellm.backends.tvm_cpu import pre_schedule_passes

    target = tvm.target.Target(target)
    for scheme, group in CASES[1:]:
        mod, _ = _Tiny(scheme, group).export_tvm(spec={
            "prefill": {"x": nn.spec.Tensor([1, "seq_len", K], "float32"), "$": {"param_mode": "packed"}}})
        with target:
            mod = tvm.transform.Sequential(pre_schedule_passes(target) + [ql.schedule_pass(target)])(mod)
        funcs = [f for _, f in mod.functions_items()
                 if isinstance(f, tvm.tirx.PrimFunc) and ql.ATTR in (f.attrs or {})]
        assert len(funcs) == 1 and "T.parallel" in funcs[0].script(), (scheme, str(target))


@pytest.mark.parametrize("isa", [(16, 32), (4, 32)], ids=["avx512-tiles", "neon-tiles"])
def test_other_targets_tilings_run_here(isa, monkeypatch):
    """The AVX-512 / NEON tile sizes (NR=32, MR=8 / NR=16, MR=6, 4-lane GEMV), compiled for this CPU."""
    monkeypatch.setattr(ql, "_isa", lambda target: isa)
    rng = np.random.default_rng(3)
    for scheme, group in [("q8", 32), ("q4", None)]:
        arrays = ql.pack(scheme, rng.standard_normal((N, K)).astype(np.float32), group=group)
        f = ql.kernel(scheme, N, K, group or (32 if scheme == "q4" else K), tvm.target.Target(HOST))
        fn = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=HOST).mod["main"]
        w = ql.dequantize(scheme, arrays)
        for m in (1, 5, 9, 17):
            x = rng.standard_normal((1, m, K)).astype(np.float32)
            out = tvm.runtime.tensor(np.zeros((1, m, N), np.float32))
            fn(tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for a in arrays.values()], out)
            ref = x @ w.T
            np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def _blocks(kind, rng, n, k):
    """Hand-built GGUF blocks + the GGUF formula's float32 weight."""
    nb = n * k // 32
    d = (rng.random(nb) * 0.02 + 0.001).astype(np.float16)
    if kind == "Q8_0":
        q = rng.integers(-128, 128, (nb, 32)).astype(np.int8)
        raw = np.concatenate([d.view(np.uint8).reshape(nb, 2), q.view(np.uint8)], axis=1)
        ref = d.astype(np.float32)[:, None] * q.astype(np.float32)
        return raw, ref.reshape(n, k)
    qs = rng.integers(0, 256, (nb, 16)).astype(np.uint8)
    nib = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)  # elements 0..15, 16..31
    if kind == "Q4_0":
        raw = np.concatenate([d.view(np.uint8).reshape(nb, 2), qs], axis=1)
        ref = (nib - 8.0) * d.astype(np.float32)[:, None]
    else:
        m = (-rng.random(nb) * 0.1).astype(np.float16)
        raw = np.concatenate([d.view(np.uint8).reshape(nb, 2), m.view(np.uint8).reshape(nb, 2), qs], axis=1)
        ref = nib * d.astype(np.float32)[:, None] + m.astype(np.float32)[:, None]
    return raw, ref.reshape(n, k)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_carry_over_exactly(kind):
    rng = np.random.default_rng(1)
    raw, ref = _blocks(kind, rng, 16, 64)
    scheme = "q8" if kind == "Q8_0" else "q4"
    arrays = ql.pack(scheme, gguf_type=kind, gguf_raw=raw.reshape(16, -1))
    np.testing.assert_array_equal(ql.dequantize(scheme, arrays), ref)
    flat = ql.pack(scheme, gguf_type=kind, gguf_raw=raw.tobytes(), shape=(16, 64))
    for a, b in zip(arrays.values(), flat.values()):
        np.testing.assert_array_equal(a, b)
    try:
        from gguf import GGMLQuantizationType, quants
    except ImportError:
        return
    want = quants.dequantize(raw.reshape(16, -1), getattr(GGMLQuantizationType, kind))
    np.testing.assert_array_equal(ql.dequantize(scheme, arrays), want)


@pytest.mark.parametrize("scheme,group", [("q8", 32), ("q8", None), ("q4", None)])
def test_quantize_error_is_small(scheme, group):
    w = np.random.default_rng(2).standard_normal((16, 64)).astype(np.float32)
    err = np.abs(ql.dequantize(scheme, ql.pack(scheme, w, group=group)) - w).max()
    assert err < (0.02 if scheme == "q8" else 0.25)


def _x_rounded(x, qmax):
    """x as the integer q4 GEMV sees it: rounded per group of 32 to qmax levels of amax."""
    xg = x.reshape(x.shape[:-1] + (-1, 32)).astype(np.float32)
    amax = np.abs(xg).max(-1, keepdims=True)
    inv = np.divide(np.float32(qmax), amax, out=np.zeros_like(amax), where=amax > 0)
    return (np.round(xg * inv) * (amax * np.float32(1.0 / qmax))).reshape(x.shape)


@pytest.mark.parametrize("mode,qmax,tol", [("i16", 16383, 3e-4), ("i8", 127, 3e-2)])
def test_q4_intdot_gemv(mode, qmax, tol):
    """The AVX2 integer GEMV: exact against x rounded per group (the only approximation), and
    within ``tol`` of the largest output against the float product; zero groups of x are fine."""
    rng = np.random.default_rng(4)
    n, k = 64, 256
    arrays = ql.pack("q4", rng.standard_normal((n, k)).astype(np.float32))
    w = ql.dequantize("q4", arrays).astype(np.float64)
    f = ql.kernel("q4", n, k, 32, tvm.target.Target(HOST), intdot=mode)
    assert "pmadd.ub.sw" in f.script()
    fn = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=HOST).mod["main"]
    for m in (1, 2, 5):
        x = (rng.standard_normal((1, m, k)) * 4).astype(np.float32)
        x[0, 0, 32:64] = 0
        out = tvm.runtime.tensor(np.zeros((1, m, n), np.float32))
        fn(tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for a in arrays.values()], out)
        ref = _x_rounded(x, qmax).astype(np.float64) @ w.T
        np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        exact = x.astype(np.float64) @ w.T
        assert np.abs(out.numpy() - exact).max() <= tol * np.abs(exact).max()


def test_q4_intdot_only_on_avx2(monkeypatch):
    """The default (``INTDOT``) applies on AVX2 x86 targets only; elsewhere the float GEMV."""
    monkeypatch.setattr(ql, "INTDOT", "i16")
    for target, want in [(HOST, True), ({"kind": "llvm", "mcpu": "x86-64-v4"}, True), ({"kind": "llvm", "mcpu": "x86-64"}, False),
                         ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
                           "mattr": ["+neon", "+dotprod"]}, False)]:
        script = ql.kernel("q4", N, K, 32, tvm.target.Target(target), intdot=None).script()
        assert ("pmadd.ub.sw" in script) == want, target
    assert "pmadd.ub.sw" not in ql.kernel("q4", N, K, 32, tvm.target.Target(HOST), intdot=False).script()
