"""Engines run a package's compiled model; one module per backend, found by name.

``edgellm/runtime/engines/<backend>.py`` exports ``Engine(manifest, members, threads)``
with ``run(arrays) -> arrays`` and ``op_times(arrays, runs) -> [(op, seconds)]``.
Adding a backend to the runtime is adding a file.
"""

from __future__ import annotations

import contextlib
import importlib
import threading

from edgellm.errors import EdgeError


def get(backend: str):
    try:
        module = importlib.import_module(f"edgellm.runtime.engines.{backend}")
    except ModuleNotFoundError as e:
        if e.name == f"edgellm.runtime.engines.{backend}":
            raise EdgeError(f"this runtime has no engine for backend {backend!r}", "upgrade edgellm on this device") from None
        raise
    return module.Engine


class Pool:
    """Per-caller objects (a TVM VM, an OpenVINO infer request) that one call uses at a time: each concurrent call
    takes an idle one, or makes one when none is idle, and gives it back; ``made`` counts them."""

    def __init__(self, make):
        self._make = make
        self._idle = [make()]
        self._lock = threading.Lock()
        self.made = 1

    @contextlib.contextmanager
    def take(self):
        with self._lock:
            item = self._idle.pop() if self._idle else None
            if item is None:
                self.made += 1
        if item is None:
            item = self._make()
        try:
            yield item
        finally:
            with self._lock:
                self._idle.append(item)
