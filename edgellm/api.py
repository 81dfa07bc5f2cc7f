"""The public Python API. The CLI is a thin layer over these functions.

    import edgellm
    result = edgellm.build("zoo:kws-cnn", target="host", output="kws.edgepkg")
"""

from __future__ import annotations

import platform
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from edgellm import __version__, backends, targets
from edgellm.errors import EdgeError
from edgellm.package import check_output, npz_bytes, write_package
from edgellm.recipe import BuildRecipe
from edgellm.runtime import device
from edgellm.runtime.accuracy import compare
from edgellm.runtime.package import read_manifest, sha256_file

STAGES = ("source", "trace", "compile", "verify", "package")

# progress(stage, seconds, detail): seconds is None when the stage starts
Progress = Callable[[str, "float | None", str], None]


@dataclass
class BuildResult:
    path: Path
    manifest: dict
    seconds: dict[str, float] = field(default_factory=dict)


@contextmanager
def _stage(name: str, progress: Progress | None, seconds: dict, detail: list):
    """Time a stage and report its start and end; ``detail`` collects its one-line summary."""
    if progress:
        progress(name, None, "")
    t0 = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - t0
    if progress:
        progress(name, seconds[name], detail[0] if detail else "")


def _choose_backend(recipe: BuildRecipe, target: targets.Target) -> str:
    if recipe.backend == "auto":
        return target.backends[0]
    if recipe.backend not in backends.KNOWN:
        raise EdgeError(f"unknown backend {recipe.backend!r}", f"known backends: {', '.join(backends.KNOWN)}")
    if recipe.backend not in target.backends:
        raise EdgeError(f"target {target.name} does not allow backend {recipe.backend!r}", f"allowed: {', '.join(target.backends)}")
    return recipe.backend


def _verify(compiled_files: dict, traced, target, backend_info: dict, tolerance: float) -> dict:
    """Run the compiled module here when this machine can, and compare with the fp32 reference."""
    from edgellm.runtime import engines
    from edgellm.runtime.package import check_device

    try:
        check_device({"target": target.to_dict()}, device.cpu_flags())
    except EdgeError as e:
        return {"status": "skipped", "reason": f"{e.problem}; run it on the device with `python -m edgellm.runtime check`"}
    from edgellm.runtime.cuda import NoGPUError

    members = {name: Path(p).read_bytes() for name, p in compiled_files.items()}
    try:
        engine = engines.get(backend_info["name"])({"backend": backend_info, "target": target.to_dict()}, members, device.cpu_count())
    except NoGPUError as e:  # a GPU target on a machine without that GPU
        return {"status": "skipped", "reason": f"{e.problem}; run it on the device with `python -m edgellm.runtime check`"}
    got = engine.run([traced.example_inputs[s.name] for s in traced.inputs])
    stats = {spec.name: compare(traced.reference[spec.name], out) for spec, out in zip(traced.outputs, got)}
    worst = max(s["rel_max_abs"] for s in stats.values())
    if worst > tolerance:
        raise EdgeError(f"the compiled model disagrees with the fp32 reference: error {worst:.3g} of the output scale > tolerance {tolerance:g}",
                        "report this as a compiler bug, or raise --tolerance if the drop is expected")
    return {"status": "passed", "tolerance": tolerance, "rel_max_abs": worst, "outputs": stats}


def build(source: str, target: str | targets.Target = "host", output: str | Path | None = None, *, backend: str = "auto",
          input_shapes: list[str] | dict | None = None, pipeline: str = "default", tolerance: float = 1e-4,
          progress: Progress | None = None) -> BuildResult:
    """source -> trace -> compile -> verify -> package. Writes ``output`` atomically."""
    from edgellm import source as sources
    from edgellm.trace import parse_shapes, trace

    tgt = targets.resolve(target)
    shapes = parse_shapes(input_shapes)
    recipe = BuildRecipe(source=source, target=tgt.name if isinstance(target, str) and target == "host" else str(getattr(target, "name", target)),
                         backend=backend, input_shapes={k: list(v) for k, v in shapes.items()}, pipeline=pipeline, tolerance=tolerance)
    backend_name = _choose_backend(recipe, tgt)
    impl = backends.get(backend_name)
    impl.check(tgt)
    out = check_output(output or f"{Path(source.split(':')[-1] if source.startswith('zoo:') else source.split(':')[0]).stem}.edgepkg")
    seconds: dict[str, float] = {}

    detail: list[str] = []
    with _stage("source", progress, seconds, detail):
        src = sources.load(source)
        detail.append(f"{src.kind} {src.name}" + (f", weights: {src.weights}" if src.weights else ""))
    detail = []
    with _stage("trace", progress, seconds, detail):
        traced = trace(src, shapes)
        detail.append(", ".join(map(str, traced.inputs)) + " -> " + ", ".join(map(str, traced.outputs)))
    with tempfile.TemporaryDirectory(prefix="edgellm-build-") as tmp:
        detail = []
        with _stage("compile", progress, seconds, detail):
            compiled = impl.compile(traced, tgt, {"pipeline": pipeline}, Path(tmp))
            detail.append(f"{backend_name} for {tgt.name}" + (f", pipeline {compiled.info['pipeline']}" if "pipeline" in compiled.info else ""))
        detail = []
        with _stage("verify", progress, seconds, detail):
            verification = _verify(compiled.files, traced, tgt, compiled.info, tolerance)
            detail.append(f"max error {verification['rel_max_abs']:.2g} of output scale (tolerance {tolerance:g})"
                          if verification["status"] == "passed" else f"skipped: {verification['reason']}")
        detail = []
        with _stage("package", progress, seconds, detail):
            members = {name: Path(p).read_bytes() for name, p in compiled.files.items()}
            members["reference.npz"] = npz_bytes({**{f"input.{k}": v for k, v in traced.example_inputs.items()},
                                                  **{f"output.{k}": v for k, v in traced.reference.items()}})
            manifest = write_package(out, {
                "edgellm_version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "recipe": recipe.to_dict(),
                "model": {"name": src.name, "description": src.description, "weights": src.weights},
                "source": {"ref": source, "kind": src.kind, "sha256": src.sha256, **src.info},
                "target": tgt.to_dict(),
                "backend": compiled.info,
                "runtime_requires": compiled.runtime_requires,
                "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in traced.inputs],
                "outputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in traced.outputs],
                "compression": {"prune": None, "quantize": None},
                "verification": verification,
                "build": {"host": platform.machine(), "seconds": {k: round(v, 3) for k, v in seconds.items()}},
            }, members)
            detail.append(f"{out} ({out.stat().st_size / 1e6:.2f} MB)")
    return BuildResult(out, manifest, seconds)


def inspect(path: str | Path) -> dict:
    """The manifest plus the package's own size and sha256."""
    manifest = read_manifest(path)
    return {**manifest, "package": {"path": str(path), "size": Path(path).stat().st_size, "sha256": sha256_file(path)}}
