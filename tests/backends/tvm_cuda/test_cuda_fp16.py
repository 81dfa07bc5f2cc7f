"""``--fp16`` for GPU targets: TVM's ToMixedPrecision (fp16 arithmetic, fp32 accumulation, fp32 at the
boundary), checked two ways: the same fp16 Relax graph compiled for this CPU keeps cosine >= 0.999 with the
fp32 reference (no GPU needed), and the cuda package's kernels really compute in half precision."""

import numpy as np
import pytest
import torch

from edgellm import api, precision, zoo
from edgellm.backends import tvm_cuda
from edgellm.errors import EdgeError
from edgellm.runtime.accuracy import compare

from cuda_testing import cuobjdump, gpu, gpu_target, model_so, needs_nvcc

FP16 = precision.FP16_CONTRACT  # the bar for fp16: cosine >= 0.999
MIN_COSINE = FP16["min_cosine"]


def _fp16_on_cpu(name):
    """(fp32 reference, outputs of the fp16-converted graph compiled for this CPU) for a zoo model."""
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    spec = zoo.build(name)
    args = tuple(spec.inputs.values())
    with torch.no_grad():
        expected = spec.module(*args).numpy()
    mod = tvm_cuda.to_fp16(from_exported_program(torch.export.export(spec.module.eval(), args)))
    kinds = set()
    relax.analysis.post_order_visit(mod["main"], lambda e: kinds.add(str(e.ty.dtype)) if isinstance(e, relax.Call) and
                                    isinstance(getattr(e, "ty", None), relax.TensorType) else None)
    assert "float16" in kinds  # the graph really computes in half precision
    vm = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(a.numpy()) for a in args])
    return expected, (got[0] if not hasattr(got, "numpy") else got).numpy()


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "kws-cnn" else pytest.mark.slow) for n in zoo.names()])
def test_fp16_graph_keeps_cosine_0999_with_fp32(name):
    expected, got = _fp16_on_cpu(name)
    stats = compare(expected, got)
    assert got.dtype == np.float32  # fp32 at the boundary: callers see no difference
    assert stats["cosine"] >= MIN_COSINE and stats["rel_max_abs"] <= FP16["tolerance"], stats
    assert stats["max_abs"] > 0  # it did change the arithmetic (fp16 rounding is visible)


def test_fp16_is_refused_for_cpu_targets(tmp_path):
    with pytest.raises(EdgeError, match="target x86_64 cannot run fp16: edgellm's fp16 is for NVIDIA GPUs and arm64 cores"):
        api.build("zoo:kws-cnn", "x86_64", tmp_path / "k.edgepkg", fp16=True)
    assert not list(tmp_path.iterdir())


@needs_nvcc
def test_fp16_package_records_its_contract_and_has_half_kernels(cuda_pkgs, tmp_path):
    m = cuda_pkgs("zoo:kws-cnn", "cuda-sm90", fp16=True).manifest
    assert m["recipe"]["precision"] == "fp16" and m["backend"]["precision"]["compute"] == "fp16"
    v = m["verification"]
    assert v["tolerance"] == FP16["tolerance"] and v["min_cosine"] == MIN_COSINE  # what the device check enforces
    (tmp_path / "k.fatbin").write_bytes(tvm_cuda.fatbins_in(model_so(cuda_pkgs("zoo:kws-cnn", "cuda-sm90", fp16=True).path))[0])
    ptx = cuobjdump(tmp_path / "k.fatbin", "-ptx")  # the PTX beside the sm_90 SASS (SASS needs nvdisasm)
    assert ".f16" in ptx and "cvt.rn.f16.f32" in ptx, "no half-precision arithmetic in the kernels"


@pytest.mark.parametrize("name", [pytest.param(n, marks=gpu if n == "kws-cnn" else [*gpu, pytest.mark.slow]) for n in zoo.names()])
def test_fp16_package_on_the_gpu_keeps_cosine_0999(cuda_pkgs, name):
    from edgellm import runtime

    result = cuda_pkgs(f"zoo:{name}", gpu_target(), fp16=True)
    assert result.manifest["verification"]["status"] == "passed", result.manifest["verification"]
    check = runtime.load(result.path).check_reference()
    assert check["passed"] and check["cosine_min"] >= MIN_COSINE, check
