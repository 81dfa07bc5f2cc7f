"""TVM packages of zoo models: fresh inputs agree with PyTorch, and the manifest describes the build."""

import numpy as np
import torch

from edgellm import runtime, zoo
from edgellm.runtime.accuracy import compare

TOLERANCE = 1e-4  # max |error| relative to the output's scale, max(1, max|ref|)


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
    assert set(m["build"]["seconds"]) == {"source", "trace", "compile", "verify", "threads"}  # package: still being written
    assert m["compression"] == {"prune": None, "quantize": None}
