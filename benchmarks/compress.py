"""What compression buys per zoo model: TVM packages fp32, prune 0.3, int8, prune 0.3 + int8; figures, not asserts.

The four packages run in one process in alternating blocks (``compress.evaluate.side_by_side``), so the
latency ratios compare like with like. Accuracy is against the unpruned fp32 package (the original model)
on 32 held-out inputs; MiniLM uses real sentences when its weights are present. No fine-tuning: pruned
figures are what pruning alone costs (``--finetune`` is how a user wins accuracy back).

    flock /tmp/edgellm-bench.lock python benchmarks/compress.py [--models kws-cnn,mobilenet-v2,minilm] [--json]
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

VARIANTS = {"fp32": {}, "prune0.3": {"prune": 0.3}, "int8": {"quantize": "int8"},
            "prune0.3+int8": {"prune": 0.3, "quantize": "int8"}}


def held_out_samples(name: str, traced) -> list[dict]:
    from edgellm.compress.calibration import random_samples

    if name == "minilm":
        from edgellm.zoo import minilm

        if minilm.model_dir() is not None:
            from tests.compress.sentences import EVAL_SENTENCES, minilm_samples

            return minilm_samples(EVAL_SENTENCES)
    return random_samples(traced.inputs, 32, 9000)


def measure(name: str, blocks: int, per_block: int) -> dict:
    from edgellm import api, runtime, source, targets
    from edgellm.compress.evaluate import engine_runner, evaluate, side_by_side
    from edgellm.trace import trace

    traced = trace(source.load(f"zoo:{name}"))
    names, outs = [s.name for s in traced.inputs], [s.name for s in traced.outputs]
    held_out = held_out_samples(name, traced)
    host = targets.host()
    result = {"model": name, "threads": THREADS, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        for key, options in VARIANTS.items():
            built = api.build(f"zoo:{name}", host, Path(tmp) / f"{key}.edgepkg", backend="tvm",
                              calib="random" if options else None, **options)
            engines[key] = runtime.load(built.path, threads=THREADS)._engine
            comp = built.manifest.get("compression") or {}
            result["variants"][key] = {"package_bytes": built.path.stat().st_size,
                                       **({"params_x": round(comp["prune"]["params_ratio"], 3), "macs_x": round(comp["prune"]["macs_ratio"], 3)}
                                          if comp.get("prune") else {})}
        arrays = [held_out[0][n] for n in names]
        p50 = side_by_side({k: (lambda e=e: e.run(arrays)) for k, e in engines.items()}, blocks=blocks, per_block=per_block)
        reference = engine_runner(engines["fp32"], names)
        for key, engine in engines.items():
            v = result["variants"][key]
            v["p50_ms"] = round(p50[key], 4)
            v["latency_x_fp32"] = round(p50[key] / p50["fp32"], 3)
            v["size_x_fp32"] = round(v["package_bytes"] / result["variants"]["fp32"]["package_bytes"], 3)
            if key != "fp32":
                st = evaluate(engine_runner(engine, names), reference, held_out, outs)["outputs"][outs[0]]
                v["accuracy"] = {k: round(float(st[k]), 4) for k in ("top1", "cosine_mean", "cosine_min")
                                 if st.get(k) is not None}
    return result


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
    print(f"TVM packages, p50 ms, {THREADS} threads, alternating blocks; accuracy vs fp32 on held-out inputs, no fine-tuning")
    print(f"{'model':<14}{'variant':<15}{'p50 ms':>9}{'x fp32':>8}{'size x':>8}{'MACs x':>8}  accuracy")
    for r in results:
        for key, v in r["variants"].items():
            print(f"{r['model']:<14}{key:<15}{v['p50_ms']:>9.3f}{v['latency_x_fp32']:>8.2f}{v['size_x_fp32']:>8.3f}  "
                  f"{v.get('accuracy', '')}")


if __name__ == "__main__":
    main()
