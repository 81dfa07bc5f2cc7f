"""``python -m edgellm.runtime run|profile|check PKG``: the device-side command line.

argparse, not click: a device has only the runtime.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from edgellm.errors import EdgeError
from edgellm.runtime import load
from edgellm.runtime.profile import format_report


def read_inputs(model, paths: list[str]) -> dict[str, np.ndarray]:
    """Inputs from .npy (one per input, in order, or NAME=file.npy) or one .npz keyed by name."""
    if not paths:
        return model.example_inputs()
    names = [s.name for s in model.inputs]
    if len(paths) == 1 and paths[0].endswith(".npz"):
        try:
            with np.load(paths[0], allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as e:
            raise EdgeError(f"cannot read inputs from {paths[0]}: {e}") from None
    inputs = {}
    for i, item in enumerate(paths):
        name, sep, path = item.partition("=")
        if not sep:
            if i >= len(names):
                raise EdgeError(f"{len(paths)} input files for a model with {len(names)} input(s)")
            name, path = names[i], item
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise EdgeError(f"cannot read input {name!r} from {path}: {e}") from None
    return inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgellm.runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "profile", "check"):
        p = sub.add_parser(name)
        p.add_argument("package")
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--trusted-key", dest="trusted_keys", action="append", default=[], metavar="KEY.pub",
                       help="refuse the package unless signed by this key (repeat for several; adds to $EDGELLM_TRUSTED_KEYS)")
        if name == "run":
            p.add_argument("--input", action="append", default=[], help="x.npy, NAME=x.npy or inputs.npz (default: the package's sample)")
            p.add_argument("-o", "--output", help="write outputs to this .npz")
        if name == "profile":
            p.add_argument("--runs", type=int, default=100)
            p.add_argument("--warmup", type=int, default=10)
            p.add_argument("--per-op", action="store_true")
        if name == "check":
            p.add_argument("--tolerance", type=float, default=None,
                           help="max |error| relative to the output scale [default: the package's own, set at build time]")
    args = parser.parse_args(argv)
    try:
        from edgellm.runtime.lm import LanguageModel

        model = load(args.package, threads=args.threads, trusted_keys=args.trusted_keys)
        if args.command == "run" and isinstance(model, LanguageModel):
            model.run()  # raises: generate instead
        if args.command == "run":
            outputs = model.run(**read_inputs(model, args.input))
            if args.output:
                np.savez(args.output, **outputs)
            summary = {n: {"shape": list(a.shape), "dtype": str(a.dtype), "head": a.ravel()[:5].tolist()} for n, a in outputs.items()}
            print(json.dumps(summary, indent=2) if args.json else "\n".join(f"{n}: {v}" for n, v in summary.items()))
        elif args.command == "profile" and isinstance(model, LanguageModel):
            from edgellm.runtime.profile import format_lm_report

            report = model.profile(runs=min(args.runs, 3))
            print(json.dumps(report, indent=2) if args.json else format_lm_report(report))
        elif args.command == "profile":
            report = model.profile(runs=args.runs, warmup=args.warmup, per_op=args.per_op)
            print(json.dumps(report, indent=2) if args.json else format_report(report))
        else:
            result = model.check_reference(args.tolerance)
            floor = f", cosine {result['cosine_min']:.5f} (floor {result['min_cosine']})" if "min_cosine" in result else ""
            print(json.dumps(result, indent=2) if args.json else
                  f"{'PASS' if result['passed'] else 'FAIL'}: max error {result['max_abs']:.3g} "
                  f"({result['rel_max_abs']:.3g} of the output scale, tolerance {result['tolerance']:g}){floor}"
                  + (f": {result['problem']}" if result.get("problem") else ""))
            return 0 if result["passed"] else 1
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
