"""The tiny runtime: load an .edgepkg and run it, on the device.

Imports numpy, the standard library and the package's backend runtime (TVM's runtime
library) only — never torch, onnx, click or a compiler; ``cryptography`` only to verify a signed
package. ``tests/backends/tvm/test_runtime_purity.py`` and ``tests/unit/test_imports.py`` prove it;
``edgellm bundle-runtime`` copies exactly this folder to a device.

    import edgellm.runtime as rt
    m = rt.load("kws.edgepkg")                                  # or trusted_keys=["release.pub"]: signed packages only
    y = m(x)
"""

from edgellm.runtime.model import InputError, Model, TensorSpec, load
from edgellm.runtime.package import PackageError, read_manifest

__all__ = ["load", "Model", "TensorSpec", "InputError", "PackageError", "read_manifest"]
