"""Every zoo model, built with TVM for this machine, matches its PyTorch fp32 reference."""

import numpy as np
import pytest
import torch

from edgellm import runtime, zoo
from edgellm.runtime.accuracy import compare

TOLERANCE = 1e-4  # max |error| relative to the output's scale, max(1, max|ref|)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "kws-cnn" else pytest.mark.slow) for n in zoo.names()])
def test_zoo_package_matches_pytorch(packages, name):
    model = runtime.load(packages(name))
    spec = zoo.build(name)
    with torch.no_grad():
        expected = spec.module(*spec.inputs.values())
    got = model(**{k: v.numpy() for k, v in spec.inputs.items()})
    stats = compare(expected.numpy(), got)
    assert stats["rel_max_abs"] <= TOLERANCE, stats
    assert model.manifest["verification"]["status"] == "passed"
    assert [s.name for s in model.inputs] == list(spec.inputs)
    assert [s.name for s in model.outputs] == spec.output_names


def test_package_runs_on_new_inputs_too(kws_pkg):
    """Not just the stored sample: a fresh input agrees with PyTorch as well."""
    spec = zoo.build("kws-cnn")
    x = np.random.default_rng(1).standard_normal((1, 1, 49, 40)).astype(np.float32)
    with torch.no_grad():
        expected = spec.module(torch.from_numpy(x)).numpy()
    assert compare(expected, runtime.load(kws_pkg)(x))["rel_max_abs"] <= TOLERANCE


def test_manifest_describes_the_build(kws_pkg):
    m = runtime.load(kws_pkg).manifest
    assert m["recipe"]["source"] == "zoo:kws-cnn"
    assert m["backend"]["name"] == "tvm" and m["backend"]["tvm"] == "0.27.0.post1"
    assert m["inputs"] == [{"name": "features", "shape": [1, 1, 49, 40], "dtype": "float32"}]
    assert m["outputs"] == [{"name": "logits", "shape": [1, 12], "dtype": "float32"}]
    assert len(m["source"]["sha256"]) == 64
    assert set(m["build"]["seconds"]) == {"source", "trace", "compile", "verify"}  # package: still being written
    assert m["compression"] == {"prune": None, "quantize": None}
