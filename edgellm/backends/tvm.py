"""Apache TVM (Relax) backend: import, compile with a CPU pipeline, export a shared library."""

from __future__ import annotations

import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

from edgellm.backends import tvm_pipelines
from edgellm.backends.base import Compiled
from edgellm.errors import EdgeError
from edgellm.targets import Target
from edgellm.trace import Traced

TVM_VERSION = "0.27.0.post1"
FFI_VERSION = "0.1.14.post1"  # 0.1.15 is ABI-incompatible with TVM 0.27 (MetaSchedule segfaults)
CROSS_CXX = {"aarch64": "aarch64-linux-gnu-g++"}


def import_compiler():
    """The full TVM (compiler included), with the version pins checked."""
    if "tvm" in sys.modules and getattr(sys.modules["tvm"].base, "_RUNTIME_ONLY", False):
        raise EdgeError("TVM was loaded runtime-only in this process (a package was loaded before building)",
                        "build before loading packages, or set TVM_USE_RUNTIME_LIB=0")
    try:
        versions = metadata.version("apache-tvm"), metadata.version("apache-tvm-ffi")
    except metadata.PackageNotFoundError:
        raise EdgeError("TVM is not installed", f"pip install apache-tvm=={TVM_VERSION} apache-tvm-ffi=={FFI_VERSION}") from None
    if versions != (TVM_VERSION, FFI_VERSION):
        raise EdgeError(f"apache-tvm {versions[0]} with apache-tvm-ffi {versions[1]} is not a tested pair",
                        f"pip install apache-tvm=={TVM_VERSION} apache-tvm-ffi=={FFI_VERSION}")
    import tvm
    from tvm import relax  # noqa: F401

    return tvm


def _unsupported(traced: Traced, ops: list[str]) -> str:
    """'op (node a, b)' for each op the frontend refused, so the user can find it."""
    parts = []
    for op in ops:
        if traced.kind == "torch":  # TVM names ops after decomposition: _linalg_det for linalg_det
            stem = op.split(".")[0].lstrip("_")
            nodes = [n.name for n in traced.graph.graph.nodes if n.op == "call_function" and stem in str(n.target)]
        else:
            nodes = [n.name or f"#{i}" for i, n in enumerate(traced.graph.graph.node) if n.op_type == op]
        parts.append(f"{op} (node {', '.join(nodes[:3])})" if nodes else op)
    return "; ".join(parts)


def to_relax(traced: Traced):
    """Relax IRModule with the weights bound as constants (so FoldConstant can pre-pack them)."""
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.frontend.torch import from_exported_program

    try:
        if traced.kind == "torch":
            return from_exported_program(traced.graph)
        shapes = {s.name: list(s.shape) for s in traced.inputs}
        dtypes = {s.name: s.dtype for s in traced.inputs}
        return from_onnx(traced.graph, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False, sanitize_input_names=False)
    except Exception as e:
        message = str(e)
        found = re.search(r"Unsupported function types \[(.*?)\]", message) or re.search(r"not supported for frontend ONNX: (.*)", message)
        if found:
            ops = [o.strip(" '\"") for o in found.group(1).split(",")]
            raise EdgeError(f"TVM cannot import op {_unsupported(traced, ops)}",
                            "rewrite that part of the model with supported ops") from None
        raise EdgeError(f"TVM could not import the model ({type(e).__name__}: {message.strip().splitlines()[-1][:300]})") from None


def cross_compiler(target: Target, host_arch: str) -> str | None:
    """The C++ compiler that links the module: None (TVM's default) for the host arch."""
    if target.arch == host_arch:
        return None
    cxx = CROSS_CXX[target.arch]
    if shutil.which(cxx) is None:
        raise EdgeError(f"cross-compiling for {target.arch} needs {cxx}", f"apt-get install g++-{target.arch}-linux-gnu")
    return cxx


class Backend:
    name = "tvm"

    def check(self, target: Target) -> None:
        if target.tvm.get("kind") == "cuda":  # NVIDIA GPUs: edgellm/backends/tvm_cuda.py
            from edgellm.backends import tvm_cuda

            return tvm_cuda.check(target)
        if target.tvm.get("kind") != "llvm":
            raise EdgeError(f"this edgellm's TVM backend compiles for CPUs (llvm); target {target.name} is {target.tvm.get('kind')!r}")

    def compile(self, traced: Traced, target: Target, options: dict, workdir: Path) -> Compiled:
        import platform

        if target.tvm.get("kind") == "cuda":
            from edgellm.backends import tvm_cuda

            return tvm_cuda.compile(self, traced, target, options, workdir)
        tvm = import_compiler()
        self.check(target)
        mod = to_relax(traced)
        tvm_target = tvm.target.Target(target.tvm)
        pipeline_name = options.get("pipeline") or "default"
        quant_info = None
        if options.get("quantize") == "int8":  # edgellm/backends/tvm_int8: u8 x s8 -> s32 kernels
            from edgellm.backends import tvm_int8

            if (pipeline_name if pipeline_name != "default" else tvm_pipelines.default_name()) != "edgellm":
                raise EdgeError("TVM int8 needs the edgellm pipeline (its int8 schedule rules)", "drop --pipeline, or use --pipeline edgellm")
            mod, quant_info = tvm_int8.quantize(mod, tvm_target, options, [s.name for s in traced.inputs])
        elif options.get("quantize"):
            from edgellm.compress.quantize import check

            check(self.name, options["quantize"])
        tuning, db_dir = None, None
        if options.get("tune") or options.get("tuning_db"):
            from edgellm.backends import tvm_tune

            if (pipeline_name if pipeline_name != "default" else tvm_pipelines.default_name()) != "edgellm":
                raise EdgeError("tuning needs the edgellm pipeline", "drop --pipeline, or use --pipeline edgellm")
            db_dir = Path(options.get("tuning_db") or tvm_tune.default_db_dir(tvm_target)).expanduser()
            if options.get("tune"):
                tuning = tvm_tune.tune(mod, tvm_target, int(options["tune"]), db_dir, budget_s=options.get("tune_budget"),
                                       progress=options.get("tune_progress"))
            pipeline = tvm_tune.pipeline(tvm_target, db_dir)
        else:
            pipeline = tvm_pipelines.get(pipeline_name, tvm_target)
        # no argument checks inside the kernels: the VM checks the model's inputs once (check_tensor_info /
        # match_shape), and then calls its kernels only with the tensors it planned. Each kernel's check
        # prologue is ~4 kB of code: kws-cnn int8's model.so 107 -> 66 kB (fp32 143 -> 119 kB)
        with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
            executable = tvm.compile(mod, tvm_target, relax_pipeline=pipeline)
        path = workdir / "model.so"
        cxx = cross_compiler(target, platform.machine())
        # no DWARF in the shipped model.so (TVM's LLVM codegen emits it; 0.15 MB of MobileNet-V2's fp32 .so,
        # 0.37 MB of its int8 one, where it is 8% of the file); the runtime only needs the dynamic symbols
        executable.export_library(str(path), options=["-Wl,--strip-debug"], **({"cc": cxx} if cxx else {}))
        return Compiled(
            files={"model.so": path},
            info={
                "name": self.name,
                "module": "model.so",
                "tvm": TVM_VERSION,
                "tvm_ffi": FFI_VERSION,
                "pipeline": tvm_pipelines.default_name() if pipeline_name == "default" else pipeline_name,
                "tvm_target": str(tvm_target),
                **({"tuning_db": str(db_dir)} if db_dir else {}),
                **({"quantize": quant_info} if quant_info else {}),
                **({"tuning": {k: tuning[k] for k in ("tasks", "tuned", "reused", "skipped", "trials", "seconds")}}
                   if tuning else {}),
            },
            runtime_requires=[f"apache-tvm=={TVM_VERSION}", f"apache-tvm-ffi=={FFI_VERSION}", "numpy"],
        )
