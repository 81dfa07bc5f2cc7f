"""TVM int8 vs TVM fp32 vs ONNX Runtime (fp32 and its static int8), per zoo model; figures, not asserts.

Only these four engines, in one process, in alternating blocks (``compress.evaluate.side_by_side``):
the full ``edgellm bench`` also runs OpenVINO and PyTorch, whose spinning worker threads take the two
cores from TVM's thread pool between blocks (TVM p90 there is 10-100x its p50). Calibration for both
int8 engines: the same seeded random samples (MiniLM: real sentences when the weights are present;
TVM int8 is dynamic there and does not use them). Accuracy: vs TVM fp32 on 32 held-out inputs.

    flock /tmp/edgellm-bench.lock python benchmarks/tvm_int8.py [--models kws-cnn,mobilenet-v2,minilm] [--json]
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


def measure(name: str, blocks: int, per_block: int) -> dict:
    import onnxruntime as ort
    import torch

    from edgellm import api, runtime, source, targets
    from edgellm.bench import _ort_int8
    from edgellm.compress.calibration import random_samples
    from edgellm.compress.evaluate import engine_runner, evaluate, side_by_side
    from edgellm.trace import trace

    src = source.load(f"zoo:{name}")
    traced = trace(src)
    names = [s.name for s in traced.inputs]
    calib = random_samples(traced.inputs, 32, 1000)
    held_out = random_samples(traced.inputs, 32, 9000)
    if name == "minilm":
        from edgellm.zoo import minilm

        if minilm.model_dir() is not None:
            from tests.compress.sentences import EVAL_SENTENCES, SENTENCES, minilm_samples

            calib, held_out = minilm_samples(SENTENCES), minilm_samples(EVAL_SENTENCES)
    host = targets.host()
    out = {"model": name, "threads": THREADS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # TVM int8 calibrates on the build's seeded random samples (MiniLM: dynamic, no calibration)
        fp32_pkg = api.build(f"zoo:{name}", host, tmp / "fp32.edgepkg", backend="tvm").path
        int8_pkg = api.build(f"zoo:{name}", host, tmp / "int8.edgepkg", backend="tvm", quantize="int8", calib="random").path
        fp32 = runtime.load(fp32_pkg, threads=THREADS)._engine
        int8 = runtime.load(int8_pkg, threads=THREADS)._engine
        out["package_bytes"] = {"fp32": fp32_pkg.stat().st_size, "int8": int8_pkg.stat().st_size}
        import zipfile

        with zipfile.ZipFile(fp32_pkg) as a, zipfile.ZipFile(int8_pkg) as b:
            out["model_so_bytes"] = {"fp32": a.getinfo("model.so").file_size, "int8": b.getinfo("model.so").file_size}
        onnx_path = tmp / "model.onnx"
        torch.onnx.export(src.model, tuple(torch.from_numpy(traced.example_inputs[n]) for n in names), str(onnx_path),
                          input_names=names, dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
        sess = {k: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
                for k, p in (("ort", onnx_path), ("ort-int8", _ort_int8(onnx_path, calib, tmp)))}
        feed = held_out[0]
        arrays = [feed[n] for n in names]
        runners = {"tvm-fp32": lambda: fp32.run(arrays), "tvm-int8": lambda: int8.run(arrays),
                   "ort-fp32": lambda: sess["ort"].run(None, feed), "ort-int8": lambda: sess["ort-int8"].run(None, feed)}
        p50 = side_by_side(runners, blocks=blocks, per_block=per_block)
        outs = [s.name for s in traced.outputs]
        acc = {}
        for key, run in (("tvm-int8", engine_runner(int8, names)),
                         ("ort-int8", lambda f: sess["ort-int8"].run(None, f))):
            rep = evaluate(run, engine_runner(fp32, names), held_out, outs)
            st = rep["outputs"][outs[0]]
            acc[key] = {k: round(float(st[k]), 5) for k in ("top1", "cosine_mean", "cosine_min") if k in st and st[k] is not None}
    out["p50_ms"] = {k: round(v, 4) for k, v in p50.items()}
    out["ratio_int8_to_fp32"] = round(p50["tvm-int8"] / p50["tvm-fp32"], 3)
    out["ratio_tvm_int8_to_ort_int8"] = round(p50["tvm-int8"] / p50["ort-int8"], 3)
    out["size_ratio"] = {"package": round(out["package_bytes"]["int8"] / out["package_bytes"]["fp32"], 3),
                         "model.so": round(out["model_so_bytes"]["int8"] / out["model_so_bytes"]["fp32"], 3)}
    out["accuracy_vs_tvm_fp32"] = acc
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="kws-cnn,mobilenet-v2,minilm")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--per-block", type=int, default=30)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results = [measure(m, args.blocks, args.per_block) for m in args.models.split(",")]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"p50 ms, {THREADS} threads, alternating blocks; accuracy vs TVM fp32 on held-out inputs")
    print(f"{'model':<14}{'tvm fp32':>10}{'tvm int8':>10}{'ort fp32':>10}{'ort int8':>10}{'i8/f32':>8}{'vs ort i8':>10}"
          f"{'pkg x':>7}{'so x':>7}  accuracy")
    for r in results:
        q = r["p50_ms"]
        print(f"{r['model']:<14}{q['tvm-fp32']:>10.3f}{q['tvm-int8']:>10.3f}{q['ort-fp32']:>10.3f}{q['ort-int8']:>10.3f}"
              f"{r['ratio_int8_to_fp32']:>8.2f}{r['ratio_tvm_int8_to_ort_int8']:>10.2f}{r['size_ratio']['package']:>7.2f}"
              f"{r['size_ratio']['model.so']:>7.2f}  {r['accuracy_vs_tvm_fp32']}")


if __name__ == "__main__":
    main()
