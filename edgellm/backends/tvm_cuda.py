"""NVIDIA GPU (CUDA) compilation for the TVM backend: kernels compiled to a fatbin at build time.

``edgellm/backends/tvm.py`` hands targets whose TVM kind is ``cuda`` to :func:`compile`.

Pipeline. TVM 0.27's CUDA Relax pipeline (``tvm.relax.backend.cuda.pipeline``) already runs
``dlight.ApplyDefaultSchedule(gpu.Matmul, gpu.GEMV, gpu.Reduction, gpu.GeneralReduction,
gpu.Fallback)`` right after LegalizeOps / FoldConstant / FuseOps / FuseTIR. :func:`pipeline`
spells that same sequence out here, so the schedule rules a package was built with are
edgellm's choice, written in one place, and not whatever a later TVM makes the default.

Kernels. TVM 0.27 generates CUDA C++. In a process where TVM's CUDA runtime library
(libtvm_runtime_cuda.so) cannot load -- any build machine without an NVIDIA driver -- the
codegen keeps that *source* in the device module (format ``"cuda"``), to be compiled when the
module is loaded, through ``tvm_callback_cuda_compile``: TVM's Python compiler side plus
NVRTC or nvcc, none of which a device running ``edgellm.runtime`` has. So
:func:`make_pack_imports` replaces TVM's import packer in ``export_library``: it serializes the
module tree as TVM does (``runtime.ModulePackImportsToTensor``), compiles the CUDA source of
every ``cuda`` module with nvcc into a fatbin for the target's arch (SASS ``sm_XX`` plus
``compute_XX`` PTX, so a newer GPU can still JIT it), writes the module back with format
``"fatbin"`` and the binary in place of the source, and links the result into model.so as
``__tvm_ffi__library_bin`` with an assembler ``.incbin`` (also for aarch64, with the cross
compiler). Where the CUDA runtime library *is* loaded at build time (a build machine with a
driver), TVM compiles each module right away through ``tvm_callback_cuda_compile``;
:func:`_nvcc_callback` points that at the same nvcc -> fatbin for the target's arch during the
build, and the packer only relabels the result. On the device, TVM's loader
(``ffi.Module.load_from_bytes.cuda``) hands any format but ``"cuda"`` straight to
``cuModuleLoadData``, which takes a fatbin. The package holds no CUDA source.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import struct
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

from edgellm.backends import tvm_base
from edgellm.backends.base import Compiled
from edgellm.errors import EdgeError
from edgellm.targets import Target
from edgellm.trace import Traced

PIPELINE = "cuda-dlight"
FATBIN_MAGIC = 0xBA55ED50
FATBIN_FORMAT = "fatbin"
# nvcc flags TVM's own nvcc path uses, minus --use_fast_math: packages are verified against fp32
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "--expt-extended-lambda",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__"]
LIBRARY_BIN = "__tvm_ffi__library_bin"


# ---------------------------------------------------------------------------------------------
# target


def sm_arch(target: Target) -> str:
    """'sm_90' from the target's TVM dict (checked)."""
    arch = str(target.tvm.get("arch", ""))
    if not re.fullmatch(r"sm_\d{2,3}", arch):
        raise EdgeError(f"target {target.name}: a cuda target needs tvm.arch = \"sm_XX\" (e.g. sm_90), not {arch or 'nothing'!r}")
    return arch


def check(target: Target) -> None:
    sm_arch(target)
    host = target.tvm.get("host")
    if not isinstance(host, dict) or host.get("kind") != "llvm":
        raise EdgeError(f"target {target.name}: a cuda target needs tvm.host = {{kind = \"llvm\", mtriple = ...}} for the CPU side")
    if find_nvcc() is None:
        raise EdgeError("compiling for an NVIDIA GPU needs nvcc (the CUDA toolkit) on this machine",
                        "install the CUDA 13 toolkit or put nvcc on PATH (CUDA_HOME/bin)")


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and Path(root, "bin", "nvcc").is_file():
            return str(Path(root, "bin", "nvcc"))
    return None


# ---------------------------------------------------------------------------------------------
# pipeline


def pipeline(tvm_target):
    """TVM's CUDA Relax pipeline with the dlight GPU schedule rules written out."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    passes = (cuda.library_dispatch_passes(tvm_target)
              + [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
                 relax.transform.FuseOps(), relax.transform.FuseTIR(),
                 dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                         dl.gpu.Fallback())]
              + cuda.dataflow_lower_passes(tvm_target)
              + cuda.finalize_passes(tvm_target))

    @tvm.transform.module_pass(opt_level=0, name="edgellm_cuda_pipeline")
    def _pipeline(mod, _ctx):
        with tvm_target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


FP16_INFO = {"compute": "fp16", "accumulate": "fp32", "inputs_outputs": "fp32",
             "pass": "relax.transform.ToMixedPrecision(out_dtype=float32)"}


def to_fp16(mod):
    """Half-precision storage and arithmetic, fp32 accumulation in conv2d / matmul, fp32 at the boundary.

    TVM's own ToMixedPrecision: ops that are safe in fp16 run in fp16, the rest (softmax, layer norm
    statistics, ...) keep fp32; the model's inputs and outputs stay fp32, so callers see no difference."""
    from tvm import relax

    return relax.transform.ToMixedPrecision(out_dtype="float32")(mod)


# ---------------------------------------------------------------------------------------------
# nvcc


def nvcc_fatbin(source: str, arch: str, workdir: Path) -> bytes:
    """CUDA C++ -> fatbin with SASS for ``arch`` and PTX for ``compute_XX`` (forward compatibility)."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise EdgeError("nvcc not found", "install the CUDA 13 toolkit or put nvcc on PATH")
    num = arch.split("_", 1)[1]
    src, out = workdir / "kernels.cu", workdir / "kernels.fatbin"
    src.write_text(source)
    cmd = [nvcc, "--fatbin", *NVCC_FLAGS, "-gencode", f"arch=compute_{num},code=sm_{num}",
           "-gencode", f"arch=compute_{num},code=compute_{num}", "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        raise EdgeError(f"nvcc could not compile the generated CUDA kernels for {arch}: {(lines or ['?'])[-1][:300]}",
                        "report this as a compiler bug (kernels.cu: set EDGELLM_KEEP_CUDA=DIR to keep it)")
    if os.environ.get("EDGELLM_KEEP_CUDA"):
        keep = Path(os.environ["EDGELLM_KEEP_CUDA"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, keep / f"kernels-{arch}.cu")
    data = out.read_bytes()
    if len(data) < 16 or struct.unpack_from("<I", data)[0] != FATBIN_MAGIC:
        raise EdgeError("nvcc wrote something that is not a fatbin")
    return data


# ---------------------------------------------------------------------------------------------
# the library binary TVM embeds in model.so (tvm-ffi's format, src/ffi/extra/library_module.cc):
#   <nbytes u64> <indptr vec<u64>> <child_indices vec<u64>> then per module <kind str> [<bytes>]
#   (no bytes for the "_lib" placeholder); str / bytes / vec are a u64 count then the items.
# A cuda module's bytes are <fmt str> <fmap> <code bytes>, code last.


class _Reader:
    def __init__(self, data: bytes, pos: int = 0):
        self.data, self.pos = data, pos

    def u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def raw(self) -> bytes:
        n = self.u64()
        if self.pos + n > len(self.data):
            raise ValueError("truncated library binary")
        v = self.data[self.pos:self.pos + n]
        self.pos += n
        return v

    def vec(self) -> list[int]:
        return [self.u64() for _ in range(self.u64())]


def _raw(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def parse_library_bin(blob: bytes) -> tuple[list[int], list[int], list[tuple[str, bytes | None]]]:
    """(indptr, child_indices, [(kind, bytes or None for _lib)]) of a packed library binary."""
    (nbytes,) = struct.unpack_from("<Q", blob)
    r = _Reader(blob[: 8 + nbytes], 8)
    indptr, children = r.vec(), r.vec()
    modules: list[tuple[str, bytes | None]] = []
    for _ in range(len(indptr) - 1):
        kind = r.raw().decode()
        modules.append((kind, None if kind == "_lib" else r.raw()))
    return indptr, children, modules


def write_library_bin(indptr: list[int], children: list[int], modules: list[tuple[str, bytes | None]]) -> bytes:
    body = struct.pack("<Q", len(indptr)) + b"".join(struct.pack("<Q", v) for v in indptr)
    body += struct.pack("<Q", len(children)) + b"".join(struct.pack("<Q", v) for v in children)
    for kind, data in modules:
        body += _raw(kind.encode()) + (b"" if data is None else _raw(data))
    return struct.pack("<Q", len(body)) + body


def split_cuda_module(data: bytes, source: str | None = None) -> tuple[str, bytes, bytes]:
    """(fmt, fmap bytes, code) of a serialized cuda module.

    fmap's encoding is TVM-internal; code is the last field, so it is found from the end and
    checked against ``source`` when given.
    """
    r = _Reader(data)
    fmt = r.raw().decode()
    start = r.pos
    if source is not None:
        code = source.encode()
        at = len(data) - len(code) - 8
        if at < start or data[at + 8:] != code or struct.unpack_from("<Q", data, at)[0] != len(code):
            raise ValueError("the cuda module's serialized form is not <fmt><fmap><code> with the source last")
        return fmt, data[start:at], code
    # without the source: the first u64 (after fmt) that is the length of everything after it
    # (the code is the longest tail; scanning from the end would stop inside the fatbin's own header)
    for at in range(start, len(data) - 7):
        if struct.unpack_from("<Q", data, at)[0] == len(data) - at - 8:
            return fmt, data[start:at], data[at + 8:]
    raise ValueError("cannot find the code of the cuda module")


def cuda_modules(blob: bytes) -> list[tuple[str, bytes]]:
    """(fmt, code) of every cuda module in a library binary."""
    _, _, modules = parse_library_bin(blob)
    return [split_cuda_module(data)[::2] for kind, data in modules if kind == "cuda"]


def compile_library_bin(blob: bytes, sources: list[str], arch: str, workdir: Path) -> tuple[bytes, list[dict]]:
    """The library binary with every cuda module's source replaced by an nvcc fatbin."""
    indptr, children, modules = parse_library_bin(blob)
    report = []
    for i, (kind, data) in enumerate(modules):
        if kind != "cuda":
            continue
        fmt, fmap, code = split_cuda_module(data)
        if fmt != "cuda" and code[:4] == struct.pack("<I", FATBIN_MAGIC):
            # compiled already, by _nvcc_callback: TVM's CUDA runtime was loaded in this process (a GPU machine)
            modules[i] = ("cuda", _raw(FATBIN_FORMAT.encode()) + fmap + _raw(code))
            report.append({"source_bytes": None, "fatbin_bytes": len(code)})
            continue
        for source in sources:  # the source this module was built from: its serialized code
            try:
                fmt, fmap, _ = split_cuda_module(data, source)
                break
            except ValueError:
                continue
        else:
            raise EdgeError("a CUDA module in the executable holds no CUDA source edgellm can compile",
                            "report this as a compiler bug")
        if fmt != "cuda":
            raise EdgeError(f"TVM produced a CUDA module of format {fmt!r}; edgellm expects CUDA source to compile")
        fatbin = nvcc_fatbin(source, arch, workdir)
        modules[i] = ("cuda", _raw(FATBIN_FORMAT.encode()) + fmap + _raw(fatbin))
        report.append({"source_bytes": len(source), "fatbin_bytes": len(fatbin)})
    return write_library_bin(indptr, children, modules), report


def _asm_for_blob(blob_path: Path) -> str:
    return (f'\t.section .rodata.{LIBRARY_BIN},"a"\n'
            f"\t.globl {LIBRARY_BIN}\n"
            f"\t.type {LIBRARY_BIN}, %object\n"
            "\t.balign 16\n"
            f"{LIBRARY_BIN}:\n"
            f'\t.incbin "{blob_path}"\n'
            f"\t.size {LIBRARY_BIN}, . - {LIBRARY_BIN}\n"
            '\t.section .note.GNU-stack,"",%progbits\n')


def _device_sources(mod) -> list[str]:
    """CUDA source of every cuda module under ``mod``."""
    out: list[str] = []

    def visit(m):
        if m.kind == "cuda":
            out.append(str(m.inspect_source("cuda")))
        for child in m.imports:
            visit(child)

    visit(mod)
    return out


@contextmanager
def _nvcc_callback(arch: str, workdir: Path):
    """Make ``tvm_callback_cuda_compile`` nvcc -> fatbin for ``arch`` while compiling.

    Only consulted where TVM's CUDA runtime library is loaded at build time (a machine with an
    NVIDIA driver): its module factory then compiles the source right away, and without this it
    would compile PTX/cubin for whatever GPU is in the build machine, with NVRTC.
    """
    import tvm_ffi

    import tvm.support.nvcc  # noqa: F401  (registers TVM's own callback first, so nothing overrides ours later)

    name = "tvm_callback_cuda_compile"
    previous = tvm_ffi.get_global_func(name, allow_missing=True)

    def compile_cuda(code, *_target):
        return bytearray(nvcc_fatbin(str(code), arch, workdir))

    tvm_ffi.register_global_func(name, compile_cuda, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func(name, previous, override=True)


def make_pack_imports(arch: str, report: list):
    """An ``fpack_imports`` for ``export_library`` that embeds fatbins instead of CUDA source."""

    def pack(mod, is_system_lib, pack_lib_prefix, workspace_dir):
        import tvm

        if is_system_lib or pack_lib_prefix:
            raise EdgeError("system-lib CUDA modules are not supported")
        blob = bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes())
        sources = _device_sources(mod)
        new_blob, info = compile_library_bin(blob, sources, arch, Path(workspace_dir))
        report.extend(info)
        blob_path = Path(workspace_dir) / "devc.bin"
        blob_path.write_bytes(new_blob)
        asm = Path(workspace_dir) / "devc.S"
        asm.write_text(_asm_for_blob(blob_path))
        return str(asm)

    return pack


# ---------------------------------------------------------------------------------------------
# the package's model.so, read back (tests, `edgellm inspect`-style checks)


def fatbins_in(data: bytes) -> list[bytes]:
    """Every fatbin embedded in ``data`` (e.g. model.so), found by its magic and header."""
    found, at = [], 0
    magic = struct.pack("<I", FATBIN_MAGIC)
    while (at := data.find(magic, at)) >= 0:
        header = struct.unpack_from("<HH", data, at + 4)[1]
        (size,) = struct.unpack_from("<Q", data, at + 8)
        if header == 16 and 0 < size <= len(data) - at - header:
            found.append(data[at:at + header + size])
            at += header + size
        else:
            at += 4
    return found


# ---------------------------------------------------------------------------------------------
# compile


def compile(backend, traced: Traced, target: Target, options: dict, workdir: Path) -> Compiled:
    """Relax -> CUDA pipeline -> VM executable -> model.so with fatbin kernels."""
    tvm = tvm_base.import_compiler()
    check(target)
    arch = sm_arch(target)
    name = options.get("pipeline") or "default"
    if name not in ("default", PIPELINE, "stock"):
        raise EdgeError(f"unknown TVM pipeline {name!r} for a CUDA target", f"known: {PIPELINE} (default), stock")
    mod = tvm_base.to_relax(traced)
    precision = options.get("precision") or "fp32"
    if precision == "fp16":
        mod = to_fp16(mod)
    elif precision != "fp32":
        raise EdgeError(f"unknown precision {precision!r} for a CUDA target", "use fp32 (default) or fp16")
    tvm_target = tvm.target.Target(target.tvm)
    relax_pipeline = tvm.relax.get_default_pipeline(tvm_target) if name == "stock" else pipeline(tvm_target)
    path = workdir / "model.so"
    cxx = tvm_base.cross_compiler(target, platform.machine())
    kernels: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgellm-cuda-", dir=workdir) as tmp, _nvcc_callback(arch, Path(tmp)):
        try:
            executable = tvm.compile(mod, tvm_target, relax_pipeline=relax_pipeline)
        except EdgeError:
            raise
        except Exception as e:  # TVM's errors are long C++ traces: keep the last line
            raise EdgeError(f"TVM could not compile the model for {target.name} ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[-1][:300]})", "report this as a compiler bug") from None
        executable.export_library(str(path), fpack_imports=make_pack_imports(arch, kernels), workspace_dir=tmp,
                                  **({"cc": cxx} if cxx else {}))
    if not kernels:
        raise EdgeError("the compiled model has no CUDA kernels", "report this as a compiler bug")
    return Compiled(
        files={"model.so": path},
        info={
            "name": backend.name,
            "module": "model.so",
            "device": "cuda",
            "tvm": tvm_base.TVM_VERSION,
            "tvm_ffi": tvm_base.FFI_VERSION,
            "pipeline": "stock" if name == "stock" else PIPELINE,
            "tvm_target": str(tvm_target),
            "precision": FP16_INFO if precision == "fp16" else {"compute": "fp32"},
            "cuda": {"arch": arch, "kernel_format": FATBIN_FORMAT, "nvcc": nvcc_version(),
                     "fatbin_bytes": sum(k["fatbin_bytes"] for k in kernels), "cuda_runtime": "libcudart.so.13"},
        },
        runtime_requires=[f"apache-tvm=={tvm_base.TVM_VERSION}", f"apache-tvm-ffi=={tvm_base.FFI_VERSION}", "numpy",
                          "nvidia-cuda-runtime==13.* (libcudart.so.13)", "NVIDIA driver >= 580 (CUDA 13)"],
    )


def nvcc_version() -> str:
    nvcc = find_nvcc()
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError, TypeError):
        return "unknown"
    found = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return found.group(2) if found else "unknown"
