"""What ``edgellm.api.build`` does for ``--prune / --quantize / --calib / --eval / --max-drop``, in a few calls.

    plan = Plan(prune=0.3, quantize="int8", calib="calib/", max_drop=1.0)
    plan.check_backend("openvino")          # before the long stages: TVM int8 is refused here
    plan.keep_reference(src)                 # after source: the original fp32 model, for evaluation
    plan.prune_source(src)                   # the model is pruned in place
    plan.load_samples(traced)                # after trace: calibration + evaluation samples
    options = {"pipeline": ..., **plan.options()}      # int8 + calibration for the backend
    tolerance = plan.tolerance(tolerance)    # verification against the traced reference, int8-aware
    plan.evaluate(engine, traced)            # after the backend is chosen: agreement with the ORIGINAL fp32
                                             # model on held-out samples; EdgeError over --max-drop
    manifest["compression"] = plan.manifest(compiled.info)

Each step returns a one-line summary for the stage's progress line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgellm.errors import EdgeError

NEEDS_CALIB = ("static int8 needs calibration data",
               "give --calib a folder or .npz of real inputs (or --calib random, and accuracy figures mean nothing)")

# Verification tolerance for int8 builds (max error relative to the output scale, on the example input).
# Measured: kws-cnn 4e-4, mobilenet-v2 2e-3, MiniLM ~3e-2; the real accuracy gate is --max-drop on the eval set.
INT8_TOLERANCE = 0.1


def check_options(prune, prune_mode, quantize, calib, eval, max_drop, finetune, auto: bool = False) -> None:
    """The compression options' own rules, one EdgeError line each (edgellm.recipe.Recipe checks a build's with this)."""
    from edgellm.compress import prune as cprune
    from edgellm.compress import quantize as cquant

    if prune is not None:
        if not 0.0 < float(prune) < 1.0:
            raise EdgeError(f"--prune {prune} is not between 0 and 1", "e.g. --prune 0.3 removes 30% of channels")
        if prune_mode not in cprune.MODES:
            raise EdgeError(f"unknown --prune-mode {prune_mode!r}", f"use one of {', '.join(cprune.MODES)}")
    if quantize is not None and quantize not in cquant.MODES:
        raise EdgeError(f"unknown --quantize {quantize!r}", f"use one of {', '.join(cquant.MODES)}")
    if max_drop is not None and max_drop < 0:
        raise EdgeError(f"--max-drop {max_drop} is negative", "give percentage points, e.g. --max-drop 1.0")
    if prune is None and quantize is None and not auto and (calib or eval or max_drop is not None):
        raise EdgeError("--calib, --eval and --max-drop go with --prune, --quantize or --precision int8 | auto")
    if finetune is not None and prune is None:
        raise EdgeError("--finetune goes with --prune", "add --prune R, or drop --finetune")


@dataclass
class Plan:
    prune: float | None = None
    prune_mode: str = "structured"
    prune_importance: str = "l2"
    quantize: str | None = None
    calib: str | None = None
    eval: str | None = None
    max_drop: float | None = None
    finetune: object = None  # fn(module) -> module, run on the pruned model (user code, user data), or "file.py:fn"
    auto: bool = False  # --precision auto: every candidate is evaluated on the eval set, and int8 ones calibrated
    prune_report: dict | None = None
    quantize_info: dict | None = None
    evaluation: dict | None = None
    _reference: object = field(default=None, repr=False)
    _calib: list | None = field(default=None, repr=False)
    _eval: list | None = field(default=None, repr=False)
    _note: str = ""

    def __post_init__(self):
        check_options(self.prune, self.prune_mode, self.quantize, self.calib, self.eval, self.max_drop, self.finetune, self.auto)
        if isinstance(self.finetune, str):
            from edgellm.source import load_function

            self.finetune = load_function(self.finetune, "--finetune", "def NAME(module): ...train...; return module")

    @property
    def active(self) -> bool:
        return self.prune is not None or self.quantize is not None or self.auto

    def check_backend(self, backend: str, quantize: str | None = None) -> None:
        """``quantize``: this candidate's (--precision auto's int8 ones), default the plan's."""
        from edgellm.compress.quantize import check

        quantize = quantize or self.quantize
        check(backend, quantize)
        # after the backend check: that is the first thing to fix. TVM decides static or dynamic int8 from the
        # graph (transformer encoders: dynamic, no calibration), so it raises the same error itself when static
        if quantize == "int8" and self.calib is None and backend != "tvm" and not self.auto:
            raise EdgeError(*NEEDS_CALIB)

    def keep_reference(self, src) -> None:
        """Keep a runner of the original fp32 model (the evaluation reference) before anything changes it."""
        from edgellm.compress.evaluate import reference_runner

        if self.active and self._reference is None and src.inputs:
            self._reference = reference_runner(src, list(src.inputs))

    def prune_source(self, src, round_to: int | None = None) -> str:
        """Prune ``src`` in place (its reference kept first); a one-line summary. ``round_to``: channel
        counts kept multiples of it (structured), so the compiled kernels keep full SIMD vectors."""
        from edgellm.compress.prune import prune_source, summary

        if self.prune is None:
            return ""
        self.keep_reference(src)
        report = prune_source(src, float(self.prune), self.prune_mode, self.prune_importance, finetune=self.finetune,
                              round_to=round_to if self.prune_mode == "structured" else None)
        self.prune_report = {k: v for k, v in report.items() if k not in ("tensors", "layers")}
        if report["mode"] == "unstructured":
            self.prune_report["layer_sparsity"] = {k: round(v["sparsity"], 4) for k, v in report["layers"].items()}
        return summary(report)

    def load_samples(self, traced) -> str:
        from edgellm.compress.calibration import prepare

        if not self.active:
            return ""
        if self._reference is None:  # ONNX / pt2 without example inputs: the traced model is the original
            from edgellm.compress.evaluate import reference_runner
            from edgellm.source import Source

            self._reference = _traced_runner(traced) if traced.kind == "torch" else reference_runner(
                Source("", "onnx", "", traced.graph, {}), [s.name for s in traced.inputs])
        self._calib, self._eval, self._note = prepare(self.calib, self.eval, traced.inputs)
        return self._note

    def options(self, quantize: str | None = None) -> dict:
        quantize = quantize or self.quantize
        return {"quantize": quantize, "calibration": self._calib, "calibration_given": self.calib is not None} if quantize else {}

    def tolerance(self, tolerance: float, quantize: str | None = None) -> float:
        return max(tolerance, INT8_TOLERANCE) if quantize or self.quantize else tolerance

    def evaluate(self, engine, traced) -> str:
        """Agreement of the built model (``engine``) with the original fp32 model on the evaluation samples;
        EdgeError over --max-drop. ``engine`` None: this machine cannot run the target's code."""
        from edgellm.compress.evaluate import check_drop

        if not self.active:
            return ""
        if engine is None:
            if self.max_drop is not None:
                raise EdgeError("cannot check --max-drop: this machine cannot run the package built for the target",
                                "build for host, or leave --max-drop out and check accuracy on the device")
            self.evaluation = {"status": "skipped", "reason": "this machine cannot run the target's code", "note": self._note}
            return "skipped: not the device"
        report = self.measure(engine, traced)
        what = " + ".join(filter(None, [f"pruned {self.prune:g}" if self.prune else "", self.quantize or ""]))
        self.evaluation = {"status": "measured", "against": "the original fp32 model", "note": self._note, **report}
        verdict = check_drop(report, self.max_drop, what)  # raises over the limit
        self.evaluation["max_drop"] = self.max_drop
        self.evaluation["drop_pp"] = verdict["drop_pp"]
        stats = report["outputs"][verdict["output"]]
        shown = f"top-1 agreement {stats['top1']:.1%}" if verdict["measure"] == "top-1 agreement" else f"mean cosine {stats['cosine_mean']:.4f}"
        limit = f" (limit {self.max_drop:g} pp)" if self.max_drop is not None else ""
        return f"{shown} vs fp32 on {report['samples']} eval samples: drop {verdict['drop_pp']:.2f} pp{limit}"

    def measure(self, engine, traced) -> dict:
        """Agreement of ``engine`` with the original fp32 model on the evaluation samples (``evaluate``'s report)."""
        from edgellm.compress.evaluate import engine_runner, evaluate

        return evaluate(engine_runner(engine, [s.name for s in traced.inputs]), self._reference, self._eval,
                        [s.name for s in traced.outputs])

    def manifest(self, backend_info: dict) -> dict:
        """The manifest's "compression": prune report, what the chosen backend quantized, the evaluation."""
        self.quantize_info = backend_info.get("quantize")
        return {"prune": self.prune_report, "quantize": self.quantize_info,
                **({"evaluation": self.evaluation} if self.evaluation else {})}


def _traced_runner(traced):
    """fp32 reference of a torch.export program (pt2 sources without example inputs at prune time)."""
    from edgellm.compress.evaluate import torch_runner

    return torch_runner(traced.graph.module(), [s.name for s in traced.inputs])
