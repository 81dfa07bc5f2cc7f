"""The VM lowering (edgellm/backends/tvm_cpu/vm_passes.py): reshapes between kernels become views inside the
kernels and no kill calls are left, so a tiny model's VM runs kernels and allocations only; outputs unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from tvm_cpu_helpers import AVX2, AVX512, HOST_AVX2, HOST_AVX512, run, to_relax, tvm

import torch

pytestmark = pytest.mark.skipif(not (HOST_AVX2 or HOST_AVX512), reason="x86 host required")


class Tiny(torch.nn.Module):
    """A one-channel conv (its NHWC input is a reshape of the NCHW one), and the input flattened into two
    linears (one reshape feeding two kernels), like kws-cnn's stem and its int8 dense layers."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = torch.nn.Linear(64, 8)
        self.fc2 = torch.nn.Linear(64, 8)

    def forward(self, x):
        flat = torch.flatten(x, 1)
        return torch.relu(self.conv(x)).mean(dim=(2, 3)) + self.fc1(flat) * self.fc2(flat)


def _builtins(ex) -> str:
    return ex.mod.as_text() if hasattr(ex, "mod") else ex.as_text()


def test_no_reshape_or_kill_calls_and_same_outputs():
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    from edgellm.backends.tvm_cpu import pipeline, pre_schedule_passes

    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.randn(1, 1, 8, 8)
    target = tvm.target.Target(AVX512 if HOST_AVX512 else AVX2)

    @tvm.transform.module_pass(opt_level=0, name="Stock")
    def stock(mod, _ctx):  # the same kernels, lowered to the VM the cpu_generic way
        with target:
            return tvm.transform.Sequential(pre_schedule_passes(target) + cpu_generic.dataflow_lower_passes(target)
                                            + cpu_generic.finalize_passes(target))(mod)

    before = tvm.compile(to_relax(model, x), target, relax_pipeline=stock)
    after = tvm.compile(to_relax(model, x), target, relax_pipeline=pipeline(target))
    assert "vm.builtin.reshape" in _builtins(before) and "vm.builtin.null_value" in _builtins(before)
    text = _builtins(after)
    assert "vm.builtin.reshape" not in text and "vm.builtin.null_value" not in text and "vm.builtin.copy" not in text, text

    with torch.no_grad():
        ref = model(x).numpy()
    for ex in (before, after):
        got = run(ex, x)
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


class Flatten(torch.nn.Module):
    def forward(self, x):
        return torch.flatten(x, 1)


@pytest.mark.parametrize("model", [Tiny(), Flatten()], ids=["tiny", "output-is-a-view-of-the-input"])
def test_engine_feeds_through_views_and_returns_copies(tmp_path, model):
    """The runtime engine refills its input tensors through numpy views and copies outputs out of DLPack
    views: results match the VM's own, and an earlier result is not changed by a later call (an output
    can be a view of the input tensor the engine refills)."""
    from edgellm.backends.tvm_cpu import pipeline
    from edgellm.runtime.engines.tvm import Engine

    torch.manual_seed(0)
    model = model.eval()
    x1, x2 = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    target = tvm.target.Target(AVX512 if HOST_AVX512 else AVX2)
    ex = tvm.compile(to_relax(model, x1), target, relax_pipeline=pipeline(target))
    ex.export_library(str(tmp_path / "model.so"))
    engine = Engine({"backend": {"name": "tvm"}, "target": {"tvm": {"kind": "llvm"}}},
                    {"model.so": (tmp_path / "model.so").read_bytes()}, threads=1)
    first = engine.run([x1.numpy()])[0]
    kept = first.copy()
    second = engine.run([np.asfortranarray(x2.numpy())])[0]  # any layout: copied into the view
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_array_equal(first, run(ex, x1))
    np.testing.assert_array_equal(second, run(ex, x2))
    assert not np.array_equal(first, second)


def _fma_then_store(asm: str) -> int:
    """Tile rows whose FMA results are stored before the next row's broadcast: an accumulator tile kept in
    memory inside the k loop, not in registers (the write-back after the loop is followed by other stores)."""
    import re

    return len(re.findall(r"vfmadd231ps[^\n]*\n(?:[^\n]*vmovups\s+%ymm\d+, [^\n]*\n)+[^\n]*vbroadcastss", asm))


def test_a_shape_function_does_not_take_the_kernels_registers():
    """TVM 0.27's codegen gives the noalias kernels of a module "may alias" TBAA tags when a PrimFunc without
    noalias comes after them (here the VM's shape function): the register tile of a matmul is then stored on
    every k step (a language model's prefill at half speed). MarkSingleBufferNoAlias marks the single-buffer
    function noalias, and the tile stays in registers."""
    from tvm.script import tirx as T

    from edgellm.backends.tvm_cpu.vm_passes import MarkSingleBufferNoAlias
    from edgellm.llm import qlinear

    @T.prim_func(s_tir=True)
    def shape_func(H: T.Buffer((T.int64(2),), "int64")):
        T.func_attr({"tirx.is_host_func": True})
        H[T.int64(1)] = T.int64(2304) * H[T.int64(0)]

    target = tvm.target.Target(AVX2)
    kernel = qlinear.kernel("f32", 64, 64, None, target)  # M dynamic, as in prefill: GEMV below 6 rows, else the tile
    mod = tvm.IRModule({"matmul": kernel.with_attr("global_symbol", "matmul"), "shape_func": shape_func})
    mod = MarkSingleBufferNoAlias(mod)
    assert mod["shape_func"].attrs["tirx.noalias"]
    lib = tvm.compile(mod, target)
    asm = (lib.mod if hasattr(lib, "mod") else lib).inspect_source("asm")
    assert asm.count("vfmadd231ps") >= 12  # the 6 x 2 register tile
    assert _fma_then_store(asm) == 0
