"""Pipeline-level behaviour: ONNX frontend, rule isolation, row reductions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvm_cpu_helpers import AVX512, HOST_AVX2, HOST_AVX512, tvm


def _target():
    from tvm_cpu_helpers import AVX2

    return tvm.target.Target(AVX512 if HOST_AVX512 else AVX2)


@pytest.mark.skipif(not (HOST_AVX2 or HOST_AVX512), reason="x86 host required")
def test_onnx_frontend(tmp_path):
    onnx = pytest.importorskip("onnx")
    from tvm.relax.frontend.onnx import from_onnx

    from edgellm.backends.tvm_cpu import pipeline
    from test_numerics import Attention, ConvBnRelu, randomize_bn

    for model, x in [(Attention().eval(), torch.randn(1, 16, 64)),
                     (randomize_bn(ConvBnRelu()).eval(), torch.randn(1, 16, 12, 12))]:
        path = str(tmp_path / "m.onnx")
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17)
        mod = from_onnx(onnx.load(path), keep_params_in_input=False)
        target = _target()
        ex = tvm.compile(mod, target, relax_pipeline=pipeline(target))
        vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(x.numpy()))
        while not hasattr(out, "numpy"):
            out = out[0]
        with torch.no_grad():
            ref = model(x).numpy()
        assert np.abs(out.numpy() - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_failing_rule_is_skipped():
    """A rule that raises is skipped; the function is scheduled by the next rule."""
    from tvm.script import tirx as T

    from edgellm.backends.tvm_cpu.apply import ApplyVerifiedSchedule
    from edgellm.backends.tvm_cpu.elementwise import Elementwise

    class Broken:
        def apply(self, func, target, tunable):
            raise RuntimeError("broken rule")

    @T.prim_func(private=True, s_tir=True)
    def add(a: T.Buffer((T.int64(64), T.int64(64)), "float32"),
            b: T.Buffer((T.int64(64), T.int64(64)), "float32")):
        for i, j in T.grid(T.int64(64), T.int64(64)):
            with T.sblock("add"):
                vi, vj = T.axis.remap("SS", [i, j])
                b[vi, vj] = a[vi, vj] + T.float32(1.0)

    target = _target()
    mod = tvm.IRModule({"add": add})
    with target:
        mod = ApplyVerifiedSchedule(Broken(), Elementwise())(mod)
    text = mod["add"].script()
    assert "is_scheduled" in text and "T.vectorized(" in text


def test_softmax_reduction_is_vectorized():
    """Softmax rows: rfactor-ed vector partial reductions, rows in parallel."""
    from tvm.relax.backend.cpu_generic import pipeline as cg

    from tvm_cpu_helpers import to_relax
    from edgellm.backends.tvm_cpu.reduction import RowReduction
    from edgellm.backends.tvm_cpu.relax_passes import layout_passes

    class Softmax(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x, dim=-1)

    target = tvm.target.Target(AVX512)
    mod = to_relax(Softmax(), torch.randn(4, 64, 128))
    with target:
        mod = tvm.transform.Sequential([layout_passes] + cg.legalize_passes(target))(mod)
    funcs = [f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) == 1
    sch = RowReduction().apply(funcs[0], target, False)
    assert sch is not None
    text = sch.mod["main"].script()
    assert "_rf" in text and "T.parallel(" in text and "T.vectorized(T.int64(16))" in text
