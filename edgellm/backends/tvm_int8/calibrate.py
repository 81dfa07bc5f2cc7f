"""Activation ranges for static int8, measured by running the fp32 model in TVM itself.

From the module after edgellm's layout passes, a copy of ``main`` returns the activation
input of every int8 candidate (conv2d 1x1 / matmul with constant weights, see
``rewrite.candidate``); it is compiled with edgellm's CPU pipeline and run on the
calibration samples; the per-tensor range is the min / max over all samples.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from edgellm.errors import EdgeError

from .rewrite import activation_inputs, candidate


def stats_module(mod, names: list[str]):
    """IRModule whose main returns (activation of names[0], ...) as a tuple."""
    nd = relax.transform.ToNonDataflow()(mod)
    func = nd["main"]
    acts = {n: call.args[0] for n, call in activation_inputs(func)}
    outs = [acts[n] for n in names]
    ret = relax.TupleType([o.ty for o in outs])
    body = relax.SeqExpr(func.body.blocks, relax.BlockBuilder().normalize(relax.Tuple(outs)))
    new = relax.Function(func.params, body, ret)
    new = new.with_attrs({k: v for k, v in func.attrs.items()}) if func.attrs else new
    nd[nd.get_global_var("main")] = new  # the other functions (call_tir'd PrimFuncs) keep their GlobalVars
    return relax.transform.Normalize()(nd)


def calibrate(mod, names: list[str], samples: list[dict], input_names: list[str], target, pipeline) -> dict[str, tuple[float, float]]:
    """{binding name: (min, max)} of each candidate's activation over ``samples``."""
    if not samples:
        raise EdgeError("static int8 needs calibration samples", "give --calib a folder or .npz of real inputs")
    ex = tvm.compile(stats_module(mod, names), target, relax_pipeline=pipeline)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    lo = {n: np.inf for n in names}
    hi = {n: -np.inf for n in names}
    for sample in samples:
        args = [tvm.runtime.tensor(np.ascontiguousarray(sample[n])) for n in input_names]
        outs = vm["main"](*args)
        for i, n in enumerate(names):
            a = outs[i].numpy()
            lo[n] = min(lo[n], float(a.min()))
            hi[n] = max(hi[n], float(a.max()))
    return {n: (lo[n], hi[n]) for n in names}


__all__ = ["calibrate", "candidate", "stats_module"]
