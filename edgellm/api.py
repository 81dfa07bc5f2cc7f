"""The public Python API. The CLI is a thin layer over these functions.

    import edgellm
    result = edgellm.build("zoo:kws-cnn", target="host", output="kws.edgepkg")
"""

from __future__ import annotations

import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from edgellm import __version__, backends, crash_guard, targets
from edgellm import precision as precisions  # build()'s keyword argument is named precision
from edgellm.build_result import BuildResult, Progress, _stage
from edgellm.errors import EdgeError
from edgellm.package import check_output, narrowed, npz_bytes, write_package
from edgellm.recipe import BuildRecipe, Recipe  # noqa: F401  (edgellm.BuildRecipe, edgellm.Recipe)
from edgellm.recipe import make as make_recipe
from edgellm.runtime import device
from edgellm.runtime.accuracy import compare, meets
from edgellm.runtime.package import read_manifest, read_package, read_signature, sha256_file

STAGES = ("source", "trace", "compile", "verify", "package")


def _local_engine(compiled, target: targets.Target, threads: int | None = None):
    """(engine, None) running the compiled files on this machine (on ``threads``, default all cores), or (None, why
    not) when it is not the device."""
    from edgellm.runtime import engines
    from edgellm.runtime.cuda import NoGPUError
    from edgellm.runtime.package import check_device

    where = "run it on the device with `python -m edgellm.runtime check` or `edgellm verify`"
    try:
        check_device({"target": target.to_dict()}, device.cpu_flags())
    except EdgeError as e:
        return None, f"{e.problem}; {where}"
    members = {name: Path(p).read_bytes() for name, p in compiled.files.items()}
    try:
        return engines.get(compiled.info["name"])({"backend": compiled.info, "target": target.to_dict()}, members, threads or device.physical_cores()), None
    except NoGPUError as e:  # a GPU target on a machine without that GPU
        return None, f"{e.problem}; {where}"


def _check(engine, traced, contract: dict) -> dict:
    """Compare the compiled model's outputs on the example inputs with the fp32 reference.

    The error is relative to max(1, output scale); an output whose scale is below 1 (a detector's map fed noise,
    ~1e-6 everywhere) would pass any result that way, so such an output must also keep the reference's direction:
    cosine >= 1 - tolerance. An all-zero reference is refused when traced (edgellm/trace.py)."""
    got = engine.run([traced.example_inputs[s.name] for s in traced.inputs])
    stats = {spec.name: compare(traced.reference[spec.name], out) for spec, out in zip(traced.outputs, got)}
    small = any(0 < s["scale"] < 1 for s in stats.values())
    # 0.9999 at fp32's 1e-4; an int8 build's looser tolerance loosens it alike
    contract = {**contract, **({"small_scale_min_cosine": 1 - contract["tolerance"]} if small else {})}
    passed, problem = meets(stats, contract)
    return {"status": "passed" if passed else "failed", **contract, "rel_max_abs": max(s["rel_max_abs"] for s in stats.values()),
            "cosine_min": min(s["cosine"] for s in stats.values()), **({"problem": problem} if problem else {}), "outputs": stats}


def _p50_ms(engine, traced, runs: int = 20, warmup: int = 3) -> float:
    from edgellm.runtime.profile import time_runs

    arrays = [traced.example_inputs[s.name] for s in traced.inputs]
    return float(sorted(time_runs(lambda: engine.run(arrays), runs, warmup))[runs // 2] * 1e3)


def _try_backend(name, traced, tgt, options, workdir, contract, measure, stage, label=None) -> dict:
    """Compile with one backend, check it against the reference here, and time it when asked. ``label``: the
    candidate's name in the stage lines (backend or precision auto: several are built)."""
    trial: dict = {"backend": name, "precision": options.get("precision") or "fp32", "contract": contract}
    impl = backends.get(name)
    detail: list[str] = []
    label = label or (name if measure else None)
    with stage(f"compile {label}" if label else "compile", detail, name):
        impl.check(tgt)
        trial["compiled"] = compiled = impl.compile(traced, tgt, options, workdir)
        detail.append(f"{name} for {tgt.name}" + (f", pipeline {compiled.info['pipeline']}" if "pipeline" in compiled.info else ""))
    detail = []
    with stage(f"verify {label}" if label else "verify", detail, name):
        engine, why_not = _local_engine(compiled, tgt)
        trial["engine"] = engine  # kept for the evaluate stage: no second load of the same code
        trial["verification"] = ({"status": "skipped", "reason": why_not, **contract} if engine is None
                                 else _check(engine, traced, contract))
        v = trial["verification"]
        detail.append(f"skipped: {why_not}" if engine is None else
                      f"{v['status']}: max error {v['rel_max_abs']:.2g} of output scale (tolerance {contract['tolerance']:g})"
                      + (f", cosine {v['cosine_min']:.5f} (floor {contract['min_cosine']})" if "min_cosine" in contract else "")
                      + (f"; {v['problem']}" if v.get("problem") else ""))
    if measure and engine is not None and trial["verification"]["status"] == "passed":
        detail = []
        with stage(f"measure {name}", detail, name):
            trial["p50_ms"] = _p50_ms(engine, traced)
            detail.append(f"p50 {trial['p50_ms']:.3f} ms with {device.physical_cores()} threads")
    return trial


def _evaluate_trial(trial: dict, plan, traced, stage, label: str) -> None:
    """--precision auto: the candidate's agreement with the original fp32 model on the eval set (not when this machine
    cannot run it, or it failed verification)."""
    from edgellm.compress.evaluate import check_drop

    if trial.get("engine") is None or trial["verification"]["status"] != "passed":
        return
    detail: list[str] = []
    with stage(f"evaluate {label}", detail, trial["backend"]):
        report = plan.measure(trial["engine"], traced)
        worst = check_drop(report, None)
        stats = report["outputs"][worst["output"]]
        trial["evaluation"] = {"status": "measured", "against": "the original fp32 model", "note": plan._note, **report,
                               "drop_pp": worst["drop_pp"]}
        trial["drop_pp"] = worst["drop_pp"]
        shown = f"top-1 agreement {stats['top1']:.1%}" if worst["measure"] == "top-1 agreement" else f"mean cosine {stats['cosine_mean']:.5f}"
        detail.append(f"{shown} vs fp32 on {report['samples']} eval samples: drop {worst['drop_pp']:.2f} pp")


def _time_trials(trials: list[dict], traced, tgt) -> str:
    """--precision auto: p50 of every correct candidate, side by side in this process (alternating blocks, so drift
    hits all alike); nothing when this machine cannot run the target's code."""
    from edgellm.compress.evaluate import side_by_side

    runnable = [t for t in trials if t.get("engine") is not None and t["verification"]["status"] == "passed"]
    if not runnable:
        return f"not measured: this machine cannot run {tgt.name}'s code"
    arrays = [traced.example_inputs[s.name] for s in traced.inputs]
    p50 = side_by_side({i: (lambda e=t["engine"]: e.run(arrays)) for i, t in enumerate(runnable)}, blocks=6, per_block=15)
    for i, t in enumerate(runnable):
        t["p50_ms"] = p50[i]
    return ", ".join(f"{t['backend']} {t['precision']} {t['p50_ms']:.3f} ms" for t in runnable) + f" ({device.physical_cores()} threads)"


def _measure_threads(chosen: dict, traced, tgt) -> tuple[dict | None, str]:
    """(the manifest's ``threads`` record, a line for the stage) when this machine ran the chosen package's code (the
    condition under which --backend / --precision auto time it): p50 of a call at 1, 2, 4 .. physical cores threads,
    so a load on this CPU runs at the fastest (runtime/threads.py)."""
    from edgellm.runtime import threads

    if chosen.get("engine") is None or chosen["verification"]["status"] != "passed":
        return None, "not measured: this machine did not run the package"
    arrays = [traced.example_inputs[s.name] for s in traced.inputs]

    def make_run(k: int):
        engine = _local_engine(chosen["compiled"], tgt, k)[0]
        return lambda: engine.run(arrays)

    rec = threads.measure(make_run, threads.MODEL_WORK)
    return rec, threads.summary(rec)


def _choose(trials: list[dict], auto: bool) -> tuple[dict, dict | None]:
    """The trial to package, and (for auto) the comparison that decided it."""
    good = [t for t in trials if t.get("verification", {}).get("status") in ("passed", "skipped")]
    if not good:
        reasons = "; ".join(f"{t['backend']}: {t.get('error') or 'error %.3g of the output scale' % t['verification']['rel_max_abs']}" for t in trials)
        raise EdgeError(f"no backend produced a model that matches the fp32 reference ({reasons})",
                        "report this as a compiler bug, or raise --tolerance if the drop is expected")
    timed = [t for t in good if "p50_ms" in t]
    chosen = min(timed, key=lambda t: t["p50_ms"]) if timed else good[0]
    if not auto:
        return chosen, None
    why = "fastest correct backend measured on this machine" if timed else "first allowed backend (this machine is not the device: not measured)"
    table = [{"backend": t["backend"], **({"p50_ms": t["p50_ms"]} if "p50_ms" in t else {}),
              "status": t.get("verification", {}).get("status", "failed"),
              **({"rel_max_abs": t["verification"]["rel_max_abs"]} if "rel_max_abs" in t.get("verification", {}) else {}),
              **({"error": t["error"]} if "error" in t else {})} for t in trials]
    return chosen, {"chosen": chosen["backend"], "why": why, "threads": device.physical_cores(), "trials": table}


def build(source: str | Recipe, target: str | targets.Target | Recipe = "host", output: str | Path | None = None, *,
          progress: Progress | None = None, backend: str | None = None, input_shapes: list[str] | dict | None = None,
          input_values: list[str] | dict | None = None, sample: str | Path | None = None,
          pipeline: str | None = None, tolerance: float | None = None, prune: float | None = None, prune_mode: str | None = None,
          prune_importance: str | None = None, finetune=None, quantize: str | None = None, calib: str | None = None,
          eval: str | None = None, max_drop: float | None = None, tune: int | None = None, tuning_db: str | Path | None = None,
          tune_budget: float | None = None, tune_remote: str | None = None, fp16: bool | None = None, precision: str | None = None, weights: str | None = None,
          max_seq_len: int | None = None, verbose: bool = False, **fields) -> BuildResult:
    """source (-> prune) -> trace (-> samples) -> compile -> verify (-> measure, for backend="auto") (-> evaluate)
    -> package. Writes ``output`` atomically, and nothing when any stage fails.

    ``build(source, recipe)`` builds what the recipe says (``Recipe.load(package)`` rebuilds a package);
    the keyword arguments are the recipe's fields (backend, input_shapes, pipeline, tolerance, prune,
    prune_mode, prune_importance, finetune, quantize, calib, eval, max_drop, tune, tuning_db, tune_budget, tune_remote,
    precision; fp16=True for precision="fp16"; ``fields``: any other Recipe field), those given (not None) applied
    to the recipe given or to a new one. ``finetune`` may also be a function fn(module) -> module.

    What TVM, ONNX Runtime, OpenVINO and NNCF print goes to a log file (edgellm/build_log.py), and their exceptions
    become one EdgeError naming the stage and that file; ``verbose=True`` lets both through instead."""
    from edgellm.build_log import BuildLog

    log = BuildLog(verbose)
    try:
        with log.captured():
            return _build(source, target, output, progress, log, backend=backend, input_shapes=input_shapes,
                          input_values=input_values, sample=sample, pipeline=pipeline,
                          tolerance=tolerance, prune=prune, prune_mode=prune_mode, prune_importance=prune_importance, finetune=finetune,
                          quantize=quantize, calib=calib, eval=eval, max_drop=max_drop, tune=tune, tuning_db=tuning_db,
                          tune_budget=tune_budget, tune_remote=tune_remote, fp16=fp16, precision=precision, weights=weights, max_seq_len=max_seq_len, **fields)
    finally:
        log.finish()


def _build(source, target, output, progress, log, *, backend, input_shapes, input_values, sample, pipeline, tolerance, prune, prune_mode, prune_importance,
           finetune, quantize, calib, eval, max_drop, tune, tuning_db, tune_budget, tune_remote, fp16, precision, weights, max_seq_len,
           **fields) -> BuildResult:
    from edgellm import source as sources
    from edgellm.compress.plan import Plan
    from edgellm.trace import trace

    given = dict(backend=backend, input_shapes=input_shapes, input_values=input_values, sample=sample, pipeline=pipeline, tolerance=tolerance, prune=prune, prune_mode=prune_mode,
                 prune_importance=prune_importance, finetune=finetune, quantize=quantize, calib=calib, eval=eval, max_drop=max_drop,
                 tune=tune, tuning_db=tuning_db, tune_budget=tune_budget, tune_remote=tune_remote, fp16=fp16, precision=precision, weights=weights,
                 max_seq_len=max_seq_len)
    recipe, finetune_fn = make_recipe(source, target, **{k: v for k, v in given.items() if v is not None}, **fields)
    if recipe.is_language_model:  # a .gguf file, a transformers folder, zoo:smollm2-135m: edgellm/llm/build.py
        from edgellm.llm.build import TOLERANCE, build_lm

        return build_lm(recipe.source, recipe.resolved_target, output, weights=recipe.weights or "fp32", max_seq_len=recipe.max_seq_len,
                        progress=progress, max_drop=recipe.max_drop, tolerance=tolerance if tolerance is not None else
                        (recipe.tolerance if recipe.tolerance != Recipe.tolerance else TOLERANCE))
    auto_precision = recipe.precision == "auto"
    # --precision auto calibrates its int8 candidates on random inputs unless --calib is given (the note says so)
    plan = Plan(recipe.prune, recipe.prune_mode, recipe.prune_importance, recipe.quantize,
                recipe.calib or ("random" if auto_precision else None), recipe.eval,
                recipe.max_drop, finetune_fn or recipe.finetune, auto=auto_precision)
    tgt = recipe.resolved_target
    shapes = {k: tuple(v) for k, v in recipe.input_shapes.items()}
    candidates = recipe.trials()  # (backend, precision) pairs
    auto = recipe.backend == "auto" or auto_precision  # several candidates: one failing does not end the build
    if not auto:
        backends.get(candidates[0][0]).check(tgt)
        plan.check_backend(candidates[0][0])
    ref = recipe.source
    out = check_output(output or f"{Path(ref.split(':')[-1] if ref.startswith('zoo:') else ref.split(':')[0]).stem}.edgepkg")
    seconds: dict[str, float] = {}

    def stage(name, detail, backend=None):
        return _stage(name, progress, seconds, detail, log, backend)

    detail: list[str] = []
    with stage("source", detail):
        src = sources.load(recipe.source)
        detail.append(f"{src.kind} {src.name}" + (f", weights: {src.weights}" if src.weights else ""))
        plan.keep_reference(src)  # the original fp32 model: what compression is evaluated against
    if plan.prune is not None:
        detail = []
        with stage("prune", detail):
            detail.append(plan.prune_source(src, round_to=max(tgt.vector_bits // 32, 1)))  # full fp32 SIMD vectors
    detail = []
    with stage("trace", detail):
        traced = trace(src, shapes, recipe.input_values, recipe.sample)
        detail.append(", ".join(map(str, traced.inputs)) + " -> " + ", ".join(map(str, traced.outputs)))
    if plan.active:
        detail = []
        with stage("samples", detail):
            detail.append(plan.load_samples(traced))
    with tempfile.TemporaryDirectory(prefix="edgellm-build-") as tmp:
        crash_guard.note("scratch", tmp)
        crash_guard.note("output", str(out))
        trials = []
        for name, prec in candidates:
            label = f"{name} {prec}" if auto_precision else name
            workdir = Path(tmp) / label.replace(" ", "-")
            workdir.mkdir()
            quantize = "int8" if prec == "int8" else recipe.quantize
            try:
                plan.check_backend(name, quantize)
                trials.append(_try_backend(name, traced, tgt, {"pipeline": recipe.pipeline, "tune": recipe.tune, "tuning_db": recipe.tuning_db,
                                                          "tune_budget": recipe.tune_budget, "tune_remote": recipe.tune_remote, "tune_progress": getattr(progress, "note", None),
                                                          "precision": "fp32" if prec == "int8" else prec, **plan.options(quantize)}, workdir,
                                           precisions.contract(prec, plan.tolerance(recipe.tolerance, quantize), traced.outputs),
                                           recipe.backend == "auto" and not auto_precision, stage, label if auto_precision else None))
                trials[-1]["precision"] = prec
                if auto_precision:
                    _evaluate_trial(trials[-1], plan, traced, stage, label)
            except EdgeError as e:
                if not auto:
                    raise
                trials.append({"backend": name, "precision": prec, "error": e.problem})
                if hasattr(progress, "failed"):
                    progress.failed(label, e.problem)
        if auto_precision:
            detail = []
            with stage("measure", detail):
                detail.append(_time_trials(trials, traced, tgt))
            chosen, precision_choice = precisions.choose(trials, recipe.max_drop, tgt.name, device.physical_cores())
            comparison = None
            plan.quantize = "int8" if chosen["precision"] == "int8" else plan.quantize
            plan.evaluation = chosen.get("evaluation")
            if hasattr(progress, "note"):
                progress.note(precisions.summary(precision_choice))
        else:
            chosen, comparison = _choose(trials, recipe.backend == "auto")
            precision_choice = None
        compiled, verification = chosen["compiled"], chosen["verification"]
        if plan.active and not auto_precision:
            detail = []
            with stage("evaluate", detail):
                detail.append(plan.evaluate(chosen.get("engine"), traced))
        detail = []
        with stage("threads", detail):
            thread_record, line = _measure_threads(chosen, traced, tgt)
            detail.append(line)
        detail = []
        with stage("package", detail):
            members = {name: Path(p).read_bytes() for name, p in compiled.files.items()}
            members["reference.npz"] = npz_bytes({**{f"input.{k}": narrowed(v) for k, v in traced.example_inputs.items()},
                                                  **{f"output.{k}": v for k, v in traced.reference.items()}})
            manifest = write_package(out, {
                "edgellm_version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "recipe": recipe.to_dict(),
                "model": {"name": src.name, "description": src.description, "weights": src.weights},
                "source": {"ref": recipe.source, "kind": src.kind, "sha256": src.sha256, **src.info},
                "target": tgt.to_dict(),
                "backend": compiled.info,
                "backend_choice": comparison,
                "precision": {"name": chosen["precision"], "contract": chosen["contract"]},
                "precision_choice": precision_choice,
                "runtime_requires": compiled.runtime_requires,
                "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in traced.inputs],
                "outputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in traced.outputs],
                "compression": plan.manifest(compiled.info),
                "verification": verification,
                **({"threads": thread_record} if thread_record else {}),
                "build": {"host": platform.machine(), "seconds": {k: round(v, 3) for k, v in seconds.items()}},
            }, members)
            detail.append(f"{out} ({out.stat().st_size / 1e6:.2f} MB)" + (f", backend {chosen['backend']}: {comparison['why']}" if comparison else "")
                          + (f", {chosen['backend']} {chosen['precision']}: {precision_choice['why']}" if precision_choice else ""))
    return BuildResult(out, manifest, seconds)


def inspect(path: str | Path, trusted_keys=None) -> dict:
    """The manifest plus the package's own size, sha256 and signature (None: unsigned). With ``trusted_keys`` the whole
    package is verified, signature included, and ``signature.verified`` is True (or a PackageError is raised)."""
    manifest = read_manifest(path)
    sig = read_signature(path)
    signature = None if sig is None else {"algorithm": sig["algorithm"], "key_fingerprint": sig["key_fingerprint"], "verified": None}
    if trusted_keys:
        read_package(path, trusted_keys)
        signature["verified"] = True
    return {**manifest, "package": {"path": str(path), "size": Path(path).stat().st_size, "sha256": sha256_file(path),
                                    "signature": signature}}
