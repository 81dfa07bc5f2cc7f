"""The Relax pipelines edgellm compiles CPU code with, by name.

The CPU schedule pipeline is one swappable piece: ``--pipeline NAME`` picks one, and the
default is chosen by target kind. ``stock`` is TVM's own cpu_generic pipeline (legalize and
fuse; no tiling, vectorization or threads); ``edgellm`` adds edgellm's schedule rules
(edgellm/backends/tvm_cpu/, with the int8 ones of edgellm/backends/tvm_int8/ and the bf16 one of
edgellm/backends/tvm_bf16.py in front).
"""

from __future__ import annotations

import importlib.util

from edgellm.errors import EdgeError


def _stock(target, precision="fp32"):
    import tvm
    from tvm import relax

    stock = relax.get_default_pipeline(target)
    if precision != "fp16":
        return stock
    return tvm.transform.Sequential([relax.transform.ToMixedPrecision(out_dtype="float32"), stock])


def _edgellm(target, precision="fp32"):
    from edgellm.backends.tvm_bf16 import bf16_rules
    from edgellm.backends.tvm_int8 import pipeline  # tvm_cpu's pipeline with the int8 (and bf16) rules in front

    return pipeline(target, precision=precision, extra_rules=bf16_rules())


PIPELINES = {"stock": _stock}
_spec = importlib.util.find_spec("edgellm.backends.tvm_cpu")
if _spec is not None and _spec.origin is not None:
    PIPELINES["edgellm"] = _edgellm


def default_name() -> str:
    return "edgellm" if "edgellm" in PIPELINES else "stock"


def get(name: str, target, precision: str = "fp32"):
    """The pipeline ``name`` for ``target``; ``precision`` fp16 adds TVM's ToMixedPrecision (fp32 accumulation)."""
    if name == "default":
        name = default_name()
    if name not in PIPELINES:
        raise EdgeError(f"unknown TVM pipeline {name!r}", f"known: {', '.join(PIPELINES)}")
    return PIPELINES[name](target, precision)
