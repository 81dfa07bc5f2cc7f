"""PyTorch eager, ONNX Runtime and the edgellm package, side by side in one process.

Same inputs, same thread count, runs interleaved round-robin (so drift in machine load hits every
engine alike), p50/p90 latency and the ratio of each engine to the fastest one. Figures, not
asserts: a benchmark informs, a test decides.

    python benchmarks/peers.py [--models kws-cnn,mobilenet-v2,minilm] [--runs 50] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def engines_for(name: str, threads: int, build_dir: Path, pipeline: str) -> tuple[dict, dict]:
    """{engine: run(inputs) callable} and the inputs, for one zoo model."""
    import onnxruntime as ort
    import torch

    from edgellm import api, runtime, zoo

    spec = zoo.build(name)
    inputs = {k: v.numpy() for k, v in spec.inputs.items()}
    torch.set_num_threads(threads)

    def run_torch(feed, module=spec.module):
        with torch.no_grad():
            return module(*[torch.from_numpy(a) for a in feed.values()])

    buffer = io.BytesIO()
    torch.onnx.export(spec.module, tuple(spec.inputs.values()), buffer, input_names=list(inputs), dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    pkg = api.build(f"zoo:{name}", "host", build_dir / f"{name}.edgepkg", pipeline=pipeline).path
    model = runtime.load(pkg, threads=threads)
    engine = model._engine
    arrays = [inputs[s.name] for s in model.inputs]
    return {
        "pytorch": run_torch,
        "onnxruntime": lambda feed: session.run(None, feed),
        "edgellm-tvm": lambda feed: engine.run(arrays),
    }, {"inputs": inputs, "package_mb": pkg.stat().st_size / 1e6}


def measure(engines: dict, inputs: dict, runs: int, warmup: int) -> dict:
    times = {k: [] for k in engines}
    for _ in range(warmup):
        for run in engines.values():
            run(inputs)
    for _ in range(runs):
        for name, run in engines.items():
            t0 = time.perf_counter()
            run(inputs)
            times[name].append((time.perf_counter() - t0) * 1e3)
    p50 = {k: float(np.percentile(v, 50)) for k, v in times.items()}
    best = min(p50.values())
    return {k: {"p50_ms": p50[k], "p90_ms": float(np.percentile(v, 90)), "ratio_to_best": p50[k] / best} for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="kws-cnn,mobilenet-v2,minilm")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pipeline", default="default", help="TVM CPU pipeline for the edgellm build")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    build_dir = ROOT / "build" / "bench"
    build_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.models.split(","):
        print(f"[bench] {name}: building and warming up ...", file=sys.stderr)
        engines, meta = engines_for(name, args.threads, build_dir, args.pipeline)
        results[name] = {"engines": measure(engines, meta["inputs"], args.runs, args.warmup), "package_mb": meta["package_mb"]}
    if args.json:
        print(json.dumps({"threads": args.threads, "runs": args.runs, "results": results}, indent=2))
        return
    print(f"p50 latency, {args.threads} threads, {args.runs} interleaved runs; ratio = p50 / fastest engine's p50")
    print(f"{'model':<14}{'engine':<14}{'p50 ms':>10}{'p90 ms':>10}{'ratio':>8}")
    for name, r in results.items():
        for engine, e in r["engines"].items():
            print(f"{name:<14}{engine:<14}{e['p50_ms']:>10.2f}{e['p90_ms']:>10.2f}{e['ratio_to_best']:>8.2f}")


if __name__ == "__main__":
    main()
