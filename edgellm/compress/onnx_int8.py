"""``edgellm quantize``: the int8 stage on its own, as a file any runtime reads -- a QDQ ONNX model.

    edgellm quantize zoo:mobilenet-v2 --calib calib/ -o mnv2-int8.onnx

The model (zoo, file.py:fn, .pt2 or .onnx) is traced as for a build, exported to ONNX (torch models:
TorchScript-based exporter, opset 17), and quantized by NNCF's ONNX backend with the calibration samples:
per-channel symmetric int8 weights, per-tensor int8 activations, QuantizeLinear/DequantizeLinear pairs
(the format ONNX Runtime, OpenVINO and TensorRT run as int8). Transformer encoders (MatMul + Softmax in the
graph) get NNCF's transformer scheme, as the OpenVINO backend does. The result is evaluated against the fp32
ONNX model in ONNX Runtime on held-out samples (``--eval``, else a split of ``--calib``), and written
atomically: a failure leaves nothing.

This is the *interchange* path; ``edgellm build --quantize int8`` is the deployment path (the backend's
own int8 kernels in a package).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeError

OPSET = 17


def _onnx_of(src, traced, workdir: Path):
    """onnx.ModelProto of the traced model (input names as traced)."""
    import onnx

    if traced.kind == "onnx":
        return traced.graph
    import torch

    names = [s.name for s in traced.inputs]
    path = workdir / "model.onnx"
    module = src.model if isinstance(src.model, torch.nn.Module) else traced.graph.module()
    args = tuple(torch.from_numpy(traced.example_inputs[n]) for n in names)
    try:
        with torch.no_grad():
            torch.onnx.export(module, args, str(path), input_names=names, opset_version=OPSET, dynamo=False)
    except Exception as e:
        raise EdgeError(f"torch.onnx could not export the model ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})",
                        "export it to ONNX yourself and pass the .onnx file") from None
    return onnx.load(str(path))


def _session(model, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _is_transformer(model) -> bool:
    ops = {n.op_type for n in model.graph.node}
    return "MatMul" in ops and "Softmax" in ops


def quantize_onnx(source: str, output: str | Path, calib: str | Path | None, eval: str | Path | None = None,
                  input_shapes: list[str] | None = None, progress=None) -> dict:
    """Trace ``source``, quantize it to a QDQ ONNX model at ``output``; the report (sizes, counts, accuracy)."""
    import onnx

    from edgellm import source as sources
    from edgellm.compress.calibration import prepare
    from edgellm.compress.evaluate import evaluate
    from edgellm.compress.quantize import import_nncf
    from edgellm.trace import parse_shapes, trace

    say = progress or (lambda message: None)
    out = Path(output)
    if out.suffix != ".onnx":
        raise EdgeError(f"output {out} should end in .onnx (edgellm quantize writes an ONNX model)", "name it NAME.onnx")
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise EdgeError(f"cannot write {out}: folder {out.parent} does not exist", f"mkdir -p {out.parent}")
    if calib is None:
        raise EdgeError("quantization needs calibration data", "give --calib a folder or .npz of real inputs (or 'random')")
    nncf, version = import_nncf()
    src = sources.load(source)
    traced = trace(src, parse_shapes(input_shapes))
    names = [s.name for s in traced.inputs]
    calib_samples, eval_samples, note = prepare(calib, eval, traced.inputs)
    say(note)
    with tempfile.TemporaryDirectory(prefix="edgellm-quantize-") as tmp:
        fp32 = _onnx_of(src, traced, Path(tmp))
        feed_names = [i.name for i in fp32.graph.input]
        if sorted(feed_names) != sorted(names):
            raise EdgeError(f"the ONNX export has inputs {feed_names}, the traced model {names}", "report this as a bug")
        transformer = _is_transformer(fp32)
        say(f"calibrating on {len(calib_samples)} samples with NNCF {version}"
            + (" (transformer scheme)" if transformer else ""))
        kwargs = {"subset_size": len(calib_samples), "preset": nncf.QuantizationPreset.PERFORMANCE}
        if transformer:
            kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        try:
            with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: not on stdout, where --json goes
                int8 = nncf.quantize(fp32, nncf.Dataset([{n: s[n] for n in names} for s in calib_samples]), **kwargs)
        except Exception as e:
            raise EdgeError(f"NNCF could not quantize the model ({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''})") from None
        ref_session, int8_session = _session(fp32), _session(int8)
        outputs = [o.name for o in fp32.graph.output]
        say(f"evaluating on {len(eval_samples)} held-out samples (ONNX Runtime, int8 vs fp32)")
        report = evaluate(lambda s: int8_session.run(None, {n: s[n] for n in names}),
                          lambda s: ref_session.run(None, {n: s[n] for n in names}), eval_samples, outputs)
        blob = int8.SerializeToString()
        fd, tmp_out = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp_out, out)
        except BaseException:
            Path(tmp_out).unlink(missing_ok=True)
            raise
    counts = {op: sum(n.op_type == op for n in int8.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    int8_weights = sum(1 for t in int8.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1)
    main = outputs[0]
    stats = report["outputs"][main]
    shown = f"top-1 agreement {stats['top1']:.1%}" if stats.get("top1") is not None else f"mean cosine {stats['cosine_mean']:.4f}"
    return {"output": str(out), "source": source, "method": "nncf.quantize (ONNX backend, static post-training)", "nncf": version,
            "model_type": "transformer" if transformer else "default", "weights": "int8 symmetric, per output channel",
            "activations": "int8 per tensor", "calibration_samples": len(calib_samples), "note": note,
            "fp32_bytes": len(fp32.SerializeToString()), "int8_bytes": len(blob), "int8_weight_tensors": int8_weights, **counts,
            "evaluation": report,
            "summary": f"wrote {out} ({len(blob) / 1e6:.2f} MB, fp32 {len(fp32.SerializeToString()) / 1e6:.2f} MB; "
                       f"{counts['QuantizeLinear']} QuantizeLinear): {shown} vs fp32 on {report['samples']} eval samples"}


def run_int8_onnx(path: str | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a quantized model in ONNX Runtime (tests, and a quick look)."""
    import onnx

    return _session(onnx.load(str(path))).run(None, feeds)
