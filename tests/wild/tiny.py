"""Tiny ONNX models, written with onnx.helper, that carry what real exporters emit (and one op TVM lacks)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def _save(nodes, inputs, outputs, inits, path, opset=17):
    model = h.make_model(h.make_graph(nodes, "g", inputs, outputs, inits), opset_imports=[h.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def tvm_lacks(path):
    """Celu: ONNX Runtime and OpenVINO run it, TVM 0.27's ONNX importer has no converter for it."""
    return _save([h.make_node("Celu", ["x"], ["y"], alpha=1.0)], [h.make_tensor_value_info("x", T.FLOAT, [1, 8])],
                 [h.make_tensor_value_info("y", T.FLOAT, [1, 8])], [], path)
