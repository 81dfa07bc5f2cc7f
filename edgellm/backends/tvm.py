"""Apache TVM (Relax) backend: import, compile with a CPU pipeline, export a shared library.

The modules read top down, and each imports only those below it (tests/unit/test_imports.py):

    tvm.py            the Backend: CPU compile here, NVIDIA GPUs handed to tvm_cuda.py
    tvm_cuda.py       CUDA: dlight schedules, fp16, nvcc fatbins
    tvm_tune.py       MetaSchedule tuning database, applied before the rules
    tvm_pipelines.py  the CPU pipelines by name (stock, edgellm)
    tvm_int8/         the int8 rewrite, and its schedule rules put in front of tvm_cpu's
    tvm_cpu/          edgellm's fp32 schedule rules, Relax and VM passes
    tvm_base.py       what all of them share: the pinned compiler, the Relax import, the linker
"""

from __future__ import annotations

from pathlib import Path

from edgellm.backends import tvm_cuda, tvm_pipelines
from edgellm.backends.base import Compiled
from edgellm.backends.tvm_base import FFI_VERSION, TVM_VERSION, cross_compiler, import_compiler, to_relax
from edgellm.errors import EdgeError
from edgellm.targets import Target
from edgellm.trace import Traced

# what --precision fp16 does on an arm64 core with fp16 arithmetic (tvm_cpu.pre_schedule_passes)
FP16_CPU_INFO = {"compute": "fp16", "accumulate": "fp32", "inputs_outputs": "fp32",
                 "pass": "relax.transform.ToMixedPrecision(out_dtype=float32), after edgellm's fp32 layout passes"}

__all__ = ["Backend", "FFI_VERSION", "TVM_VERSION", "cross_compiler", "import_compiler", "to_relax"]


class Backend:
    name = "tvm"

    def check(self, target: Target) -> None:
        if target.tvm.get("kind") == "cuda":  # NVIDIA GPUs: edgellm/backends/tvm_cuda.py
            return tvm_cuda.check(target)
        if target.tvm.get("kind") != "llvm":
            raise EdgeError(f"this edgellm's TVM backend compiles for CPUs (llvm); target {target.name} is {target.tvm.get('kind')!r}")

    def compile(self, traced: Traced, target: Target, options: dict, workdir: Path) -> Compiled:
        import platform

        if target.tvm.get("kind") == "cuda":
            return tvm_cuda.compile(self, traced, target, options, workdir)
        tvm = import_compiler()
        self.check(target)
        mod = to_relax(traced)
        tvm_target = tvm.target.Target(target.tvm)
        pipeline_name = options.get("pipeline") or "default"
        precision = options.get("precision") or "fp32"
        if precision == "bf16" and (options.get("tune") or options.get("tuning_db")):
            raise EdgeError("--tune / --tuning-db do not combine with --precision bf16 yet", "build bf16 without tuning")
        if precision == "fp16" and (options.get("tune") or options.get("tuning_db")):
            raise EdgeError("--tune / --tuning-db do not combine with --precision fp16 yet", "build fp16 without tuning")
        quant_info = None
        if options.get("quantize") == "int8":  # edgellm/backends/tvm_int8: u8 x s8 -> s32 kernels
            from edgellm.backends import tvm_int8

            if (pipeline_name if pipeline_name != "default" else tvm_pipelines.default_name()) != "edgellm":
                raise EdgeError("TVM int8 needs the edgellm pipeline (its int8 schedule rules)", "drop --pipeline, or use --pipeline edgellm")
            mod, quant_info = tvm_int8.quantize(mod, tvm_target, options, [s.name for s in traced.inputs])
        elif options.get("quantize"):
            from edgellm.compress.quantize import check

            check(self.name, options["quantize"])
        bf16_info = None
        if precision == "bf16":  # edgellm/backends/tvm_bf16.py: vdpbf16ps dense for matmuls and 1x1 convs
            from edgellm.backends import tvm_bf16

            if not tvm_bf16.has_avx512_bf16(tvm_target):
                raise EdgeError(f"TVM's bf16 kernels need AVX512-BF16; target {target.name} ({tvm_target.attrs.get('mcpu', '')}) lacks it",
                                "use --target x86_64-amx, or --backend openvino for --precision bf16")
            if (pipeline_name if pipeline_name != "default" else tvm_pipelines.default_name()) != "edgellm":
                raise EdgeError("TVM bf16 needs the edgellm pipeline (its bf16 schedule rule)", "drop --pipeline, or use --pipeline edgellm")
            mod, bf16_info = tvm_bf16.rewrite(mod, tvm_target)
        if quant_info is not None or bf16_info is not None:  # AMX: attention's activation x activation matmuls on tiles
            from edgellm.backends import tvm_bf16

            mod, on_tiles = tvm_bf16.attention_to_tiles(mod, tvm_target)
            if on_tiles:
                tvm_bf16.note_attention_on_tiles(quant_info if quant_info is not None else bf16_info, on_tiles)
        tuning, db_dir = None, None
        if options.get("tune") or options.get("tuning_db"):
            from edgellm.backends import tvm_tune

            if (pipeline_name if pipeline_name != "default" else tvm_pipelines.default_name()) != "edgellm":
                raise EdgeError("tuning needs the edgellm pipeline", "drop --pipeline, or use --pipeline edgellm")
            db_dir = Path(options.get("tuning_db") or tvm_tune.default_db_dir(tvm_target)).expanduser()
            if options.get("tune"):
                tuning = tvm_tune.tune(mod, tvm_target, int(options["tune"]), db_dir, budget_s=options.get("tune_budget"),
                                       progress=options.get("tune_progress"), remote=options.get("tune_remote"))
            pipeline = tvm_tune.pipeline(tvm_target, db_dir)
        else:
            pipeline = tvm_pipelines.get(pipeline_name, tvm_target, "fp16" if precision == "fp16" else "fp32")
        # no argument checks inside the kernels: the VM checks the model's inputs once (check_tensor_info /
        # match_shape), and then calls its kernels only with the tensors it planned. Each kernel's check
        # prologue is ~4 kB of code: kws-cnn int8's model.so 107 -> 66 kB (fp32 143 -> 119 kB)
        with tvm.transform.PassContext(opt_level=3, config={"tirx.disable_assert": True}):
            executable = tvm.compile(mod, tvm_target, relax_pipeline=pipeline)
        path = workdir / "model.so"
        cxx = cross_compiler(target, platform.machine())
        # no DWARF in the shipped model.so (TVM's LLVM codegen emits it; 0.15 MB of MobileNet-V2's fp32 .so,
        # 0.37 MB of its int8 one, where it is 8% of the file); the runtime only needs the dynamic symbols
        executable.export_library(str(path), options=["-Wl,--strip-debug"], **({"cc": cxx} if cxx else {}))
        return Compiled(
            files={"model.so": path},
            info={
                "name": self.name,
                "module": "model.so",
                "tvm": TVM_VERSION,
                "tvm_ffi": FFI_VERSION,
                "pipeline": tvm_pipelines.default_name() if pipeline_name == "default" else pipeline_name,
                "tvm_target": str(tvm_target),
                "precision": FP16_CPU_INFO if precision == "fp16" else bf16_info or {"compute": "fp32"},
                **({"tuning_db": str(db_dir)} if db_dir else {}),
                **({"quantize": quant_info} if quant_info else {}),
                **({"tuning": {k: tuning[k] for k in ("tasks", "tuned", "reused", "skipped", "trials", "seconds")}}
                   if tuning else {}),
            },
            runtime_requires=[f"apache-tvm=={TVM_VERSION}", f"apache-tvm-ffi=={FFI_VERSION}", "numpy"],
        )
