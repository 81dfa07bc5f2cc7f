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


def if_on_input(path):
    """What silero-vad's export carries: an If on an int64 scalar input (the sample rate) choosing the branch, and a
    recurrent state in and out (h = tanh(x W + state U), y = h V), so a stream of calls carries the state on."""
    rng = np.random.default_rng(1)
    W, U, V = ((rng.standard_normal(s) * 0.4).astype(np.float32) for s in ((16, 8), (8, 8), (8, 2)))

    def branch(name, scale):
        nodes = [h.make_node("MatMul", ["x", "W"], [f"{name}_a"]), h.make_node("MatMul", ["state", "U"], [f"{name}_b"]),
                 h.make_node("Add", [f"{name}_a", f"{name}_b"], [f"{name}_c"]),
                 h.make_node("Mul", [f"{name}_c", f"{name}_k"], [f"{name}_d"]),
                 h.make_node("Tanh", [f"{name}_d"], [f"{name}_h"]), h.make_node("MatMul", [f"{name}_h", "V"], [f"{name}_y"])]
        return h.make_graph(nodes, name, [], [h.make_tensor_value_info(f"{name}_y", T.FLOAT, [1, 2]),
                                              h.make_tensor_value_info(f"{name}_h", T.FLOAT, [1, 8])],
                            [nh.from_array(np.array(scale, np.float32), f"{name}_k")])

    nodes = [h.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
             h.make_node("If", ["is16k"], ["y", "state_out"], then_branch=branch("at16k", 1.0), else_branch=branch("at8k", 0.5))]
    inits = [nh.from_array(a, n) for n, a in (("W", W), ("U", U), ("V", V))] + [nh.from_array(np.array(16000, np.int64), "sr16k")]
    return _save(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 16]), h.make_tensor_value_info("state", T.FLOAT, [1, 8]),
                         h.make_tensor_value_info("sr", T.INT64, [])],
                 [h.make_tensor_value_info("y", T.FLOAT, [1, 2]), h.make_tensor_value_info("state_out", T.FLOAT, [1, 8])], inits, path)


def tiny_outputs(path):
    """A detector's head on noise: outputs ~1e-6 everywhere, where an error relative to max(1, scale) proves nothing."""
    return _save([h.make_node("Mul", ["x", "k"], ["y"])], [h.make_tensor_value_info("x", T.FLOAT, [1, 64])],
                 [h.make_tensor_value_info("y", T.FLOAT, [1, 64])], [nh.from_array(np.array(1e-6, np.float32), "k")], path)


def upsampler(path, keep_resize_after_conv: bool = True):
    """A decoder's tail (segmentation, OCR detection): Conv -> Resize (linear, x2) -> ConvTranspose (stride 2) -> Resize."""
    rng = np.random.default_rng(2)
    w1 = nh.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w1")
    w2 = nh.from_array((rng.standard_normal((8, 4, 2, 2)) * 0.3).astype(np.float32), "w2")
    scales = nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [h.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1]),
             h.make_node("Relu", ["a"], ["b"]),
             h.make_node("Resize", ["b", "", "scales"], ["b2"], mode="linear"),
             h.make_node("ConvTranspose", ["b2", "w2"], ["c"], strides=[2, 2]),
             h.make_node("Resize", ["c", "", "scales"], ["y"], mode="nearest")]
    return _save(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])], [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 64, 64])],
                 [w1, w2, scales], path)


def lstm(path, seq=3):
    """A recurrent audio head (silero-vad v6's decoder): LSTM over `seq` frames with h/c state in and out."""
    rng = np.random.default_rng(3)
    hidden, feat = 8, 6
    inits = [nh.from_array((rng.standard_normal(s) * 0.4).astype(np.float32), n)
             for n, s in (("W", (1, 4 * hidden, feat)), ("R", (1, 4 * hidden, hidden)), ("B", (1, 8 * hidden)))]
    nodes = [h.make_node("LSTM", ["x", "W", "R", "B", "", "h", "c"], ["y", "h_out", "c_out"], hidden_size=hidden)]
    return _save(nodes, [h.make_tensor_value_info("x", T.FLOAT, [seq, 1, feat]), h.make_tensor_value_info("h", T.FLOAT, [1, 1, hidden]),
                         h.make_tensor_value_info("c", T.FLOAT, [1, 1, hidden])],
                 [h.make_tensor_value_info("y", T.FLOAT, [seq, 1, 1, hidden]), h.make_tensor_value_info("h_out", T.FLOAT, [1, 1, hidden]),
                  h.make_tensor_value_info("c_out", T.FLOAT, [1, 1, hidden])], inits, path)


def conv_then_reduce(path):
    """Magika's body (keras Conv1D -> ONNX): an NCHW conv over (C, L, 1), Slice + Squeeze of the unit dim, ReduceMax over
    L, a variance over C floored by Max (TVM imports it as stack + max). TVM 0.27's ConvertLayout fails on that max, for
    the whole module."""
    rng = np.random.default_rng(5)
    w = nh.from_array((rng.standard_normal((8, 4, 5, 1)) * 0.3).astype(np.float32), "w")
    consts = [nh.from_array(np.array(v, np.int64), n) for n, v in (("zero", [0]), ("one", [1]), ("two", [2]), ("three", [3]))]
    floor = nh.from_array(np.array([0.0], np.float32), "floor")
    nodes = [h.make_node("Conv", ["x", "w"], ["a"]),
             h.make_node("Slice", ["a", "zero", "one", "three"], ["a1"]),
             h.make_node("Squeeze", ["a1", "three"], ["b"]),
             h.make_node("ReduceMax", ["b"], ["c"], axes=[2], keepdims=1),
             h.make_node("Squeeze", ["c", "two"], ["d"]),
             h.make_node("Mul", ["d", "d"], ["d2"]),
             h.make_node("ReduceSum", ["d2", "one"], ["e"], keepdims=0),
             h.make_node("Max", ["e", "floor"], ["y"])]
    return _save(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 4, 16, 1])], [h.make_tensor_value_info("y", T.FLOAT, [1])],
                 [w, floor, *consts], path)


def conv1d(path):
    """An audio front end (silero-vad): 1-D convs, strided, padded, dilated, grouped, with bias and ReLU."""
    rng = np.random.default_rng(6)
    inits = [nh.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("w1", (16, 4, 5)), ("b1", (16,)), ("w2", (8, 4, 3)), ("w3", (6, 8, 3)))]
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["a"], strides=[2], pads=[2, 1]),
             h.make_node("Relu", ["a"], ["b"]),
             h.make_node("Conv", ["b", "w2"], ["c"], group=4, dilations=[2], pads=[2, 2]),
             h.make_node("Conv", ["c", "w3"], ["y"], pads=[1, 1])]
    return _save(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 4, 33])], [h.make_tensor_value_info("y", T.FLOAT, [1, 6, 16])],
                 inits, path)


def stft_conv(path):
    """silero-vad's STFT: a strided 1-D conv from 1 channel to 2 x 9 (real, imaginary) = 18 channels, not a multiple
    of any vector width, then the magnitude of the two halves."""
    rng = np.random.default_rng(7)
    inits = [nh.from_array((rng.standard_normal((18, 1, 16)) * 0.3).astype(np.float32), "w"),
             *[nh.from_array(np.array(v, np.int64), n) for n, v in (("z", [0]), ("m", [9]), ("e", [18]), ("one", [1]))]]
    nodes = [h.make_node("Conv", ["x", "w"], ["a"], strides=[8]),
             h.make_node("Slice", ["a", "z", "m", "one"], ["re"]),
             h.make_node("Slice", ["a", "m", "e", "one"], ["im"]),
             h.make_node("Mul", ["re", "re"], ["re2"]),
             h.make_node("Mul", ["im", "im"], ["im2"]),
             h.make_node("Add", ["re2", "im2"], ["y"])]
    return _save(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 1, 96])], [h.make_tensor_value_info("y", T.FLOAT, [1, 9, 11])],
                 inits, path)


def yolo_head(path):
    """A YOLOv8 / DBNet head: Conv -> SiLU (Sigmoid * x) -> 1x1 convs to 18 classes and to 16 x 2 DFL bins (Softmax over
    axis 1), and a 2x2 stride-2 ConvTranspose to 1 channel -> Sigmoid (DBNet's probability map)."""
    rng = np.random.default_rng(10)
    inits = [nh.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("wc", (18, 8, 1, 1)), ("wd", (32, 8, 1, 1)), ("wt", (8, 1, 2, 2)))]
    inits.append(nh.from_array(np.array([1, 16, 2, 64], np.int64), "shape"))
    nodes = [h.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1], strides=[2, 2]),
             h.make_node("Sigmoid", ["a"], ["s"]),
             h.make_node("Mul", ["a", "s"], ["f"]),
             h.make_node("Conv", ["f", "wc"], ["cls"]),
             h.make_node("Conv", ["f", "wd"], ["d"]),
             h.make_node("Reshape", ["d", "shape"], ["d2"]),
             h.make_node("Softmax", ["d2"], ["dfl"], axis=1),
             h.make_node("ConvTranspose", ["f", "wt"], ["t"], strides=[2, 2]),
             h.make_node("Sigmoid", ["t"], ["prob"])]
    outs = [h.make_tensor_value_info("cls", T.FLOAT, [1, 18, 8, 8]), h.make_tensor_value_info("dfl", T.FLOAT, [1, 16, 2, 64]),
            h.make_tensor_value_info("prob", T.FLOAT, [1, 1, 16, 16])]
    return _save(nodes, [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 16, 16])], outs, inits, path)


def one_hot_embedding(path):
    """magika's byte embedding: Equal(bytes[..., None], arange(257)) -> Cast -> MatMul(W[257, 16]); a byte outside
    0..256 (magika's padding value is 256; anything else) gets an all-zero one-hot row."""
    rng = np.random.default_rng(11)
    inits = [nh.from_array(np.arange(257, dtype=np.int32).reshape(1, 1, 257), "classes"),
             nh.from_array((rng.standard_normal((257, 16)) * 0.3).astype(np.float32), "w"),
             nh.from_array(np.array([1, 12, 1], np.int64), "shape")]
    nodes = [h.make_node("Reshape", ["bytes", "shape"], ["b"]),
             h.make_node("Equal", ["b", "classes"], ["eq"]),
             h.make_node("Cast", ["eq"], ["oh"], to=T.FLOAT),
             h.make_node("MatMul", ["oh", "w"], ["y"])]
    return _save(nodes, [h.make_tensor_value_info("bytes", T.INT32, [1, 12])], [h.make_tensor_value_info("y", T.FLOAT, [1, 12, 16])],
                 inits, path)
