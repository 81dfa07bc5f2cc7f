"""Shared fixtures: packages built once per session, for tests that only need to load one."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")


@pytest.fixture(scope="session", autouse=True)
def _full_tvm():
    """Load TVM with its compiler first: runtime tests in this process then reuse it, and
    builds later in the session still work (the runtime would otherwise load TVM runtime-only)."""
    try:
        import tvm  # noqa: F401
    except ImportError:
        pass


@pytest.fixture(scope="session")
def packages(tmp_path_factory):
    """(zoo name, target, backend) -> built .edgepkg (built on first use, once per session)."""
    from edgellm import api, targets

    out = tmp_path_factory.mktemp("pkgs")
    cache: dict[str, Path] = {}

    def get(name: str, target: str = "host", backend: str = "default") -> Path:
        if backend == "default":
            backend = targets.resolve(target).backends[0]
        key = f"{name}-{target}-{backend}"
        if key not in cache:
            cache[key] = api.build(f"zoo:{name}", target, out / f"{key}.edgepkg", backend=backend).path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def kws_pkg(packages) -> Path:
    return packages("kws-cnn")


def import_blocker(*names: str) -> str:
    """Python source that makes importing any of ``names`` (or their submodules) fail, for purity tests."""
    return (f"import sys\nBLOCKED = {names!r}\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if any(name == b or name.startswith(b + '.') for b in BLOCKED):\n"
            "            raise ImportError('blocked by the purity test: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n")


def run_cli(*args: str, cwd=None, env=None):
    """Run the real ``edgellm`` command in a subprocess (exit codes and stderr as a user sees them)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "edgellm", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=600)
