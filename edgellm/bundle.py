"""The runtime a device needs, as files: edgellm's runtime package plus pinned, pruned wheels.

``edgellm bundle-runtime --target arm64 -o runtime-arm64/`` writes a folder that, copied to a
device with Python 3, runs packages with ``PYTHONPATH=runtime-arm64 python3 -m edgellm.runtime``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import edgellm
from edgellm.errors import EdgeError

PACKAGE_ROOT = Path(edgellm.__file__).parent
# the runtime imports edgellm (its __init__ is stdlib-only), edgellm.errors and edgellm.runtime: nothing else
RUNTIME_FILES = ("__init__.py", "errors.py", "runtime")


def copy_runtime_sources(dest: Path) -> Path:
    """Copy edgellm's runtime (and only it) to ``dest/edgellm``; returns that folder."""
    out = dest / "edgellm"
    out.mkdir(parents=True, exist_ok=True)
    for name in RUNTIME_FILES:
        src = PACKAGE_ROOT / name
        if src.is_dir():
            shutil.copytree(src, out / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, out / name)
    return out


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def bundle_runtime(arch: str, output: Path, python_version: str = "3.11", progress=None) -> dict:
    """Write the runtime bundle for ``arch`` (aarch64 | x86_64) and CPython ``python_version``."""
    from edgellm import emulate

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise EdgeError(f"{output} exists and is not empty", "give a new folder")
    wheels = emulate.runtime_wheels(python_version, arch)
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plat = [f"--platform=manylinux_2_{m}_{arch}" for m in range(17, 37)] + [f"--platform=manylinux2014_{arch}"]
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--only-binary=:all:", "--no-compile",
               "--target", str(tmp), "--python-version", python_version, "--implementation", "cp", *plat, *wheels]
        if progress:
            progress(f"pip install {' '.join(wheels)} for {arch} / CPython {python_version}")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise EdgeError(f"pip could not fetch the runtime wheels for {arch}: {proc.stderr.strip().splitlines()[-1][:300]}",
                            "check access to PyPI")
        before = folder_size(tmp)
        freed = emulate.prune_tvm_runtime(tmp)
        shutil.rmtree(tmp / "bin", ignore_errors=True)
        copy_runtime_sources(tmp)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(output), "arch": arch, "python": python_version, "requires": wheels,
            "size_bytes": folder_size(output), "unpruned_bytes": before, "pruned_bytes": freed,
            "usage": f"PYTHONPATH={output} python3 -m edgellm.runtime profile PKG"}
