"""Compile a language model with TVM Relax: the nn module exported with its KV-cache entry points, edgellm's CPU
pipeline with the weight-compressed linear kernels scheduled first, one shared library for the target."""

from __future__ import annotations

import platform
from pathlib import Path

from edgellm.backends.tvm import FFI_VERSION, TVM_VERSION, cross_compiler, import_compiler
from edgellm.errors import EdgeError
from edgellm.llm.config import LMConfig
from edgellm.llm.weights import Scheme
from edgellm.targets import Target

MODULE = "model.so"


def compile_lm(config: LMConfig, schemes: dict[str, Scheme], target: Target, workdir: Path) -> tuple[Path, list[tuple[str, tuple, str]], dict]:
    """(model.so, [(parameter name, shape, dtype)] in the order the entry points take them, backend info)."""
    tvm = import_compiler()
    if target.tvm.get("kind") != "llvm":
        raise EdgeError(f"language models compile for CPU targets (llvm) in this edgellm; {target.name} is {target.tvm.get('kind')!r}",
                        "build for x86_64, arm64, rpi4, rpi5 or jetson-orin-cpu")
    from edgellm.backends.tvm_cpu import pipeline
    from edgellm.llm import layers
    from edgellm.llm.model import CausalLM

    tvm_target = tvm.target.Target(target.tvm)
    model = CausalLM(config, tvm_target, schemes["layers"], schemes["head"])
    mod, named = model.export_tvm(spec=model.spec())
    params = [(name, tuple(int(d) for d in p.shape), str(p.dtype)) for name, p in named]
    with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
        executable = tvm.compile(mod, tvm_target, relax_pipeline=pipeline(tvm_target, before_rules=layers.schedule_passes(tvm_target, config.rope_theta)))
    path = workdir / MODULE
    cxx = cross_compiler(target, platform.machine())
    executable.export_library(str(path), options=["-Wl,--strip-debug"], **({"cc": cxx} if cxx else {}))
    info = {"name": "tvm", "module": MODULE, "tvm": TVM_VERSION, "tvm_ffi": FFI_VERSION, "pipeline": "edgellm", "tvm_target": str(tvm_target)}
    return path, params, info
