"""The CUDA tests' session fixture; helpers live in cuda_testing.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def cuda_pkgs(tmp_path_factory):
    """(zoo name or factory source, target, **build options) -> built .edgepkg (built on first use, once per session)."""
    from edgellm import api

    out = tmp_path_factory.mktemp("cuda-pkgs")
    cache: dict[tuple[str, str], object] = {}

    def get(source: str, target: str, **options):
        key = (source, target, tuple(sorted(options.items())))
        if key not in cache:
            name = source.split(":")[-1] if source.startswith("zoo:") else Path(source.split(":")[0]).stem
            tag = "".join(f"-{k}" for k, v in sorted(options.items()) if v)
            cache[key] = api.build(source, target, out / f"{name}-{target}{tag}.edgepkg", **options)
        return cache[key]

    return get
