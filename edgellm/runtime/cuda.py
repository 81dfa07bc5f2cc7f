"""NVIDIA GPUs for the TVM engine: load TVM's CUDA runtime, check the GPU, say clearly why not.

A CUDA package's model.so holds fatbin kernels (edgellm/backends/tvm_cuda.py). Running it
needs, besides TVM's runtime: the NVIDIA driver (``libcuda.so.1``, from the system), the CUDA
13 runtime (``libcudart.so.13``: the system's, the ``nvidia-cuda-runtime`` wheel's that
``edgellm bundle-runtime --target cuda-...`` adds, or torch's) and TVM's
``tvm/lib/libtvm_runtime_cuda.so``, which registers the CUDA device and the loader for CUDA
modules. All are dlopen'ed here with ctypes, RTLD_GLOBAL, before the module is loaded.
Stdlib + ctypes only, like the rest of the runtime.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from pathlib import Path

from edgellm.errors import EdgeError

CUDART = "libcudart.so.13"
CUDA_MAJOR = 13  # TVM 0.27's libtvm_runtime_cuda.so links libcudart.so.13
MIN_DRIVER = "580"  # the first driver branch with CUDA 13
_loaded: dict[str, ctypes.CDLL] = {}


class NoGPUError(EdgeError):
    """This machine cannot run CUDA packages: no NVIDIA GPU, driver or CUDA runtime."""


def is_cuda(manifest: dict) -> bool:
    """Whether a package (or the manifest stub a build verifies with) runs on an NVIDIA GPU."""
    return (manifest.get("backend", {}).get("device") == "cuda"
            or manifest.get("target", {}).get("tvm", {}).get("kind") == "cuda")


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _driver() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        raise NoGPUError("no NVIDIA GPU found (cudaGetDeviceCount cannot run: the NVIDIA driver library libcuda.so.1 is not installed)",
                         "run CUDA packages on a machine with an NVIDIA GPU and its driver, or build for a CPU target") from None


def _cudart_candidates() -> list[str]:
    """Where libcudart.so.13 may be: the loader's path, the bundle / site-packages wheels, CUDA installs."""
    found = [CUDART]
    for entry in [p for p in sys.path if p] + [str(Path(__file__).resolve().parents[2])]:
        for rel in ("nvidia/cu13/lib", "nvidia/cuda_runtime/lib", "nvidia/cu13/lib64"):
            found.append(os.path.join(entry, rel, CUDART))
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda", "/usr/local/cuda-13"):
        if root:
            found += [os.path.join(root, d, CUDART) for d in ("lib64", "lib")]
            found += sorted(glob.glob(os.path.join(root, "targets", "*", "lib", CUDART)))
    return found


def _cudart() -> ctypes.CDLL:
    tried = []
    for cand in _cudart_candidates():
        if cand != CUDART and not os.path.exists(cand):
            continue
        try:
            return ctypes.CDLL(cand, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            tried.append(f"{cand}: {e}")
    raise NoGPUError(f"the CUDA {CUDA_MAJOR} runtime ({CUDART}) is not installed" + (f" ({tried[-1]})" if tried else ""),
                     f"pip install 'nvidia-cuda-runtime=={CUDA_MAJOR}.*' or use the folder from `edgellm bundle-runtime --target cuda-sm90`")


def _error(cudart: ctypes.CDLL, code: int) -> str:
    cudart.cudaGetErrorName.restype = ctypes.c_char_p
    cudart.cudaGetErrorString.restype = ctypes.c_char_p
    return f"{cudart.cudaGetErrorName(code).decode()}: {cudart.cudaGetErrorString(code).decode()}"


def check_gpu(needed_arch: str | None = None) -> dict:
    """The GPU this process will use, or a NoGPUError that says what is missing.

    ``needed_arch`` ('sm_90'): refuse a GPU of a lower compute capability (its SASS would not
    load; PTX in the fatbin covers newer GPUs).
    """
    libcuda = _driver()
    version = ctypes.c_int(0)
    try:
        status = libcuda.cuDriverGetVersion(ctypes.byref(version))
    except AttributeError:  # not a real NVIDIA driver library
        raise NoGPUError("no NVIDIA GPU found (libcuda.so.1 is not an NVIDIA driver: no cuDriverGetVersion)") from None
    if status == 0 and 0 < version.value < CUDA_MAJOR * 1000:
        raise NoGPUError(f"NVIDIA driver too old: it supports CUDA {_version(version.value)}, CUDA packages need CUDA {CUDA_MAJOR}.0",
                         f"install NVIDIA driver {MIN_DRIVER} or newer")
    cudart = _loaded.get("cudart") or _cudart()
    _loaded["cudart"] = cudart
    count = ctypes.c_int(0)
    err = cudart.cudaGetDeviceCount(ctypes.byref(count))
    if err == 35:  # cudaErrorInsufficientDriver
        raise NoGPUError(f"NVIDIA driver too old (cudaGetDeviceCount: {_error(cudart, err)}; driver supports CUDA {_version(version.value)})",
                         f"install NVIDIA driver {MIN_DRIVER} or newer")
    if err != 0:
        raise NoGPUError(f"no NVIDIA GPU found (cudaGetDeviceCount: {_error(cudart, err)})",
                         "check nvidia-smi, CUDA_VISIBLE_DEVICES and /dev/nvidia*")
    if count.value < 1:
        raise NoGPUError("no NVIDIA GPU found (cudaGetDeviceCount returned 0)", "check nvidia-smi and CUDA_VISIBLE_DEVICES")
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    cudart.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0)  # cudaDevAttrComputeCapabilityMajor
    cudart.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0)  # cudaDevAttrComputeCapabilityMinor
    have = major.value * 10 + minor.value
    if needed_arch:
        need = int(needed_arch.split("_", 1)[1].rstrip("af"))
        if have < need:
            raise NoGPUError(f"this GPU is sm_{have} (compute capability {major.value}.{minor.value}); the package's kernels are for {needed_arch}",
                             f"build it for --target cuda-sm{have} (or the nearest lower cuda target)")
    return {"devices": count.value, "arch": f"sm_{have}", "driver_cuda": _version(version.value)}


def load_runtime(tvm) -> None:
    """dlopen TVM's CUDA runtime (registers the cuda device and CUDA module loader) once per process."""
    if "tvm_runtime_cuda" in _loaded:
        return
    lib = Path(tvm.__file__).resolve().parent / "lib" / "libtvm_runtime_cuda.so"
    if not lib.is_file():
        raise NoGPUError(f"TVM's CUDA runtime {lib} is missing (a CPU-only runtime bundle?)",
                         "use a runtime from `edgellm bundle-runtime --target cuda-sm90` or pip install apache-tvm")
    try:
        _loaded["tvm_runtime_cuda"] = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise NoGPUError(f"cannot load TVM's CUDA runtime ({e})") from None


def device(tvm, manifest: dict):
    """tvm.cuda(0), after checking the GPU and loading TVM's CUDA runtime."""
    check_gpu(manifest.get("backend", {}).get("cuda", {}).get("arch") or manifest.get("target", {}).get("tvm", {}).get("arch"))
    load_runtime(tvm)
    dev = tvm.cuda(0)
    if not dev.exist:
        raise NoGPUError("no NVIDIA GPU found (TVM's CUDA runtime sees no device 0)", "check nvidia-smi and CUDA_VISIBLE_DEVICES")
    return dev
