"""PyTorch eager, ONNX Runtime, plain OpenVINO and edgellm's packages, side by side in one process.

A thin wrapper over `edgellm bench` (edgellm/bench.py) for the zoo; figures, not asserts.

    python benchmarks/peers.py [--models kws-cnn,mobilenet-v2,minilm] [--runs 50] [--threads 2] [--json] [--html out.html]
"""

import argparse
import json
import sys
from pathlib import Path

from edgellm.bench import bench, format_table, write_html


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="kws-cnn,mobilenet-v2,minilm")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--html")
    args = parser.parse_args()
    out = Path(__file__).resolve().parent.parent / "build" / "bench"
    report = bench([f"zoo:{m}" for m in args.models.split(",")], args.threads, args.runs, args.warmup, out,
                   progress=lambda m: print(f"[bench] {m}", file=sys.stderr))
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    if args.html:
        write_html(report, args.html)


if __name__ == "__main__":
    main()
