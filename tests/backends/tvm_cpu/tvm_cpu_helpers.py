"""Shared helpers for the TVM CPU pipeline tests (compile with pipeline(target), compare)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))

tvm = pytest.importorskip("tvm")
torch = pytest.importorskip("torch")

AVX512 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4"}
AVX2 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"}
NEON = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


def _host_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return flag in f.read().split()
    except OSError:
        return False


HOST_AVX512 = _host_has("avx512f")
HOST_AVX2 = _host_has("avx2")


def to_relax(model, x):
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    ep = torch.export.export(model.eval(), (x,))
    return from_exported_program(ep)


def compile_model(model, x, target_dict=None):
    from edgellm.backends.tvm_cpu import pipeline

    target = tvm.target.Target(target_dict or (AVX512 if HOST_AVX512 else AVX2))
    mod = to_relax(model, x)
    return tvm.compile(mod, target, relax_pipeline=pipeline(target))


def run(ex, x):
    vm = tvm.relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.detach().numpy()))
    while not hasattr(out, "numpy"):
        out = out[0]
    return out.numpy()


def check_close(model, x, target_dict=None):
    """Compile with pipeline(target), run, compare with torch fp32."""
    if not (HOST_AVX2 or HOST_AVX512):
        pytest.skip("x86 AVX2/AVX-512 host required to run the compiled code")
    if target_dict is AVX512 and not HOST_AVX512:
        pytest.skip("AVX-512 host required")
    model = model.eval()
    with torch.no_grad():
        ref = model(x).numpy()
    got = run(compile_model(model, x, target_dict), x)
    assert got.shape == ref.shape
    err = float(np.abs(got - ref).max())
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    assert err <= tol, f"max abs error {err} > {tol}"
    return err


def randomize_bn(module):
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return module
