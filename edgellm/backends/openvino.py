"""OpenVINO backend: convert the traced graph to OpenVINO IR (model.xml + model.bin, fp32), static shapes.

With ``options["quantize"]`` = "int8" (static, calibrated on ``options["calibration"]``, a list of feed
dicts) or "int8-weights" (weight-only), NNCF quantizes the converted model before it is saved
(edgellm/compress/quantize.py); the IR then carries int8 weights and, for static int8, FakeQuantize nodes
that the CPU plugin turns into int8 kernels.

The IR is compiled on the device by OpenVINO's CPU plugin at load time (edgellm/runtime/engines/openvino.py),
with f32 inference precision: on CPUs with bf16 or AMX, OpenVINO would otherwise run in bf16; ``--precision bf16``
asks for exactly that (INFERENCE_PRECISION_HINT=bf16, edgellm/precision.py).
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from edgellm.backends.base import Compiled
from edgellm.errors import EdgeError
from edgellm.targets import Target
from edgellm.trace import Traced

OPENVINO_VERSION = "2026.4.1"
ARCHES = ("x86_64", "aarch64")  # OpenVINO's CPU plugin: x86-64 and Arm64
# traced dtype -> OpenVINO element type name (ov.Type.get_type_name())
OV_TYPES = {"float32": "f32", "float16": "f16", "float64": "f64", "int64": "i64", "int32": "i32", "int16": "i16",
            "int8": "i8", "uint8": "u8", "bool": "boolean"}


def import_openvino():
    """OpenVINO (converter included), with the version pin checked."""
    try:
        version = metadata.version("openvino")
    except metadata.PackageNotFoundError:
        raise EdgeError("OpenVINO is not installed", f"pip install openvino=={OPENVINO_VERSION}") from None
    if version != OPENVINO_VERSION:
        raise EdgeError(f"openvino {version} is not the tested version", f"pip install openvino=={OPENVINO_VERSION}")
    import openvino

    return openvino


def _unsupported(traced: Traced, ops: list[str]) -> str:
    """'op (node a, b)' for each op OpenVINO could not convert, so the user can find it."""
    parts = []
    for op in ops:
        if traced.kind == "torch":  # OpenVINO names ops after decomposition: aten._linalg_det.default for linalg_det
            stem = op.split(".")[1].lstrip("_") if op.startswith("aten.") else op
            nodes = [n.name for n in traced.graph.graph.nodes if n.op == "call_function" and stem in str(n.target)]
        else:  # ONNX: "Op" in the default domain, "domain.Op" in another one
            nodes = [n.name or f"#{i}" for i, n in enumerate(traced.graph.graph.node)
                     if op in (n.op_type, f"{n.domain}.{n.op_type}")]
        parts.append(f"{op} (node {', '.join(nodes[:3])})" if nodes else op)
    return "; ".join(parts)


def _conversion_error(traced: Traced, e: Exception) -> EdgeError:
    message = str(e)
    missing = re.search(r"No conversion rule found for operations: (.*)", message)
    failed = re.search(r"Conversion is failed for: (.*)", message)
    if missing or failed:
        ops = [o.strip() for o in (missing or failed).group(1).split(",") if o.strip()]
        what = "has no conversion rule for" if missing else "failed to convert"
        return EdgeError(f"OpenVINO {what} op {_unsupported(traced, ops)}", "rewrite that part of the model with supported ops")
    lines = [line.strip() for line in message.strip().splitlines() if line.strip() and not line.startswith("Check ")]
    last = lines[-1] if lines else type(e).__name__
    return EdgeError(f"OpenVINO could not convert the model ({type(e).__name__}: {last[:300]})")


def _match(ports, specs) -> list[int]:
    """IR port index for each traced tensor: by name when the IR has them all, else by position."""
    ports = list(ports)
    by_name: dict[str, int] = {}
    for i, port in enumerate(ports):
        for name in port.get_names():
            by_name.setdefault(name, i)
    order = [by_name.get(s.name) for s in specs]
    if None in order or len(set(order)) != len(order):
        order = list(range(len(specs)))  # OpenVINO keeps the source's order; its names may differ (outputs: 'linear:0')
    return order


def to_openvino(ov, traced: Traced, workdir: Path):
    """ov.Model with static input shapes and the traced input/output names on its tensors."""
    try:
        if traced.kind == "torch":
            model = ov.convert_model(traced.graph)
        else:  # convert_model does not take an in-memory onnx.ModelProto
            path = workdir / "model.onnx"
            path.write_bytes(traced.graph.SerializeToString())
            model = ov.convert_model(str(path))
    except Exception as e:
        raise _conversion_error(traced, e) from None
    if len(model.inputs) != len(traced.inputs) or len(model.outputs) != len(traced.outputs):
        raise EdgeError(f"OpenVINO's model has {len(model.inputs)} input(s) and {len(model.outputs)} output(s), "
                        f"the traced model {len(traced.inputs)} and {len(traced.outputs)}")
    inputs = [model.inputs[i] for i in _match(model.inputs, traced.inputs)]
    outputs = [model.outputs[i] for i in _match(model.outputs, traced.outputs)]
    try:
        model.reshape({port: ov.PartialShape(list(spec.shape)) for port, spec in zip(inputs, traced.inputs)})
    except Exception as e:
        raise EdgeError(f"OpenVINO cannot set static input shapes ({str(e).strip().splitlines()[-1][:300]})") from None
    for port, spec in zip(inputs, traced.inputs):
        got = port.get_element_type().get_type_name()
        if OV_TYPES.get(spec.dtype, spec.dtype) != got:
            raise EdgeError(f"OpenVINO typed input {spec.name!r} as {got}, the model takes {spec.dtype}")
        port.get_tensor().add_names({spec.name})
    for port, spec in zip(outputs, traced.outputs):
        shape = port.get_partial_shape()
        if shape.is_dynamic or tuple(shape.to_shape()) != tuple(spec.shape):
            raise EdgeError(f"OpenVINO infers output {spec.name!r} as {shape}, the model gives {list(spec.shape)}")
        # the names the runtime looks outputs up by (OpenVINO's own are like 'linear:0')
        port.get_tensor().set_names({spec.name})
        port.get_node().set_friendly_name(spec.name)
    return model


class Backend:
    name = "openvino"

    def check(self, target: Target) -> None:
        if target.arch not in ARCHES or target.tvm.get("kind", "llvm") != "llvm":
            kind = target.tvm.get("kind")
            raise EdgeError(f"this edgellm's OpenVINO backend compiles for CPUs ({', '.join(ARCHES)}); target {target.name} is "
                            + (f"{target.arch!r}" if target.arch not in ARCHES else f"{kind!r}"),
                            "pick a CPU target, or --backend tvm")

    def compile(self, traced: Traced, target: Target, options: dict, workdir: Path) -> Compiled:
        self.check(target)
        if (options.get("precision") or "fp32") not in ("fp32", "bf16"):
            raise EdgeError(f"the OpenVINO backend has no {options['precision']} for CPU targets", "use --precision fp32, bf16 or int8")
        if (options.get("pipeline") or "default") != "default":
            raise EdgeError(f"the OpenVINO backend has no pipeline {options['pipeline']!r} (pipelines are TVM's)", "leave --pipeline out")
        ov = import_openvino()
        model = to_openvino(ov, traced, workdir)
        quantized = None
        if options.get("quantize"):
            from edgellm.compress.quantize import quantize_openvino

            model, quantized = quantize_openvino(model, options["quantize"], options.get("calibration"))
        xml = workdir / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        return Compiled(
            files={"model.xml": xml, "model.bin": xml.with_suffix(".bin")},
            info={
                "name": self.name,
                "openvino": OPENVINO_VERSION,
                # pinned: OpenVINO's CPU plugin runs f32 IR in bf16 on CPUs with AVX512-BF16 / AMX unless told
                "precision": "bf16" if options.get("precision") == "bf16" else "f32",
                "device": "CPU",
                "model": "model.xml",
                "weights": "model.bin",
                "input_names": [s.name for s in traced.inputs],
                "output_names": [s.name for s in traced.outputs],
                **({"quantize": quantized} if quantized else {}),
            },
            runtime_requires=[f"openvino=={OPENVINO_VERSION}", "numpy"],
        )
