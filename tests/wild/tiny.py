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


def shape_arithmetic(path):
    """What exporters emit for a flatten with dynamic dims: Shape -> Gather / Slice -> ReduceProd -> Concat -> Reshape, a
    new shape computed at run time (TVM 0.27's importer stops at the Reshape: "requires the input new shape to be
    Shape"). The input's dims are dynamic (N, H, W); --input-shape fixes them."""
    rng = np.random.default_rng(0)
    w = nh.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    consts = [nh.from_array(np.array(v, np.int64), n) for n, v in (("i0", [0]), ("b", [1]), ("e", [4]))]
    nodes = [h.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             h.make_node("Shape", ["c"], ["s"]),
             h.make_node("Gather", ["s", "i0"], ["n"], axis=0),
             h.make_node("Slice", ["s", "b", "e"], ["chw"]),
             h.make_node("ReduceProd", ["chw"], ["p"], keepdims=1),
             h.make_node("Concat", ["n", "p"], ["shape"], axis=0),
             h.make_node("Reshape", ["c", "shape"], ["r"]),
             h.make_node("Softmax", ["r"], ["y"], axis=-1)]
    return _save(nodes, [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, "H", "W"])],
                 [h.make_tensor_value_info("y", T.FLOAT, ["N", "CHW"])], [w, *consts], path)
