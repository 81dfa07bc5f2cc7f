"""int8 for edgellm's TVM backend: real integer arithmetic (u8 x s8 -> s32 on x86, s8 x s8 on arm64).

    mod, info = quantize(mod, target, options, input_names)   # tvm.py, for --quantize int8

1. ``relax_passes.layout_passes`` (BN folding, NHWC convs, constant weights);
2. static mode: calibration (``calibrate.py``), the fp32 model compiled by TVM run on the
   user's samples, per-tensor activation ranges; dynamic mode (transformer encoders):
   per-row scales computed at run time;
3. ``rewrite.py``: conv2d 1x1 / matmul with constant weights (and small-patch kxk stems, as
   im2col) -> quantize + packed int8 dense (``compute.py``) + dequantize, weights int8 per
   channel packed as constants; each epilogue's dequantize ... requantize chain folded to one
   multiply-add + clamp;
4. the usual pipeline with ``schedule_rules()``: ``int8_rules()`` first, then ``tvm_cpu``'s;
   the int8 rules schedule the packed dense with ``vpdpbusd`` (VNNI) or ``vpmaddubsw`` (AVX2 /
   AVX-512BW without VNNI; 7-bit weights) in ``x86.py``, or sdot / NEON (``arm.py``).

Also (static mode) depthwise convs after an int8 dense or an fp32 conv read 8-bit activations with int8
weights (f32 arithmetic, ``compute.depthwise_dq_te``), and (both modes) large embedding tables
are stored int8 per row. ``--quantize int8-weights`` is refused for TVM (``compress.quantize``).
Measured figures: docs/tvm-int8.md and ``benchmarks/tvm_int8.py``.
"""

from __future__ import annotations

import collections

from edgellm.errors import EdgeError


def int8_rules() -> list:
    """Schedule rules for the packed int8 dense: x86 (AVX2 / AVX-512, VNNI where present) and arm64 (sdot / NEON); each declines other targets."""
    from .arm import arm_rules
    from .depthwise import DepthwiseU8X86
    from .schedule import Im2col
    from .x86 import PackedDenseX86

    return [Im2col(), amx_dense_rule(), PackedDenseX86(), DepthwiseU8X86(), *arm_rules()]


def amx_dense_rule():
    """The packed int8 dense on AMX tiles (``tvm_amx``), matched as ``x86.py`` matches it for the vector kernels."""
    from edgellm.backends.tvm_amx import INT8, amx_rules

    from .x86 import match_packed_dense

    return amx_rules(INT8, lambda sch: match_packed_dense(sch, 16, ("uint8",))[1])[0]


def schedule_rules(extra_rules: list | tuple = ()) -> list:
    """edgellm's whole rule set: the int8 rules and ``extra_rules`` (tvm_bf16's; each matches only its rewrite's
    kernels), then tvm_cpu's fp32 rules."""
    from edgellm.backends.tvm_cpu import schedule_rules as fp32_rules

    return [*int8_rules(), *extra_rules, *fp32_rules()]


def pipeline(target, before_rules: list | tuple = (), precision: str = "fp32", extra_rules: list | tuple = ()):
    """tvm_cpu's pipeline with ``schedule_rules(extra_rules)``: what ``--pipeline edgellm`` compiles with
    (tvm_pipelines adds the bf16 rule)."""
    from edgellm.backends.tvm_cpu import pipeline as cpu_pipeline

    return cpu_pipeline(target, before_rules, rules=schedule_rules(extra_rules), precision=precision)


def _is_transformer(mod) -> bool:
    from tvm import relax

    ops = set()

    def visit(e):
        if isinstance(e, relax.Call) and hasattr(e.op, "name"):
            ops.add(e.op.name)

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    return "relax.nn.softmax" in ops and "relax.matmul" in ops


def quantize(mod, tvm_target, options: dict, input_names: list[str]):
    """(int8 module, manifest info) for ``--quantize int8`` on an llvm target."""
    import tvm

    from edgellm.backends import tvm_amx
    from edgellm.backends.tvm_cpu.relax_passes import layout_passes

    from .compute import has_vnni, packing
    from .embedding import quantize_embeddings
    from .rewrite import activation_inputs, candidate, depthwise_after, rewrite

    pk = packing(tvm_target)
    if pk is None:
        raise EdgeError(f"edgellm's TVM int8 needs AVX2 or AVX-512 (x86_64) or arm64; target {tvm_target.attrs.get('mcpu', '')} has none",
                        "build for --target x86_64 or arm64, or use --backend openvino for int8")
    lanes, act_dtype = pk.lanes, pk.act_dtype
    transformer = _is_transformer(mod)  # before layout_passes (FastMath turns softmax into a call_tir)
    mode = options.get("int8_activations") or ("dynamic" if transformer else "static")
    if mode == "static" and options.get("calibration_given") is False:  # dynamic int8 needs no --calib
        from edgellm.compress.plan import NEEDS_CALIB

        raise EdgeError(*NEEDS_CALIB)
    with tvm_target:
        mod = layout_passes(mod)
    cands = activation_inputs(mod["main"])
    chosen, left = [], collections.Counter()
    for name, call in cands:
        kind, w, why = candidate(call, target=tvm_target)
        if w is None:
            left[f"{kind}: {why}"] += 1
        else:
            chosen.append(name)
    if not chosen:
        raise EdgeError("no layer of this model can run in int8 with TVM (no 1x1 conv or matmul with constant weights)",
                        "use --backend openvino for int8, or build fp32")
    samples = options.get("calibration") or []
    dw = []
    if mode == "static":
        from .calibrate import calibrate

        # a depthwise conv after an int8 dense reads that dense's output as 8-bit codes (4x less memory
        # traffic on MobileNet's expanded tensors), decoded to f32 while padding; its arithmetic stays f32
        dw = depthwise_after(mod["main"], set(chosen)) if options.get("int8_depthwise_input", True) else []
        # calibration runs the fp32 model here: compiled for this machine, whatever the target
        from edgellm import targets

        host = tvm.target.Target(targets.host().tvm)
        ranges = calibrate(mod, chosen + dw, samples, input_names, host, pipeline(host))
        plan = {n: {"mode": "static", "lo": ranges[n][0], "hi": ranges[n][1]} for n in chosen}
        plan.update({n: {"mode": "depthwise_8bit_input", "lo": ranges[n][0], "hi": ranges[n][1]} for n in dw})
    else:
        plan = {n: {"mode": "dynamic"} for n in chosen}
    rw_stats: dict = {}
    new, done = rewrite(mod, plan, lanes, act_dtype, stats=rw_stats, weight_max=pk.weight_max, tvm_target=tvm_target,
                        # u8-input depthwise convs in integer arithmetic on x86 AVX-512 VNNI (depthwise.py; kws-cnn
                        # 4.7 -> 3.1 us a conv on 2 threads); option int8_depthwise_int=False: the f32 kernel
                        int_depthwise=options.get("int8_depthwise_int", True) and lanes == 16 and has_vnni(tvm_target))
    n_int_dw = rw_stats.get("int_depthwise", 0)
    isa = tvm_amx.describe(tvm_amx.INT8, tvm_target, pk.isa)
    new, tables = quantize_embeddings(new)
    info = {
        "mode": "int8", "method": "edgellm TVM int8 (Relax rewrite to packed int8 dense, post-training)",
        "weights": f"int{8 if pk.weight_max == 127 else 7} symmetric, per output channel",
        "activations": ("uint8" if act_dtype == "uint8" else "int8") + (
            " per tensor, asymmetric, min/max calibrated" if mode == "static" else " per row, symmetric, scale computed at run time (dynamic)"),
        "activation_mode": mode,
        "compute": f"{act_dtype[0]}8 x s8 -> s32 ({isa}), dequantize + bias + activation fused in the epilogue",
        "layers_int8": len([k for k in done if k not in dw]),
        **({"depthwise_8bit_input": f"{len([k for k in done if k in dw])} of the depthwise convs read 8-bit activations "
                                    "and int8 per-channel weights (" + (
                                        f"{n_int_dw} in integer arithmetic: u8 x s8 -> s32 vpdpbusd over tap quads"
                                        + ("; the others decoded in the conv, f32 arithmetic" if n_int_dw < len([k for k in done if k in dw]) else "")
                                        if n_int_dw else "decoded in the conv; f32 arithmetic") + ")"} if dw else {}),
        "layers_fp32": dict(left) | ({"not rewritten": len(chosen) + len(dw) - len(done)} if len(done) < len(chosen) + len(dw) else {}),
        **({"embeddings": {"tables": tables, "how": "int8 per row, symmetric (weight-only; gathered rows dequantized)"}}
           if tables else {}),
        "calibration_samples": len(samples) if mode == "static" else 0,
    }
    return new, info
