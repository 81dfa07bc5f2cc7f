"""CUDA targets, built here (nvcc, no GPU needed): the package holds fatbin kernels for the target's
arch and no CUDA source, TVM's CUDA loader reads them back, and without a GPU loading fails clearly."""

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgellm import api, runtime, targets
from edgellm.backends import tvm_cuda
from edgellm.errors import EdgeError
from edgellm.runtime import cuda
from tests.conftest import ROOT

from cuda_testing import GPU, cuobjdump, model_so, needs_nvcc

TINY = f"{Path(__file__).parent / 'models' / 'tiny_matmul.py'}:build"
CUDA_TARGETS = {"cuda-sm80": ("x86_64", "sm_80"), "cuda-sm86": ("x86_64", "sm_86"), "cuda-sm89": ("x86_64", "sm_89"),
                "cuda-sm90": ("x86_64", "sm_90"), "jetson-orin": ("aarch64", "sm_87")}
CUDA_SOURCE_MARKS = (b'extern "C" __global__', b"__global__", b"__CUDACC", b"__launch_bounds__")  # (launch tags like threadIdx.x are metadata)


def test_cuda_targets_are_bundled_and_tvm_accepts_them():
    tvm = pytest.importorskip("tvm")
    known = targets.all_targets()
    for name, (arch, sm) in CUDA_TARGETS.items():
        t = known[name]
        assert t.arch == arch and t.backends == ["tvm"] and t.tvm["kind"] == "cuda" and t.tvm["arch"] == sm
        assert t.tvm["host"]["kind"] == "llvm" and t.tvm["host"]["mtriple"].startswith(arch)
        parsed = tvm.target.Target(t.tvm)
        assert parsed.kind.name == "cuda" and parsed.arch == sm and parsed.host.kind.name == "llvm"
    assert targets.host().tvm["kind"] == "llvm"  # `--target host` stays a CPU target


def test_cuda_target_needs_an_sm_arch():
    bad = targets.resolve("cuda-sm90").to_dict() | {"name": "bad", "tvm": {"kind": "cuda", "arch": "hopper"}}
    with pytest.raises(EdgeError, match=r'needs tvm.arch = "sm_XX"'):
        api.build("zoo:kws-cnn", json.dumps(bad), "/tmp/never.edgepkg")


@needs_nvcc
@pytest.mark.parametrize("source", ["zoo:kws-cnn", TINY])
def test_sm90_package_holds_sm90_fatbin_and_no_cuda_source(cuda_pkgs, source, tmp_path):
    result = cuda_pkgs(source, "cuda-sm90")
    m = result.manifest
    assert result.path.is_file()
    assert m["target"]["name"] == "cuda-sm90" and m["target"]["tvm"]["kind"] == "cuda"
    assert m["backend"]["device"] == "cuda" and m["backend"]["cuda"]["arch"] == "sm_90"
    assert m["backend"]["cuda"]["kernel_format"] == "fatbin" and m["backend"]["pipeline"] == "cuda-dlight"
    if GPU is None:
        assert m["verification"]["status"] == "skipped"
        assert "no NVIDIA GPU found" in m["verification"]["reason"]
    else:
        assert m["verification"]["status"] == "passed"

    so = model_so(result.path)
    for mark in CUDA_SOURCE_MARKS:
        assert mark not in so, f"CUDA source ({mark!r}) in model.so"
    fatbins = tvm_cuda.fatbins_in(so)
    assert len(fatbins) == 1 and len(fatbins[0]) == m["backend"]["cuda"]["fatbin_bytes"]
    (tmp_path / "kernels.fatbin").write_bytes(fatbins[0])
    elf = cuobjdump(tmp_path / "kernels.fatbin", "--list-elf")
    ptx = cuobjdump(tmp_path / "kernels.fatbin", "--list-ptx")
    assert "sm_90.cubin" in elf and elf.count("ELF file") == 1, elf
    assert "sm_90.ptx" in ptx, ptx  # PTX too: a newer GPU can JIT it
    functions = cuobjdump(tmp_path / "kernels.fatbin", "--dump-elf-symbols")
    assert "STT_FUNC" in functions and "fused" in functions


@needs_nvcc
def test_jetson_orin_host_code_is_aarch64_and_kernels_sm87(cuda_pkgs, tmp_path):
    result = cuda_pkgs("zoo:kws-cnn", "jetson-orin")
    assert result.manifest["verification"]["status"] == "skipped"  # aarch64: not runnable here
    so = model_so(result.path)
    assert so[:4] == b"\x7fELF" and struct.unpack_from("<H", so, 18)[0] == 183  # EM_AARCH64
    (tmp_path / "model.so").write_bytes(so)
    described = subprocess.run(["file", str(tmp_path / "model.so")], capture_output=True, text=True).stdout
    if described:
        assert "ARM aarch64" in described, described
    (tmp_path / "k.fatbin").write_bytes(tvm_cuda.fatbins_in(so)[0])
    listing = cuobjdump(tmp_path / "k.fatbin", "--list-elf")
    assert "sm_87.cubin" in listing and "sm_90" not in listing, listing
    for mark in CUDA_SOURCE_MARKS:
        assert mark not in so


@needs_nvcc
@pytest.mark.skipif(GPU is not None, reason="this machine has a GPU: the no-GPU path is not reachable")
def test_loading_a_cuda_package_without_a_gpu_is_a_clear_error(cuda_pkgs):
    pkg = cuda_pkgs("zoo:kws-cnn", "cuda-sm90").path
    with pytest.raises(cuda.NoGPUError, match=r"no NVIDIA GPU found \(cudaGetDeviceCount"):
        runtime.load(pkg)
    proc = subprocess.run([sys.executable, "-m", "edgellm.runtime", "check", str(pkg)], capture_output=True, text=True,
                          cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no NVIDIA GPU found"), proc.stderr


STUB_DRIVER = r"""
/* libcuda.so.1 with no GPU behind it: every call says CUDA_ERROR_NO_DEVICE (100) */
#define STUB(name) int name() { return 100; }
STUB(cuInit) STUB(cuDeviceGetName) STUB(cuFuncSetAttribute) STUB(cuLaunchKernelEx) STUB(cuModuleGetFunction)
STUB(cuModuleLoadData) STUB(cuModuleUnload) STUB(cuTensorMapEncodeTiled) STUB(cuDeviceGetCount) STUB(cuGetProcAddress)
STUB(cuGetProcAddress_v2)
int cuGetErrorName(int e, const char** s) { *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
int cuGetErrorString(int e, const char** s) { *s = "no CUDA-capable device is detected"; return 0; }
int cuDriverGetVersion(int* v) { *v = 13000; return 0; }
"""

LOAD_WITH_STUB = r"""
import json, os, sys, tempfile, zipfile
import edgellm.runtime.engines.tvm as engine
tvm = engine.import_tvm()
from edgellm.runtime import cuda
cuda.load_runtime(tvm)          # libtvm_runtime_cuda.so: registers ffi.Module.load_from_bytes.cuda
with zipfile.ZipFile(sys.argv[1]) as z, tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "model.so")
    open(path, "wb").write(z.read("model.so"))
    lib = tvm.runtime.load_module(path)
def source(m, fmt):
    try:
        return len(m.inspect_source(fmt))
    except UnicodeDecodeError:
        return "binary"
tree = []
def walk(m):
    tree.append({"kind": m.kind, **({"fatbin": source(m, "fatbin"), "cuda": source(m, "cuda")} if m.kind == "cuda" else {})})
    for c in m.imports:
        walk(c)
walk(lib)
tvm.runtime.vm.VirtualMachine(lib, tvm.cpu())  # the VM executable deserializes too
try:
    cuda.check_gpu("sm_90")
    error = None
except cuda.NoGPUError as e:
    error = str(e)
print(json.dumps({"tree": tree, "error": error, "runtime_only": tvm.base._RUNTIME_ONLY}))
"""


@needs_nvcc
def test_tvm_cuda_loader_reads_the_fatbin_module(cuda_pkgs, tmp_path):
    """TVM's own CUDA module loader (libtvm_runtime_cuda.so) deserializes the package's module as format
    "fatbin" with no CUDA source. No GPU here: a stub libcuda.so.1 lets the CUDA runtime library load."""
    pkg = cuda_pkgs("zoo:kws-cnn", "cuda-sm90").path
    _stub_driver(tmp_path)
    proc = subprocess.run([sys.executable, "-c", LOAD_WITH_STUB, str(pkg)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "LD_LIBRARY_PATH": str(tmp_path),
                               **({"HOME": os.environ["HOME"]} if "HOME" in os.environ else {})})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["runtime_only"]
    assert [m["kind"] for m in result["tree"]] == ["relax.VMExecutable", "library", "cuda"]
    assert result["tree"][2] == {"kind": "cuda", "fatbin": "binary", "cuda": 0}
    assert result["error"] and ("driver" in result["error"] or "no NVIDIA GPU found" in result["error"])


BUILD_WITH_DRIVER = r"""
import json, sys, zipfile
import tvm, tvm_ffi
from edgellm import api
from edgellm.backends import tvm_cuda
jit = tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None  # TVM's CUDA runtime loaded
r = api.build(sys.argv[1], "cuda-sm90", sys.argv[2])
so = zipfile.ZipFile(sys.argv[2]).read("model.so")
print(json.dumps({"jit": jit, "fatbins": [len(f) for f in tvm_cuda.fatbins_in(so)], "source": b"__global__" in so,
                  "verification": r.manifest["verification"]["status"]}))
"""


def _stub_driver(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "stub.c").write_text(STUB_DRIVER)
    cc = subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(tmp_path / "libcuda.so.1"), "-Wl,-soname,libcuda.so.1",
                         str(tmp_path / "stub.c")], capture_output=True, text=True)
    if cc.returncode != 0:
        pytest.skip(f"cannot build the stub driver: {cc.stderr[-200:]}")
    return tmp_path


@needs_nvcc
@pytest.mark.slow
def test_build_where_tvms_cuda_runtime_loads_still_embeds_the_target_fatbin(tmp_path):
    """On a build machine with an NVIDIA driver, TVM compiles CUDA modules during codegen (through
    tvm_callback_cuda_compile) instead of keeping source: the package must hold the same fatbin for
    the *target's* arch. Simulated here with a stub libcuda.so.1, which lets libtvm_runtime_cuda.so load."""
    stub = _stub_driver(tmp_path / "stub")
    pkg = tmp_path / "tiny.edgepkg"
    proc = subprocess.run([sys.executable, "-c", BUILD_WITH_DRIVER, TINY, str(pkg)], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env={**os.environ, "LD_LIBRARY_PATH": str(stub), "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["jit"] and len(result["fatbins"]) == 1 and not result["source"]
    assert result["verification"] == "skipped"  # the stub has no GPU
    (tmp_path / "k.fatbin").write_bytes(tvm_cuda.fatbins_in(model_so(pkg))[0])
    assert "sm_90.cubin" in cuobjdump(tmp_path / "k.fatbin", "--list-elf")


def _blob(modules):
    """A library binary with a VM-like module, the _lib placeholder and a cuda module."""
    indptr, children = [0, 1, 2, 2], [1, 2]
    return tvm_cuda.write_library_bin(indptr, children, modules)


def test_library_bin_rewrite_keeps_the_tree_and_swaps_source_for_fatbin(tmp_path, monkeypatch):
    source = 'extern "C" __global__ void k(float* x) { x[threadIdx.x] *= 2.f; }\n'
    fmap = struct.pack("<Q", 1) + struct.pack("<Q", 1) + b"k" + bytes(20)
    cuda_bytes = struct.pack("<Q", 4) + b"cuda" + fmap + struct.pack("<Q", len(source)) + source.encode()
    blob = _blob([("relax.VMExecutable", b"vm-bytes"), ("_lib", None), ("cuda", cuda_bytes)])
    assert tvm_cuda.write_library_bin(*tvm_cuda.parse_library_bin(blob)) == blob
    fake = struct.pack("<IHHQ", tvm_cuda.FATBIN_MAGIC, 1, 16, 8) + b"SASS...."
    monkeypatch.setattr(tvm_cuda, "nvcc_fatbin", lambda src, arch, workdir: fake)
    new, report = tvm_cuda.compile_library_bin(blob, [source], "sm_90", tmp_path)
    indptr, children, modules = tvm_cuda.parse_library_bin(new)
    assert (indptr, children) == ([0, 1, 2, 2], [1, 2])
    assert modules[:2] == [("relax.VMExecutable", b"vm-bytes"), ("_lib", None)]
    fmt, fmap2, code = tvm_cuda.split_cuda_module(modules[2][1])
    assert (fmt, fmap2, code) == ("fatbin", fmap, fake)
    assert tvm_cuda.fatbins_in(b"junk" + new + b"junk") == [fake]
    assert source.encode() not in new and report == [{"source_bytes": len(source), "fatbin_bytes": len(fake)}]


def test_prune_keeps_the_cuda_runtime_only_when_asked(tmp_path):
    from edgellm import emulate

    for keep in (False, True):
        sp = tmp_path / str(keep)
        (sp / "tvm" / "lib").mkdir(parents=True)
        for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so", "libtvm_compiler.so"):
            (sp / "tvm" / "lib" / name).write_bytes(b"x" * 10)
        emulate.prune_tvm_runtime(sp, keep_cuda=keep)
        assert (sp / "tvm" / "lib" / "libtvm_runtime_cuda.so").exists() == keep
        assert (sp / "tvm" / "lib" / "libtvm_runtime.so").exists() and not (sp / "tvm" / "lib" / "libtvm_compiler.so").exists()


def test_cpu_packages_do_not_touch_cuda(kws_pkg):
    m = runtime.load(kws_pkg)
    assert not cuda.is_cuda(m.manifest) and not m._engine.cuda and m._engine.device.dlpack_device_type() == 1
    with zipfile.ZipFile(kws_pkg) as z:
        assert not tvm_cuda.fatbins_in(z.read("model.so"))
