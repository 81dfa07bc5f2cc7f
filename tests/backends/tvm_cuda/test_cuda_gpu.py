"""On an NVIDIA GPU (marker ``gpu``; skipped where there is none): every zoo model, built for this GPU's
cuda target, matches its PyTorch fp32 reference; timing and per-op profiles synchronize the GPU."""

import numpy as np
import pytest
import torch

from edgellm import runtime, zoo
from edgellm.runtime.accuracy import compare

from cuda_testing import GPU, gpu, gpu_target

pytestmark = gpu
TOLERANCE = 1e-4  # max |error| relative to the output's scale, as for CPU packages


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "kws-cnn" else pytest.mark.slow) for n in zoo.names()])
def test_zoo_model_on_the_gpu_matches_pytorch_fp32(cuda_pkgs, name):
    result = cuda_pkgs(f"zoo:{name}", gpu_target())
    assert result.manifest["verification"]["status"] == "passed", result.manifest["verification"]
    model = runtime.load(result.path)
    assert model._engine.cuda and model._engine.device.dlpack_device_type() == 2  # kDLCUDA
    spec = zoo.build(name)
    with torch.no_grad():
        expected = spec.module(*spec.inputs.values())
    got = model(**{k: v.numpy() for k, v in spec.inputs.items()})
    assert compare(expected.numpy(), got)["rel_max_abs"] <= TOLERANCE
    assert model.check_reference()["rel_max_abs"] <= TOLERANCE


def test_fresh_inputs_and_repeated_runs_agree(cuda_pkgs):
    model = runtime.load(cuda_pkgs("zoo:kws-cnn", gpu_target()).path)
    spec = zoo.build("kws-cnn")
    x = np.random.default_rng(7).standard_normal((1, 1, 49, 40)).astype(np.float32)
    with torch.no_grad():
        expected = spec.module(torch.from_numpy(x)).numpy()
    first, second = model(x), model(x)
    assert np.array_equal(first, second)
    assert compare(expected, first)["rel_max_abs"] <= TOLERANCE


def test_profile_and_per_op_times_on_the_gpu(cuda_pkgs):
    model = runtime.load(cuda_pkgs("zoo:kws-cnn", gpu_target()).path)
    report = model.profile(runs=50, warmup=5, per_op=True)
    lat = report["latency_ms"]
    assert 0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["max"]
    kernels = [o for o in report["per_op"] if o["kind"] == "kernel"]
    assert kernels and any("conv2d" in o["name"] for o in kernels)
    # synchronized per-op times add up to no more than a synchronized inference (plus instrument overhead)
    assert sum(o["ms"] for o in report["per_op"]) < 20 * lat["max"]


def test_gpu_is_the_one_the_target_names():
    assert GPU["arch"].startswith("sm_") and GPU["devices"] >= 1
