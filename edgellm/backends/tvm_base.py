"""What every TVM flow shares (CPU in tvm.py, GPU in tvm_cuda.py): the pinned compiler, the model's
import into Relax, and the C++ compiler that links the module."""

from __future__ import annotations

import re
import shutil
import sys
from importlib import metadata

import numpy as np

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


def _lstm_steps(node, shapes: dict, inits: dict, opset: int):
    """An LSTM node as its time steps in MatMul / Sigmoid / Tanh (forward, default activations, weights as initializers,
    no peepholes, clip or sequence_lens, a static sequence length), or None where it is not such a node."""
    from onnx import helper, numpy_helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inputs = list(node.input) + [""] * (8 - len(node.input))
    x, w, r, b, lens, h0, c0, peep = inputs[:8]
    seq, batch = (shapes.get(x) or [None, None])[:2]
    if (attrs.get("direction", b"forward") not in (b"forward", "forward") or "activations" in attrs or "clip" in attrs
            or attrs.get("input_forget", 0) or attrs.get("layout", 0) or lens or peep or w not in inits or r not in inits
            or (b and b not in inits) or not isinstance(seq, int) or not isinstance(batch, int) or seq <= 0 or batch <= 0):
        return None
    hidden = int(attrs["hidden_size"])
    p = (node.name or node.output[0]).replace("/", "_") + "_step"
    consts = {f"{p}_Wt": numpy_helper.to_array(inits[w])[0].T.copy(), f"{p}_Rt": numpy_helper.to_array(inits[r])[0].T.copy(),
              f"{p}_b": (numpy_helper.to_array(inits[b])[0, :4 * hidden] + numpy_helper.to_array(inits[b])[0, 4 * hidden:]) if b
              else np.zeros(4 * hidden, np.float32), f"{p}_bh": np.array([batch, hidden], np.int64),
              f"{p}_step_shape": np.array([1, 1, batch, hidden], np.int64), f"{p}_state_shape": np.array([1, batch, hidden], np.int64),
              f"{p}_zeros": np.zeros((batch, hidden), np.float32)}
    for k in range(5):
        consts[f"{p}_at{k}"] = np.array([k * hidden], np.int64)
    consts[f"{p}_axis1"] = np.array([1], np.int64)
    nodes = []

    def add(op, ins, out, **kw):
        nodes.append(helper.make_node(op, ins, [out], **kw))
        return out

    h = add("Reshape", [h0, f"{p}_bh"], f"{p}_h_init") if h0 else f"{p}_zeros"
    c = add("Reshape", [c0, f"{p}_bh"], f"{p}_c_init") if c0 else f"{p}_zeros"
    steps = []
    for t in range(seq):
        consts[f"{p}_t{t}"] = np.array(t, np.int64)
        xt = add("Gather", [x, f"{p}_t{t}"], f"{p}_x{t}", axis=0)
        gates = add("Add", [add("Add", [add("MatMul", [xt, f"{p}_Wt"], f"{p}_xw{t}"), add("MatMul", [h, f"{p}_Rt"], f"{p}_hr{t}")],
                                f"{p}_s{t}"), f"{p}_b"], f"{p}_gates{t}")
        i, o, f, g = (add("Slice", [gates, f"{p}_at{k}", f"{p}_at{k + 1}", f"{p}_axis1"], f"{p}_{n}{t}") for k, n in enumerate("iofg"))
        i, o, f = (add("Sigmoid", [v], f"{v}_act") for v in (i, o, f))
        c = add("Add", [add("Mul", [f, c], f"{p}_fc{t}"), add("Mul", [i, add("Tanh", [g], f"{g}_act")], f"{p}_ig{t}")], f"{p}_c{t}")
        h = add("Mul", [o, add("Tanh", [c], f"{p}_tc{t}")], f"{p}_h{t}")
        steps.append(add("Reshape", [h, f"{p}_step_shape"], f"{p}_y{t}"))
    outs = list(node.output) + [""] * (3 - len(node.output))
    if outs[0]:
        add("Concat", steps, outs[0], axis=0)
    if outs[1]:
        add("Reshape", [h, f"{p}_state_shape"], outs[1])
    if outs[2]:
        add("Reshape", [c, f"{p}_state_shape"], outs[2])
    return nodes, [numpy_helper.from_array(v, k) for k, v in consts.items()]


def unroll_lstms(model):
    """The ONNX model with each LSTM that _lstm_steps takes written as its steps: TVM 0.27's ONNX importer has no LSTM,
    and the recurrent models edge devices run (silero-vad's decoder) step one frame per call."""
    import onnx

    if not any(n.op_type == "LSTM" for n in model.graph.node):
        return model
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    inits = {i.name: i for i in model.graph.initializer}
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    for node in model.graph.node:
        steps = _lstm_steps(node, shapes, inits, opset) if node.op_type == "LSTM" else None
        if steps is None:
            out.graph.node.append(node)
        else:
            out.graph.node.extend(steps[0])
            out.graph.initializer.extend(steps[1])
    return out


def to_relax(traced: Traced):
    """Relax IRModule with the weights bound as constants (so FoldConstant can pre-pack them)."""
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.relax.frontend.torch import from_exported_program

    try:
        if traced.kind == "torch":
            return from_exported_program(traced.graph)
        shapes = {s.name: list(s.shape) for s in traced.inputs}
        dtypes = {s.name: s.dtype for s in traced.inputs}
        return from_onnx(unroll_lstms(traced.graph), shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False, sanitize_input_names=False)
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
