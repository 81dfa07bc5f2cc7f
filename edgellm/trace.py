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


def parse_values(items: list[str] | dict | None) -> dict[str, float | list[float]]:
    """``["sr=16000", "bias=0.5,1"]`` -> {"sr": 16000, "bias": [0.5, 1]}: what --input-value freezes an input to."""
    if not items:
        return {}
    if isinstance(items, dict):
        return dict(items)
    values = {}
    for item in items:
        name, sep, text = item.partition("=")
        try:
            numbers = [float(v) if any(c in v for c in ".eE") or v.strip().lower() in ("nan", "inf", "-inf") else int(v)
                       for v in text.split(",")]
            if not sep or not name:
                raise ValueError
        except ValueError:
            raise EdgeError(f"cannot read --input-value {item!r}", "write it as NAME=16000 (or NAME=1,2,3 for a vector)") from None
        values[name] = numbers[0] if len(numbers) == 1 else numbers
    return values


def load_sample(path: str | None) -> dict[str, np.ndarray]:
    """The inputs in a --sample .npz, by input name (keys NAME, or input.NAME as a package's reference.npz has them)."""
    if not path:
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise EdgeError(f"cannot read --sample {path}: {e}", "give an .npz written by numpy.savez(path, NAME=array, ...)") from None
    found = {k.removeprefix("input."): v for k, v in arrays.items() if not k.startswith("output.")}
    if not found:
        raise EdgeError(f"--sample {path} holds no arrays", "write it with numpy.savez(path, NAME=array, ...), one per model input")
    return found


def _frozen(model, values: dict):
    """The ONNX model with each input in ``values`` turned into a constant of its type (and shape, where it has one)."""
    import onnx
    from onnx import numpy_helper

    inputs = {v.name: v for v in model.graph.input}
    frozen = onnx.ModelProto()
    frozen.CopyFrom(model)
    for name, value in values.items():
        if name not in inputs:
            raise EdgeError(f"--input-value names unknown input {name!r}", f"the model's inputs are {', '.join(inputs)}")
        tensor = inputs[name].type.tensor_type
        dtype = ONNX_DTYPES.get(tensor.elem_type)
        if dtype is None:
            raise EdgeError(f"input {name!r} has an ONNX element type ({tensor.elem_type}) --input-value cannot make")
        array = np.asarray(value, dtype=dtype)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim] if tensor.HasField("shape") else None
        if dims is not None and None not in dims:
            if int(np.prod(dims)) != array.size:
                raise EdgeError(f"--input-value {name} gives {array.size} value(s), the input has shape {dims}")
            array = array.reshape(dims)
        elif dims is not None and len(dims) == 1:
            array = array.reshape(-1)
        elif dims is not None and len(dims) != array.ndim:
            raise EdgeError(f"input {name!r} has {len(dims)} dims, some dynamic: --input-value cannot tell its shape",
                            "give its value in --sample FILE.npz instead")
        frozen.graph.input.remove(next(v for v in frozen.graph.input if v.name == name))
        frozen.graph.initializer.append(numpy_helper.from_array(array, name))
    return frozen


def sample(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    """A deterministic example input: N(0, 1) floats, 0/1 integers (valid ids and masks).

    Floats are drawn at half precision so the package's reference sample stores them in half the bytes."""
    rng = np.random.default_rng(seed)
    if np.issubdtype(np.dtype(dtype), np.floating):
        return rng.standard_normal(shape).astype(np.float16).astype(dtype)
    if dtype == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 2, shape).astype(dtype)


def _sample_inputs(specs: list[TensorSpec], given: dict) -> dict[str, np.ndarray]:
    """The --sample arrays (checked against the inputs, cast to their dtypes), random draws for the inputs it lacks."""
    unknown = sorted(set(given) - {s.name for s in specs})
    if unknown:
        raise EdgeError(f"--sample has an array {unknown[0]!r} that is no input of the model", f"the inputs are {', '.join(s.name for s in specs)}")
    inputs = {}
    for i, s in enumerate(specs):
        if s.name not in given:
            inputs[s.name] = sample(s.shape, s.dtype, seed=i)
            continue
        array = np.asarray(given[s.name])
        if tuple(array.shape) != tuple(s.shape):
            raise EdgeError(f"--sample array {s.name!r} has shape {list(array.shape)}, the input {list(s.shape)}")
        if np.issubdtype(np.dtype(s.dtype), np.floating) != np.issubdtype(array.dtype, np.floating):
            raise EdgeError(f"--sample array {s.name!r} is {array.dtype}, the input {s.dtype}")
        inputs[s.name] = array.astype(s.dtype)
    return inputs


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


def trace_torch(source: Source, shapes: dict, given: dict | None = None) -> Traced:
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
    if given:
        inputs = _sample_inputs([TensorSpec(n, tuple(given.get(n, a).shape), str(a.dtype)) for n, a in inputs.items()],
                                {**given, **{n: a for n, a in inputs.items() if n not in given}})
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


def trace_onnx(source: Source, shapes: dict, values: dict | None = None, given: dict | None = None) -> Traced:
    """``values``: inputs frozen to constants (--input-value) before anything else; ``given``: the inputs to trace and
    verify with (--sample), in place of random draws, their shapes fixing dims --input-shape does not."""
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # ORT's graph warnings are not the user's business
    model = _frozen(source.model, values) if values else source.model
    given = given or {}
    graph = model.graph
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
        elif value.name in given and np.ndim(given[value.name]) == len(dims):  # dynamic dims: the sample's
            shape = tuple(np.shape(given[value.name]))
        else:
            free = [str(d) if isinstance(d, str) and d != "?" else "N" for d in dims if not (isinstance(d, int) and d > 0)]
            raise EdgeError(f"input {value.name!r} has a dynamic shape {dims}",
                            f"give it with --input-shape {value.name}=" + "x".join(str(d) if isinstance(d, int) and d > 0 else "N" for d in dims)
                            + f", a number for each N: {', '.join(dict.fromkeys(free))}")
        specs.append(TensorSpec(value.name, tuple(shape), dtype))
    _check_names(shapes, [s.name for s in specs])
    inputs = _sample_inputs(specs, given)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        reference = session.run(None, inputs)
    except Exception as e:
        # an int scalar drawn at random (a sample rate, a length) is the usual cause: say which and how to give it
        guessed = [s.name for s in specs if s.name not in given and len(s.shape) <= 1 and not np.issubdtype(np.dtype(s.dtype), np.floating)]
        fix = (f"freeze {'them' if len(guessed) > 1 else 'it'} with " + " ".join(f"--input-value {n}=VALUE" for n in guessed)
               + ", or give real inputs with --sample FILE.npz") if guessed else None
        raise EdgeError(f"ONNX Runtime cannot run {source.ref} for the fp32 reference ({str(e).splitlines()[0][:300]})"
                        + (f" on random values for its int input {', '.join(map(repr, guessed))}" if guessed else ""), fix) from None
    outputs = dict(zip([o.name for o in graph.output], reference))
    return Traced("onnx", fold_onnx(model, specs), specs,
                  [TensorSpec(n, tuple(a.shape), str(a.dtype)) for n, a in outputs.items()], inputs, outputs)


def fold_onnx(model, specs: list[TensorSpec]):
    """The graph with its inputs' dims fixed and all that those dims (and frozen inputs) make constant folded away, so
    Shape -> Gather / Slice -> ReduceProd -> Concat -> Reshape chains and an If on a constant reach the importers as
    constants. onnxscript's optimizer does it (shape inference, constant folding, If inlining; pure Python, standard
    ops out). Tried and dropped: onnxslim 0.1.98 lost outer-scope names when it inlined an If; ONNX Runtime's offline
    basic optimizer crashed the process inlining silero-vad's If. Where it fails, the graph as it came."""
    import onnx
    import onnxscript.optimizer

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
    try:
        folded = onnxscript.optimizer.optimize(fixed)
        again = _fold_constant_nodes(folded)
        if again is not folded:
            folded = onnxscript.optimizer.optimize(again)
    except Exception:  # noqa: BLE001 (the optimizer's own failure: the importers get the model as it came)
        return model
    if any(n.domain not in ("", "ai.onnx") for n in folded.graph.node) or [o.name for o in folded.graph.output] != [o.name for o in model.graph.output]:
        return model
    return folded


NOT_FOLDED = {"If", "Loop", "Scan", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def _fold_constant_nodes(model):
    """Nodes whose inputs are all constants replaced by their value, computed by ONNX's reference evaluator: what
    onnxscript's folder leaves after it inlines an If (silero-vad's STFT padding, ConstantOfShape -> Concat -> Pad)."""
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    keep, added = [], []
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        inputs = [i for i in node.input if i]
        if (node.domain not in ("", "ai.onnx") or node.op_type in NOT_FOLDED or not inputs or not all(i in values for i in inputs)
                or any(o in outputs for o in node.output) or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            keep.append(node)
            continue
        try:
            results = ReferenceEvaluator(node).run(None, {i: values[i] for i in inputs})
        except Exception:  # noqa: BLE001 (not evaluable here: the node stays)
            keep.append(node)
            continue
        for name, value in zip(node.output, results):
            if name:
                values[name] = np.asarray(value)
                added.append(numpy_helper.from_array(np.asarray(value), name))
    if not added:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(keep)
    out.graph.initializer.extend(added)
    return out


def _check_reference(outputs: dict[str, np.ndarray]) -> None:
    """Refuse a vacuous comparison: a reference that is zero everywhere proves nothing about a compiled model."""
    if outputs and all(not np.any(a) for a in outputs.values()):
        raise EdgeError("the model's outputs are all zero on the sample inputs, so verifying against them would prove nothing",
                        "give real inputs with --sample FILE.npz")


def trace(source: Source, input_shapes: dict | None = None, input_values: dict | None = None, sample_file: str | None = None) -> Traced:
    shapes = parse_shapes(input_shapes)
    values = parse_values(input_values)
    given = load_sample(sample_file)
    if source.kind == "onnx":
        traced = trace_onnx(source, shapes, values, given)
    else:
        if values:
            raise EdgeError("--input-value freezes inputs of ONNX models", "for a PyTorch model, fix the value in forward() and export again")
        traced = trace_torch(source, shapes, given)
    _check_reference(traced.reference)
    return traced
