"""Engines run a package's compiled model; one module per backend, found by name.

``edgellm/runtime/engines/<backend>.py`` exports ``Engine(manifest, members, threads)``
with ``run(arrays) -> arrays`` and ``op_times(arrays, runs) -> [(op, seconds)]``.
Adding a backend to the runtime is adding a file.
"""

from __future__ import annotations

import importlib

from edgellm.errors import EdgeError


def get(backend: str):
    try:
        module = importlib.import_module(f"edgellm.runtime.engines.{backend}")
    except ModuleNotFoundError as e:
        if e.name == f"edgellm.runtime.engines.{backend}":
            raise EdgeError(f"this runtime has no engine for backend {backend!r}", "upgrade edgellm on this device") from None
        raise
    return module.Engine
