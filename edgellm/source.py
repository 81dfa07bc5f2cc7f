"""Load any model reference into a model object plus example inputs.

References: ``model.onnx``, ``program.pt2`` (torch.export.save), ``file.py:fn`` (a factory
returning ``(module, example_inputs)``), and ``zoo:NAME`` (the bundled examples).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import EdgeError
from edgellm.runtime.package import sha256_file


@dataclass
class Source:
    ref: str
    kind: str  # onnx | pt2 | factory | zoo
    sha256: str
    model: Any  # torch.nn.Module | torch.export.ExportedProgram | onnx.ModelProto
    inputs: dict[str, np.ndarray]  # example inputs in the model's order; empty: derive from the model
    output_names: list[str] | None = None
    description: str = ""
    weights: str = ""
    info: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        if self.kind == "zoo":
            return self.ref.split(":", 1)[1]
        return Path(self.ref.split(":")[0]).stem


def load(ref: str) -> Source:
    if ref.startswith("zoo:"):
        return _zoo(ref)
    path_part, sep, fn = ref.rpartition(":")
    if sep and path_part.endswith(".py"):
        return _factory(ref, Path(path_part), fn)
    path = Path(ref)
    if path.suffix == ".py":
        raise EdgeError(f"{ref} names a Python file but no factory", f"use {ref}:FUNCTION")
    if not path.exists():
        raise EdgeError(f"model file {ref} does not exist")
    if path.suffix == ".onnx":
        return _onnx(ref, path)
    if path.suffix == ".pt2":
        return _pt2(ref, path)
    raise EdgeError(f"cannot tell what kind of model {ref} is", "give a .onnx or .pt2 file, file.py:function, or zoo:NAME")


def _torch_sha256(module) -> str:
    """Identity of a torch model: its class and every weight, byte for byte."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _to_numpy(value, what: str) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    raise EdgeError(f"{what} is a {type(value).__name__}, not a tensor")


def _named_inputs(module, inputs, what: str) -> dict[str, np.ndarray]:
    """Example inputs as an ordered {name: array}; names from forward()'s signature."""
    if isinstance(inputs, dict):
        return {k: _to_numpy(v, f"{what} input {k!r}") for k, v in inputs.items()}
    if not isinstance(inputs, (tuple, list)):
        inputs = (inputs,)
    params = [p.name for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) < len(inputs):
        params += [f"input_{i}" for i in range(len(params), len(inputs))]
    return {params[i]: _to_numpy(v, f"{what} input {i}") for i, v in enumerate(inputs)}


def _from_torch(ref: str, kind: str, result, what: str) -> Source:
    import torch

    output_names = description = weights = None
    if hasattr(result, "module") and hasattr(result, "inputs"):  # a ZooModel or look-alike
        module, inputs = result.module, result.inputs
        output_names = getattr(result, "output_names", None)
        description, weights = getattr(result, "description", ""), getattr(result, "weights", "")
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        module, inputs = result
    else:
        raise EdgeError(f"{what} returned a {type(result).__name__}", "return (torch.nn.Module, example_inputs)")
    if not isinstance(module, torch.nn.Module):
        raise EdgeError(f"{what} returned a {type(module).__name__} where a torch.nn.Module belongs", "return (torch.nn.Module, example_inputs)")
    named = _named_inputs(module, inputs, what)
    if not named:
        raise EdgeError(f"{what} returned no example inputs", "return (module, (example_tensor, ...))")
    return Source(ref, kind, _torch_sha256(module), module.eval(), named, output_names, description or "", weights or "")


def _zoo(ref: str) -> Source:
    from edgellm import zoo

    name = ref.split(":", 1)[1]
    if name not in zoo.ZOO:
        raise EdgeError(f"unknown zoo model {name!r}", f"known: {', '.join(zoo.names())}")
    return _from_torch(ref, "zoo", zoo.build(name), f"zoo model {name}")


def load_function(ref: str, what: str = "function", hint: str = "def NAME(): ..."):
    """The function ``fn`` of ``file.py:fn`` (the file imported with its folder on sys.path)."""
    file, _, fn = ref.rpartition(":")
    path = Path(file)
    if not file or not fn or path.suffix != ".py":
        raise EdgeError(f"{what} {ref!r} is not file.py:function", f"e.g. train.py:{fn or 'finetune'}")
    if not path.is_file():
        raise EdgeError(f"{what} file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"edgellm_user_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent.resolve()))  # let the file import its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code failed: say where, not our stack
        raise EdgeError(f"importing {path} raised {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(str(path.parent.resolve()))
    function = getattr(module, fn, None)
    if not callable(function):
        raise EdgeError(f"{path} has no function {fn!r}", f"define {hint.replace('NAME', fn)}")
    return function


def _factory(ref: str, path: Path, fn: str) -> Source:
    if not path.is_file():
        raise EdgeError(f"factory file {path} does not exist")
    factory = load_function(ref, "factory", "def NAME(): return module, example_inputs")
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        result = factory()
    except EdgeError:
        raise
    except Exception as e:  # the user's code failed: say where, not our stack
        raise EdgeError(f"factory {ref} raised {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(str(path.parent.resolve()))
    source = _from_torch(ref, "factory", result, f"factory {ref}")
    source.info["file_sha256"] = sha256_file(path)
    return source


def _onnx(ref: str, path: Path) -> Source:
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:
        raise EdgeError(f"{ref} is not a valid ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return Source(ref, "onnx", sha256_file(path), model, {}, [o.name for o in model.graph.output])


def _pt2(ref: str, path: Path) -> Source:
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as e:
        raise EdgeError(f"{ref} is not a torch.export program ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                        "save one with torch.export.save(torch.export.export(model, args), 'model.pt2')") from None
    inputs = {}
    if program.example_inputs:
        args, _ = program.example_inputs
        names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        inputs = {n: _to_numpy(a, f"{ref} example input") for n, a in zip(names, args)}
    return Source(ref, "pt2", sha256_file(path), program, inputs)
