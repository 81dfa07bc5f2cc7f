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
# the runtime imports edgellm (its __init__ is stdlib-only), edgellm.errors and edgellm.runtime: nothing else;
# fleet/ holds the device agent (edgellm agent), which needs no more than the runtime
RUNTIME_FILES = ("__init__.py", "errors.py", "runtime", "fleet")


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


# CUDA packages also need the CUDA runtime TVM's libtvm_runtime_cuda.so links (libcudart.so.13); the driver
# (libcuda.so.1) comes with the device's NVIDIA driver
CUDA_WHEELS = ["nvidia-cuda-runtime==13.0.96"]


def bundle_runtime(arch: str, output: Path, python_version: str = "3.11", progress=None, cuda: bool = False) -> dict:
    """Write the runtime bundle for ``arch`` (aarch64 | x86_64) and CPython ``python_version``.

    ``cuda``: for CUDA targets: keeps TVM's CUDA runtime and adds libcudart (edgellm/runtime/cuda.py)."""
    from edgellm import emulate

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise EdgeError(f"{output} exists and is not empty", "give a new folder")
    try:
        wheels = emulate.runtime_wheels(python_version, arch)
    except ValueError as e:
        raise EdgeError(f"cannot bundle the runtime: {e}", "pass --python 3.11 (or 3.12 .. 3.14)") from None
    wheels += CUDA_WHEELS if cuda else []
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
        freed = emulate.prune_tvm_runtime(tmp, keep_cuda=cuda)
        if cuda:  # the CUDA wheel's headers, static libs and tools: not needed to run
            for rel in ("nvidia/cu13/include", "nvidia/cu13/bin"):
                shutil.rmtree(tmp / rel, ignore_errors=True)
            freed += sum(p.stat().st_size for p in (tmp / "nvidia").rglob("*.a") if p.is_file())
            for p in (tmp / "nvidia").rglob("*.a"):
                p.unlink()
        shutil.rmtree(tmp / "bin", ignore_errors=True)
        copy_runtime_sources(tmp)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(output), "arch": arch, "python": python_version, "requires": wheels, "cuda": cuda,
            "size_bytes": folder_size(output), "unpruned_bytes": before, "pruned_bytes": freed,
            "usage": f"PYTHONPATH={output} python3 -m edgellm.runtime profile PKG"}
