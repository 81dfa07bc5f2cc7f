"""The runtime bundle holds edgellm's runtime and nothing of the compiler side; bad requests are one line."""

import re

import pytest

from edgellm.bundle import RUNTIME_FILES, bundle_runtime, copy_runtime_sources
from edgellm.errors import EdgeError


def test_runtime_sources_are_the_runtime_alone(tmp_path):
    out = copy_runtime_sources(tmp_path)
    names = {p.name for p in out.iterdir()}
    assert names == set(RUNTIME_FILES)
    text = "\n".join(p.read_text() for p in out.rglob("*.py"))
    heavy = re.findall(r"^\s*(?:import|from)\s+(torch|onnx|click|rich|openvino\.tools|tvm\.relax|tvm\.s_tir|edgellm\.(?:api|backends|cli))\b",
                       text, re.MULTILINE)
    assert heavy == []


def test_unsupported_python_is_refused_before_any_download(tmp_path):
    with pytest.raises(EdgeError, match="python_version must be 3.11"):
        bundle_runtime("aarch64", tmp_path / "rt", "3.9")
    assert not (tmp_path / "rt").exists()
