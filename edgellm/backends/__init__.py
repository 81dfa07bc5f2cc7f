"""Backends compile a traced model for a target. Found by convention:
``edgellm/backends/<name>.py`` exports ``Backend``; adding a backend is adding a file."""

from __future__ import annotations

import importlib

from edgellm.errors import EdgeError

KNOWN = ("tvm", "openvino")


def get(name: str):
    if name not in KNOWN:
        raise EdgeError(f"unknown backend {name!r}", f"known backends: {', '.join(KNOWN)}")
    return importlib.import_module(f"edgellm.backends.{name}").Backend()
