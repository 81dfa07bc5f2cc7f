"""Shared pieces of the CUDA tests (imported as ``cuda_testing``: a unique name, unlike ``conftest``): which GPU (if any) is here, packages built once, cuobjdump.

Build-side tests need nvcc only (no GPU): they compile, package and inspect the kernels.
Tests marked ``gpu`` run packages on an NVIDIA GPU and are skipped where there is none.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgellm import targets
from edgellm.backends import tvm_cuda
from edgellm.runtime import cuda


def _gpu() -> dict | None:
    try:
        return cuda.check_gpu()
    except cuda.NoGPUError:
        return None


GPU = _gpu()  # {"devices", "arch": "sm_90", "driver_cuda"} or None
NVCC = tvm_cuda.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit) to compile kernels")
gpu = [pytest.mark.gpu, pytest.mark.skipif(GPU is None, reason="needs an NVIDIA GPU with a CUDA 13 driver"), needs_nvcc]


def gpu_target() -> str:
    """The bundled cuda target for the GPU here: its own arch, else the nearest lower one."""
    have = int(GPU["arch"].split("_")[1])
    cands = [(int(t.tvm["arch"].split("_")[1]), n) for n, t in targets.all_targets().items()
             if t.tvm.get("kind") == "cuda" and t.arch == "x86_64"]
    fits = [c for c in cands if c[0] <= have]
    return max(fits)[1] if fits else "cuda-sm90"


def find_cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    cands = [os.path.join(r, "bin", "cuobjdump") for r in roots if r]
    cands += sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "site-packages", "nvidia", "cu*", "bin", "cuobjdump")))
    cands += [os.path.join(p, "nvidia", "cu13", "bin", "cuobjdump") for p in sys.path if p]
    return next((c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def cuobjdump(path: Path, *flags: str) -> str:
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (pip install nvidia-cuda-cuobjdump, or the CUDA toolkit)")
    proc = subprocess.run([tool, *flags, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def model_so(pkg: Path) -> bytes:
    with zipfile.ZipFile(pkg) as z:
        return z.read("model.so")
