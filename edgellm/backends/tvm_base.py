"""What every TVM flow shares (CPU in tvm.py, GPU in tvm_cuda.py): the pinned compiler, the model's
import into Relax, and the C++ compiler that links the module."""

from __future__ import annotations

import re
import shutil
import sys
from importlib import metadata

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
                            "try --backend openvino or --backend auto, or rewrite that part of the model with supported ops") from None
        raise EdgeError(f"TVM could not import the model ({type(e).__name__}: {message.strip().splitlines()[-1][:300]})") from None


def cross_compiler(target: Target, host_arch: str) -> str | None:
    """The C++ compiler that links the module: None (TVM's default) for the host arch."""
    if target.arch == host_arch:
        return None
    cxx = CROSS_CXX[target.arch]
    if shutil.which(cxx) is None:
        raise EdgeError(f"cross-compiling for {target.arch} needs {cxx}", f"apt-get install g++-{target.arch}-linux-gnu")
    return cxx
