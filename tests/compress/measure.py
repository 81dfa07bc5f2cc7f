"""Figures for the compression issue: python -m tests.compress.measure [MODEL ...] > figures.json

Per zoo model, 2 threads, OpenVINO: fp32, int8 (static NNCF), int8-weights, structured prune 0.3 (fp32 and int8):
p50 latency measured side by side in this process (alternating blocks), model.bin sizes, int8 kernel share, and
agreement with the original fp32 PyTorch model on held-out samples (real sentences for MiniLM, seeded random
inputs for the random-weight CNNs, where top-1 agreement is the only meaningful accuracy figure).
"""

from __future__ import annotations

import json
import sys
import tempfile
import zlib
from pathlib import Path

from edgellm import backends, source, targets
from edgellm.compress import quantize as q
from edgellm.compress.calibration import load_samples, split
from edgellm.compress.evaluate import engine_runner, evaluate, reference_runner, side_by_side
from edgellm.compress.prune import prune
from edgellm.runtime import engines
from edgellm.trace import trace

HOST = targets.resolve("host")
THREADS = 2


def _build(traced, options):
    with tempfile.TemporaryDirectory() as tmp:
        compiled = backends.get("openvino").compile(traced, HOST, options, Path(tmp))
        members = {n: Path(p).read_bytes() for n, p in compiled.files.items()}
    manifest = {"backend": compiled.info, "target": HOST.to_dict(), "runtime_requires": compiled.runtime_requires}
    engine = engines.get("openvino")(manifest, members, THREADS)
    sizes = {"model.bin": len(members["model.bin"]), "model.xml": len(members["model.xml"]),
             "model.bin_deflated": len(zlib.compress(members["model.bin"], 6))}
    return engine, sizes


def measure(name: str) -> dict:
    src = source.load(f"zoo:{name}")
    names = list(src.inputs)
    if name == "minilm":
        from tests.compress.sentences import minilm_samples

        samples = minilm_samples()
    else:
        traced0 = trace(src)
        samples = load_samples("random", traced0.inputs, random_count=40)
    calib, ev, note = split(samples, None)
    reference = reference_runner(src, names)
    out_names = None
    variants = {}
    pruned_module, prune_report = prune(src.model, src.inputs, 0.3, "structured")
    for tag, module in (("", src.model), ("pruned-", pruned_module)):
        s = source.Source(src.ref, src.kind, src.sha256, module, src.inputs, src.output_names)
        traced = trace(s)
        out_names = [o.name for o in traced.outputs]
        for mode in ([None, "int8", "int8-weights"] if not tag else [None, "int8"]):
            options = {"quantize": mode, "calibration": calib} if mode else {}
            engine, sizes = _build(traced, options)
            label = tag + (mode or "fp32")
            report = evaluate(engine_runner(engine, names), reference, ev, out_names)
            feed = [ev[0][n] for n in names]
            variants[label] = {"engine": engine, "sizes": sizes, "accuracy": report["outputs"],
                               "int8_share": q.int8_share(engine, feed)}
    feed = [ev[0][n] for n in names]
    p50 = side_by_side({k: (lambda e=v["engine"]: e.run(feed)) for k, v in variants.items()}, blocks=6, per_block=20)
    result = {"model": name, "threads": THREADS, "eval": note, "prune_0.3": {k: prune_report[k] for k in
              ("before", "after", "params_ratio", "macs_ratio", "size_ratio") if k in prune_report}}
    if "attention_heads" in prune_report:
        result["prune_0.3"]["attention_heads"] = prune_report["attention_heads"]
    for k, v in variants.items():
        acc = {o: {m: round(x, 5) for m, x in s.items() if m in ("top1", "cosine_mean", "cosine_min")} for o, s in v["accuracy"].items()}
        result[k] = {"p50_ms": round(p50[k], 3), "speedup_vs_fp32": round(p50["fp32"] / p50[k], 2), **v["sizes"],
                     "int8_share": round(v["int8_share"], 3), "accuracy_vs_original_fp32": acc}
    return result


if __name__ == "__main__":
    for model in sys.argv[1:] or ["kws-cnn", "mobilenet-v2", "minilm"]:
        print(json.dumps(measure(model), indent=1), flush=True)
