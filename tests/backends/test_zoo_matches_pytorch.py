"""Every zoo model, built with every CPU backend for this machine, matches its PyTorch fp32 reference."""

import pytest
import torch

from edgellm import runtime, zoo
from edgellm.runtime.accuracy import compare

TOLERANCE = 1e-4  # max |error| relative to the output's scale, max(1, max|ref|)
BACKENDS = ["tvm", pytest.param("openvino", marks=pytest.mark.skipif(not __import__("importlib").util.find_spec("openvino"), reason="no openvino"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == "kws-cnn" else pytest.mark.slow) for n in zoo.names()])
def test_zoo_package_matches_pytorch(packages, name, backend):
    model = runtime.load(packages(name, backend=backend))
    spec = zoo.build(name)
    with torch.no_grad():
        expected = spec.module(*spec.inputs.values())
    got = model(**{k: v.numpy() for k, v in spec.inputs.items()})
    stats = compare(expected.numpy(), got)
    assert stats["rel_max_abs"] <= TOLERANCE, stats
    assert model.manifest["backend"]["name"] == backend
    assert model.manifest["verification"]["status"] == "passed"
    assert [s.name for s in model.inputs] == list(spec.inputs)
    assert [s.name for s in model.outputs] == spec.output_names
    assert model.check_reference()["rel_max_abs"] <= TOLERANCE
