"""Backends compile a traced model for a target. Found by convention:
``edgellm/backends/<name>.py`` exports ``Backend``; adding a backend is adding a file."""

from __future__ import annotations

import importlib
import warnings

from edgellm.errors import EdgeError

# torch 2.13 warns from inside TVM's and OpenVINO's exported-program importers on every build; not the user's concern
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

KNOWN = ("tvm", "openvino")


def get(name: str):
    if name not in KNOWN:
        raise EdgeError(f"unknown backend {name!r}", f"known backends: {', '.join(KNOWN)}")
    return importlib.import_module(f"edgellm.backends.{name}").Backend()
