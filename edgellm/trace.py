"""Capture the model as a static graph (torch.export or ONNX) and its fp32 reference.

The reference outputs are computed here, from the original framework (PyTorch eager, or
ONNX Runtime for ONNX files), on the example inputs: every later stage is judged against them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgellm.errors import EdgeError
from edgellm.runtime.model import TensorSpec
from edgellm.source import Source

ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64"}


@dataclass
class Traced:
    kind: str  # torch | onnx
    graph: Any  # torch.export.ExportedProgram | onnx.ModelProto
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    example_inputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]  # fp32 outputs of the original framework


def parse_shapes(items: list[str] | dict | None) -> dict[str, tuple[int, ...]]:
    """``["x=1x3x224x224", ...]`` -> {"x": (1, 3, 224, 224)}."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {k: tuple(int(d) for d in v) for k, v in items.items()}
    shapes = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
            if not sep or not name or any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise EdgeError(f"cannot read --input-shape {item!r}", "write it as NAME=1x3x224x224") from None
        shapes[name] = shape
    return shapes


def sample(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    """A deterministic example input: N(0, 1) floats, 0/1 integers (valid ids and masks).

    Floats are drawn at half precision so the package's reference sample stores them in half the bytes."""
    rng = np.random.default_rng(seed)
    if np.issubdtype(np.dtype(dtype), np.floating):
        return rng.standard_normal(shape).astype(np.float16).astype(dtype)
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 2, shape).astype(dtype)


def _check_names(shapes: dict, names: list[str]) -> None:
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise EdgeError(f"--input-shape names unknown input {unknown[0]!r}", f"the model's inputs are {', '.join(names)}")


def _outputs(names: list[str] | None, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    if not names or len(names) != len(arrays):
        names = ["output"] if len(arrays) == 1 else [f"output_{i}" for i in range(len(arrays))]
    return dict(zip(names, arrays))


def _flatten(out) -> list[np.ndarray]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out.detach().numpy()]
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in _flatten(o)]
    if isinstance(out, dict):
        return [a for o in out.values() for a in _flatten(o)]
    raise EdgeError(f"the model returned a {type(out).__name__}", "return tensors (or tuples of tensors) from forward()")


def trace_torch(source: Source, shapes: dict) -> Traced:
    import torch

    inputs = dict(source.inputs)
    if source.kind == "pt2":
        program = source.model
        names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        if shapes:
            raise EdgeError("--input-shape cannot change a saved torch.export program (its shapes are fixed)",
                            "export it again with the shapes you want")
        if not inputs:
            metas = [n.meta["val"] for n in program.graph.nodes if n.op == "placeholder" and n.name in names]
            inputs = {n: sample(tuple(m.shape), str(m.dtype).removeprefix("torch.")) for n, m in zip(names, metas)}
        module = program.module()
    else:
        _check_names(shapes, list(inputs))
        for name, shape in shapes.items():
            inputs[name] = sample(shape, str(inputs[name].dtype))
        module = source.model
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs.values())
    with torch.no_grad():
        try:
            reference = _flatten(module(*args))
        except Exception as e:
            raise EdgeError(f"the model failed on its example inputs ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
        if source.kind == "pt2":
            program = source.model
        else:
            try:
                program = torch.export.export(module, args)
            except Exception as e:
                raise EdgeError(f"torch.export could not capture the model ({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})",
                                "make forward() traceable: no data-dependent Python control flow") from None
    outputs = _outputs(source.output_names, reference)
    return Traced(
        "torch", program,
        [TensorSpec(n, tuple(a.shape), str(a.dtype)) for n, a in inputs.items()],
        [TensorSpec(n, tuple(a.shape), str(a.dtype)) for n, a in outputs.items()],
        inputs, outputs,
    )


def trace_onnx(source: Source, shapes: dict) -> Traced:
    import onnxruntime as ort

    graph = source.model.graph
    initializers = {i.name for i in graph.initializer}
    specs = []
    for value in graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dtype = ONNX_DTYPES.get(tensor.elem_type)
        if dtype is None:
            raise EdgeError(f"input {value.name!r} has an ONNX element type ({tensor.elem_type}) edgellm does not take")
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
        if value.name in shapes:
            shape = shapes[value.name]
            if len(shape) != len(dims):
                raise EdgeError(f"--input-shape {value.name} has {len(shape)} dims, the model's input has {len(dims)}")
        elif all(isinstance(d, int) and d > 0 for d in dims):
            shape = tuple(dims)
        else:
            free = [str(d) if isinstance(d, str) and d != "?" else "N" for d in dims if not (isinstance(d, int) and d > 0)]
            raise EdgeError(f"input {value.name!r} has a dynamic shape {dims}",
                            f"fix it with --input-shape {value.name}=" + "x".join(str(d) if isinstance(d, int) and d > 0 else
                                                                              (str(d) if d != "?" else "N") for d in dims)
                            + f", a number for {', '.join(dict.fromkeys(free))}")
        specs.append(TensorSpec(value.name, tuple(shape), dtype))
    _check_names(shapes, [s.name for s in specs])
    inputs = {s.name: sample(s.shape, s.dtype, seed=i) for i, s in enumerate(specs)}
    try:
        session = ort.InferenceSession(source.model.SerializeToString(), providers=["CPUExecutionProvider"])
        reference = session.run(None, inputs)
    except Exception as e:
        raise EdgeError(f"ONNX Runtime cannot run {source.ref} for the fp32 reference ({str(e).splitlines()[0][:300]})") from None
    outputs = dict(zip([o.name for o in graph.output], reference))
    return Traced("onnx", fold_onnx(source.model, specs), specs,
                  [TensorSpec(n, tuple(a.shape), str(a.dtype)) for n, a in outputs.items()], inputs, outputs)


def fold_onnx(model, specs: list[TensorSpec]):
    """The graph with its inputs' dims fixed and all that those dims make constant folded away (shape inference and
    constant folding by onnxslim), so Shape -> Gather / Slice -> ReduceProd -> Concat -> Reshape chains reach the
    importers as constant shapes. Where onnxslim fails, the graph as it came (the importers may still take it)."""
    import onnx
    import onnxslim

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    shapes = {s.name: s.shape for s in specs}
    for value in fixed.graph.input:
        if value.name in shapes:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[value.name]:
                dims.add().dim_value = int(d)
    del fixed.graph.value_info[:]  # dims inferred from the dynamic inputs: inferred again from the fixed ones
    for value in fixed.graph.output:
        value.type.tensor_type.ClearField("shape")
    try:
        return onnxslim.slim(fixed)
    except Exception:  # noqa: BLE001 (onnxslim's own failure: the importers get the model as it came)
        return model


def trace(source: Source, input_shapes: dict | None = None) -> Traced:
    shapes = parse_shapes(input_shapes)
    return trace_onnx(source, shapes) if source.kind == "onnx" else trace_torch(source, shapes)
