"""TVM on AMX tiles vs the same precision on AVX-512 vectors, per zoo model; figures, not asserts.

Five TVM packages of each model, loaded in one process and timed in alternating blocks
(``compress.evaluate.side_by_side``), 2 threads:

* fp32 (x86_64-amx: AVX-512 FMA);
* int8 on VNNI (x86_64-avx512: ``vpdpbusd`` zmm) and int8 on tiles (x86_64-amx: ``tdpbusd``);
* bf16 on vectors (x86_64-avx512-bf16: ``vdpbf16ps`` zmm) and bf16 on tiles (x86_64-amx: ``tdpbf16ps``).

Accuracy: cosine vs the fp32 package on 16 held-out random inputs (MiniLM: int8 is dynamic, no calibration).
On a CPU without AMX (no ``amx_int8`` / ``amx_bf16`` in /proc/cpuinfo) it says so and times nothing.

    flock /tmp/edgellm-timing.lock python benchmarks/amx.py [--models kws-cnn,mobilenet-v2,minilm] [--json]
    python benchmarks/amx.py --models benchmarks/resnet18.py:build          # any source edgellm builds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

THREADS = 2
os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = {  # name: (target, build options)
    "fp32": ("x86_64-amx", {}),
    "int8-vnni": ("x86_64-avx512", {"quantize": "int8", "calib": "random"}),
    "int8-amx": ("x86_64-amx", {"quantize": "int8", "calib": "random"}),
    "bf16-avx512": ("x86_64-avx512-bf16", {"precision": "bf16"}),
    "bf16-amx": ("x86_64-amx", {"precision": "bf16"}),
}


def measure(name: str, blocks: int, per_block: int) -> dict:
    from edgellm import api, runtime, source
    from edgellm.errors import EdgeError
    from edgellm.compress.calibration import random_samples
    from edgellm.compress.evaluate import engine_runner, evaluate, side_by_side
    from edgellm.trace import trace

    src = name if ":" in name else f"zoo:{name}"  # a zoo name, or file.py:fn (benchmarks/resnet18.py:build)
    traced = trace(source.load(src))
    names = [s.name for s in traced.inputs]
    held_out = random_samples(traced.inputs, 16, 9000)
    engines, out = {}, {"model": name, "threads": THREADS, "not_built": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for key, (target, opts) in VARIANTS.items():
            try:
                pkg = api.build(src, target, Path(tmp) / f"{key}.edgepkg", backend="tvm", **opts).path
            except EdgeError as err:  # bf16 on tiles: no layer of the model fits them
                out["not_built"][key] = str(err)
                continue
            engines[key] = runtime.load(pkg, threads=THREADS)._engine
        arrays = [held_out[0][n] for n in names]
        p50 = side_by_side({k: (lambda e=e: e.run(arrays)) for k, e in engines.items()}, blocks=blocks, per_block=per_block)
        outs = [s.name for s in traced.outputs]
        cos = {}
        for key in engines:
            if key != "fp32":
                rep = evaluate(engine_runner(engines[key], names), engine_runner(engines["fp32"], names), held_out, outs)
                cos[key] = round(float(rep["outputs"][outs[0]]["cosine_min"]), 6)
    nan = float("nan")
    out["p50_ms"] = {k: round(p50.get(k, nan), 4) for k in VARIANTS}
    out["amx_vs_vectors"] = {"int8": round(p50["int8-amx"] / p50["int8-vnni"], 3),
                             "bf16": round(p50.get("bf16-amx", nan) / p50["bf16-avx512"], 3)}
    out["bf16_amx_vs_fp32"] = round(p50.get("bf16-amx", nan) / p50["fp32"], 3)
    out["cosine_min_vs_fp32"] = cos
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="kws-cnn,mobilenet-v2,minilm")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--per-block", type=int, default=30)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from edgellm.runtime.device import cpu_flags, cpu_model

    if not {"amx_tile", "amx_int8", "amx_bf16"} <= cpu_flags():
        print(json.dumps({"skipped": "this CPU has no AMX (/proc/cpuinfo lacks amx_int8 / amx_bf16)"}) if args.json
              else f"skipped: {cpu_model()} has no AMX (/proc/cpuinfo lacks amx_int8 / amx_bf16)")
        return
    results = [measure(m, args.blocks, args.per_block) for m in args.models.split(",")]
    if args.json:
        print(json.dumps({"cpu": cpu_model(), "results": results}, indent=2))
        return
    print(f"{cpu_model()}: p50 ms, {THREADS} threads, alternating blocks; cosine (min) vs the fp32 package")
    print(f"{'model':<14}" + "".join(f"{k:>13}" for k in VARIANTS) + f"{'i8 amx/vnni':>13}{'bf16 amx/vec':>13}{'bf16amx/f32':>13}")
    for r in results:
        q = r["p50_ms"]
        print(f"{r['model'][-14:]:<14}" + "".join(f"{q[k]:>13.3f}" for k in VARIANTS)
              + f"{r['amx_vs_vectors']['int8']:>13.2f}{r['amx_vs_vectors']['bf16']:>13.2f}{r['bf16_amx_vs_fp32']:>13.2f}")
        print(f"{'':<14}cosine: {r['cosine_min_vs_fp32']}" + "".join(f"; {k} not built: {v}" for k, v in r["not_built"].items()))


if __name__ == "__main__":
    main()
