"""edgellm's CPU compilation pipeline for Apache TVM 0.27 (Relax -> VM).

``pipeline(target)`` = stock ``cpu_generic`` passes (library dispatch, legalize, fuse,
dataflow lowering, finalize) plus

* before legalization: BN folding, ``clip`` -> min/max, NHWC/HWIO conv layout
  (``relax_passes.py``);
* after fusion: edgellm's schedule rules (dlight ``ScheduleRule`` s; ``rules=`` puts others, e.g.
  the int8 ones from ``edgellm.backends.tvm_int8``, in front), applied like
  ``tvm.s_tir.dlight.ApplyDefaultSchedule`` -- tried in order, the first that returns a
  schedule wins, each returns None on a function it cannot handle -- by
  ``apply.ApplyVerifiedSchedule``, which also rejects a schedule that fails to lower
  (then the next rule is tried, and an unmatched function is left untouched):

  ``Matmul`` (matmul.py), ``ConvNHWC`` (conv.py), ``DepthwiseNHWC`` (depthwise.py),
  ``Pooling`` (reduction.py), ``Elementwise`` (elementwise.py), ``RowReduction``
  (reduction.py, softmax / layer norm), ``InlinedRowReduction`` (reduction.py: injective blocks
  then one innermost-axis reduction), dlight.cpu ``GEMV`` and ``Reduction``, and
  ``ParallelFallback`` (elementwise.py);
* after the rules (``weight_prepack_passes``): the weight copies into contiguous column panels that the
  matmul / conv rules add (``_common.pack_vector_operand``) are split into functions of their own and
  folded at compile time when the weight is a constant;
* in the VM lowering (``vm_lower_passes``, vm_passes.py): reshapes between kernels folded into
  the kernels as views, and no kill calls -- the VM's own work per call on a 0.1 ms model.

Vector width comes from the target (``target_info.vector_lanes``): AVX-512 16 fp32 lanes,
AVX2 8, NEON 4; register count, FMA units/latency and L1d/L2 sizes from ``target_info.core_info``
(data per ``mcpu``, sysfs for ``native``).  Threads: outer loops are ``parallel``; the TVM runtime uses
``TVM_NUM_THREADS``.
"""

from __future__ import annotations

import tvm

from .target_info import num_vector_registers as num_vector_registers  # noqa: F401
from .target_info import vector_bits as vector_bits  # noqa: F401
from .target_info import vector_lanes as vector_lanes  # noqa: F401

# the public entry point; schedule_rules / vector_lanes stay importable for tests and tools
__all__ = ["pipeline"]


def schedule_rules():
    """The fp32 ScheduleRules applied after fusion, in priority order. The int8 rules plug in before
    them (``edgellm.backends.tvm_int8.schedule_rules``); this package imports nothing above it."""
    from tvm.s_tir import dlight

    from .conv import ConvNHWC
    from .depthwise import DepthwiseNHWC
    from .elementwise import Elementwise, ParallelFallback
    from .matmul import Matmul
    from .reduction import InlinedRowReduction, Pooling, RowReduction

    return [
        Matmul(),
        ConvNHWC(),
        DepthwiseNHWC(),
        Pooling(),
        Elementwise(),
        RowReduction(),
        InlinedRowReduction(),
        dlight.cpu.GEMV(),
        ParallelFallback(),
    ]


def pre_schedule_passes(target: "tvm.target.Target", precision: str = "fp32") -> list:
    """Everything before the schedule rules: what the rules (and MetaSchedule tuning) see.

    ``precision`` "fp16": TVM's ToMixedPrecision after the fp32 graph rewrites (BN folding and the NHWC
    layout match fp32 graphs), so convs and matmuls read fp16 and accumulate in fp32 (the rules' float
    outputs), elementwise ops run in fp16, and the inputs and outputs stay fp32."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    from .relax_passes import layout_passes, layout_passes_fp16

    layout = layout_passes_fp16 if precision == "fp16" else layout_passes
    return cpu_generic.library_dispatch_passes(target) + [layout] + cpu_generic.legalize_passes(target)


def weight_prepack_passes() -> list:
    """After the rules: the weight packs they marked (``_common.pack_vector_operand``) become functions of their own,
    folded at compile time when the weight is a constant (a packed ResNet-18 copies ~30 MB of weights a call
    otherwise); with weights as inputs the pack stays a kernel that runs each call."""
    from tvm import relax

    from .apply import SplitWeightPrepack

    return [SplitWeightPrepack, relax.transform.FoldConstant(), relax.transform.DeadCodeElimination()]


def vm_lower_passes(target: "tvm.target.Target") -> list:
    """cpu_generic's dataflow lowering and finalization, less per-call VM work (vm_passes.py):
    reshapes between kernels become views inside the kernels, and no kill calls -- with
    static memory planning (edgellm traces static shapes only) and the VM's pooled allocator,
    clearing dead registers early frees nothing (the planned storages are all alive at the peak
    anyway); each kill is a ``vm.builtin.null_value`` call per dead tensor and storage."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    from .vm_passes import DropKills, FoldReshapeIntoKernels, MarkSingleBufferNoAlias

    passes = []
    for p in cpu_generic.dataflow_lower_passes(target) + cpu_generic.finalize_passes(target):
        passes.append(p)
        if p.info.name == "RewriteDataflowReshape":  # reshapes are R.reshape from here on
            passes.append(FoldReshapeIntoKernels)
        if p.info.name == "KillAfterLastUse":  # kept for its other job: it drops the `lv = alloc` aliases
            passes.append(DropKills)           # CallTIRRewrite leaves (each one a vm.builtin.copy call)
    return passes + [MarkSingleBufferNoAlias]  # after VMShapeLower made the shape functions


def pipeline(target: "tvm.target.Target", before_rules: list | tuple = (), rules: list | None = None,
             precision: str = "fp32") -> "tvm.transform.Pass":
    """A Relax->VM pipeline usable as tvm.compile(mod, target, relax_pipeline=pipeline(target)).

    ``before_rules``: passes that schedule some functions first (e.g. a tuning database);
    the rules then take what is left unscheduled. ``rules``: the schedule rules [default:
    ``schedule_rules()``; edgellm's build uses ``tvm_int8.schedule_rules()``, the int8 rules first].
    ``precision``: fp32, or fp16 (``pre_schedule_passes``)."""
    from .apply import ApplyVerifiedSchedule

    if not isinstance(target, tvm.target.Target):
        target = tvm.target.Target(target)

    @tvm.transform.module_pass(opt_level=0, name="EdgeLLMCPUPipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                pre_schedule_passes(target, precision)
                + list(before_rules)
                + [ApplyVerifiedSchedule(*(schedule_rules() if rules is None else rules))]
                + weight_prepack_passes()
                + vm_lower_passes(target)
            )
            mod = seq(mod)
        return mod

    return _pipeline
