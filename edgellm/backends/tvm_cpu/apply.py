"""``ApplyVerifiedSchedule``: dlight's ApplyDefaultSchedule, plus a safety net.

Like ``tvm.s_tir.dlight.ApplyDefaultSchedule`` (first rule that returns a schedule wins),
except that each scheduled PrimFunc is run through the target's TIR lowering pipeline
in isolation before it is accepted; a schedule that does not lower (an unsupported
vectorize, a bad annotation...) is rejected and the next rule is tried, so a rule can
never break the build.  Set ``EDGELLM_TVM_VERIFY=0`` to skip the check.
"""

from __future__ import annotations

import os

import tvm
from tvm import s_tir, tirx
from tvm.ir.transform import module_pass

from ._common import debug_exception


def _is_scheduled(func) -> bool:
    return "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1


_LOWERING = [
    # the structural part of the s_tir default pipeline (up to vectorization), where a bad
    # schedule fails; the rest (host/device split, packed API) does not depend on it
    ("s_tir", "CanonicalizeLoop"), ("s_tir", "LowerInitBlock"),
    ("s_tir", "PlanAndUpdateBufferAllocationLocation"), ("s_tir", "ConvertBlocksToOpaque"),
    ("s_tir", "CompactBufferAllocation"), ("s_tir", "LowerMatchBuffer"),
    ("s_tir", "StmtSimplify"), ("s_tir", "LowerOpaqueBlock"), ("tirx", "FlattenBuffer"),
    ("tirx", "NarrowDataType"), ("s_tir", "LoopPartition"), ("tirx", "VectorizeLoop"),
    ("tirx", "StorageRewrite"), ("tirx", "UnrollLoop"), ("tirx", "StmtSimplify"),
    ("tirx", "RemoveNoOp"), ("tirx", "VerifyMemory"),
]


def _lowering_passes():
    passes = []
    for ns, name in _LOWERING:
        mod = s_tir.transform if ns == "s_tir" else tirx.transform
        factory = getattr(mod, name, None)
        if factory is None:
            continue
        passes.append(factory(32) if name == "NarrowDataType" else factory())
    return tvm.transform.Sequential(passes)


def _lowers(func, target) -> bool:
    try:
        mod = tvm.IRModule({"main": func.with_attr("target", target)
                            .with_attr("global_symbol", "main")})
        with target:
            _lowering_passes()(mod)
        return True
    except Exception:  # pylint: disable=broad-except
        debug_exception("lowering check", func)
        return False


@module_pass(opt_level=0, name="EdgeApplyVerifiedSchedule")
class ApplyVerifiedSchedule:  # pylint: disable=too-few-public-methods
    """Apply the first ScheduleRule whose schedule lowers, to every unscheduled PrimFunc."""

    def __init__(self, *rules):
        self.rules = list(rules)
        self.verify = os.environ.get("EDGELLM_TVM_VERIFY", "1") != "0"

    def transform_module(self, mod, _ctx):  # pylint: disable=missing-function-docstring
        updated = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            target = func.attrs.get("target", None) or tvm.target.Target.current(allow_none=False)
            for rule in self.rules:
                try:
                    sch = rule.apply(func, target, False)
                except Exception:  # pylint: disable=broad-except
                    debug_exception(type(rule).__name__, func)
                    sch = None
                if sch is None:
                    continue
                if isinstance(sch, (list, tuple)):
                    sch = sch[0]
                new = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                if self.verify and not _lowers(new, target):
                    continue
                updated[gv] = new
                break
        for gv, func in updated.items():
            mod[gv] = func
        return mod


PREPACK_ATTR = "meta_schedule.layout_rewrite_preproc"


def _prepack_blocks(func) -> list[str]:
    """Names of the root-level blocks of ``func`` marked as weight packs."""
    try:
        sch = s_tir.Schedule(func)
        return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))
                if PREPACK_ATTR in sch.get(b).annotations]
    except Exception:  # pylint: disable=broad-except
        return []  # no root block (a hand-written kernel): nothing the rules marked


def _strip_prepack(mod):
    """``mod`` with the prepack marks removed (each pack stays inside its kernel, run per call)."""
    out = tvm.IRModule({}, attrs=mod.attrs)
    for gv, func in mod.functions_items():
        names = _prepack_blocks(func) if isinstance(func, tirx.PrimFunc) else []
        if names:
            sch = s_tir.Schedule(func)
            for n in names:
                sch.unannotate(sch.get_sblock(n), PREPACK_ATTR)
            func = sch.mod["main"]
        out[gv] = func
    return out


@module_pass(opt_level=0, name="EdgeSplitWeightPrepack")
def SplitWeightPrepack(mod, _ctx):  # pylint: disable=invalid-name
    """Relax's ``SplitLayoutRewritePreproc`` on the weight packs the rules marked. That pass also walks every other
    PrimFunc and rejects some (a root holding no block, e.g. a hand-written attention kernel), so it sees only the
    Relax functions and the marked kernels; the rest are put back unchanged. Should it still fail, the packs stay
    inside their kernels."""
    marked = {gv for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and _prepack_blocks(f)}
    if not marked:
        return mod
    sub = tvm.IRModule({gv: f for gv, f in mod.functions_items()
                        if gv in marked or not isinstance(f, tirx.PrimFunc)}, attrs=mod.attrs)
    try:
        out = tvm.relax.transform.SplitLayoutRewritePreproc()(sub)
    except Exception:  # pylint: disable=broad-except
        debug_exception("SplitLayoutRewritePreproc", None)
        return _strip_prepack(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, tirx.PrimFunc) and gv not in marked:
            out[gv] = func
    return out
