"""int8 for the OpenVINO backend, with NNCF; and the check that int8 kernels really run.

Modes (``--quantize``):

- ``int8``: static post-training quantization, ``nncf.quantize`` on the converted ov.Model with the
  calibration samples: per-channel symmetric int8 weights, per-tensor int8 activations (NNCF's CPU defaults,
  preset PERFORMANCE), fast bias correction. Transformer encoders (the graph has MatMul and Softmax) get
  ``model_type=TRANSFORMER`` and SmoothQuant with alpha 0.8 on MatMuls: on all-MiniLM-L6-v2 with real
  sentences, NNCF's default alpha (0.95) kept a mean cosine of 0.992 vs fp32, 0.8 kept 0.996 (0.5: 0.968,
  SmoothQuant off: 0.986). OpenVINO's CPU plugin then runs convolutions and MatMuls in int8 kernels
  (exec types like ``brgconv_avx512_I8``, ``brgemm_avx512_i8``) on CPUs with VNNI/AMX.
- ``int8-weights``: weight-only int8 (``nncf.compress_weights``, INT8_ASYM per channel): no calibration
  data, about the accuracy of fp32 (MiniLM: cosine 0.9995), weights 4x smaller; activations and compute
  stay f32 (weights are decompressed inside the f32 GEMM: no int8 kernels, int8_share 0). It still runs
  faster where the f32 weights' memory traffic dominates (MiniLM, 2 threads: 12.5 -> 7.2 ms; static int8 4.7 ms).

TVM: ``int8`` is edgellm's own Relax rewrite to u8/s8 -> s32 kernels (edgellm/backends/tvm_int8): static
per-tensor activations (calibrated) for CNNs, dynamic per-row activations for transformer encoders;
``int8-weights`` is refused for TVM.
"""

from __future__ import annotations

import contextlib
import re
import sys
from importlib import metadata

import numpy as np

from edgellm.errors import EdgeError

MODES = ("int8", "int8-weights")
NNCF_VERSION = "3.4.0"
TRANSFORMER_SMOOTH_QUANT_ALPHA = 0.8
INT8_EXEC = re.compile(r"(^|_)[iu]8($|_)", re.IGNORECASE)  # brgemm_avx512_I8, jit_avx512_i8, unknown_u8; not i64


def check(backend: str, mode: str | None) -> None:
    """Raise EdgeError when ``backend`` cannot do ``mode`` (None: nothing asked, fine)."""
    if mode is None:
        return
    if mode not in MODES:
        raise EdgeError(f"unknown quantization {mode!r}", f"use one of {', '.join(MODES)}")
    if backend == "tvm":
        if mode == "int8-weights":
            raise EdgeError("weight-only int8 (int8-weights) is not implemented for the TVM backend",
                            "use --quantize int8 (static / dynamic int8 with integer kernels), or --backend openvino")
        return
    if backend != "openvino":
        raise EdgeError(f"int8 with the {backend} backend is not implemented", "use --backend openvino")


def import_nncf():
    try:
        version = metadata.version("nncf")
    except metadata.PackageNotFoundError:
        raise EdgeError("int8 needs NNCF, which is not installed", f"pip install nncf=={NNCF_VERSION}") from None
    import nncf

    return nncf, version


def is_transformer(ov_model) -> bool:
    """A transformer encoder for NNCF's purposes: the graph has both MatMul and Softmax."""
    types = {op.get_type_name() for op in ov_model.get_ordered_ops()}
    return "MatMul" in types and any(t.startswith("Softmax") for t in types)


def _feeds(ov_model, samples: list[dict]) -> list[dict]:
    """Samples keyed the way the ov.Model's inputs are named (the traced names the backend put on them)."""
    names = [sorted(p.get_names()) for p in ov_model.inputs]
    out = []
    for i, sample in enumerate(samples):
        feed = {}
        for k, port_names in enumerate(names):
            name = next((n for n in port_names if n in sample), None)
            if name is None:
                if len(sample) != len(names):
                    raise EdgeError(f"calibration sample {i} has inputs {', '.join(sample)}; the model takes {len(names)} inputs")
                name = list(sample)[k]
            feed[k] = np.ascontiguousarray(sample[name])
        out.append(feed)
    return out


def quantize_openvino(ov_model, mode: str, calibration: list[dict] | None = None):
    """(quantized ov.Model, info for the manifest). ``calibration``: feed dicts {input name: array} (``int8`` only)."""
    check("openvino", mode)
    nncf, version = import_nncf()
    transformer = is_transformer(ov_model)
    if mode == "int8-weights":
        mode_enum = nncf.CompressWeightsMode.INT8_ASYM
        try:
            with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: not on stdout, where --json goes
                model = nncf.compress_weights(ov_model, mode=mode_enum)
        except Exception as e:
            raise EdgeError(f"NNCF could not compress the weights ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
        return model, {"mode": mode, "method": "nncf.compress_weights (weight-only)", "nncf": version,
                       "weights": "int8 asymmetric, per output channel", "activations": "f32 (unchanged)",
                       "compute": "f32 (weights decompressed in the kernels)", "calibration_samples": 0}
    if not calibration:
        raise EdgeError("static int8 needs calibration samples", "give --calib a folder or .npz of real inputs (or 'random')")
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    kwargs = {"subset_size": len(calibration), "preset": nncf.QuantizationPreset.PERFORMANCE, "fast_bias_correction": True}
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        kwargs["advanced_parameters"] = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=TRANSFORMER_SMOOTH_QUANT_ALPHA))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: not on stdout, where --json goes
            model = nncf.quantize(ov_model, nncf.Dataset(_feeds(ov_model, calibration)), **kwargs)
    except EdgeError:
        raise
    except Exception as e:
        raise EdgeError(f"NNCF could not quantize the model ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                        "try --quantize int8-weights") from None
    fq = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())
    return model, {"mode": mode, "method": "nncf.quantize (static post-training)", "nncf": version,
                   "preset": "performance", "model_type": "transformer" if transformer else "default",
                   **({"smooth_quant_alpha_matmul": TRANSFORMER_SMOOTH_QUANT_ALPHA} if transformer else {}),
                   "fast_bias_correction": True, "subset_size": len(calibration), "calibration_samples": len(calibration),
                   "weights": "int8 symmetric, per output channel", "activations": "int8 per tensor",
                   "fake_quantize_nodes": fq}


# ---------------------------------------------------------------------------- int8 kernels really used?

def _compiled_with_counters(obj, feeds):
    """(ov CompiledModel with PERF_COUNT on, feed list) from a CompiledModel, ov.Model, edgellm Engine/Model or .edgepkg path."""
    import openvino as ov

    if isinstance(obj, (str,)) or hasattr(obj, "suffix"):  # a package path
        from edgellm.runtime.model import Model

        obj = Model(obj)
    if hasattr(obj, "_engine"):  # edgellm.runtime.model.Model
        model = obj
        if feeds is None and model._reference is not None:
            feeds = list(model.example_inputs().values())
        obj = model._engine
    if hasattr(obj, "_compile") and hasattr(obj, "config"):  # edgellm's OpenVINO Engine
        compiled = obj._compile({**obj.config, "PERF_COUNT": True})
    elif isinstance(obj, ov.CompiledModel):
        compiled = obj
        if not compiled.get_property("PERF_COUNT"):
            raise EdgeError("int8_share needs a model compiled with PERF_COUNT=True")
    elif isinstance(obj, ov.Model):
        compiled = ov.Core().compile_model(obj, "CPU", {"PERF_COUNT": True, "INFERENCE_PRECISION_HINT": "f32"})
    else:
        raise EdgeError(f"int8_share takes an OpenVINO model or package, not a {type(obj).__name__}")
    if feeds is None:
        raise EdgeError("int8_share needs inputs to run the model on")
    if isinstance(feeds, dict):
        feeds = list(feeds.values())
    return compiled, [np.ascontiguousarray(a) for a in feeds]


def kernel_times(obj, feeds=None, runs: int = 5) -> dict[str, float]:
    """Seconds per OpenVINO CPU exec type (e.g. brgemm_avx512_I8), summed over ``runs`` inferences."""
    import openvino as ov

    compiled, arrays = _compiled_with_counters(obj, feeds)
    request = compiled.create_infer_request()
    executed = ov.ProfilingInfo.Status.EXECUTED
    totals: dict[str, float] = {}
    request.infer(arrays)  # warm-up: first-run reorders are not the steady state
    for _ in range(runs):
        request.infer(arrays)
        for node in request.profiling_info:
            if node.status == executed:
                totals[node.exec_type] = totals.get(node.exec_type, 0.0) + node.real_time.total_seconds()
    return totals


def is_int8_kernel(exec_type: str) -> bool:
    return bool(INT8_EXEC.search(exec_type))


def int8_share(obj, feeds=None, runs: int = 5) -> float:
    """Share of the executed time spent in int8 kernels (exec type ending in I8/i8/u8), 0..1."""
    totals = kernel_times(obj, feeds, runs)
    total = sum(totals.values())
    return sum(t for k, t in totals.items() if is_int8_kernel(k)) / total if total else 0.0
